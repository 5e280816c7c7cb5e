"""Replay and time: seen envelope ids persist, and timestamps must lie inside a window.

The ledger tests run a real ``jmix-agent run`` process (site B) and deliver genuine
envelopes from site A into its inbox by hidden-name copy and rename. The window tests
open envelopes in-process with the policy the inbound pipeline builds from the config.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hostile import (
    MAX_CLOCK_SKEW_SECONDS,
    MAX_ENVELOPE_AGE_HOURS,
    Receiver,
    audit_events,
    build_receiver,
    deliver,
    quarantine_records,
    tree_digest,
    wait_until,
)

from agent.config import ConfigError, load_config, parse_config
from agent.demo import imported_envelopes, start_agent, stop_agent
from agent.jmix.reader import EnvelopeRejected, OpenPolicy, open_envelope
from agent.jmix.timeutil import format_timestamp, utc_now
from agent.pipeline.inbound import InboundPipeline
from agent.pipeline.spool import Spool

TIMEOUT = 60.0


class RunningAgent:
    """Site B's agent process, restartable the way an operator restarts the service."""

    def __init__(self, receiver: Receiver) -> None:
        self.site = receiver.site
        self.process = start_agent(self.site)

    def restart(self) -> None:
        assert stop_agent(self.process) == 0
        self.process = start_agent(self.site)

    def running(self) -> bool:
        return self.process.poll() is None


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    return build_receiver(tmp_path)


@pytest.fixture
def agent(receiver: Receiver) -> Iterator[RunningAgent]:
    running = RunningAgent(receiver)
    try:
        yield running
    finally:
        stop_agent(running.process)
        if receiver.site.log_path.exists():
            print(f"--- agent log (tail)\n{receiver.site.log_path.read_text()[-4000:]}")


def envelope_id(envelope: Path) -> str:
    return envelope.name.removesuffix(".JMIX")


def wait_imported(receiver: Receiver, identifier: str) -> bool:
    return wait_until(lambda: (receiver.site.import_dir / identifier).is_dir(), TIMEOUT)


def rejections_of(receiver: Receiver, identifier: str) -> list[dict[str, Any]]:
    return [
        reason
        for _folder, reason in quarantine_records(receiver.site.quarantine)
        if reason["envelope_id"] == identifier
    ]


def wait_rejections(receiver: Receiver, identifier: str, count: int) -> list[dict[str, Any]]:
    wait_until(lambda: len(rejections_of(receiver, identifier)) >= count, TIMEOUT)
    return rejections_of(receiver, identifier)


def copy_of(envelope: Path, directory: Path) -> Path:
    directory.mkdir(parents=True)
    return Path(shutil.copytree(envelope, directory / envelope.name))


# -- the ledger of seen ids, through the daemon ----------------------------------------------


def test_same_envelope_twice_imported_once(
    receiver: Receiver, agent: RunningAgent, tmp_path: Path
) -> None:
    envelope = receiver.forge.seal(tmp_path / "sealed")
    identifier = envelope_id(envelope)
    deliver([envelope], receiver.site.inbox)
    assert wait_imported(receiver, identifier)
    imported = tree_digest(receiver.site.import_dir / identifier)

    deliver([envelope], receiver.site.inbox)

    assert wait_until(lambda: audit_events(receiver.site, "envelope_duplicate"), TIMEOUT)
    duplicate = audit_events(receiver.site, "envelope_duplicate")
    assert [record["envelope_id"] for record in duplicate] == [identifier]
    assert duplicate[0]["outcome"] == "ignored"
    assert [path.name for path in imported_envelopes(receiver.site)] == [identifier]
    assert tree_digest(receiver.site.import_dir / identifier) == imported
    assert len(audit_events(receiver.site, "envelope_imported")) == 1
    assert audit_events(receiver.site, "envelope_rejected") == []
    assert os.listdir(receiver.site.inbox) == []
    assert agent.running()


def test_reused_id_rejected_as_replay(
    receiver: Receiver, agent: RunningAgent, tmp_path: Path
) -> None:
    first = receiver.forge.seal(tmp_path / "first")
    identifier = envelope_id(first)
    deliver([first], receiver.site.inbox)
    assert wait_imported(receiver, identifier)
    imported = tree_digest(receiver.site.import_dir / identifier)

    # A second genuine envelope, signed by the real sender, that reuses the id.
    second = receiver.forge.seal(tmp_path / "second", envelope_id=uuid.UUID(identifier))
    deliver([second], receiver.site.inbox)

    reasons = wait_rejections(receiver, identifier, 1)
    assert [reason["code"] for reason in reasons] == ["replay"]
    assert tree_digest(receiver.site.import_dir / identifier) == imported
    rejected = audit_events(receiver.site, "envelope_rejected")
    assert [record["envelope_id"] for record in rejected] == [identifier]
    assert rejected[0]["reason"].startswith("replay: ")
    assert audit_events(receiver.site, "envelope_duplicate") == []
    assert agent.running()


