"""Load: eight concurrent storescu associations of 500 instances each and a busy drop folder.

Every instance must be stored by agent A and imported by agent B exactly once, no
association or instance may be refused (eight is below A's max_associations of 10), and
A's peak resident memory must stay bounded. Nothing here measures speed.
"""

from __future__ import annotations

import threading
from pathlib import Path

from faultkit import (
    FAULT_TEST_MARKS,
    Study,
    audit_events,
    drop_atomically,
    imported_copies,
    make_pair,
    make_study,
    set_options,
    wait_until,
)

from agent.demo import storescu
from agent.devtools.sshd import SshdServer

pytestmark = FAULT_TEST_MARKS

ASSOCIATIONS = 8
INSTANCES = 500
DROPPED = 500
PEAK_RSS_LIMIT_MB = 300
"""Generous: about 80 MiB was measured on a 2-core Debian 12 VM with this test."""


def peak_rss_mb(pid: int) -> float:
    """Return a process's peak resident set size (VmHWM) in MiB, read from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def test_eight_associations_and_drop_folder(tmp_path: Path, sshd: SshdServer) -> None:
    pair = make_pair(tmp_path, sshd)
    set_options(pair.a, "agent", study_quiet_seconds=3.0)
    studies = [
        make_study(tmp_path / f"study-{number}", INSTANCES) for number in range(ASSOCIATIONS)
    ]
    dropped = make_study(tmp_path / "dropped", DROPPED)
    pair.start("a")
    pair.start("b")
    try:
        results: dict[int, int] = {}

        def send(number: int, study: Study) -> None:
            result = storescu(
                pair.a.dicom_port or 0, list(study.files.values()), f"MODALITY{number}"
            )
            results[number] = result.returncode

        senders = [
            threading.Thread(target=send, args=(number, study))
            for number, study in enumerate(studies)
        ]
        for thread in senders:
            thread.start()
        for number, path in enumerate(dropped.files.values()):
            drop_atomically(path, pair.a.drop, f"{number:05d}.dcm")
        for thread in senders:
            thread.join(600)
        assert results == dict.fromkeys(range(ASSOCIATIONS), 0)

        expected = {name for study in [*studies, dropped] for name in study.names}
        assert wait_until(lambda: expected <= set(imported_copies(pair.b)), 300, step=1.0), (
            f"imported {len(imported_copies(pair.b))} of {len(expected)}"
        )
        imported = imported_copies(pair.b)
        assert {name: len(paths) for name, paths in imported.items()} == dict.fromkeys(expected, 1)
        assert audit_events(pair.a, "association_rejected") == []
        assert audit_events(pair.a, "instance_rejected") == []
        received = sum(r["count"] for r in audit_events(pair.a, "instances_received"))
        assert received == len(expected)

        peak = peak_rss_mb(pair.processes["a"].pid)
        print(f"agent A peak RSS: {peak:.0f} MiB for {len(expected)} instances")
        assert peak < PEAK_RSS_LIMIT_MB
    finally:
        codes = {which: pair.stop(which) for which in ("a", "b")}
        if any(code != 0 for code in codes.values()):
            pair.print_logs()
    assert codes == {"a": 0, "b": 0}
