"""The kill test: SIGKILL both agents at random moments and check nothing is lost or doubled.

A feeder sends generated studies to agent A, some with DCMTK's storescu and some through
the drop folder, while A seals them and sends them over a real sshd to agent B, which
imports them. The harness kills A or B with SIGKILL, aiming each kill at one phase in
turn (receive, seal, upload, import, or a random moment), and restarts it at once.
Afterwards every instance must be in B's import folder exactly once and byte-identical
to A's stored copy, nothing partial may be visible, and both audit logs must verify.

JMIX_SOAK_KILLS sets the number of kills (default 30, sized for CI); JMIX_SOAK_SEED
repeats a run's random choices.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

from faultkit import (
    FAULT_TEST_MARKS,
    Pair,
    Study,
    audit_events,
    drop_atomically,
    imported_copies,
    incomplete_imports,
    leftovers,
    make_pair,
    make_study,
    set_options,
    sha256,
    stored_copies,
    wait_until,
)

from agent.audit import verify_log
from agent.demo import storescu
from agent.devtools.sshd import SshdServer

pytestmark = FAULT_TEST_MARKS

KILLS = int(os.environ.get("JMIX_SOAK_KILLS", "30"))
PHASES = ("receive", "seal", "upload", "import", "random")
PHASE_WAIT = 6.0
"""Seconds to wait for a phase to show before killing at whatever moment it is."""


class Feeder(threading.Thread):
    """Sends studies to A until stopped; a study counts once A has accepted all of it."""

    def __init__(self, pair: Pair, root: Path, rng: random.Random) -> None:
        super().__init__(name="feeder", daemon=True)
        self.pair = pair
        self.root = root
        self.rng = rng
        self.stop_event = threading.Event()
        self.in_association = threading.Event()
        self.fed: list[tuple[str, Study]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            number = 0
            while not self.stop_event.is_set():
                number += 1
                study = make_study(
                    self.root / f"study-{number}",
                    self.rng.randint(4, 12),
                    pad_bytes=self.rng.randint(200_000, 900_000),
                )
                how = "drop" if number % 3 == 0 else "scp"
                if how == "drop":
                    for path in study.files.values():
                        drop_atomically(path, self.pair.a.drop, f"s{number}-{path.name}")
                else:
                    self._send(study)
                self.fed.append((how, study))
                self.stop_event.wait(self.rng.uniform(0.0, 0.5))
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _send(self, study: Study) -> None:
        """Send the whole study until one association stores all of it."""
        port = self.pair.a.dicom_port or 0
        files = list(study.files.values())
        while True:
            self.in_association.set()
            try:
                result = storescu(port, files, calling_ae="MODALITY")
            finally:
                self.in_association.clear()
            if result.returncode == 0:
                return
            time.sleep(0.3)


def _exists(directory: Path, predicate: object = None) -> bool:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return False
    if predicate is None:
        return bool(names)
    return any(predicate(name) for name in names)  # type: ignore[operator]


def _phase_visible(pair: Pair, phase: str, feeder: Feeder) -> bool:
    state_a, state_b = pair.a.state, pair.b.state
    if phase == "receive":
        return feeder.in_association.is_set() and _exists(state_a / "incoming")
    if phase == "seal":
        outbox = state_a / "outbox" / "org_demo.site-b"
        return _exists(outbox, lambda name: name.startswith(".tmp-"))
    if phase == "upload":
        return _exists(pair.b.inbox, lambda name: ".partial-" in name)
    if phase == "import":
        return _exists(state_b / "work", lambda name: name.startswith("in-"))
    raise ValueError(phase)


def _kill_once(pair: Pair, phase: str, feeder: Feeder, rng: random.Random) -> str:
    """Wait for ``phase`` (or a random moment), SIGKILL its agent and restart it."""
    if phase == "random":
        target = rng.choice("ab")
        time.sleep(rng.uniform(0.0, 1.5))
        hit = "random"
    else:
        target = "b" if phase == "import" else "a"
        deadline = time.monotonic() + PHASE_WAIT
        while not _phase_visible(pair, phase, feeder):
            if time.monotonic() > deadline:
                break
            time.sleep(0.003)
        hit = phase if _phase_visible(pair, phase, feeder) else "missed-" + phase
        if phase == "receive":
            # Somewhere inside the association, not always at its first instance.
            time.sleep(rng.uniform(0.0, 0.15))
    pair.kill(target)
    pair.start(target)
    return f"{hit}:{target}"


def _drained(pair: Pair, expected: set[str]) -> bool:
    state_a = pair.a.state
    busy = [
        state_a / "incoming",
        state_a / "ready",
        state_a / "outbox" / "org_demo.site-b",
        pair.b.inbox,
    ]
    if any(_exists(folder) for folder in busy):
        return False
    if _exists(pair.b.state / "work", lambda name: name.startswith("in-")):
        return False
    if _exists(pair.a.drop, lambda name: not name.startswith(".")):
        return False
    return expected <= set(imported_copies(pair.b))


def test_kill_at_random_moments(tmp_path: Path, sshd: SshdServer) -> None:
    seed = int(os.environ.get("JMIX_SOAK_SEED", str(random.randrange(2**32))))
    print(f"kill test: {KILLS} kills, JMIX_SOAK_SEED={seed}")
    rng = random.Random(seed)
    pair = make_pair(tmp_path, sshd)
    set_options(pair.a, "agent", study_quiet_seconds=1.0)
    set_options(pair.a, "delivery", retry_initial_seconds=0.5, retry_max_seconds=2.0)
    set_options(pair.b, "inbound", settle_seconds=0.2, stale_upload_seconds=3.0)
    pair.start("a")
    pair.start("b")
    feeder = Feeder(pair, tmp_path / "studies", random.Random(rng.random()))
    hits: Counter[str] = Counter()
    try:
        feeder.start()
        for number in range(KILLS):
            hits[_kill_once(pair, PHASES[number % len(PHASES)], feeder, rng)] += 1
        feeder.stop_event.set()
        feeder.join(120)
        assert not feeder.is_alive(), "the feeder did not finish its last study"
        assert feeder.error is None, feeder.error
        print(f"kills by phase and agent: {dict(sorted(hits.items()))}")

        expected = {name for _how, study in feeder.fed for name in study.names}
        drained = wait_until(lambda: _drained(pair, expected), timeout=150, step=0.5)
        status_a = pair.status("a")
        assert drained, f"not drained: A {status_a}, B {pair.status('b')}"
        # B removes partial uploads left by a killed A once they are 3 s old.
        assert wait_until(lambda: leftovers(pair.b.inbox) == [], timeout=30)

        # Every instance exactly once, byte-identical to A's stored copy.
        imported = imported_copies(pair.b)
        doubled = {name: len(paths) for name, paths in imported.items() if len(paths) > 1}
        assert doubled == {}
        assert set(imported) == expected, "B imported instances that were never sent"
        stored = stored_copies(pair.a)
        for name, (copy,) in imported.items():
            digest = sha256(copy)
            assert {sha256(path) for path in stored[name]} == {digest}, f"{name} differs"
        # A drop folder file is stored unchanged, so it also equals the original.
        for how, study in feeder.fed:
            if how == "drop":
                for uid, path in study.files.items():
                    assert sha256(imported[f"{uid}.dcm"][0]) == sha256(path)

        # Nothing partial is visible, nothing was rejected.
        assert incomplete_imports(pair.b) == []
        assert leftovers(pair.b.import_dir, pair.b.inbox, pair.a.state) == []
        assert audit_events(pair.b, "envelope_rejected") == []
        quarantined = list(pair.b.quarantine.iterdir()) if pair.b.quarantine.exists() else []
        assert quarantined == []

        # Every phase was hit at least once.
        for phase in ("receive", "seal", "upload", "import"):
            assert any(key.startswith(f"{phase}:") for key in hits), f"no kill during {phase}"
    finally:
        feeder.stop_event.set()
        stops = {which: pair.stop(which) for which in ("a", "b")}
        if any(code not in (0, None) for code in stops.values()):
            pair.print_logs()
    assert stops == {"a": 0, "b": 0}
    assert verify_log(pair.a.audit_log).ok
    assert verify_log(pair.b.audit_log).ok


def test_restart_resumes_work_left_on_disk(tmp_path: Path, sshd: SshdServer) -> None:
    """Work that arrived or was interrupted while both agents were down is finished."""
    pair = make_pair(tmp_path, sshd)
    set_options(pair.b, "inbound", stale_upload_seconds=2.0)
    pair.start("a")
    first = make_study(tmp_path / "first", 3)
    result = storescu(pair.a.dicom_port or 0, list(first.files.values()), "MODALITY")
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: any(p.suffix == ".JMIX" for p in pair.b.inbox.iterdir()))
    assert pair.stop("a") == 0

    # While both are down: B's import of the first study was interrupted after its
    # claim, A's drop folder receives a second study, and crashes left temporary names.
    (envelope,) = [p for p in pair.b.inbox.iterdir() if p.suffix == ".JMIX"]
    claim = pair.b.state / "work" / "in-interrupted"
    (claim / "open").mkdir(parents=True)
    envelope.rename(claim / envelope.name)
    partial = pair.b.inbox / ".abc.JMIX.partial-0123456789abcdef"
    partial.mkdir()
    second = make_study(tmp_path / "second", 4)
    for path in second.files.values():
        drop_atomically(path, pair.a.drop)
    (pair.a.state / "outbox" / "org_demo.site-b" / ".tmp-1234.JMIX").mkdir(parents=True)
    half = pair.a.state / "incoming" / "1.2.3.4" / ".tmp-abcd-1.2.3.4.5.dcm"
    half.parent.mkdir(parents=True)
    half.write_bytes(b"half an instance")

    pair.start("b")
    pair.start("a")
    expected = first.names | second.names
    assert wait_until(lambda: expected <= set(imported_copies(pair.b)))
    imported = imported_copies(pair.b)
    assert {name: len(paths) for name, paths in imported.items()} == dict.fromkeys(expected, 1)
    assert not claim.exists()
    assert wait_until(lambda: not partial.exists(), 30)
    assert leftovers(pair.a.state, pair.b.inbox, pair.b.import_dir) == []
    assert "1 inbound envelopes to resume" in (pair.b.log_path.read_text())
    assert pair.stop("a") == 0
    assert pair.stop("b") == 0
    assert verify_log(pair.a.audit_log).ok
    assert verify_log(pair.b.audit_log).ok
