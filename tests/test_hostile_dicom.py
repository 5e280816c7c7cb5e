"""Hostile and broken DICOM input against a live ``jmix-agent run`` process.

Each test starts its own agent: no peers, studies held in incoming/ for an hour, the SCP
on a free 127.0.0.1 port. The tests then act as users and broken peers would: files
copied into the drop folder, DCMTK's storescu and echoscu, pynetdicom as SCU, and a
raw-socket peer that stops in the middle of an instance. Nothing is sent anywhere but
127.0.0.1. Run with ``-s`` to see the tallies of the two bulk passes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dicom_faults import (
    IDENTIFYING_UIDS,
    SCP_AE_TITLE,
    LiveAgent,
    RawAssociation,
    bundled_file,
    bundled_files,
    bundled_root,
    c_store_command,
    dataset_elements,
    echoscu,
    encode_dataset,
    has_short_value,
    invalid_identifiers,
    start_live_agent,
    storescu,
    storescu_own_syntax,
    wait_until,
    write_raw_instance,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, _config

from agent.dicom.inspect import MEDIA_STORAGE_DIRECTORY, PART10_PREFIX
from agent.dicom.scp import (
    STATUS_CANNOT_DECODE,
    STATUS_INVALID_IDENTIFIERS,
    STATUS_SUCCESS,
)
from agent.ingest.watch import TEMP_SUFFIXES, _label

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

STORAGE_SOP_CLASSES = frozenset(
    str(context.abstract_syntax) for context in AllStoragePresentationContexts
)
VERIFICATION = "1.2.840.10008.1.1"
# "Error: Cannot understand" (PS3.4 table B.2-1): the class of every status for a dataset
# the agent cannot use.
CANNOT_UNDERSTAND = range(0xC000, 0xD000)
# Seconds the drop-folder watcher waits before quarantining a file that looks cut short.
DROP_INCOMPLETE_SECONDS = 3.0
DROP_WAIT_SECONDS = 120.0


@pytest.fixture
def live_agent(tmp_path: Path) -> Iterator[Callable[..., LiveAgent]]:
    """Return a function that starts an agent, and stop every agent it started."""
    agents: list[LiveAgent] = []

    def start(**options: Any) -> LiveAgent:
        agent = start_live_agent(tmp_path / f"agent{len(agents)}", **options)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()
        print(f"--- agent log (last 3000 characters)\n{agent.log_text()[-3000:]}")


# -- 1. every bundled file through the drop folder -------------------------------------


@dataclass
class DropRun:
    """What one batch of files dropped into a live agent's drop folder turned into."""

    agent: LiveAgent
    offered: dict[str, Path]
    """Path relative to the drop folder -> the original file it is a copy of."""
    skipped: set[str]
    """Offered paths the watcher must ignore (hidden or temporary names)."""
    left_in_folder: dict[str, bytes]
    reasons: dict[str, dict[str, Any]]
    """Path relative to the drop folder -> the contents of its quarantine reason file."""
    quarantined: dict[str, Path]
    running_after: bool
    exit_code: int | None = None
    received_count: int = 0
    """Instances stored, as the agent's instances_received audit records count them."""
    log: str = ""

    @property
    def stored(self) -> set[str]:
        return set(self.offered) - set(self.reasons) - set(self.left_in_folder)


def is_skipped_name(relative: str) -> bool:
    """Return True for a name the watcher documents as skipped (hidden or temporary)."""
    parts = Path(relative).parts
    return any(part.startswith(".") for part in parts) or parts[-1].endswith(TEMP_SUFFIXES)


def write_without_preamble(source: Path, target: Path) -> Path:
    """Write a copy of ``source`` with a new SOP Instance UID and no preamble or prefix."""
    dataset = dcmread(source)
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    buffer = DicomBytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    target.write_bytes(buffer.getvalue()[len(PART10_PREFIX) :])
    return target


