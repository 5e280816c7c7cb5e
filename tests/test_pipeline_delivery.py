"""Tests for the durable delivery state: backoff, maximum age, pauses, operator retry.

The sender runs in the test's thread (``send_pending``) with a scripted transport and a
clock the test moves, so every schedule decision is checked without waiting.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import DeliveryConfig, DirectoryTransportConfig, PeerConfig
from agent.pipeline.delivery import (
    DeliveryStore,
    backoff_delay,
    retry_envelopes,
)
from agent.pipeline.sender import PeerSender
from agent.pipeline.spool import Spool
from agent.transport.base import (
    DeliveryResult,
    HostKeyError,
    SourceError,
    TransportError,
)

SETTINGS = DeliveryConfig(
    retry_initial_seconds=10.0,
    retry_max_seconds=300.0,
    max_age_hours=1.0,
    paused_retry_seconds=3600.0,
    retention_hours=1.0,
)


@dataclass
class Recorder:
    """An audit sink that keeps records in memory."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def record(self, event: str, **fields: Any) -> None:
        self.records.append({"event": event, **fields})

    def events(self, event: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record["event"] == event]


class ScriptedTransport:
    """A transport whose deliver() consults ``fail`` (name -> exception or None)."""

    def __init__(self) -> None:
        self.fail: Callable[[str], Exception | None] = lambda _name: None
        self.delivered: list[str] = []
        self.calls: list[str] = []
        self.closed = False

    def deliver(self, local: Path, name: str) -> DeliveryResult:
        self.calls.append(name)
        error = self.fail(name)
        if error is not None:
            raise error
        self.delivered.append(name)
        return DeliveryResult(location=f"test:{name}", already_present=False)

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_peer(peer_id: str, tmp_path: Path) -> PeerConfig:
    return PeerConfig(
        id=peer_id,
        name=peer_id,
        encryption_key=bytes(32),
        signing_keys=(),
        transport=DirectoryTransportConfig(tmp_path / "remote"),
    )


@dataclass
class Setup:
    spool: Spool
    audit: Recorder
    transport: ScriptedTransport
    clock: Clock
    sender: PeerSender

    def queue(self, name: str, age: float = 0.0) -> Path:
        """Put a fake envelope folder into the outbox, sealed ``age`` seconds ago."""
        outbox = self.spool.path("outbox") / self.sender.peer_dir
        outbox.mkdir(parents=True, exist_ok=True)
        envelope = outbox / name
        envelope.mkdir()
        (envelope / "manifest.json").write_text("{}")
        stamp = self.clock.now - age
        import os

        os.utime(envelope, (stamp, stamp))
        return envelope

    def where(self, name: str) -> str | None:
        for state in ("outbox", "sent", "failed"):
            if (self.spool.root / state / self.sender.peer_dir / name).exists():
                return state
        return None


def make_setup(tmp_path: Path, peer_id: str = "org:test.peer") -> Setup:
    spool = Spool(tmp_path / "state")
    audit = Recorder()
    transport = ScriptedTransport()
    clock = Clock(1_000_000.0)
    sender = PeerSender(
        make_peer(peer_id, tmp_path),
        transport,
        spool,
        audit,
        SETTINGS,
        clock=clock,
        rng=random.Random(7),
    )
    return Setup(spool, audit, transport, clock, sender)


NAME_1 = "11111111-1111-4111-8111-111111111111.JMIX"
NAME_2 = "22222222-2222-4222-8222-222222222222.JMIX"
NAME_3 = "33333333-3333-4333-8333-333333333333.JMIX"


def test_backoff_doubles_to_the_cap() -> None:
    rng = random.Random(1)
    for failures, base in [(1, 10), (2, 20), (3, 40), (4, 80), (6, 300), (50, 300)]:
        delays = [backoff_delay(failures, 10.0, 300.0, rng) for _ in range(200)]
        assert min(delays) >= base * 0.5
        assert max(delays) <= base
        assert max(delays) - min(delays) > base * 0.3, "jitter spreads the delays"


