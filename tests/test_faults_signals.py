"""SIGTERM and SIGHUP against a running agent: clean exit, reload, nothing lost or doubled."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import (
    FAULT_TEST_MARKS,
    Pair,
    Study,
    imported_copies,
    incomplete_imports,
    leftovers,
    log_text,
    make_pair,
    make_study,
    rewrite_peers,
    set_options,
    sftp_transport,
    sha256,
    stored_copies,
    wait_until,
)

from agent.audit import verify_log
from agent.demo import free_port, storescu
from agent.devtools.sshd import SshdServer

pytestmark = FAULT_TEST_MARKS

EXIT_SECONDS = 20.0
"""A generous bound below the unit's TimeoutStopSec (90 s); not a performance figure."""


@pytest.fixture
def pair(tmp_path: Path, sshd: SshdServer) -> Iterator[Pair]:
    pair = make_pair(tmp_path, sshd)
    set_options(pair.a, "delivery", retry_initial_seconds=0.5, retry_max_seconds=2.0)
    set_options(pair.b, "inbound", stale_upload_seconds=5.0)
    try:
        yield pair
    finally:
        codes = {which: pair.stop(which) for which in list(pair.processes)}
        if any(code != 0 for code in codes.values()):
            pair.print_logs()


def terminate(pair: Pair, which: str) -> tuple[int, float]:
    """Send SIGTERM; return the exit status and the seconds until the process exited."""
    process = pair.processes.pop(which)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(EXIT_SECONDS * 3)
    return code, time.monotonic() - started


def assert_exactly_once(pair: Pair, study: Study) -> None:
    assert wait_until(lambda: study.names <= set(imported_copies(pair.b))), (
        f"imported {len(imported_copies(pair.b))} of {len(study.names)}: {pair.status('a')}"
    )
    imported = imported_copies(pair.b)
    assert {name: len(paths) for name, paths in imported.items()} == dict.fromkeys(study.names, 1)
    stored = stored_copies(pair.a)
    for name, (copy,) in imported.items():
        assert {sha256(path) for path in stored[name]} == {sha256(copy)}, name
    assert incomplete_imports(pair.b) == []


def test_sigterm_while_receiving(pair: Pair, tmp_path: Path) -> None:
    pair.start("a")
    pair.start("b")
    study = make_study(tmp_path / "study", 80, pad_bytes=500_000)
    files = list(study.files.values())
    results = []
    sender = threading.Thread(
        target=lambda: results.append(storescu(pair.a.dicom_port or 0, files, "MODALITY"))
    )
    sender.start()
    incoming = pair.a.state / "incoming" / study.study_uid
    assert wait_until(lambda: len(list(incoming.glob("*.dcm"))) >= 10, 60, step=0.005)

    code, seconds = terminate(pair, "a")
    sender.join(120)
    assert code == 0
    assert seconds < EXIT_SECONDS
    assert "did not finish" not in log_text(pair.a)
    assert results[0].returncode != 0, "the association was cut"
    stored = len(list(incoming.glob("*.dcm")))
    assert 10 <= stored < len(files)
    assert leftovers(pair.a.state) == []

    # After a restart the modality sends the study again.
    pair.start("a")
    result = storescu(pair.a.dicom_port or 0, files, "MODALITY")
    assert result.returncode == 0, result.stderr
    assert_exactly_once(pair, study)
    assert pair.stop("a") == 0
    assert verify_log(pair.a.audit_log).ok