@pytest.fixture(scope="module")
def drop_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DropRun]:
    """Drop every bundled file, plus a few extra cases, into a live agent in one batch."""
    root = tmp_path_factory.mktemp("drop")
    agent = start_live_agent(root / "agent", watch=True, incomplete_seconds=DROP_INCOMPLETE_SECONDS)
    try:
        yield run_drop_batch(agent, root)
    finally:
        agent.stop()
        print(f"--- agent log (last 3000 characters)\n{agent.log_text()[-3000:]}")


def run_drop_batch(agent: LiveAgent, root: Path) -> DropRun:
    # Step 1: the batch. Every bundled file keeps its relative path, because several
    # share a name (README.txt, DICOMDIR). The extras cover a Part 10 file without
    # preamble and the two kinds of names the watcher skips.
    ct_small = bundled_file("CT_small.dcm")
    extras = root / "extras"
    extras.mkdir()
    offered = {f"pydicom/{path.relative_to(bundled_root())}": path for path in bundled_files()}
    offered["extras/CT_small-no-preamble.dcm"] = write_without_preamble(
        ct_small, extras / "no-preamble.dcm"
    )
    offered["extras/.hidden-CT_small.dcm"] = ct_small
    offered["extras/CT_small.dcm.part"] = ct_small
    skipped = {relative for relative in offered if is_skipped_name(relative)}

    # Step 2: copy it outside the folder, then move it in with one rename, so the
    # watcher never sees a file that is still being copied.
    staging = root / "staging"
    for relative, source in offered.items():
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    os.rename(staging, agent.site.drop / "batch")
    offered = {f"batch/{relative}": source for relative, source in offered.items()}
    skipped = {f"batch/{relative}" for relative in skipped}

    # Step 3: wait until every file the watcher does not skip has left the folder, and
    # its audit records are written.
    def left_in_folder() -> dict[str, bytes]:
        return {
            str(path.relative_to(agent.site.drop)): path.read_bytes()
            for path in agent.site.drop.rglob("*")
            if path.is_file()
        }

    wait_until(lambda: set(left_in_folder()) <= skipped, DROP_WAIT_SECONDS)
    reasons: dict[str, dict[str, Any]] = {}
    quarantined: dict[str, Path] = {}
    for reason_file in agent.watch_quarantine.glob("*.reason.json"):
        details = json.loads(reason_file.read_text())
        reasons[details["path"]] = details
        quarantined[details["path"]] = reason_file.with_name(
            reason_file.name.removesuffix(".reason.json")
        )
    run = DropRun(
        agent=agent,
        offered=offered,
        skipped=skipped,
        left_in_folder=left_in_folder(),
        reasons=reasons,
        quarantined=quarantined,
        running_after=False,
    )

    def received_count() -> int:
        return sum(
            record["count"]
            for record in agent.records("instances_received")
            if record["source"] == "watch-drop"
        )

    wait_until(lambda: received_count() >= len(run.stored), 30)
    run.received_count = received_count()
    run.running_after = agent.is_running()
    run.exit_code = agent.stop()
    run.log = agent.log_text()
    print(
        f"\ndrop folder: offered {len(offered)}, stored {len(run.stored)}, "
        f"quarantined {len(reasons)}, skipped {len(run.left_in_folder)} "
        f"(expected skipped: {len(skipped)})"
    )
    return run


