"""No patient data in logs, audit logs, manifests or quarantine reasons, even at DEBUG.

Two ``jmix-agent run`` processes exchange studies over a throwaway sshd, as in the
end-to-end tests, with ``log_level = "DEBUG"`` and ``JOURNAL_STREAM`` set so that they
log in the format systemd's journal receives. The DICOM files are copies of pydicom's
bundled samples whose PatientName, PatientID, PatientBirthDate and OtherPatientIDs are
set to distinctive strings. Site A receives them through storescu and its drop folder;
site B also gets two broken envelopes made from them, which it quarantines. Afterwards
none of the strings may appear in anything either agent wrote for operators, while the
imported study must still carry them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile import (
    EnvelopeForge,
    Member,
    audit_events,
    dicom_member,
    file_listing,
    payload_edit,
    quarantine_records,
    relisted,
    replaced,
    wait_until,
    with_listing,
)
from pydicom import dcmread

from agent.demo import (
    STORESCU,
    Site,
    build_pair,
    imported_envelopes,
    sample_paths,
    stop_agent,
    storescu,
    wait_for_port,
)
from agent.devtools.sshd import SshdServer
from agent.jmix.seal import Party

pytestmark = pytest.mark.skipif(not STORESCU.exists(), reason="DCMTK storescu is not installed")

TIMEOUT = 90.0
FAMILY, GIVEN, MIDDLE = "Quarantotto", "Zebedee", "Ignatius"
PATIENT_NAME = f"{FAMILY}^{GIVEN}^{MIDDLE}"
PATIENT_ID = "PHI-ID-7Q3X9K"
BIRTH_DATE = "19230417"
OTHER_IDS = ["OPID-K4V8W2", "OPID-J2M5N7"]
# Every form in which a value could leak: DICOM, the metadata.json forms, and parts.
SECRETS = [PATIENT_NAME, FAMILY, GIVEN, MIDDLE, PATIENT_ID, BIRTH_DATE, "1923-04-17", *OTHER_IDS]

NETWORK_FILES = ["CT_small.dcm", "JPEG2000.dcm", "rtdose_1frame.dcm"]
DROP_FILE = "MR_small_RLE.dcm"


def with_patient(source: Path, target: Path) -> Path:
    """Write a copy of ``source`` with the distinctive patient attributes, other data kept."""
    dataset = dcmread(source)
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    dataset.PatientBirthDate = BIRTH_DATE
    dataset.OtherPatientIDs = OTHER_IDS
    dataset.save_as(target)
    return target


def bare_dataset(part10: bytes) -> bytes:
    """Return the dataset of a Part 10 file without preamble, prefix and file meta."""
    # (0002,0000) File Meta Information Group Length follows the 132-byte preamble and
    # prefix as an explicit VR UL element: tag, "UL", 2-byte length, 4-byte value.
    group_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + group_length :]


@pytest.fixture
def phi_files(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "phi"
    folder.mkdir()
    return {
        path.name: with_patient(path, folder / path.name)
        for path in sample_paths([*NETWORK_FILES, DROP_FILE])
    }


def start_journal_agent(site: Site) -> subprocess.Popen[bytes]:
    """Start ``jmix-agent run`` as systemd would, stdout and stderr in separate files."""
    environment = dict(os.environ, JOURNAL_STREAM="8:4242")
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(site.config_path), "run"],
        stdout=(site.root / "stdout.log").open("wb"),
        stderr=(site.root / "stderr.log").open("wb"),
        env=environment,
    )


@pytest.fixture
def pair(tmp_path: Path, sshd: SshdServer) -> Iterator[tuple[Site, Site, list]]:
    site_a, site_b = build_pair(tmp_path, sshd)
    for site in (site_a, site_b):
        text = site.config_path.read_text()
        site.config_path.write_text(text.replace("[agent]\n", '[agent]\nlog_level = "DEBUG"\n', 1))
    processes = [start_journal_agent(site_a), start_journal_agent(site_b)]
    assert site_a.dicom_port is not None
    wait_for_port(site_a.dicom_port)
    try:
        yield site_a, site_b, processes
    finally:
        for process in processes:
            stop_agent(process)


def broken_envelopes(site_a: Site, site_b: Site, dicom: Path, directory: Path) -> list[Path]:
    """Two envelopes from A holding the patient's DICOM that B must quarantine."""
    sender, receiver = site_a.identity(), site_b.identity()
    forge = EnvelopeForge(
        Party(sender.id, sender.name),
        sender.signing_key,
        Party(receiver.id, receiver.name),
        receiver.encryption_keys[0],
        [dicom],
        impersonated_id="org:demo.nobody",
    )

    def hash_mismatch(members: list[Member]) -> list[Member]:
        listing = file_listing(members)
        listing[0]["hash"] = "sha256:" + "0" * 64
        return with_listing(members, listing)

    def without_file_meta(members: list[Member]) -> list[Member]:
        original = dicom_member(members)
        bare = Member(original.name, bare_dataset(original.data))
        return relisted(replaced(members, original, bare))

    return [
        payload_edit(hash_mismatch)(forge, directory / "hash-mismatch"),
        payload_edit(without_file_meta)(forge, directory / "no-file-meta"),
    ]