def test_transient_failure_backs_off_then_delivers(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.queue(NAME_1)
    setup.transport.fail = lambda _name: TransportError("connection refused")

    assert setup.sender.send_pending() == 0
    state = setup.sender.store.load_peer(setup.sender.peer_dir)
    assert state.failures == 1
    assert 5.0 <= state.next_attempt - setup.clock.now <= 10.0
    record = setup.sender.store.load_record(setup.sender.peer_dir, NAME_1)
    assert record is not None
    assert record.attempts == 1
    assert record.last_error == "connection refused"
    assert [r["outcome"] for r in setup.audit.events("send_failed")] == ["retry"]

    # Within the backoff nothing is tried.
    setup.clock.now += 4.0
    assert setup.sender.send_pending() == 0
    assert len(setup.transport.calls) == 1

    # The second failure doubles the backoff.
    setup.clock.now += 10.0
    setup.sender.send_pending()
    state = setup.sender.store.load_peer(setup.sender.peer_dir)
    assert state.failures == 2
    assert 10.0 <= state.next_attempt - setup.clock.now <= 20.0

    setup.transport.fail = lambda _name: None
    setup.clock.now += 20.0
    assert setup.sender.send_pending() == 1
    assert setup.where(NAME_1) == "sent"
    assert setup.sender.store.load_record(setup.sender.peer_dir, NAME_1) is None
    assert setup.sender.store.load_peer(setup.sender.peer_dir).failures == 0
    sent = setup.audit.events("envelope_sent")
    assert [(r["attempt"], r["outcome"]) for r in sent] == [(3, "ok")]


def test_backoff_survives_restart(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.queue(NAME_1)
    setup.transport.fail = lambda _name: TransportError("connection refused")
    for _ in range(3):
        setup.sender.send_pending()
        setup.clock.now += 1000.0

    restarted = PeerSender(
        setup.sender.peer,
        setup.transport,
        setup.spool,
        setup.audit,
        SETTINGS,
        clock=setup.clock,
        rng=random.Random(3),
    )
    # A start allows one attempt at once, but keeps counting failures.
    restarted._open_gate("test start", keep_failures=True)
    restarted.send_pending()
    state = restarted.store.load_peer(restarted.peer_dir)
    assert state.failures == 4
    assert 40.0 <= state.next_attempt - setup.clock.now <= 80.0
    record = restarted.store.load_record(restarted.peer_dir, NAME_1)
    assert record is not None
    assert record.attempts == 4


def test_refused_envelope_does_not_block_others(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.queue(NAME_1, age=30)
    setup.queue(NAME_2, age=20)
    setup.queue(NAME_3, age=10)
    setup.transport.fail = lambda name: (
        TransportError("remote disk full") if name == NAME_1 else None
    )

    setup.sender.send_pending()
    assert setup.transport.calls == [NAME_1]
    setup.clock.now += 60.0
    setup.sender.send_pending()

    # The envelope tried last goes last, so the others get through.
    assert setup.transport.calls == [NAME_1, NAME_2, NAME_3, NAME_1]
    assert setup.where(NAME_2) == "sent"
    assert setup.where(NAME_3) == "sent"
    assert setup.where(NAME_1) == "outbox"


def test_max_age_moves_to_failed(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.queue(NAME_1, age=3000)
    setup.queue(NAME_2, age=10)
    setup.transport.fail = lambda _name: TransportError("connection refused")

    setup.sender.send_pending()
    assert setup.where(NAME_1) == "outbox", "younger than max age"

    setup.clock.now += 700.0
    setup.sender.send_pending()
    assert setup.where(NAME_1) == "failed"
    assert setup.where(NAME_2) == "outbox"
    record = setup.sender.store.load_record(setup.sender.peer_dir, NAME_1)
    assert record is not None
    assert record.state == "failed"
    assert record.reason is not None
    assert "not delivered within 1 h" in record.reason
    assert "connection refused" in record.reason
    failed = [r for r in setup.audit.events("send_failed") if r["outcome"] == "failed"]
    assert [r["envelope_id"] for r in failed] == [NAME_1.split(".")[0]]


def test_old_envelopes_wait_for_one_attempt(tmp_path: Path) -> None:
    # After the agent was down for longer than the maximum age, envelopes get an
    # attempt before anything moves to failed/.
    setup = make_setup(tmp_path)
    setup.queue(NAME_1, age=10 * 3600)
    assert setup.sender.send_pending() == 1
    assert setup.where(NAME_1) == "sent"


def test_permanent_error_pauses_only_that_peer(tmp_path: Path) -> None:
    broken = make_setup(tmp_path / "a", "org:test.broken")
    healthy = make_setup(tmp_path / "b", "org:test.healthy")
    broken.queue(NAME_1)
    broken.queue(NAME_2)
    healthy.queue(NAME_3)
    broken.transport.fail = lambda _name: HostKeyError("host key changed")

    broken.sender.send_pending()
    assert healthy.sender.send_pending() == 1
    assert broken.transport.calls == [NAME_1], "a paused peer stops after one attempt"
    state = broken.sender.store.load_peer(broken.sender.peer_dir)
    assert state.paused(broken.clock.now)
    assert state.paused_reason == "host key changed"
    paused = [r for r in broken.audit.events("send_failed") if r["outcome"] == "paused"]
    assert len(paused) == 1

    broken.clock.now += 1800.0
    broken.sender.send_pending()
    assert broken.transport.calls == [NAME_1], "still paused"

    # SIGHUP or `jmix-agent retry` ends the pause; with the key fixed, both go out.
    broken.transport.fail = lambda _name: None
    broken.sender.retry_now()
    assert broken.sender.send_pending() == 2
    assert not broken.sender.store.load_peer(broken.sender.peer_dir).paused(broken.clock.now)


def test_pause_ends_after_interval(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.queue(NAME_1)
    setup.transport.fail = lambda _name: HostKeyError("host key changed")
    setup.sender.send_pending()
    setup.transport.fail = lambda _name: None
    setup.clock.now += SETTINGS.paused_retry_seconds + 1
    assert setup.sender.send_pending() == 1


def test_unusable_envelope_fails_at_once(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.queue(NAME_1, age=20)
    setup.queue(NAME_2, age=10)
    setup.transport.fail = lambda name: (
        SourceError("contains a symbolic link") if name == NAME_1 else None
    )
    assert setup.sender.send_pending() == 1
    assert setup.where(NAME_1) == "failed"
    assert setup.where(NAME_2) == "sent"
    state = setup.sender.store.load_peer(setup.sender.peer_dir)
    assert state.failures == 0, "an envelope's own problem does not hold up the peer"


def test_retry_requeues_failed_envelope(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.queue(NAME_1, age=5000)
    setup.transport.fail = lambda _name: TransportError("permission denied")
    setup.sender.send_pending()
    assert setup.where(NAME_1) == "failed"

    outcome = retry_envelopes(
        setup.spool.root, envelope_id=NAME_1.split(".")[0], now=setup.clock.now
    )
    assert outcome.requeued == [(setup.sender.peer_dir, NAME_1)]
    assert setup.where(NAME_1) == "outbox"
    record = setup.sender.store.load_record(setup.sender.peer_dir, NAME_1)
    assert record is not None
    assert record.queued_at == setup.clock.now, "the maximum age counts from the retry"
    assert record.state == "queued"

    # The retry request opens the gate at once, although the backoff has not run out.
    setup.transport.fail = lambda _name: None
    assert setup.sender.send_pending() == 1
    assert setup.where(NAME_1) == "sent"


def test_retry_by_peer_and_all(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    for name in (NAME_1, NAME_2):
        failed = setup.spool.root / "failed" / setup.sender.peer_dir / name
        failed.mkdir(parents=True)
    setup.queue(NAME_3)

    outcome = retry_envelopes(setup.spool.root, peer_dir="other", now=setup.clock.now)
    assert outcome.requeued == []
    assert outcome.peers == ["other"]

    outcome = retry_envelopes(setup.spool.root, now=setup.clock.now)
    assert sorted(name for _peer, name in outcome.requeued) == [NAME_1, NAME_2]
    assert outcome.waiting == [(setup.sender.peer_dir, NAME_3)]
    assert setup.sender.peer_dir in outcome.peers
    store = DeliveryStore(setup.spool.root)
    assert store.take_retry_request(setup.sender.peer_dir)


def test_unreadable_record_is_ignored(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.queue(NAME_1)
    record = setup.sender.store.record_path(setup.sender.peer_dir, NAME_1)
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    assert setup.sender.send_pending() == 1


@pytest.fixture
def cli_site(tmp_path: Path) -> Path:
    """A minimal config whose state folder has one failed and one queued envelope."""
    from agent.identity import generate_keys

    keys = tmp_path / "keys"
    generate_keys(keys / "signing.key", keys / "encryption.key")
    state = tmp_path / "state"
    peer_dir = "org_test.peer"
    failed = state / "failed" / peer_dir / NAME_1
    failed.mkdir(parents=True)
    queued = state / "outbox" / peer_dir / NAME_2
    queued.mkdir(parents=True)
    store = DeliveryStore(state)
    from agent.pipeline.delivery import EnvelopeRecord

    store.save_record(
        peer_dir,
        EnvelopeRecord(
            envelope=NAME_1,
            peer="org:test.peer",
            queued_at=1.0,
            attempts=12,
            last_error="connection refused",
            state="failed",
            reason="not delivered within 72 h; last error: connection refused",
        ),
    )
    store.save_record(
        peer_dir,
        EnvelopeRecord(
            envelope=NAME_2, peer="org:test.peer", queued_at=1.0, attempts=2, last_error="timed out"
        ),
    )
    config = tmp_path / "agent.toml"
    config.write_text(
        "\n".join(
            [
                "[agent]",
                f'state_dir = "{state}"',
                "[identity]",
                'id = "org:test.self"',
                'name = "Self"',
                f'signing_key = "{keys / "signing.key"}"',
                f'encryption_key = "{keys / "encryption.key"}"',
                "[inbound]",
                f'inbox = "{state / "inbox"}"',
                f'import_dir = "{tmp_path / "import"}"',
                f'quarantine_dir = "{tmp_path / "quarantine"}"',
            ]
        )
        + "\n"
    )
    return config


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_status_lists_stuck_envelopes(cli_site: Path) -> None:
    result = run_cli(cli_site, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    (peer,) = status["peers"]
    assert peer["peer"] == "org_test.peer"
    assert peer["configured"] is False
    assert (peer["queued"], peer["failed"], peer["sent"]) == (1, 1, 0)
    stuck = {item["id"]: item for item in status["stuck"]}
    failed = stuck[NAME_1.split(".")[0]]
    assert failed["state"] == "failed"
    assert failed["attempts"] == 12
    assert "not delivered within 72 h" in failed["last_error"]
    assert failed["age_seconds"] > 1_000_000
    queued = stuck[NAME_2.split(".")[0]]
    assert queued["last_error"] == "timed out"

    text = run_cli(cli_site, "status")
    assert text.returncode == 0, text.stderr
    assert "stuck (2):" in text.stdout
    assert "jmix-agent retry ENVELOPE_ID" in text.stdout


def test_retry_command(cli_site: Path) -> None:
    state = cli_site.parent / "state"
    usage = run_cli(cli_site, "retry")
    assert usage.returncode == 2
    assert "exactly one of" in usage.stderr

    unknown = run_cli(cli_site, "retry", "44444444-4444-4444-8444-444444444444")
    assert unknown.returncode == 1
    assert "no failed or queued envelope" in unknown.stderr

    result = run_cli(cli_site, "retry", NAME_1.split(".")[0])
    assert result.returncode == 0, result.stderr
    assert "from failed/ back to the outbox" in result.stdout
    assert (state / "outbox" / "org_test.peer" / NAME_1).is_dir()
    assert (state / "delivery" / "org_test.peer" / "retry-requested").exists()

    every = run_cli(cli_site, "retry", "--all", "--json")
    assert every.returncode == 0, every.stderr
    assert json.loads(every.stdout)["requeued"] == []
