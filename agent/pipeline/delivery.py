"""Durable delivery state: per-envelope records, per-peer retry gate, operator retries.

Layout under the state directory::

    delivery/<peer>/<envelope>.json    attempts, last error, failure reason of one envelope
    delivery/<peer>/peer.json          the peer's retry gate: consecutive failures, next
                                       attempt, last error, and a pause after a permanent error
    delivery/<peer>/retry-requested    written by ``jmix-agent retry``; the sender resets
                                       the gate and the pause when it finds it

Why small JSON files rather than a SQLite ledger: the envelope itself is the source of
truth and its folder (``outbox/``, ``sent/``, ``failed/``) is its state, so a record only
adds the schedule and the last error. A lost or unreadable record therefore costs at
most a retry too early, never an envelope. Each record has one writer at a time (the
peer's sender thread while the envelope is in ``outbox/``, the ``retry`` command while it
is in ``failed/``), so no locking is needed between the daemon and the command. Records
are written with the temp-fsync-rename-fsync rule, and an operator can read them with
``cat``. A record exists only for an envelope that failed at least once or was retried,
so a healthy delivery writes none.

All times are wall-clock seconds since the epoch, because they must survive a restart.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from agent import fsutil

LOGGER = logging.getLogger(__name__)

DELIVERY_DIR = "delivery"
PEER_FILE = "peer.json"
RETRY_REQUEST_FILE = "retry-requested"
RECORD_SUFFIX = ".json"
ENVELOPE_SUFFIXES = (".JMIX", ".jmix", ".zip")

QUEUED = "queued"
FAILED = "failed"


def backoff_delay(
    failures: int, initial: float, cap: float, rng: random.Random | None = None
) -> float:
    """Return the wait in seconds after ``failures`` consecutive failed attempts.

    The base doubles from ``initial`` with every failure up to ``cap``. The wait is a
    random point in the upper half of the base ("equal jitter"), so peers that failed
    together do not all retry at the same moment, yet no retry comes earlier than half
    the scheduled interval.
    """
    exponent = min(max(failures, 1) - 1, 60)
    base = min(cap, initial * 2.0**exponent)
    return base * (rng or random).uniform(0.5, 1.0)


def safe_dir_name(peer_id: str) -> str:
    """Return a file-name-safe folder name for a peer id from config."""
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in peer_id)


def envelope_id_of(name: str) -> str:
    """Return the envelope id of an outbox entry name such as ``<id>.JMIX``."""
    return name.split(".", 1)[0]


@dataclass
class EnvelopeRecord:
    """Delivery state of one envelope, apart from the folder it is in."""

    envelope: str
    peer: str
    queued_at: float
    attempts: int = 0
    last_attempt: float | None = None
    last_error: str | None = None
    state: str = QUEUED
    failed_at: float | None = None
    reason: str | None = None

    @property
    def envelope_id(self) -> str:
        """The envelope id, without the folder suffix."""
        return envelope_id_of(self.envelope)


@dataclass
class PeerState:
    """One peer's retry gate and pause.

    ``failures`` counts consecutive failed attempts and drives the backoff;
    ``next_attempt`` is when the sender may try again. A permanent error (host key,
    client key) sets ``paused_until`` instead, which is much later.
    """

    failures: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    last_failure: float | None = None
    paused_since: float | None = None
    paused_until: float | None = None
    paused_reason: str | None = None

    def paused(self, now: float) -> bool:
        """Return True while a permanent error keeps the peer paused."""
        return self.paused_until is not None and now < self.paused_until

    def waiting(self, now: float) -> bool:
        """Return True while the backoff after a failure has not yet run out."""
        return now < self.next_attempt


def _load_json(path: Path) -> dict[str, Any] | None:
    """Return a JSON object from ``path``, or None if it is missing or unreadable."""
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        LOGGER.warning("ignoring unreadable delivery record %s: %s", path, exc)
        return None
    return document if isinstance(document, dict) else None


def _known_fields(cls: type, document: dict[str, Any]) -> dict[str, Any]:
    names = {item.name for item in fields(cls)}
    return {key: value for key, value in document.items() if key in names}


class DeliveryStore:
    """Reads and writes the files under ``<state>/delivery``; safe for one writer per file."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / DELIVERY_DIR

    def peer_dir(self, peer_dir: str) -> Path:
        """Return (without creating) the folder of one peer's records."""
        return self.root / peer_dir

    def peer_dirs(self) -> list[str]:
        """Return the peer folder names that have records."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    # -- envelope records ------------------------------------------------------------

    def record_path(self, peer_dir: str, envelope: str) -> Path:
        """Return the path of one envelope's record."""
        return self.root / peer_dir / f"{envelope}{RECORD_SUFFIX}"

    def load_record(self, peer_dir: str, envelope: str) -> EnvelopeRecord | None:
        """Return an envelope's record, or None if it has none (or it is unreadable)."""
        document = _load_json(self.record_path(peer_dir, envelope))
        if document is None:
            return None
        try:
            return EnvelopeRecord(**_known_fields(EnvelopeRecord, document))
        except TypeError as exc:
            LOGGER.warning("ignoring incomplete delivery record of %s: %s", envelope, exc)
            return None

    def save_record(self, peer_dir: str, record: EnvelopeRecord) -> None:
        """Write an envelope's record durably."""
        directory = fsutil.make_private_dir(self.root / peer_dir)
        data = json.dumps(asdict(record), indent=2, sort_keys=True).encode()
        fsutil.write_bytes_durably(directory / f"{record.envelope}{RECORD_SUFFIX}", data)

    def remove_record(self, peer_dir: str, envelope: str) -> None:
        """Delete an envelope's record if it has one."""
        self.record_path(peer_dir, envelope).unlink(missing_ok=True)

    def records(self, peer_dir: str) -> Iterator[EnvelopeRecord]:
        """Yield every readable envelope record of one peer."""
        directory = self.root / peer_dir
        if not directory.is_dir():
            return
        for path in sorted(directory.glob(f"*{RECORD_SUFFIX}")):
            if path.name == PEER_FILE or path.name.startswith("."):
                continue
            record = self.load_record(peer_dir, path.name.removesuffix(RECORD_SUFFIX))
            if record is not None:
                yield record

    # -- peer state ------------------------------------------------------------------

    def load_peer(self, peer_dir: str) -> PeerState:
        """Return a peer's retry gate and pause; a fresh state if it has none."""
        document = _load_json(self.root / peer_dir / PEER_FILE)
        if document is None:
            return PeerState()
        try:
            return PeerState(**_known_fields(PeerState, document))
        except TypeError:
            return PeerState()

    def save_peer(self, peer_dir: str, state: PeerState) -> None:
        """Write a peer's retry gate and pause durably."""
        directory = fsutil.make_private_dir(self.root / peer_dir)
        data = json.dumps(asdict(state), indent=2, sort_keys=True).encode()
        fsutil.write_bytes_durably(directory / PEER_FILE, data)

    # -- operator retry requests -----------------------------------------------------

    def request_retry(self, peer_dir: str) -> None:
        """Ask the peer's sender to try again now (it may run in another process)."""
        directory = fsutil.make_private_dir(self.root / peer_dir)
        fsutil.write_bytes_durably(directory / RETRY_REQUEST_FILE, b"")

    def take_retry_request(self, peer_dir: str) -> bool:
        """Consume a pending retry request; return True if there was one."""
        try:
            os.unlink(self.root / peer_dir / RETRY_REQUEST_FILE)
        except FileNotFoundError:
            return False
        return True


