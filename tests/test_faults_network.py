"""Network faults between agent A and agent B's sshd: each ends in one delivery or failed/.

Real processes throughout: two ``jmix-agent run`` agents, a throwaway OpenSSH server on
127.0.0.1 (stopped, cut, made read-only or given a full disk by the test) and DCMTK's
storescu as the modality.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import (
    FAULT_TEST_MARKS,
    Pair,
    Study,
    audit_events,
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
from agent.demo import Site, storescu
from agent.devtools.sshd import SshdServer, generate_key

pytestmark = FAULT_TEST_MARKS

PEER = "org:demo.site-b"


@pytest.fixture
def pair(tmp_path: Path, sshd: SshdServer) -> Iterator[Pair]:
    """Agents A and B, configured but not started, with fast retries on A."""
    pair = make_pair(tmp_path, sshd)
    set_options(pair.a, "delivery", retry_initial_seconds=0.5, retry_max_seconds=2.0)
    try:
        yield pair
    finally:
        codes = {which: pair.stop(which) for which in list(pair.processes)}
        if any(code != 0 for code in codes.values()):
            pair.print_logs()
        if not sshd.running:
            sshd.start()


def send(pair: Pair, study: Study) -> None:
    result = storescu(pair.a.dicom_port or 0, list(study.files.values()), calling_ae="MODALITY")
    assert result.returncode == 0, result.stderr


def peer_status(pair: Pair) -> dict:
    (peer,) = [p for p in pair.status("a")["peers"] if p["peer"] == PEER]
    return peer


def assert_delivered_once(pair: Pair, *studies: Study) -> None:
    """Every instance of ``studies`` is in B's import exactly once, as A stored it."""
    expected = {name for study in studies for name in study.names}
    assert wait_until(lambda: expected <= set(imported_copies(pair.b))), (
        f"imported {len(imported_copies(pair.b))} of {len(expected)}; A: {pair.status('a')}"
    )
    assert wait_until(lambda: not any((pair.a.state / "outbox").rglob("*.JMIX")), 30)
    imported = imported_copies(pair.b)
    assert {name: len(paths) for name, paths in imported.items()} == dict.fromkeys(expected, 1)
    stored = stored_copies(pair.a)
    for name, (copy,) in imported.items():
        assert {sha256(path) for path in stored[name]} == {sha256(copy)}
    assert incomplete_imports(pair.b) == []
    assert audit_events(pair.b, "envelope_rejected") == []


def test_sshd_down_then_back(pair: Pair, sshd: SshdServer, tmp_path: Path) -> None:
    sshd.stop()
    pair.start("a")
    pair.start("b")
    study = make_study(tmp_path / "study", 5)
    send(pair, study)

    assert wait_until(lambda: peer_status(pair)["consecutive_failures"] >= 3, 60)
    peer = peer_status(pair)
    assert peer["state"] == "retrying"
    assert "connection refused" in peer["last_error"]
    assert imported_copies(pair.b) == {}

    sshd.start()
    assert_delivered_once(pair, study)
    failures = audit_events(pair.a, "send_failed")
    assert len(failures) >= 3
    assert {record["outcome"] for record in failures} == {"retry"}
    (sent,) = audit_events(pair.a, "envelope_sent")
    assert sent["attempt"] == len(failures) + 1
    assert peer_status(pair)["state"] == "ok"


def test_connection_cut_mid_upload(pair: Pair, sshd: SshdServer, tmp_path: Path) -> None:
    pair.start("a")
    pair.start("b")
    study = make_study(tmp_path / "study", 40, pad_bytes=4_000_000)
    send(pair, study)

    def uploading() -> bool:
        return any(".partial-" in path.name for path in pair.b.inbox.iterdir())

    assert wait_until(uploading, 60, step=0.002), "the upload was never seen in progress"
    sshd.kill_sessions()

    assert_delivered_once(pair, study)
    failures = audit_events(pair.a, "send_failed")
    sent = audit_events(pair.a, "envelope_sent")
    assert len(sent) == 1
    # The transport either retried at once on a new connection or failed the attempt.
    # Either way the SFTP transport removed its temporary upload itself, because
    # stale_upload_seconds keeps its default of an hour here.
    assert len(failures) + 1 >= sent[0]["attempt"]
    assert leftovers(pair.b.inbox) == []


def test_remote_inbox_not_writable(pair: Pair, sshd: SshdServer, tmp_path: Path) -> None:
    sshd.restart(read_only=True)
    pair.start("a")
    pair.start("b")
    study = make_study(tmp_path / "study", 3)
    send(pair, study)

    assert wait_until(lambda: peer_status(pair)["consecutive_failures"] >= 2, 60)
    assert "denied permission" in peer_status(pair)["last_error"]
    sshd.restart()
    assert_delivered_once(pair, study)


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {result.stderr.strip()}")


@pytest.fixture
def small_b_state(pair: Pair) -> Iterator[Path]:
    """B's state folder (and so its inbox) on a 4 MiB tmpfs."""
    state = pair.b.state
    shutil.rmtree(state)
    _mount_tmpfs(state, "4m")
    pair.b.inbox.mkdir()
    try:
        yield state
    finally:
        pair.stop("b")
        subprocess.run(["umount", str(state)], check=False)