def expected_drop_rejection(path: Path) -> str | None:
    """Classify a file with pydicom alone: None if it is a storable instance.

    Otherwise return the kind of problem: "no file meta" (also for non-DICOM files),
    "DICOMDIR", "truncated" or "invalid UID".
    """
    try:
        dataset = dcmread(path, force=True)
    except Exception:
        return "no file meta"
    meta = getattr(dataset, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        return "no file meta"
    if meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
        return "DICOMDIR"
    if has_short_value(dataset):
        return "truncated"
    if invalid_identifiers(dataset):
        return "invalid UID"
    return None


def test_drop_folder_daemon_keeps_running(drop_run: DropRun) -> None:
    assert drop_run.running_after
    assert drop_run.exit_code == 0
    assert "Traceback" not in drop_run.log


def test_drop_folder_every_file_accounted(drop_run: DropRun) -> None:
    offered = set(drop_run.offered)
    quarantined = set(drop_run.reasons)
    left = set(drop_run.left_in_folder)

    assert left == drop_run.skipped
    assert quarantined <= offered
    assert not quarantined & left
    # The stored count is the agent's own: the sum of its instances_received records.
    assert drop_run.received_count + len(quarantined) + len(left) == len(offered)


def test_drop_folder_skipped_files_untouched(drop_run: DropRun) -> None:
    for relative in drop_run.skipped:
        original = drop_run.offered[relative].read_bytes()
        assert drop_run.left_in_folder[relative] == original, relative


def test_drop_folder_stored_bytes_identical(drop_run: DropRun) -> None:
    # Files with the same Study and SOP Instance UIDs share one spool path, and the one
    # taken last overwrites the others, so each spool file must equal one of its group.
    groups: dict[tuple[str, str], list[str]] = {}
    for relative in sorted(drop_run.stored):
        dataset = dcmread(drop_run.offered[relative], force=True, stop_before_pixels=True)
        key = (str(dataset.StudyInstanceUID), str(dataset.SOPInstanceUID))
        groups.setdefault(key, []).append(relative)

    mismatched = []
    for (study_uid, sop_instance_uid), members in groups.items():
        stored = drop_run.agent.stored_path(study_uid, sop_instance_uid)
        candidates = [expected_spool_bytes(drop_run.offered[member]) for member in members]
        if not stored.exists() or stored.read_bytes() not in candidates:
            mismatched.append(members)

    print(
        f"\ndrop folder: {len(drop_run.stored)} stored as {len(groups)} spool files; "
        f"{len(drop_run.stored) - len(groups)} overwrote a file with the same UIDs"
    )
    assert mismatched == []
    assert len(drop_run.agent.stored_files()) == len(groups)
    assert drop_run.agent.temporary_files() == []


def expected_spool_bytes(original: Path) -> bytes:
    """Return the bytes the watcher must store: the file, with a preamble if it had none."""
    data = original.read_bytes()
    return data if data[128:132] == b"DICM" else PART10_PREFIX + data


def test_drop_folder_preamble_added(drop_run: DropRun) -> None:
    relative = "batch/extras/CT_small-no-preamble.dcm"
    original = drop_run.offered[relative]
    dataset = dcmread(original, force=True, stop_before_pixels=True)
    stored = drop_run.agent.stored_path(dataset.StudyInstanceUID, dataset.SOPInstanceUID)

    assert relative in drop_run.stored
    assert stored.read_bytes() == PART10_PREFIX + original.read_bytes()


def test_drop_folder_quarantine_has_reason_and_audit(drop_run: DropRun) -> None:
    audit = {
        record["path"]: record
        for record in drop_run.agent.records("file_rejected")
        if record["source"] == "watch-drop"
    }

    assert len(audit) == len(drop_run.reasons)
    for relative, details in drop_run.reasons.items():
        original = drop_run.offered[relative]
        quarantined = drop_run.quarantined[relative]
        assert quarantined.read_bytes() == original.read_bytes(), relative
        assert details["reason"], relative
        assert details["bytes"] == original.stat().st_size, relative
        # Names may identify patients, so the quarantine name is a label, never the name.
        assert Path(relative).name not in quarantined.name, relative
        assert audit[_label(relative)]["reason"] == details["reason"], relative


# What the reason names, by the kind of problem expected_drop_rejection finds. A file
# without file meta is rejected before its content is read, whatever else is wrong.
REASON_FRAGMENTS = {
    "no file meta": ("file meta information",),
    "truncated": ("more bytes than the file has",),
    "invalid UID": IDENTIFYING_UIDS,
    # Any reason passes here. test_drop_folder_dicomdir_reason_names_it checks more.
    "DICOMDIR": ("",),
}


def test_drop_folder_rejections_match_independent_check(drop_run: DropRun) -> None:
    expected = {
        relative: expected_drop_rejection(source)
        for relative, source in drop_run.offered.items()
        if relative not in drop_run.skipped
    }
    expected_rejected = {relative for relative, kind in expected.items() if kind}
    tally = Counter(kind for kind in expected.values() if kind)
    print(f"\ndrop folder: quarantined by kind: {dict(tally)}")

    assert set(drop_run.reasons) == expected_rejected
    for relative in expected_rejected:
        reason = drop_run.reasons[relative]["reason"]
        fragments = REASON_FRAGMENTS[str(expected[relative])]
        assert any(fragment in reason for fragment in fragments), (relative, reason)


def test_drop_folder_dicomdir_reason_names_it(drop_run: DropRun) -> None:
    reasons = {
        relative: details["reason"]
        for relative, details in drop_run.reasons.items()
        if expected_drop_rejection(drop_run.offered[relative]) == "DICOMDIR"
    }

    assert reasons
    for relative, reason in reasons.items():
        assert "DICOMDIR" in reason, (relative, reason)


# -- 2. every parsable bundled file through storescu -----------------------------------


@dataclass
class StorescuTally:
    """What storescu's runs turned into, by bundled file name."""

    stored: list[str] = field(default_factory=list)
    stored_keys: set[tuple[str, str]] = field(default_factory=set)
    failed: dict[int, list[str]] = field(default_factory=dict)
    not_sent: dict[str, str] = field(default_factory=dict)
    """File name -> the last error line storescu printed before giving up on it."""


def storescu_candidates() -> list[Path]:
    """Return the bundled files that pydicom reads and whose SOP class is a storage class."""
    candidates = []
    for path in bundled_files():
        try:
            dataset = dcmread(path)
        except Exception:
            continue
        if str(dataset.get("SOPClassUID", "")) in STORAGE_SOP_CLASSES:
            candidates.append(path)
    return candidates


def test_storescu_every_bundled_file(live_agent: Callable[..., LiveAgent]) -> None:
    agent = live_agent()
    candidates = storescu_candidates()
    tally = StorescuTally()
    values_changed: list[str] = []
    wrong_status: list[str] = []
    stored_on_failure: list[str] = []
    wrong_audit: list[str] = []

    # One storescu run per file, so a failing file stops nothing else, and each status
    # belongs to exactly one file.
    for path in candidates:
        name = str(path.relative_to(bundled_root()))
        dataset = dcmread(path, stop_before_pixels=True)
        invalid = invalid_identifiers(dataset)
        rejections_before = len(agent.records("instance_rejected"))
        files_before = agent.stored_files()

        run = storescu_own_syntax(agent.port, path)

        if run.statuses == [STATUS_SUCCESS] and run.returncode == 0:
            if invalid:
                wrong_status.append(f"{name}: stored although {invalid} are invalid")
                continue
            # Compared now, before a later file with the same UIDs overwrites it.
            stored = agent.stored_path(dataset.StudyInstanceUID, dataset.SOPInstanceUID)
            if dataset_elements(stored) != dataset_elements(path):
                values_changed.append(name)
            tally.stored.append(name)
            tally.stored_keys.add((dataset.StudyInstanceUID, dataset.SOPInstanceUID))
        elif run.statuses:
            status = run.statuses[-1]
            tally.failed.setdefault(status, []).append(name)
            if run.returncode == 0 or not invalid or status != STATUS_INVALID_IDENTIFIERS:
                wrong_status.append(f"{name}: 0x{status:04X}, exit {run.returncode}, {invalid}")
            if agent.stored_files() != files_before:
                stored_on_failure.append(name)
            records = agent.wait_for_records("instance_rejected", rejections_before + 1)
            latest = records[-1]
            if latest["outcome"] != f"0x{status:04X}" or not latest["reason"].startswith(
                tuple(invalid or IDENTIFYING_UIDS)
            ):
                wrong_audit.append(f"{name}: {latest}")
        else:
            # storescu could not read the file itself, so it never reached the agent.
            assert not run.association_rejected, run.output
            assert run.problems(), f"{name}: storescu sent nothing and printed no error"
            tally.not_sent[name] = run.problems()[-1]

    failed_count = sum(len(names) for names in tally.failed.values())
    by_status = ", ".join(f"0x{status:04X}: {len(names)}" for status, names in tally.failed.items())
    print(
        f"\nstorescu: offered {len(candidates)}, stored {len(tally.stored)} "
        f"({len(tally.stored_keys)} distinct instances, "
        f"{len(tally.stored) - len(tally.stored_keys)} overwrote one with the same UIDs), "
        f"failed {failed_count} ({by_status}), "
        f"not sent because storescu could not read them {len(tally.not_sent)}"
    )
    for status, names in tally.failed.items():
        print(f"  0x{status:04X}: {', '.join(names)}")
    for name, problem in tally.not_sent.items():
        print(f"  not sent: {name}: {problem}")

    assert values_changed == []
    assert wrong_status == []
    assert stored_on_failure == []
    assert wrong_audit == []
    assert len(tally.stored) + failed_count + len(tally.not_sent) == len(candidates)
    assert agent.is_running()
    assert "Traceback" not in agent.log_text()
    assert echoscu(agent.port, "ECHOSCU").returncode == 0
    assert len(agent.stored_files()) == len(tally.stored_keys)
    assert len(agent.records("instance_rejected")) == failed_count
    received = agent.wait_for_records("instances_received", len(tally.stored))
    assert sum(record["count"] for record in received) == len(tally.stored)
    assert agent.temporary_files() == []


# -- 3. calling AE allow-list ------------------------------------------------------------


def test_unlisted_calling_ae_rejected(live_agent: Callable[..., LiveAgent]) -> None:
    agent = live_agent(allowed_callers=["STORESCU", "ECHOSCU"])

    echo = echoscu(agent.port, "INTRUDER")
    store = storescu(agent.port, [bundled_file("CT_small.dcm")], calling_ae="INTRUDER")

    assert echo.returncode != 0
    assert "Calling AE Title Not Recognized" in echo.stderr
    assert store.returncode != 0
    assert store.association_rejected
    assert store.statuses == []
    assert agent.stored_files() == []
    reason = "calling AE title is not in the allowed callers"
    rejections = agent.wait_for_records("association_rejected", 2)
    assert [(record["calling_ae"], record["reason"]) for record in rejections] == [
        ("INTRUDER", reason)
    ] * 2
    assert f"rejected association from AE 'INTRUDER' at 127.0.0.1: {reason}" in agent.log_text()
    # Listed callers still get in.
    assert echoscu(agent.port, "ECHOSCU").returncode == 0
    assert storescu(agent.port, [bundled_file("CT_small.dcm")]).statuses == [STATUS_SUCCESS]


def test_allowed_ae_from_other_network_rejected(live_agent: Callable[..., LiveAgent]) -> None:
    # 10.0.0.0/8 is only configured: every connection here comes from 127.0.0.1.
    agent = live_agent(allowed_callers=["REMOTE_CT@10.0.0.0/8", "ECHOSCU"])

    store = storescu(agent.port, [bundled_file("CT_small.dcm")], calling_ae="REMOTE_CT")

    assert store.returncode != 0
    assert store.association_rejected
    assert "Calling AE Title Not Recognized" in store.output
    assert agent.stored_files() == []
    reason = "calling AE title is not allowed from address 127.0.0.1"
    [rejection] = agent.wait_for_records("association_rejected", 1)
    assert (rejection["calling_ae"], rejection["reason"]) == ("REMOTE_CT", reason)
    assert f"rejected association from AE 'REMOTE_CT' at 127.0.0.1: {reason}" in agent.log_text()
    assert echoscu(agent.port, "ECHOSCU").returncode == 0


# -- 4. association limit ----------------------------------------------------------------


def hold_associations(port: int, count: int) -> list[Any]:
    """Open ``count`` Verification associations with pynetdicom and keep them open."""
    scu = AE(ae_title="HOLDER")
    scu.add_requested_context(VERIFICATION)
    return [scu.associate("127.0.0.1", port, ae_title=SCP_AE_TITLE) for _ in range(count)]


def release_all(associations: list[Any]) -> None:
    for association in associations:
        if association.is_established:
            association.release()


def test_association_limit_rejects_extra_caller(live_agent: Callable[..., LiveAgent]) -> None:
    agent = live_agent(max_associations=2)
    ct_small = bundled_file("CT_small.dcm")

    holders = hold_associations(agent.port, 2)
    try:
        established = [association.is_established for association in holders]
        extra = storescu(agent.port, [ct_small])
    finally:
        release_all(holders)

    assert established == [True, True]
    assert extra.returncode != 0
    assert extra.association_rejected
    assert "Local Limit Exceeded" in extra.output
    assert agent.stored_files() == []
    assert "rejected association from AE 'STORESCU': maximum of 2 associations reached" in (
        agent.log_text()
    )
    [rejection] = agent.wait_for_records("association_rejected", 1)
    assert rejection["reason"] == "maximum of 2 associations reached"
    # The server notices the releases on its own threads, so the slots come free a moment
    # after release() returns. Rejections in that moment are audited too.
    assert wait_until(lambda: storescu(agent.port, [ct_small]).statuses == [STATUS_SUCCESS], 20)
    assert len(agent.stored_files()) == 1


def test_closed_connections_hold_no_slot(live_agent: Callable[..., LiveAgent]) -> None:
    # A TCP health check connects and closes without an A-ASSOCIATE-RQ. pynetdicom 3.0
    # counts such a connection as an association until its 30 s ACSE timeout, so the SCP
    # frees the slot itself when the connection closes.
    agent = live_agent(max_associations=2)
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5):
            pass

    def two_fit() -> bool:
        holders = hold_associations(agent.port, 2)
        established = all(association.is_established for association in holders)
        release_all(holders)
        return established

    # Well under the 30 s for which pynetdicom alone keeps the closed connections.
    assert wait_until(two_fit, 10)