@dataclass(frozen=True)
class RetryOutcome:
    """Result of :func:`retry_envelopes`: envelopes moved back and peers asked to retry."""

    requeued: list[tuple[str, str]]
    """(peer folder, envelope folder name) of each envelope moved from failed/ to outbox/."""
    waiting: list[tuple[str, str]]
    """(peer folder, envelope folder name) of each matching envelope already in outbox/."""
    peers: list[str]
    """Peer folders whose sender was asked to retry now."""


def _entries(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if not p.name.startswith(".") and p.suffix in ENVELOPE_SUFFIXES
    )


def retry_envelopes(
    state_dir: Path,
    *,
    envelope_id: str | None = None,
    peer_dir: str | None = None,
    now: float,
) -> RetryOutcome:
    """Move failed envelopes back to ``outbox/`` and ask their senders to retry now.

    With neither ``envelope_id`` nor ``peer_dir`` every peer is selected. A failed
    envelope gets a fresh record first, so its maximum age counts from ``now``, and is
    then renamed back into the outbox. A crash in between leaves it in ``failed/`` with
    the fresh record, and running the command again finishes the move. Envelopes that
    are still waiting in the outbox are not moved; their peer's sender is woken instead,
    which also ends a pause. Safe while the daemon runs: the daemon never writes the
    record of an envelope in ``failed/``.
    """
    store = DeliveryStore(state_dir)
    requeued: list[tuple[str, str]] = []
    waiting: list[tuple[str, str]] = []
    peers: set[str] = set()
    folders = {
        p.name
        for state in ("failed", "outbox")
        if (state_dir / state).is_dir()
        for p in (state_dir / state).iterdir()
        if p.is_dir()
    }
    for folder in sorted(folders):
        if peer_dir is not None and folder != peer_dir:
            continue
        for item in _entries(state_dir / "outbox" / folder):
            if envelope_id is None or envelope_id_of(item.name) == envelope_id:
                waiting.append((folder, item.name))
                peers.add(folder)
        for item in _entries(state_dir / "failed" / folder):
            if envelope_id is not None and envelope_id_of(item.name) != envelope_id:
                continue
            previous = store.load_record(folder, item.name)
            record = EnvelopeRecord(
                envelope=item.name,
                peer=previous.peer if previous else folder,
                queued_at=now,
                last_error=previous.reason if previous else None,
            )
            store.save_record(folder, record)
            outbox = fsutil.make_private_dir(state_dir / "outbox" / folder)
            fsutil.rename_durably(item, outbox / item.name)
            requeued.append((folder, item.name))
            peers.add(folder)
    if envelope_id is None:
        # A paused peer may have nothing waiting yet; the request still ends its pause.
        peers.update([peer_dir] if peer_dir is not None else store.peer_dirs())
    for folder in sorted(peers):
        store.request_retry(folder)
    return RetryOutcome(requeued, waiting, sorted(peers))
