"""Tests for agent.dicom.scp with DCMTK's storescu/echoscu and pynetdicom as senders.

Every server listens on 127.0.0.1 on a port chosen here, and is stopped after its test.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.audit import AuditLog, read_records
from agent.dicom.inspect import PART10_PREFIX, read_instance_info
from agent.dicom.scp import (
    STATUS_CANNOT_DECODE,
    STATUS_INVALID_IDENTIFIERS,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_SUCCESS,
    StorageSCP,
)
from agent.dicom.uids import InstanceInfo
from agent.pipeline.spool import Spool

# DCMTK's tools, by full path: pynetdicom installs a same-named storescu in the venv.
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
DCMCONV = "/usr/bin/dcmconv"
AE_TITLE = "AGENT"
DIMSE_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def bundled_file(name: str) -> Path:
    """Return a file bundled with pydicom (never downloaded: there is no network)."""
    matches = [Path(item) for item in get_testdata_files() if Path(item).name == name]
    assert matches, f"{name} is not among pydicom's bundled test files"
    return matches[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dataset_offset(data: bytes) -> int:
    """Return where the dataset starts in Part 10 bytes (after the group 0002 elements)."""
    offset = len(PART10_PREFIX) if data[128:132] == b"DICM" else 0
    while struct.unpack("<H", data[offset : offset + 2])[0] == 0x0002:
        vr = data[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
            offset += 12 + struct.unpack("<L", data[offset + 8 : offset + 12])[0]
        else:
            offset += 8 + struct.unpack("<H", data[offset + 6 : offset + 8])[0]
    return offset


def dcmtk(tool: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    assert os.path.exists(tool), f"{tool} is missing: install the dcmtk package"
    return subprocess.run(
        [tool, *arguments],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class StoreResult:
    returncode: int
    statuses: list[int]
    stderr: str


def storescu(
    port: int, files: Sequence[Path], *options: str, calling_ae: str = "STORESCU"
) -> StoreResult:
    """Send ``files`` in one association; ``-d`` makes storescu print each DIMSE status."""
    result = dcmtk(
        STORESCU,
        "-d",
        "-aet",
        calling_ae,
        "-aec",
        AE_TITLE,
        *options,
        "127.0.0.1",
        str(port),
        *map(str, files),
    )
    statuses = [int(code, 16) for code in DIMSE_STATUS.findall(result.stderr)]
    return StoreResult(result.returncode, statuses, result.stderr)


@dataclass
class Harness:
    scp: StorageSCP
    spool: Spool
    audit_path: Path
    stored: list[tuple[InstanceInfo, str]] = field(default_factory=list)

    def records(self, event: str) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [record for record in read_records(self.audit_path) if record["event"] == event]

    def wait_for_records(self, event: str, count: int) -> list[dict[str, Any]]:
        """Wait for ``count`` records: the SCP writes some after the sender has gone."""
        deadline = time.monotonic() + 10
        while len(records := self.records(event)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return records

    def stored_files(self) -> list[Path]:
        return sorted(self.spool.path("incoming").glob("*/*.dcm"))

    def stored_path(self, info: InstanceInfo) -> Path:
        return self.spool.path("incoming") / info.study_uid / f"{info.sop_instance_uid}.dcm"


@pytest.fixture
def start_scp(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Return a function that starts a StorageSCP on a free loopback port."""
    harnesses: list[Harness] = []

    def start(
        allowed_callers: Sequence[tuple[str, str | None]] = (
            ("STORESCU", None),
            ("ECHOSCU", None),
            ("PYNETDICOM", "127.0.0.1"),
        ),
        min_free_bytes: int = 0,
        max_associations: int = 10,
        on_stored: Callable[[InstanceInfo, str], None] | None = None,
    ) -> Harness:
        root = tmp_path / f"agent{len(harnesses)}"
        spool = Spool(root / "spool", min_free_bytes=min_free_bytes)
        audit_path = root / "audit.jsonl"
        harness = Harness(None, spool, audit_path)  # type: ignore[arg-type]

        def record_stored(info: InstanceInfo, source: str) -> None:
            harness.stored.append((info, source))
            if on_stored is not None:
                on_stored(info, source)

        harness.scp = StorageSCP(
            AE_TITLE,
            "127.0.0.1",
            free_port(),
            spool,
            AuditLog(audit_path),
            allowed_callers=allowed_callers,
            max_associations=max_associations,
            on_stored=record_stored,
        )
        harness.scp.start()
        harnesses.append(harness)
        return harness

    yield start
    for harness in harnesses:
        harness.scp.stop()


