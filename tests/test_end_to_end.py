"""End to end over real parts: storescu -> agent A -> sshd/SFTP -> agent B -> import.

Each test runs two ``jmix-agent run`` processes with generated identities and a
throwaway OpenSSH server on 127.0.0.1, exactly as the demo does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from agent.audit import read_records, verify_log
from agent.demo import (
    STORESCU,
    Site,
    build_pair,
    imported_envelopes,
    sample_paths,
    start_agent,
    stop_agent,
    storescu,
    wait_for_port,
)
from agent.devtools.sshd import SshdServer
from agent.jmix.seal import Party, PayloadFile, seal_envelope

pytestmark = pytest.mark.skipif(not STORESCU.exists(), reason="DCMTK storescu is not installed")

TIMEOUT = 90.0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dataset_elements(path: Path) -> dict[int, object]:
    """Return every top-level element's value by tag, without padding and group lengths.

    DCMTK's storescu re-encodes the dataset it sends: it drops the trailing padding
    element (FFFC,FFFC) and writes encapsulated pixel data as OB even where the file
    says OW. So what the SCP receives cannot equal the file byte for byte, but every
    value, pixel data included, must arrive unchanged.
    """
    dataset = dcmread(path)
    return {
        int(element.tag): element.value
        for element in dataset
        if element.tag != 0xFFFCFFFC and element.tag.element != 0
    }


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


def visible_temp_files(*roots: Path) -> list[Path]:
    """Return temporary or partial names below ``roots`` (outside private work folders)."""
    found = []
    for root in roots:
        if root.exists():
            found += [
                path
                for path in root.rglob("*")
                if path.name.startswith((".tmp-", ".partial")) or ".partial" in path.name
            ]
    return found


@pytest.fixture
def pair(
    tmp_path: Path, sshd: SshdServer
) -> Iterator[tuple[Site, Site, list[subprocess.Popen[bytes]]]]:
    site_a, site_b = build_pair(tmp_path, sshd)
    processes = [start_agent(site_a), start_agent(site_b)]
    assert site_a.dicom_port is not None
    wait_for_port(site_a.dicom_port)
    try:
        yield site_a, site_b, processes
    finally:
        for process in processes:
            stop_agent(process)
        for site in (site_a, site_b):
            if site.log_path.exists():
                print(f"--- {site.name} log\n{site.log_path.read_text()[-4000:]}")


def imported_instances(site: Site) -> dict[str, Path]:
    return {
        path.name: path
        for envelope in imported_envelopes(site)
        for path in (envelope / "dicom").glob("*.dcm")
    }


def test_storescu_study_arrives_identical(pair: tuple[Site, Site, list]) -> None:
    site_a, site_b, processes = pair
    files = sample_paths()
    assert len(files) >= 8, "expected at least 8 bundled sample files"
    originals = {dcmread(path, stop_before_pixels=True).SOPInstanceUID: path for path in files}
    studies = {dcmread(path, stop_before_pixels=True).StudyInstanceUID for path in files}
    syntaxes = {
        str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) for path in files
    }
    assert len(syntaxes) >= 6

    result = storescu(site_a.dicom_port or 0, files)
    assert result.returncode == 0, result.stderr

    assert wait_until(lambda: len(imported_instances(site_b)) == len(files)), (
        f"imported {len(imported_instances(site_b))} of {len(files)}"
    )
    assert wait_until(lambda: not any((site_a.state / "outbox").rglob("*.JMIX")))
    imported = imported_instances(site_b)
    assert sorted(imported) == sorted(f"{uid}.dcm" for uid in originals)

    spooled = {path.name: path for path in (site_a.state / "sealed").rglob("*.dcm")}
    for name, path in imported.items():
        assert sha256(path) == sha256(spooled[name]), f"{name} differs from A's spool copy"
        original = originals[name.removesuffix(".dcm")]
        assert dataset_elements(path) == dataset_elements(original), f"{name} content changed"
        received_syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        sent_syntax = dcmread(original, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert received_syntax == sent_syntax, f"{name} arrived in another transfer syntax"
    assert len(imported_envelopes(site_b)) == len(studies)

    events_a = [record["event"] for record in read_records(site_a.audit_log)]
    events_b = [record["event"] for record in read_records(site_b.audit_log)]
    assert events_a.count("study_complete") == len(studies)
    assert events_a.count("envelope_sealed") == len(studies)
    assert events_a.count("envelope_sent") == len(studies)
    assert "instances_received" in events_a
    assert events_b.count("envelope_imported") == len(studies)
    assert "envelope_rejected" not in events_b

    assert visible_temp_files(site_b.import_dir, site_b.inbox, site_a.state / "outbox") == []
    assert all(process.poll() is None for process in processes)
    for process in processes:
        assert stop_agent(process) == 0
    assert verify_log(site_a.audit_log).ok
    assert verify_log(site_b.audit_log).ok


def test_drop_folder_slow_writer(pair: tuple[Site, Site, list]) -> None:
    site_a, site_b, _processes = pair
    files = sample_paths(["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"])
    site_a.drop.mkdir(exist_ok=True)
    for source in files:
        data = source.read_bytes()
        target = site_a.drop / source.name
        with target.open("wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            # A pause longer than the agent's poll interval, shorter than stable_seconds
            # would be too easy; the file must not be taken while it is still changing.
            time.sleep(0.6)
            handle.write(data[len(data) // 2 :])

    assert wait_until(lambda: len(imported_instances(site_b)) == len(files))
    imported = imported_instances(site_b)
    for source in files:
        uid = dcmread(source, stop_before_pixels=True).SOPInstanceUID
        assert sha256(imported[f"{uid}.dcm"]) == sha256(source), f"{source.name} changed"
    assert wait_until(lambda: not any(site_a.drop.iterdir()))


def _seal_into_inbox(site_b: Site, signer: Site, tmp_path: Path) -> Path:
    """Seal a small study from ``signer`` to B, outside B's inbox; return the envelope."""
    identity = signer.identity()
    receiver = site_b.identity()
    files = sample_paths(["CT_small.dcm"])
    uid = dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    staging = tmp_path / f"staging-{signer.entity_id.replace(':', '_')}"
    staging.mkdir()
    result = seal_envelope(
        [PayloadFile(f"dicom/{uid}.dcm", files[0])],
        {"patient": {"id": "ANON"}},
        staging,
        Party(identity.id, identity.name),
        identity.signing_key,
        Party(receiver.id, receiver.name),
        receiver.encryption_keys[0].public_key(),
    )
    return result.path