def test_remote_disk_full(pair: Pair, small_b_state: Path, tmp_path: Path) -> None:
    pair.start("a")
    pair.start("b")
    study = make_study(tmp_path / "study", 8, pad_bytes=1_000_000)
    send(pair, study)

    assert wait_until(lambda: peer_status(pair)["consecutive_failures"] >= 2, 60)
    assert "disk is full" in peer_status(pair)["last_error"]
    assert imported_copies(pair.b) == {}
    assert wait_until(lambda: leftovers(pair.b.inbox) == [], 10), "partial upload left"

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_b_state)], check=True)
    assert_delivered_once(pair, study)


def test_failed_after_max_age_then_retry(pair: Pair, sshd: SshdServer, tmp_path: Path) -> None:
    # Every upload of more than 64 KiB fails, like a full disk or a quota.
    sshd.restart(file_size_limit=64 * 1024)
    set_options(pair.a, "delivery", max_age_hours=0.001)
    pair.start("a")
    pair.start("b")
    study = make_study(tmp_path / "study", 4, pad_bytes=100_000)
    send(pair, study)

    failed_dir = pair.a.state / "failed" / "org_demo.site-b"
    assert wait_until(lambda: any(failed_dir.glob("*.JMIX")), 60)
    status = pair.status("a")
    (stuck,) = [item for item in status["stuck"] if item["kind"] == "envelope"]
    assert stuck["state"] == "failed"
    assert stuck["attempts"] >= 1
    assert "not delivered within 0.001 h" in stuck["last_error"]
    assert "disk is full" in stuck["last_error"]
    text = pair.cli("a", "status").stdout
    assert f"envelope {stuck['id']} for {PEER}: failed" in text
    assert [r["outcome"] for r in audit_events(pair.a, "send_failed")].count("failed") == 1
    assert "moved to failed/" in log_text(pair.a)

    # Clearing the fault alone does not send it: an operator decides.
    sshd.restart()
    time.sleep(3)
    assert imported_copies(pair.b) == {}
    result = pair.cli("a", "retry", stuck["id"])
    assert result.returncode == 0, result.stderr
    assert_delivered_once(pair, study)
    assert pair.status("a")["stuck"] == []


def test_host_key_change_pauses_only_that_peer(
    pair: Pair, sshd: SshdServer, tmp_path: Path
) -> None:
    # A third site, C, receives through a directory; B's pinned host key is wrong.
    site_c = Site("Site C", tmp_path / "site-c", "org:demo.site-c")
    site_c.root.mkdir()
    site_c.create_keys()
    site_c.inbox.mkdir(parents=True)
    wrong_key = generate_key(tmp_path / "other_host_key", comment="not-the-server")
    rewrite_peers(
        pair.a,
        [
            (pair.b, sftp_transport(sshd, pair.b, host_key=wrong_key)),
            (site_c, {"kind": "directory", "path": site_c.inbox}),
        ],
    )
    set_options(pair.a, "delivery", paused_retry_seconds=3600)
    pair.start("a")
    pair.start("b")
    study = make_study(tmp_path / "study", 3)
    send(pair, study)

    assert wait_until(lambda: any(site_c.inbox.iterdir()), 60), "C is held up by B"
    assert wait_until(lambda: peer_status(pair)["state"] == "paused", 30)
    peer = peer_status(pair)
    assert "offered host key" in peer["paused_reason"]
    assert peer["next_attempt_in_seconds"] > 3000
    paused = [r for r in audit_events(pair.a, "send_failed") if r["outcome"] == "paused"]
    assert len(paused) == 1
    assert "is paused" in log_text(pair.a)
    assert sshd.accepted_logins() == 0, "nothing is trusted on first use"

    # The operator fixes the pinned key and reloads; the pause ends at once.
    rewrite_peers(
        pair.a,
        [
            (pair.b, sftp_transport(sshd, pair.b)),
            (site_c, {"kind": "directory", "path": site_c.inbox}),
        ],
    )
    pair.processes["a"].send_signal(1)
    assert_delivered_once(pair, study)


def test_lost_acknowledgement_is_not_imported_twice(pair: Pair, tmp_path: Path) -> None:
    pair.start("a")
    pair.start("b")
    study = make_study(tmp_path / "study", 3)
    send(pair, study)
    assert_delivered_once(pair, study)

    # As if A crashed after the upload but before recording it: B has imported the
    # envelope and removed it from its inbox, so A uploads it again.
    assert pair.stop("a") == 0
    sent_dir = pair.a.state / "sent" / "org_demo.site-b"
    (envelope,) = sent_dir.iterdir()
    envelope.rename(pair.a.state / "outbox" / "org_demo.site-b" / envelope.name)
    pair.start("a")
    assert wait_until(lambda: len(audit_events(pair.b, "envelope_duplicate")) == 1)
    assert_delivered_once(pair, study)
    assert len(audit_events(pair.a, "envelope_sent")) == 2

    # Same crash, but B had not taken the envelope yet: A finds it already delivered.
    assert pair.stop("b") == 0
    second = make_study(tmp_path / "second", 2)
    send(pair, second)
    assert wait_until(lambda: any(p.suffix == ".JMIX" for p in pair.b.inbox.iterdir()))
    assert wait_until(lambda: len(list(sent_dir.iterdir())) == 2)
    assert pair.stop("a") == 0
    newest = max(sent_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    newest.rename(pair.a.state / "outbox" / "org_demo.site-b" / newest.name)
    pair.start("a")
    pair.start("b")
    assert_delivered_once(pair, study, second)
    outcomes = [record["outcome"] for record in audit_events(pair.a, "envelope_sent")]
    assert outcomes[-1] == "already_delivered"
    assert pair.stop("a") == 0
    assert pair.stop("b") == 0
    assert verify_log(pair.a.audit_log).ok
    assert verify_log(pair.b.audit_log).ok