def test_sigterm_while_uploading(pair: Pair, tmp_path: Path) -> None:
    pair.start("a")
    pair.start("b")
    study = make_study(tmp_path / "study", 40, pad_bytes=4_000_000)
    result = storescu(pair.a.dicom_port or 0, list(study.files.values()), "MODALITY")
    assert result.returncode == 0, result.stderr

    def uploading() -> bool:
        return any(".partial-" in path.name for path in pair.b.inbox.iterdir())

    assert wait_until(uploading, 60, step=0.002)
    code, seconds = terminate(pair, "a")
    assert code == 0
    assert seconds < EXIT_SECONDS
    assert "jmix-agent stopped" in log_text(pair.a)

    # The state is consistent: the envelope is either sent or still queued, never both.
    outbox = list((pair.a.state / "outbox" / "org_demo.site-b").glob("*.JMIX"))
    sent_dir = pair.a.state / "sent" / "org_demo.site-b"
    sent = list(sent_dir.glob("*.JMIX")) if sent_dir.exists() else []
    assert len(outbox) + len(sent) == 1
    pair.start("a")
    assert_exactly_once(pair, study)
    assert wait_until(lambda: leftovers(pair.b.inbox) == [], 30)


def test_sighup_applies_fixed_transport(pair: Pair, sshd: SshdServer, tmp_path: Path) -> None:
    # A starts with the wrong SFTP port and a long backoff.
    rewrite_peers(pair.a, [(pair.b, sftp_transport(sshd, pair.b, port=free_port()))])
    set_options(pair.a, "delivery", retry_initial_seconds=600.0, retry_max_seconds=900.0)
    pair.start("a")
    pair.start("b")
    study = make_study(tmp_path / "study", 3)
    result = storescu(pair.a.dicom_port or 0, list(study.files.values()), "MODALITY")
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: "connection refused" in log_text(pair.a), 60)

    rewrite_peers(pair.a, [(pair.b, sftp_transport(sshd, pair.b))])
    pair.processes["a"].send_signal(signal.SIGHUP)
    # Delivered long before the 5-10 minute backoff would have run out.
    assert wait_until(lambda: study.names <= set(imported_copies(pair.b)), 30)
    assert_exactly_once(pair, study)
    assert "configuration reloaded" in log_text(pair.a)


def test_sighup_with_invalid_config_keeps_running(pair: Pair, tmp_path: Path) -> None:
    pair.start("a")
    pair.start("b")
    good = pair.a.config_path.read_text()

    set_options(pair.a, "delivery", retry_initial_seconds=-1)
    pair.processes["a"].send_signal(signal.SIGHUP)
    assert wait_until(lambda: "the running one is kept" in log_text(pair.a), 20)
    assert "delivery.retry_initial_seconds: must be between" in log_text(pair.a)

    # A pinned host key that the config accepts but the transport cannot parse.
    broken = good.replace("ssh-ed25519 AAAA", "ssh-ed25519 AAAA!!", 1)
    assert broken != good
    pair.a.config_path.write_text(broken)
    pair.processes["a"].send_signal(signal.SIGHUP)
    assert wait_until(lambda: log_text(pair.a).count("the running one is kept") == 2, 20)

    # The old configuration still works.
    study = make_study(tmp_path / "study", 3)
    result = storescu(pair.a.dicom_port or 0, list(study.files.values()), "MODALITY")
    assert result.returncode == 0, result.stderr
    assert_exactly_once(pair, study)
    assert pair.running("a")


def test_sighup_during_upload_keeps_work(pair: Pair, sshd: SshdServer, tmp_path: Path) -> None:
    pair.start("a")
    pair.start("b")
    study = make_study(tmp_path / "study", 40, pad_bytes=4_000_000)
    result = storescu(pair.a.dicom_port or 0, list(study.files.values()), "MODALITY")
    assert result.returncode == 0, result.stderr

    def uploading() -> bool:
        return any(".partial-" in path.name for path in pair.b.inbox.iterdir())

    assert wait_until(uploading, 60, step=0.002)
    # A changed transport replaces the peer's sender once its delivery finished.
    rewrite_peers(pair.a, [(pair.b, sftp_transport(sshd, pair.b, connect_timeout=20.0))])
    pair.processes["a"].send_signal(signal.SIGHUP)
    assert_exactly_once(pair, study)
    assert wait_until(lambda: "configuration reloaded" in log_text(pair.a), 10)

    second = make_study(tmp_path / "second", 3)
    result = storescu(pair.a.dicom_port or 0, list(second.files.values()), "MODALITY")
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: second.names <= set(imported_copies(pair.b)))