@pytest.fixture
def agent(start_scp: Callable[..., Harness]) -> Harness:
    return start_scp()


def write_variant(tmp_path: Path, name: str = "CT_small.dcm", **changes: Any) -> Path:
    """Save a copy of a bundled file with attributes changed."""
    dataset = dcmread(bundled_file(name))
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    path = tmp_path / f"variant-{len(list(tmp_path.glob('variant-*')))}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


# -- storing ---------------------------------------------------------------------------

# Each file is sent in its own transfer syntax; the storescu option proposes it. These
# fixtures are ones storescu transmits byte for byte as they are in the file.
TRANSFER_SYNTAX_CASES = [
    ("SC_rgb_small_odd.dcm", "-xe", "1.2.840.10008.1.2.1"),  # explicit VR LE
    ("MR_small_implicit.dcm", "-xi", "1.2.840.10008.1.2"),  # implicit VR LE
    ("MR_small_bigendian.dcm", "-xb", "1.2.840.10008.1.2.2"),  # explicit VR BE
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy", "1.2.840.10008.1.2.4.50"),  # JPEG baseline
    ("SC_rgb_jpeg_gdcm.dcm", "-xs", "1.2.840.10008.1.2.4.70"),  # JPEG lossless SV1
    ("GDCMJ2K_TextGBR.dcm", "-xv", "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
    ("SC_rgb_rle.dcm", "-xr", "1.2.840.10008.1.2.5"),  # RLE lossless
]


@pytest.mark.parametrize(("name", "option", "transfer_syntax"), TRANSFER_SYNTAX_CASES)
def test_store_keeps_received_bytes(
    agent: Harness, name: str, option: str, transfer_syntax: str
) -> None:
    original = bundled_file(name)
    assert_stored_as_sent(agent, original, option, transfer_syntax)


def test_store_jpeg2000_lossy_keeps_received_bytes(agent: Harness, tmp_path: Path) -> None:
    # storescu drops the group length elements of the bundled JPEG 2000 (lossy) files
    # when it sends them. dcmconv from the same DCMTK writes the file the way storescu
    # sends it, so its dataset bytes are what goes over the wire.
    normalized = tmp_path / "693_J2KI.dcm"
    converted = dcmtk(DCMCONV, str(bundled_file("693_J2KI.dcm")), str(normalized))
    assert converted.returncode == 0, converted.stderr

    assert_stored_as_sent(agent, normalized, "-xw", "1.2.840.10008.1.2.4.91")


def assert_stored_as_sent(
    agent: Harness, original: Path, option: str, transfer_syntax: str
) -> None:
    result = storescu(agent.scp.port, [original], option)

    assert result.returncode == 0, result.stderr
    assert result.statuses == [STATUS_SUCCESS]
    info = read_instance_info(original)
    stored = agent.stored_path(info).read_bytes()
    sent = original.read_bytes()
    assert stored.startswith(PART10_PREFIX)
    assert read_instance_info(agent.stored_path(info)).transfer_syntax_uid == transfer_syntax
    assert stored[dataset_offset(stored) :] == sent[dataset_offset(sent) :]


def test_store_deflated_kept_deflated(agent: Harness) -> None:
    original = bundled_file("image_dfl.dcm")

    result = storescu(agent.scp.port, [original], "-xd")

    assert result.statuses == [STATUS_SUCCESS]
    info = read_instance_info(original)
    stored = agent.stored_path(info).read_bytes()
    sent = original.read_bytes()
    assert read_instance_info(agent.stored_path(info)).transfer_syntax_uid == (
        DeflatedExplicitVRLittleEndian
    )
    # storescu deflates again as it sends, so the compressed bytes differ from the file's.
    # The SCP stores what arrived, still deflated, and it inflates to the file's dataset.
    stored_dataset = zlib.decompress(stored[dataset_offset(stored) :], -zlib.MAX_WBITS)
    sent_dataset = zlib.decompress(sent[dataset_offset(sent) :], -zlib.MAX_WBITS)
    assert stored_dataset == sent_dataset
    assert dcmread(agent.stored_path(info)).SOPInstanceUID == info.sop_instance_uid


def test_store_file_meta_names_instance(agent: Harness) -> None:
    original = bundled_file("CT_small.dcm")

    storescu(agent.scp.port, [original])

    info = read_instance_info(original)
    meta = dcmread(agent.stored_path(info), stop_before_pixels=True).file_meta
    assert meta.MediaStorageSOPClassUID == info.sop_class_uid
    assert meta.MediaStorageSOPInstanceUID == info.sop_instance_uid
    assert agent.stored == [(info, "ae-STORESCU")]
    assert (agent.stored_path(info).parent / ".sources" / "ae-STORESCU").exists()


def test_association_audited_per_study(agent: Harness) -> None:
    series = sorted((bundled_file("CT_small.dcm").parent / "dicomdirtests" / "98892001").rglob("*"))
    study_files = [path for path in series if path.is_file()][:3]
    other_study = bundled_file("CT_small.dcm")
    studies = {read_instance_info(path).study_uid for path in study_files}
    assert len(studies) == 1

    result = storescu(agent.scp.port, [*study_files, other_study])

    assert result.statuses == [STATUS_SUCCESS] * 4
    records = agent.wait_for_records("instances_received", 2)
    counts = {record["study_uid"]: record["count"] for record in records}
    assert counts == {studies.pop(): 3, read_instance_info(other_study).study_uid: 1}
    assert {record["outcome"] for record in records} == {"released"}
    assert {record["calling_ae"] for record in records} == {"STORESCU"}


def test_aborted_association_audited(agent: Harness) -> None:
    result = storescu(agent.scp.port, [bundled_file("CT_small.dcm")], "--abort")

    assert result.statuses == [STATUS_SUCCESS]
    records = agent.wait_for_records("instances_received", 1)
    assert [(record["count"], record["outcome"]) for record in records] == [(1, "aborted")]


def test_uids_logged_only_at_debug(agent: Harness, caplog: pytest.LogCaptureFixture) -> None:
    original = bundled_file("CT_small.dcm")
    info = read_instance_info(original)

    with caplog.at_level(logging.DEBUG):
        storescu(agent.scp.port, [original])

    assert any(info.sop_instance_uid in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        if record.levelno >= logging.INFO:
            assert info.study_uid not in record.getMessage()
            assert info.sop_instance_uid not in record.getMessage()


def test_leading_zero_uid_stored_without_warning(
    start_scp: Callable[..., Harness],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A UID component with a leading zero breaks the PS3.5 grammar but occurs in real
    # archives, so the agent accepts it. pydicom's own check would log it at WARNING.
    sop_instance_uid = "1.2.826.0.1.3680043.0123.1"
    variant = write_variant(tmp_path, SOPInstanceUID=sop_instance_uid)
    for mode in ("_reading_validation_mode", "_writing_validation_mode"):
        monkeypatch.setattr(pydicom_config.settings, mode, None)  # pydicom's defaults
    agent = start_scp()
    caplog.clear()

    with caplog.at_level(logging.INFO):
        result = storescu(agent.scp.port, [variant])

    assert result.statuses == [STATUS_SUCCESS]
    assert [info.sop_instance_uid for info, _source in agent.stored] == [sop_instance_uid]
    assert sop_instance_uid not in caplog.text


# -- failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"StudyInstanceUID": "1.2.840.10008/../../etc"}, "StudyInstanceUID contains"),
        ({"SeriesInstanceUID": "1." + "2" * 70}, "SeriesInstanceUID is 72 characters"),
    ],
)
def test_invalid_uid_rejected_and_not_stored(
    agent: Harness, tmp_path: Path, changes: dict[str, str], reason: str
) -> None:
    variant = write_variant(tmp_path, **changes)

    result = storescu(agent.scp.port, [variant])

    assert result.returncode != 0
    assert result.statuses == [STATUS_INVALID_IDENTIFIERS]
    assert agent.stored_files() == []
    assert agent.stored == []
    [rejection] = agent.records("instance_rejected")
    assert reason in rejection["reason"]
    assert rejection["outcome"] == "0xC212"
    assert agent.records("instances_received") == []


def send_raw_file(port: int, path: Path, transfer_syntax: str) -> int:
    """Send a Part 10 file's dataset bytes unparsed with pynetdicom; return the status."""
    scu = AE(ae_title="PYNETDICOM")
    scu.add_requested_context(CTImageStorage, [transfer_syntax])
    association = scu.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert association.is_established
    try:
        response = association.send_c_store(path)
    finally:
        association.release()
    return int(response.Status)


def raw_variant(tmp_path: Path, dataset: bytes, transfer_syntax: str, **meta_changes: str) -> Path:
    """Write CT_small's file meta (changed as asked) in front of arbitrary dataset bytes."""
    source = dcmread(bundled_file("CT_small.dcm"))
    meta = source.file_meta
    meta.TransferSyntaxUID = UID(transfer_syntax)
    for keyword, value in meta_changes.items():
        setattr(meta, keyword, value)

    path = tmp_path / "raw.dcm"
    with path.open("wb") as handle:
        handle.write(PART10_PREFIX)
        write_file_meta_info(handle, meta, enforce_standard=True)  # type: ignore[arg-type]
        handle.write(dataset)
    return path


@pytest.fixture
def send_files_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom then sends a file's dataset bytes as they are, without decoding them.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.mark.usefixtures("send_files_unparsed")
def test_undecodable_dataset_cannot_understand(agent: Harness, tmp_path: Path) -> None:
    path = raw_variant(tmp_path, b"\xff" * 256, DeflatedExplicitVRLittleEndian)

    status = send_raw_file(agent.scp.port, path, DeflatedExplicitVRLittleEndian)

    assert status == STATUS_CANNOT_DECODE
    assert agent.stored_files() == []
    [rejection] = agent.records("instance_rejected")
    assert "cannot be decoded" in rejection["reason"]


@pytest.mark.usefixtures("send_files_unparsed")
def test_request_and_dataset_disagree(agent: Harness, tmp_path: Path) -> None:
    data = bundled_file("CT_small.dcm").read_bytes()
    dataset = data[dataset_offset(data) :]
    explicit = "1.2.840.10008.1.2.1"

    other_instance = raw_variant(
        tmp_path, dataset, explicit, MediaStorageSOPInstanceUID="1.2.3.4.5"
    )
    assert send_raw_file(agent.scp.port, other_instance, explicit) == STATUS_INVALID_IDENTIFIERS

    other_class = raw_variant(
        tmp_path, dataset, explicit, MediaStorageSOPClassUID="1.2.840.10008.5.1.4.1.1.4"
    )
    scu = AE(ae_title="PYNETDICOM")
    scu.add_requested_context("1.2.840.10008.5.1.4.1.1.4", [explicit])
    association = scu.associate("127.0.0.1", agent.scp.port, ae_title=AE_TITLE)
    try:
        status = int(association.send_c_store(other_class).Status)
    finally:
        association.release()
    assert status == STATUS_SOP_CLASS_MISMATCH
    assert agent.stored_files() == []


def test_spool_full_out_of_resources(start_scp: Callable[..., Harness]) -> None:
    agent = start_scp(min_free_bytes=1 << 62)

    result = storescu(agent.scp.port, [bundled_file("CT_small.dcm")])

    assert result.statuses == [STATUS_OUT_OF_RESOURCES]
    assert agent.stored_files() == []
    [rejection] = agent.records("instance_rejected")
    assert rejection["reason"].startswith("free space on ")


def test_disk_error_out_of_resources(agent: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_store(*_arguments: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(agent.spool, "store_instance", failing_store)

    result = storescu(agent.scp.port, [bundled_file("CT_small.dcm")])

    assert result.statuses == [STATUS_OUT_OF_RESOURCES]
    [rejection] = agent.records("instance_rejected")
    assert "Input/output error" in rejection["reason"]


def test_unexpected_error_answered(agent: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_store(*_arguments: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(agent.spool, "store_instance", broken_store)

    result = storescu(agent.scp.port, [bundled_file("CT_small.dcm")])

    assert result.statuses == [STATUS_PROCESSING_FAILURE]
    # The SCP keeps serving after the failure.
    monkeypatch.undo()
    assert storescu(agent.scp.port, [bundled_file("CT_small.dcm")]).statuses == [STATUS_SUCCESS]


def test_failing_callback_still_success(start_scp: Callable[..., Harness]) -> None:
    def failing_callback(_info: InstanceInfo, _source: str) -> None:
        raise RuntimeError("pipeline is down")

    agent = start_scp(on_stored=failing_callback)

    result = storescu(agent.scp.port, [bundled_file("CT_small.dcm")])

    assert result.statuses == [STATUS_SUCCESS]
    assert len(agent.stored_files()) == 1


# -- association control and C-ECHO ----------------------------------------------------


def test_echo_answered(agent: Harness) -> None:
    result = dcmtk(ECHOSCU, "-aet", "ECHOSCU", "-aec", AE_TITLE, "127.0.0.1", str(agent.scp.port))
    assert result.returncode == 0, result.stderr


def test_unlisted_calling_ae_rejected(agent: Harness) -> None:
    result = storescu(agent.scp.port, [bundled_file("CT_small.dcm")], calling_ae="INTRUDER")

    assert result.returncode != 0
    assert "Association Rejected" in result.stderr
    assert "Calling AE Title Not Recognized" in result.stderr
    assert agent.stored_files() == []
    [rejection] = agent.records("association_rejected")
    assert rejection["calling_ae"] == "INTRUDER"
    assert rejection["reason"] == "calling AE title is not in the allowed callers"


def test_ae_from_unlisted_network_rejected(start_scp: Callable[..., Harness]) -> None:
    # 192.0.2.0/24 is reserved for documentation; the test only connects from 127.0.0.1.
    agent = start_scp(allowed_callers=[("STORESCU", "192.0.2.0/24")])

    result = storescu(agent.scp.port, [bundled_file("CT_small.dcm")])

    assert "Association Rejected" in result.stderr
    [rejection] = agent.records("association_rejected")
    assert rejection["reason"] == "calling AE title is not allowed from address 127.0.0.1"


def test_ae_from_listed_network_accepted(start_scp: Callable[..., Harness]) -> None:
    agent = start_scp(allowed_callers=[("STORESCU", "127.0.0.0/8")])

    result = storescu(agent.scp.port, [bundled_file("CT_small.dcm")])

    assert result.statuses == [STATUS_SUCCESS]


def test_empty_allowed_list_accepts_any_ae(start_scp: Callable[..., Harness]) -> None:
    agent = start_scp(allowed_callers=[])

    result = storescu(agent.scp.port, [bundled_file("CT_small.dcm")], calling_ae="ANYONE")

    assert result.statuses == [STATUS_SUCCESS]


def test_max_associations_rejects_and_logs(
    start_scp: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    agent = start_scp(max_associations=1)
    scu = AE(ae_title="PYNETDICOM")
    scu.add_requested_context("1.2.840.10008.1.1")
    holder = scu.associate("127.0.0.1", agent.scp.port, ae_title=AE_TITLE)
    assert holder.is_established

    try:
        with caplog.at_level(logging.WARNING, logger="agent.dicom.scp"):
            result = dcmtk(
                ECHOSCU, "-aet", "ECHOSCU", "-aec", AE_TITLE, "127.0.0.1", str(agent.scp.port)
            )
    finally:
        holder.release()

    assert result.returncode != 0
    assert "Association Rejected" in result.stderr
    [rejection] = agent.records("association_rejected")
    assert rejection["reason"] == "maximum of 1 associations reached"
    assert "maximum of 1 associations reached" in caplog.text


def test_invalid_allowed_network_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        StorageSCP(
            AE_TITLE,
            "127.0.0.1",
            0,
            Spool(tmp_path / "spool"),
            AuditLog(tmp_path / "audit.jsonl"),
            allowed_callers=[("X", "not-an-ip")],
        )


def test_start_twice_raises_and_stop_twice_is_harmless(agent: Harness) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        agent.scp.start()
    agent.scp.stop()
    agent.scp.stop()


def test_dcmtk_tools_installed() -> None:
    for tool in (STORESCU, ECHOSCU, DCMCONV):
        assert shutil.which(tool), f"{tool} is missing: install the dcmtk package"