def operator_files(site_a: Site, site_b: Site) -> list[Path]:
    """Everything the agents wrote that operators read: logs, audit, manifests, reasons."""
    files = []
    for site in (site_a, site_b):
        files += [site.root / "stdout.log", site.root / "stderr.log"]
        files += [site.audit_log, site.audit_log.with_name(site.audit_log.name + ".head")]
        files += sorted(path for path in (site.state / "ledger").rglob("*") if path.is_file())
    for state in ("outbox", "sent"):
        for name in ("manifest.json", "audit.json"):
            files += sorted((site_a.state / state).rglob(name))
    files += sorted(site_b.quarantine.rglob("reason.json"))
    files += sorted(site_b.quarantine.rglob("manifest.json"))
    return files


def test_no_patient_data_outside_payload(
    pair: tuple[Site, Site, list], phi_files: dict[str, Path], tmp_path: Path
) -> None:
    site_a, site_b, processes = pair
    network = [phi_files[name] for name in NETWORK_FILES]
    studies = {
        dcmread(path, stop_before_pixels=True).StudyInstanceUID for path in phi_files.values()
    }

    result = storescu(site_a.dicom_port or 0, network)
    assert result.returncode == 0, result.stderr
    site_a.drop.mkdir(exist_ok=True)
    shutil.copy(phi_files[DROP_FILE], site_a.drop / ".incoming")
    (site_a.drop / ".incoming").rename(site_a.drop / DROP_FILE)
    broken = broken_envelopes(site_a, site_b, phi_files["CT_small.dcm"], tmp_path / "broken")
    for envelope in broken:
        shutil.copytree(envelope, site_b.inbox / f".{envelope.name}")
        (site_b.inbox / f".{envelope.name}").rename(site_b.inbox / envelope.name)

    assert wait_until(lambda: len(imported_envelopes(site_b)) == len(studies), TIMEOUT)
    assert wait_until(lambda: len(quarantine_records(site_b.quarantine)) == 2, TIMEOUT)
    assert wait_until(lambda: not any((site_a.state / "outbox").rglob("*.JMIX")), TIMEOUT)
    for process in processes:
        assert stop_agent(process) == 0

    # The logs were written at DEBUG, in the journal's format.
    stderr_b = (site_b.root / "stderr.log").read_text()
    assert "\nDEBUG agent." in "\n" + (site_a.root / "stderr.log").read_text() + stderr_b
    rejected = audit_events(site_b, "envelope_rejected")
    codes = sorted(record["reason"].split(":")[0] for record in rejected)
    assert codes == ["dicom_invalid", "file_hash_mismatch"]

    checked = operator_files(site_a, site_b)
    assert len([path for path in checked if path.name == "manifest.json"]) >= len(studies) + 2
    for path in checked:
        text = path.read_bytes().decode("utf-8", "replace").lower()
        for secret in SECRETS:
            assert secret.lower() not in text, f"{secret!r} appears in {path}"

    # The study itself still carries the patient: in metadata.json and the DICOM files,
    # which travelled only inside the encrypted payload.
    for envelope in imported_envelopes(site_b):
        metadata = (envelope / "metadata.json").read_text()
        for value in (FAMILY, GIVEN, MIDDLE, PATIENT_ID, "1923-04-17"):
            assert value in metadata, f"{value!r} is missing from {envelope.name}/metadata.json"
        for instance in (envelope / "dicom").glob("*.dcm"):
            dataset = dcmread(instance, stop_before_pixels=True)
            assert str(dataset.PatientName) == PATIENT_NAME
            assert list(dataset.OtherPatientIDs) == OTHER_IDS
    for encrypted in (site_a.state / "sent").rglob("payload.encrypted"):
        assert PATIENT_ID.encode() not in encrypted.read_bytes()
