"""The disk guard: below min_free_mb the SCP refuses and drop folders wait, then both resume.

Agent A's state folder is a 64 MiB tmpfs that the test fills with a ballast file, so the
free space really drops and nothing in the agent is stubbed. Mounting needs root, so the
test is skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import (
    FAULT_TEST_MARKS,
    Pair,
    audit_events,
    drop_atomically,
    imported_copies,
    log_text,
    make_pair,
    make_study,
    set_options,
    wait_until,
)

from agent.demo import storescu
from agent.devtools.sshd import SshdServer

pytestmark = FAULT_TEST_MARKS

MIN_FREE_MB = 24


@pytest.fixture
def pair(tmp_path: Path, sshd: SshdServer) -> Iterator[Pair]:
    pair = make_pair(tmp_path, sshd)
    state = pair.a.state
    state.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the disk guard test: {mounted.stderr.strip()}")
    set_options(pair.a, "agent", min_free_mb=MIN_FREE_MB)
    try:
        yield pair
    finally:
        codes = {which: pair.stop(which) for which in list(pair.processes)}
        if any(code != 0 for code in codes.values()):
            pair.print_logs()
        subprocess.run(["umount", str(state)], check=False)


def free_mb(path: Path) -> float:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize / 2**20


def test_disk_guard_refuses_then_resumes(pair: Pair, tmp_path: Path) -> None:
    pair.start("a")
    pair.start("b")
    by_scp = make_study(tmp_path / "scp", 5)
    by_drop = make_study(tmp_path / "drop", 3)

    # Leave 12 MiB free, below the 24 MiB threshold.
    ballast = pair.a.state / "ballast"
    with ballast.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, int((free_mb(pair.a.state) - 12) * 2**20))
    assert free_mb(pair.a.state) < MIN_FREE_MB
    assert wait_until(lambda: "below min_free_mb" in log_text(pair.a), 30)

    refused = storescu(pair.a.dicom_port or 0, list(by_scp.files.values()), "MODALITY")
    rejected = audit_events(pair.a, "instance_rejected")
    assert refused.returncode != 0, "storescu reports the refusal"
    assert rejected, refused.stderr
    assert {record["outcome"] for record in rejected} == {"0xA700"}
    assert not (pair.a.state / "incoming" / by_scp.study_uid).exists()

    for path in by_drop.files.values():
        drop_atomically(path, pair.a.drop)
    time.sleep(3)
    assert len(list(pair.a.drop.glob("*.dcm"))) == len(by_drop.files), "drop folder waits"
    assert "spool full" in log_text(pair.a)

    # Space returns: both kinds of intake resume without a restart.
    ballast.unlink()
    assert wait_until(lambda: "intake resumes" in log_text(pair.a), 30)
    result = storescu(pair.a.dicom_port or 0, list(by_scp.files.values()), "MODALITY")
    assert result.returncode == 0, result.stderr
    expected = by_scp.names | by_drop.names
    assert wait_until(lambda: expected <= set(imported_copies(pair.b)), 90)
    assert {name: len(paths) for name, paths in imported_copies(pair.b).items()} == dict.fromkeys(
        expected, 1
    )
    assert not list(pair.a.drop.glob("*.dcm"))