# -- 5. associations aborted in the middle of an instance ------------------------------


def large_instance() -> Dataset:
    """Return CT_small as a new study with 2 MiB of pixel data, sent in many PDUs."""
    dataset = dcmread(bundled_file("CT_small.dcm"))
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.Rows = dataset.Columns = 1024
    dataset.PixelData = bytes(range(256)) * (1024 * 1024 * 2 // 256)
    return dataset


@pytest.mark.parametrize("ending", ["abort", "drop"])
def test_abort_mid_instance_stores_nothing_partial(
    live_agent: Callable[..., LiveAgent], ending: str
) -> None:
    agent = live_agent()
    complete = dcmread(bundled_file("CT_small.dcm"))
    partial = large_instance()
    complete_bytes = encode_dataset(complete)
    partial_bytes = encode_dataset(partial)

    # One whole instance first, then the large one cut off after a quarter of its bytes.
    association = RawAssociation.open(
        agent.port, "RAWSCU", complete.SOPClassUID, ExplicitVRLittleEndian
    )
    association.send_command(c_store_command(complete.SOPClassUID, complete.SOPInstanceUID))
    association.send_dataset(complete_bytes, last=True)
    first_status = association.read_store_status()
    association.send_command(
        c_store_command(partial.SOPClassUID, partial.SOPInstanceUID, message_id=2)
    )
    fragments = association.send_dataset(partial_bytes[: len(partial_bytes) // 4], last=False)
    if ending == "abort":
        association.abort()
    else:
        association.drop()

    assert first_status == STATUS_SUCCESS
    assert fragments > 10
    [record] = agent.wait_for_records("instances_received", 1)
    assert (record["calling_ae"], record["study_uid"]) == ("RAWSCU", complete.StudyInstanceUID)
    assert (record["count"], record["outcome"]) == (1, "aborted")
    assert "association from AE 'RAWSCU' aborted: 1 instances stored" in agent.log_text()
    assert agent.stored_files() == [
        agent.stored_path(complete.StudyInstanceUID, complete.SOPInstanceUID)
    ]
    assert not (agent.incoming / partial.StudyInstanceUID).exists()
    assert agent.temporary_files() == []
    assert agent.is_running()
    assert "Traceback" not in agent.log_text()
    assert storescu(agent.port, [bundled_file("MR_small.dcm")]).statuses == [STATUS_SUCCESS]


# -- 6. malformed datasets over the network ----------------------------------------------


@dataclass(frozen=True)
class MalformedCase:
    """A C-STORE whose dataset (or request) is broken in one way."""

    changes: dict[str, str | None] = field(default_factory=dict)
    """CT_small attributes to set, or to delete where the value is None."""
    dataset: Callable[[], bytes] | None = None
    """Dataset bytes to send in place of the changed CT_small."""
    request_uid: str | None = None
    """Affected SOP Instance UID of the request, if not the dataset's."""
    syntax: str = ExplicitVRLittleEndian
    status: int | None = None
    """The exact status expected; None accepts any "Cannot understand" status."""
    reason: str = ""


def ct_small_bytes(cut: slice = slice(None)) -> bytes:
    return encode_dataset(dcmread(bundled_file("CT_small.dcm")))[cut]


def ct_small_big_endian() -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = False
    buffer.is_little_endian = False
    write_dataset(buffer, dcmread(bundled_file("CT_small.dcm")))
    return buffer.getvalue()


UID_CASES = {
    "study_uid_too_long": MalformedCase(
        changes={"StudyInstanceUID": "1." + "2" * 70},
        status=STATUS_INVALID_IDENTIFIERS,
        reason="StudyInstanceUID is 72 characters long",
    ),
    "study_uid_parent_path": MalformedCase(
        changes={"StudyInstanceUID": "../../x"},
        status=STATUS_INVALID_IDENTIFIERS,
        reason="StudyInstanceUID contains characters other than digits and dots",
    ),
    "study_uid_slash": MalformedCase(
        changes={"StudyInstanceUID": "1.2/3"},
        status=STATUS_INVALID_IDENTIFIERS,
        reason="StudyInstanceUID contains characters other than digits and dots",
    ),
    "sop_instance_uid_path": MalformedCase(
        changes={"SOPInstanceUID": "1.2/../3"},
        request_uid="1.2/../3",
        status=STATUS_INVALID_IDENTIFIERS,
        reason="SOPInstanceUID contains characters other than digits and dots",
    ),
    "series_uid_two_values": MalformedCase(
        changes={"SeriesInstanceUID": "1.2\\3.4"},
        status=STATUS_INVALID_IDENTIFIERS,
        reason="SeriesInstanceUID has 2 values",
    ),
    "sop_instance_uid_missing": MalformedCase(
        changes={"SOPInstanceUID": None},
        status=STATUS_INVALID_IDENTIFIERS,
        reason="SOPInstanceUID is missing",
    ),
    "request_uid_path": MalformedCase(
        request_uid="1.2/../../3",
        status=STATUS_INVALID_IDENTIFIERS,
        reason="dataset SOPInstanceUID differs from the request's",
    ),
    "empty_dataset": MalformedCase(
        dataset=lambda: b"",
        status=STATUS_INVALID_IDENTIFIERS,
        reason="StudyInstanceUID is missing",
    ),
}

# Bytes that do not parse in the negotiated transfer syntax.
GARBAGE_CASES = {
    "byte_ramp": MalformedCase(dataset=lambda: bytes(range(256)) * 4),
    "ff_bytes_implicit_vr": MalformedCase(
        dataset=lambda: b"\xff" * 256, syntax=ImplicitVRLittleEndian
    ),
    "big_endian_as_little_endian": MalformedCase(dataset=ct_small_big_endian),
    "cut_inside_header": MalformedCase(dataset=lambda: ct_small_bytes(slice(0, 301))),
}

TRUNCATED_PIXEL_DATA = MalformedCase(
    dataset=lambda: ct_small_bytes(slice(0, -100)),
    status=STATUS_CANNOT_DECODE,
    reason="cannot be decoded",
)

MALFORMED_CASES = [
    *(pytest.param(case, id=name) for name, case in UID_CASES.items()),
    *(pytest.param(case, id=name) for name, case in GARBAGE_CASES.items()),
    pytest.param(TRUNCATED_PIXEL_DATA, id="truncated_in_pixel_data"),
]


@pytest.fixture(scope="module")
def malformed_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgent]:
    agent = start_live_agent(tmp_path_factory.mktemp("malformed") / "agent")
    try:
        yield agent
    finally:
        agent.stop()
        print(f"--- agent log (last 3000 characters)\n{agent.log_text()[-3000:]}")


@pytest.fixture
def send_files_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom then sends a file's dataset bytes as they are, without decoding them.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def send_malformed(agent: LiveAgent, case: MalformedCase, folder: Path) -> int:
    """Send one malformed C-STORE with pynetdicom and return the response status."""
    original = dcmread(bundled_file("CT_small.dcm"))
    if case.dataset is not None:
        dataset_bytes = case.dataset()
        dataset_uid = str(original.SOPInstanceUID)
    else:
        changed = dcmread(bundled_file("CT_small.dcm"))
        for keyword, value in case.changes.items():
            if value is None:
                del changed[keyword]
            else:
                setattr(changed, keyword, value)
        dataset_bytes = encode_dataset(changed)
        dataset_uid = str(changed.get("SOPInstanceUID", original.SOPInstanceUID))
    path = write_raw_instance(
        folder / "malformed.dcm",
        dataset_bytes,
        str(original.SOPClassUID),
        case.request_uid or dataset_uid,
        case.syntax,
    )

    scu = AE(ae_title="PYNETDICOM")
    scu.add_requested_context(original.SOPClassUID, [case.syntax])
    association = scu.associate("127.0.0.1", agent.port, ae_title=SCP_AE_TITLE)
    assert association.is_established
    try:
        response = association.send_c_store(path)
    finally:
        association.release()
    return int(response.Status)


@pytest.mark.usefixtures("send_files_unparsed")
@pytest.mark.parametrize("case", MALFORMED_CASES)
def test_malformed_dataset_rejected(
    malformed_agent: LiveAgent, case: MalformedCase, tmp_path: Path
) -> None:
    agent = malformed_agent
    before = agent.state_snapshot()
    rejections_before = len(agent.records("instance_rejected"))

    status = send_malformed(agent, case, tmp_path)

    assert status in CANNOT_UNDERSTAND
    if case.status is not None:
        assert status == case.status
    # Nothing at all is created, so no file was named from the rejected UIDs.
    assert agent.state_snapshot() == before
    records = agent.wait_for_records("instance_rejected", rejections_before + 1)
    assert len(records) == rejections_before + 1
    assert records[-1]["outcome"] == f"0x{status:04X}"
    assert records[-1]["calling_ae"] == "PYNETDICOM"
    assert case.reason in records[-1]["reason"]
    assert agent.is_running()
    assert "Traceback" not in agent.log_text()
    assert storescu(agent.port, [bundled_file("CT_small.dcm")]).statuses == [STATUS_SUCCESS]


@pytest.mark.usefixtures("send_files_unparsed")
@pytest.mark.parametrize("name", sorted(GARBAGE_CASES))
def test_garbage_dataset_cannot_decode(
    malformed_agent: LiveAgent, name: str, tmp_path: Path
) -> None:
    rejections_before = len(malformed_agent.records("instance_rejected"))

    status = send_malformed(malformed_agent, GARBAGE_CASES[name], tmp_path)

    records = malformed_agent.wait_for_records("instance_rejected", rejections_before + 1)
    assert status == STATUS_CANNOT_DECODE
    assert "cannot be decoded" in records[-1]["reason"]