def test_rejected_id_not_remembered(
    receiver: Receiver, agent: RunningAgent, tmp_path: Path
) -> None:
    genuine = receiver.forge.seal(tmp_path / "genuine")
    identifier = envelope_id(genuine)
    tampered = copy_of(genuine, tmp_path / "tampered")
    payload = tampered / "payload.encrypted"
    data = bytearray(payload.read_bytes())
    data[100] ^= 0x01
    payload.write_bytes(bytes(data))

    deliver([tampered], receiver.site.inbox)
    assert [r["code"] for r in wait_rejections(receiver, identifier, 1)] == ["decrypt_failed"]

    deliver([genuine], receiver.site.inbox)
    assert wait_imported(receiver, identifier)

    # After the import the tampered copy still fails verification, before any id check.
    deliver([tampered], receiver.site.inbox)
    codes = [reason["code"] for reason in wait_rejections(receiver, identifier, 2)]
    assert codes == ["decrypt_failed", "decrypt_failed"]
    assert len(audit_events(receiver.site, "envelope_imported")) == 1
    assert agent.running()


def test_quarantined_envelope_resent(
    receiver: Receiver, agent: RunningAgent, tmp_path: Path
) -> None:
    """A re-sent rejected envelope is verified again, and imported once the cause is fixed."""
    rotated_key = Ed25519PrivateKey.generate()
    envelope = receiver.forge.seal(tmp_path / "sealed")
    manifest = receiver.forge.read_manifest(envelope)
    receiver.forge.resign(manifest, key=rotated_key)
    receiver.forge.write_manifest(envelope, manifest)
    identifier = envelope_id(envelope)

    deliver([envelope], receiver.site.inbox)
    wait_rejections(receiver, identifier, 1)
    deliver([envelope], receiver.site.inbox)
    reasons = wait_rejections(receiver, identifier, 2)

    assert [reason["code"] for reason in reasons] == ["key_not_pinned", "key_not_pinned"]
    folders = [
        folder
        for folder, reason in quarantine_records(receiver.site.quarantine)
        if reason["envelope_id"] == identifier
    ]
    assert len(set(folders)) == 2, "each delivery keeps its own quarantine folder"
    assert len(audit_events(receiver.site, "envelope_rejected")) == 2
    assert imported_envelopes(receiver.site) == []

    # The operator pins the sender's new key, restarts, and moves one copy back.
    receiver.write_config(extra_signing_keys=[rotated_key])
    agent.restart()
    os.rename(folders[0] / envelope.name, receiver.site.inbox / envelope.name)

    assert wait_imported(receiver, identifier)
    assert len(audit_events(receiver.site, "envelope_imported")) == 1
    assert agent.running()


def test_seen_ids_survive_restart(receiver: Receiver, agent: RunningAgent, tmp_path: Path) -> None:
    envelope = receiver.forge.seal(tmp_path / "sealed")
    identifier = envelope_id(envelope)
    deliver([envelope], receiver.site.inbox)
    assert wait_imported(receiver, identifier)

    agent.restart()
    deliver([envelope], receiver.site.inbox)
    assert wait_until(lambda: audit_events(receiver.site, "envelope_duplicate"), TIMEOUT)

    reused = receiver.forge.seal(tmp_path / "reused", envelope_id=uuid.UUID(identifier))
    deliver([reused], receiver.site.inbox)
    assert [r["code"] for r in wait_rejections(receiver, identifier, 1)] == ["replay"]
    assert [path.name for path in imported_envelopes(receiver.site)] == [identifier]


# -- the timestamp window, in-process --------------------------------------------------------


class NullAudit:
    def record(self, event: str, **fields: Any) -> None:
        """Drop the record: these tests only build the policy."""


def inbound_policy(receiver: Receiver) -> OpenPolicy:
    """Return the policy the inbound pipeline builds from site B's config."""
    config = load_config(receiver.site.config_path)
    pipeline = InboundPipeline(
        config, Spool(config.state_dir), receiver.site.identity(), NullAudit()
    )
    return pipeline.policy()


def sealed_at(receiver: Receiver, directory: Path, moment: datetime) -> Path:
    """Seal a genuine envelope, then re-sign it with ``moment`` as its timestamp."""
    envelope = receiver.forge.seal(directory)
    manifest = receiver.forge.read_manifest(envelope)
    manifest["timestamp"] = format_timestamp(moment)
    receiver.forge.resign(manifest)
    receiver.forge.write_manifest(envelope, manifest)
    return envelope


# The forge's assertions expire 30 days after the real time, so the policy's clock must
# stay near it. A fixed ``now`` keeps the window boundaries exact to the second.
NOW = utc_now()