def _deliver(envelope: Path, inbox: Path) -> None:
    hidden = inbox / f".{envelope.name}.partial"
    shutil.copytree(envelope, hidden)
    hidden.rename(inbox / envelope.name)


def test_tampered_and_unknown_sender_quarantined(
    pair: tuple[Site, Site, list], tmp_path: Path
) -> None:
    site_a, site_b, processes = pair

    tampered = _seal_into_inbox(site_b, site_a, tmp_path)
    payload = tampered / "payload.encrypted"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01
    payload.write_bytes(bytes(data))

    stranger = Site("Stranger", tmp_path / "stranger", "org:demo.stranger")
    stranger.root.mkdir()
    stranger.create_keys()
    unknown = _seal_into_inbox(site_b, stranger, tmp_path)

    _deliver(tampered, site_b.inbox)
    _deliver(unknown, site_b.inbox)

    def reasons() -> dict[str, dict]:
        found = {}
        for reason_file in site_b.quarantine.glob("*/reason.json"):
            document = json.loads(reason_file.read_text())
            found[document["envelope_id"]] = document
        return found

    assert wait_until(lambda: len(reasons()) == 2)
    found = reasons()
    tampered_id = tampered.name.removesuffix(".JMIX")
    unknown_id = unknown.name.removesuffix(".JMIX")
    assert found[tampered_id]["code"] in ("payload_hash_mismatch", "decrypt_failed")
    assert found[unknown_id]["code"] == "key_not_pinned"
    for envelope_id in (tampered_id, unknown_id):
        folder = next(
            p.parent
            for p in site_b.quarantine.glob("*/reason.json")
            if json.loads(p.read_text())["envelope_id"] == envelope_id
        )
        assert (folder / f"{envelope_id}.JMIX" / "manifest.json").is_file()

    assert imported_envelopes(site_b) == []
    assert not any(site_b.inbox.iterdir())
    rejected = [r for r in read_records(site_b.audit_log) if r["event"] == "envelope_rejected"]
    assert {r["envelope_id"] for r in rejected} == {tampered_id, unknown_id}
    assert all(process.poll() is None for process in processes)

    # The daemon still imports the next good envelope.
    again = tmp_path / "again"
    again.mkdir()
    good = _seal_into_inbox(site_b, site_a, again)
    _deliver(good, site_b.inbox)
    assert wait_until(lambda: len(imported_envelopes(site_b)) == 1)


def test_demo_configs_pass_check_config(tmp_path: Path, sshd: SshdServer) -> None:
    site_a, site_b = build_pair(tmp_path, sshd)
    for site in (site_a, site_b):
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", "--config", str(site.config_path), "check-config"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
