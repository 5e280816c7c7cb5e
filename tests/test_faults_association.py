"""Association faults: a sender that aborts mid-study, two senders of one study, follow-ups.

Agent A and agent B run as processes with a real sshd between them. The aborting
sender is a pynetdicom SCU, because it can send an A-ABORT after a chosen instance;
every other sender is DCMTK's storescu.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import (
    FAULT_TEST_MARKS,
    Pair,
    Study,
    audit_events,
    envelopes,
    imported_copies,
    incomplete_imports,
    make_pair,
    make_study,
    sha256,
    stored_copies,
    wait_until,
)
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.audit import verify_log
from agent.demo import STORESCU, storescu
from agent.devtools.sshd import SshdServer

pytestmark = FAULT_TEST_MARKS


@pytest.fixture
def pair(tmp_path: Path, sshd: SshdServer) -> Iterator[Pair]:
    pair = make_pair(tmp_path, sshd)
    pair.start("a")
    pair.start("b")
    try:
        yield pair
    finally:
        codes = {which: pair.stop(which) for which in list(pair.processes)}
        if any(code != 0 for code in codes.values()):
            pair.print_logs()


def assert_exactly_once(pair: Pair, study: Study) -> None:
    assert wait_until(lambda: study.names <= set(imported_copies(pair.b))), (
        f"imported {len(imported_copies(pair.b))} of {len(study.names)}"
    )
    imported = imported_copies(pair.b)
    assert {name: len(paths) for name, paths in imported.items()} == dict.fromkeys(study.names, 1)
    stored = stored_copies(pair.a)
    for name, (copy,) in imported.items():
        assert {sha256(path) for path in stored[name]} == {sha256(copy)}, name
    assert incomplete_imports(pair.b) == []


def _send_with_pynetdicom(pair: Pair, files: list[Path], abort_after: int | None) -> None:
    """Send ``files`` on one association; with ``abort_after``, send an A-ABORT after that many."""
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", pair.a.dicom_port or 0, ae_title="JMIX_AGENT")
    assert association.is_established
    for number, path in enumerate(files):
        if number == abort_after:
            association.abort()
            return
        status = association.send_c_store(dcmread(path))
        assert status.Status == 0x0000
    association.release()


def test_aborted_study_resent(pair: Pair, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 20)
    files = list(study.files.values())
    _send_with_pynetdicom(pair, files, abort_after=7)

    # The seven stored instances are a complete batch once the study is quiet.
    assert wait_until(lambda: len(imported_copies(pair.b)) == 7)
    received = audit_events(pair.a, "instances_received")
    assert [(r["count"], r["outcome"]) for r in received] == [(7, "aborted")]

    # The sender starts the study again from the beginning.
    _send_with_pynetdicom(pair, files, abort_after=None)
    assert_exactly_once(pair, study)
    assert len(envelopes(pair.b)) == 2
    assert [r["count"] for r in audit_events(pair.a, "envelope_sealed")] == [7, 13]


def test_killed_storescu_resent(pair: Pair, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 60, pad_bytes=300_000)
    files = list(study.files.values())
    env = dict(os.environ, TCP_NODELAY="1")
    command = [str(STORESCU), "-aet", "MODALITY", "-aec", "JMIX_AGENT", "-xe"]
    process = subprocess.Popen(
        [*command, "127.0.0.1", str(pair.a.dicom_port), *map(str, files)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    incoming = pair.a.state / "incoming" / study.study_uid
    assert wait_until(lambda: len(list(incoming.glob("*.dcm"))) >= 10, 60, step=0.005)
    process.kill()
    process.wait()
    assert len(list(incoming.glob("*.dcm"))) < len(files), "storescu finished too early"

    result = storescu(pair.a.dicom_port or 0, files, calling_ae="MODALITY")
    assert result.returncode == 0, result.stderr
    assert_exactly_once(pair, study)


def test_two_senders_same_study(pair: Pair, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 40)
    files = list(study.files.values())
    results = []

    def send(calling_ae: str) -> None:
        results.append(storescu(pair.a.dicom_port or 0, files, calling_ae=calling_ae))

    senders = [threading.Thread(target=send, args=(ae,)) for ae in ("MODALITY1", "MODALITY2")]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(120)
    assert [result.returncode for result in results] == [0, 0], [r.stderr for r in results]

    assert_exactly_once(pair, study)
    received = audit_events(pair.a, "instances_received")
    assert {r["calling_ae"] for r in received} == {"MODALITY1", "MODALITY2"}


def test_follow_up_after_sealing(pair: Pair, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 10)
    files = list(study.files.values())
    result = storescu(pair.a.dicom_port or 0, files[:4], calling_ae="MODALITY")
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: len(imported_copies(pair.b)) == 4)

    result = storescu(pair.a.dicom_port or 0, files[4:], calling_ae="MODALITY")
    assert result.returncode == 0, result.stderr
    assert_exactly_once(pair, study)
    assert len(envelopes(pair.b)) == 2
    assert pair.stop("a") == 0
    assert pair.stop("b") == 0
    assert verify_log(pair.a.audit_log).ok
    assert verify_log(pair.b.audit_log).ok