def work_folder(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    return work


MAX_AGE = timedelta(hours=MAX_ENVELOPE_AGE_HOURS)
MAX_SKEW = timedelta(seconds=MAX_CLOCK_SKEW_SECONDS)


def test_policy_from_config(receiver: Receiver) -> None:
    policy = inbound_policy(receiver)

    assert policy.max_age == MAX_AGE
    assert policy.max_clock_skew == MAX_SKEW
    assert policy.limits.max_total_bytes == 4 * 1024 * 1024
    assert policy.limits.max_members == 50


@pytest.mark.parametrize(
    "offset",
    [-MAX_AGE + timedelta(seconds=1), timedelta(0), MAX_SKEW - timedelta(seconds=1)],
    ids=["just-inside-age", "now", "just-inside-skew"],
)
def test_window_accepts_inside(receiver: Receiver, tmp_path: Path, offset: timedelta) -> None:
    policy = dataclasses.replace(inbound_policy(receiver), now=NOW)
    envelope = sealed_at(receiver, tmp_path / "sealed", NOW + offset)

    opened = open_envelope(envelope, policy, work_folder(tmp_path))

    timestamp_checks = [check for check in opened.checks if check.name == "timestamp"]
    assert len(timestamp_checks) == 1
    assert timestamp_checks[0].ok


@pytest.mark.parametrize(
    ("offset", "code"),
    [
        (-MAX_AGE - timedelta(seconds=1), "timestamp_too_old"),
        (-timedelta(days=400), "timestamp_too_old"),
        (MAX_SKEW + timedelta(seconds=1), "timestamp_in_future"),
        (timedelta(days=1), "timestamp_in_future"),
    ],
    ids=["just-too-old", "a-year-old", "just-too-far-ahead", "a-day-ahead"],
)
def test_window_rejects_outside(
    receiver: Receiver, tmp_path: Path, offset: timedelta, code: str
) -> None:
    policy = dataclasses.replace(inbound_policy(receiver), now=NOW)
    envelope = sealed_at(receiver, tmp_path / "sealed", NOW + offset)

    with pytest.raises(EnvelopeRejected) as caught:
        open_envelope(envelope, policy, work_folder(tmp_path))

    assert caught.value.code == code
    assert caught.value.checks[-1].name == "timestamp"
    assert [check.name for check in caught.value.checks if check.ok] == [
        "layout",
        "manifest",
        "sender",
    ]


def test_window_off_without_limits(receiver: Receiver, tmp_path: Path) -> None:
    """``jmix-agent open`` and ``verify`` build a policy without a window."""
    policy = dataclasses.replace(
        inbound_policy(receiver), now=NOW, max_age=None, max_clock_skew=None
    )
    envelope = sealed_at(receiver, tmp_path / "sealed", NOW - timedelta(days=20))

    opened = open_envelope(envelope, policy, work_folder(tmp_path))

    assert "timestamp" not in [check.name for check in opened.checks]


# -- the window settings ---------------------------------------------------------------------

BASE_CONFIG = """
[identity]
id = "org:test.site-b"
name = "Site B"
signing_key = "keys/signing.key"
encryption_key = "keys/encryption.key"
[inbound]
"""


def test_window_defaults(tmp_path: Path) -> None:
    inbound = parse_config(BASE_CONFIG, tmp_path / "agent.toml").inbound

    assert inbound.max_envelope_age_hours == 720.0
    assert inbound.max_clock_skew_seconds == 300.0
    assert inbound.max_envelope_bytes == 64 * 1024**3
    assert inbound.max_members == 100_000
    assert inbound.max_expansion_ratio == 200.0


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_envelope_age_hours = 0", "max_envelope_age_hours: must be between 1 and 87600"),
        ("max_clock_skew_seconds = -1", "max_clock_skew_seconds: must be between 0 and 86400"),
        ("max_envelope_bytes = 1000", "max_envelope_bytes: must be between 1048576"),
        ("max_members = 0", "max_members: must be between 1 and"),
        ("max_expansion_ratio = 0.5", "max_expansion_ratio: must be between 1 and"),
        ('max_clock_skew_seconds = "5m"', "max_clock_skew_seconds: must be a number"),
    ],
)
def test_window_settings_invalid(tmp_path: Path, setting: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f":8: inbound.{message}"):
        parse_config(BASE_CONFIG + setting + "\n", tmp_path / "agent.toml")


def test_window_settings_in_example_config() -> None:
    """The shipped example config documents and sets every window and limit key."""
    example = Path(__file__).resolve().parents[1] / "etc" / "jmix-agent" / "agent.toml"
    inbound = parse_config(example.read_text(), example).inbound
    text = example.read_text()

    for key in (
        "max_envelope_age_hours",
        "max_clock_skew_seconds",
        "max_envelope_bytes",
        "max_members",
        "max_expansion_ratio",
    ):
        assert f"\n{key} = " in text, f"{key} is missing from the example config"
    assert inbound.max_envelope_age_hours == 720.0
    assert inbound.max_clock_skew_seconds == 300.0
