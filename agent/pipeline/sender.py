"""Per-peer delivery: one thread per peer moves its outbox to the peer and keeps score.

    outbox/<peer>/<envelope>  --delivered-->  sent/<peer>/<envelope>
                              --too old, peer still failing-->  failed/<peer>/<envelope>

Each peer has its own thread, so a slow or dead peer never delays another. Failures are
scored per peer, because almost every failure (connection refused, timeout, remote disk
full) concerns the peer, not one envelope:

- A transient error closes the peer's gate for an exponential backoff with jitter, capped
  at ``retry_max_seconds``. When it opens, envelopes never tried go first, then the one
  tried longest ago, so one envelope the peer keeps refusing cannot block the others.
- A permanent error (changed host key, rejected client key) pauses the peer for
  ``paused_retry_seconds``, logs an error and audits ``send_failed`` with outcome
  ``paused``. Nothing is trusted on first use: the pause ends only after that interval, on
  ``jmix-agent retry``, on SIGHUP or on a restart, and the same check runs again.
- An envelope older than ``max_age_hours`` moves to ``failed/<peer>/`` with its reason once
  the peer fails again; it stays there until an operator runs ``jmix-agent retry``. An
  envelope whose own files are unusable (SourceError) moves there at once.

The gate and each failed envelope's attempts live in :mod:`agent.pipeline.delivery`, so
the backoff continues where it was after a restart.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent import fsutil
from agent.audit import AuditSink
from agent.config import DeliveryConfig, PeerConfig
from agent.pipeline.delivery import (
    ENVELOPE_SUFFIXES,
    FAILED,
    DeliveryStore,
    EnvelopeRecord,
    backoff_delay,
    envelope_id_of,
    safe_dir_name,
)
from agent.pipeline.spool import Spool
from agent.transport.base import DeliveryResult, SourceError, Transport, TransportError

LOGGER = logging.getLogger(__name__)


class _Outcome(enum.Enum):
    DELIVERED = "delivered"
    ENVELOPE_FAILED = "envelope failed"
    PEER_FAILED = "peer failed"


class PeerSender(threading.Thread):
    """Delivers one peer's outbox in its own thread; see the module docstring."""

    def __init__(
        self,
        peer: PeerConfig,
        transport: Transport,
        spool: Spool,
        audit: AuditSink,
        settings: DeliveryConfig,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name=f"send-{peer.id}", daemon=True)
        self.peer = peer
        self.transport = transport
        self.spool = spool
        self.audit = audit
        self.settings = settings
        self.poll_interval = poll_interval
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self.peer_dir = safe_dir_name(peer.id)
        self.store = DeliveryStore(spool.root)
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._retry_requested = threading.Event()
        self._state = self.store.load_peer(self.peer_dir)
        # Records of outbox entries, loaded on first sight; None means "has no record".
        self._records: dict[str, EnvelopeRecord | None] = {}

    # -- control from other threads --------------------------------------------------

    def stop(self) -> None:
        """Ask the thread to finish its current delivery and exit."""
        self.stop_event.set()
        self._wake.set()

    def retry_now(self) -> None:
        """End a pause or backoff at the next poll (SIGHUP, operator retry)."""
        self._retry_requested.set()
        self._wake.set()

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        # A start may follow a config fix, so the peer gets one attempt at once. The
        # failure count is kept: if the attempt fails, the backoff goes on from there.
        self._open_gate("the agent started", keep_failures=True)
        while not self.stop_event.is_set():
            try:
                self.send_pending()
            except Exception:
                LOGGER.exception("sender for %s failed unexpectedly; retrying", self.peer.id)
            self._wake.wait(self.poll_interval)
            self._wake.clear()
        self.transport.close()

    def pending(self) -> list[Path]:
        """Return the envelopes waiting in this peer's outbox, oldest first."""
        outbox = self.spool.path("outbox") / self.peer_dir
        if not outbox.is_dir():
            return []
        items = []
        for path in outbox.iterdir():
            if path.name.startswith(".") or path.suffix not in ENVELOPE_SUFFIXES:
                continue
            try:
                items.append((path.lstat().st_mtime, path))
            except FileNotFoundError:
                continue
        return [path for _mtime, path in sorted(items)]

    def send_pending(self) -> int:
        """Deliver every envelope while the peer's gate is open; return how many went out."""
        if self._retry_requested.is_set() or self.store.take_retry_request(self.peer_dir):
            self._retry_requested.clear()
            self._open_gate("a retry was requested", keep_failures=False)

        items = self.pending()
        names = {item.name for item in items}
        self._records = {name: record for name, record in self._records.items() if name in names}
        if not items:
            return 0
        now = self.clock()
        if self._state.paused(now) or self._state.waiting(now):
            self._fail_expired(items, now)
            return 0

        delivered = 0
        for item in self._by_last_attempt(items):
            if self.stop_event.is_set():
                break
            outcome = self._send_one(item)
            if outcome is _Outcome.DELIVERED:
                delivered += 1
            elif outcome is _Outcome.PEER_FAILED:
                self._fail_expired([i for i in items if i.exists()], self.clock())
                break
        return delivered

    def _by_last_attempt(self, items: list[Path]) -> list[Path]:
        """Order never-tried envelopes first (oldest first), then by their last attempt."""

        def last_attempt(item: Path) -> float:
            record = self._record(item)
            return (record.last_attempt or 0.0) if record else 0.0

        return sorted(items, key=last_attempt)

    # -- one envelope ----------------------------------------------------------------

    def _send_one(self, item: Path) -> _Outcome:
        envelope_id = envelope_id_of(item.name)
        try:
            result = self.transport.deliver(item, item.name)
        except SourceError as exc:
            record = self._note_attempt(item, exc.message)
            self._fail(item, record, f"the envelope cannot be sent as it is: {exc.message}")
            return _Outcome.ENVELOPE_FAILED
        except TransportError as exc:
            self._note_peer_failure(item, exc.message, permanent=exc.permanent)
            return _Outcome.PEER_FAILED
        except Exception as exc:
            # A transport bug must not kill the thread; count it like a transient error.
            LOGGER.exception("delivering envelope %s to %s failed", envelope_id, self.peer.id)
            self._note_peer_failure(item, f"unexpected {type(exc).__name__}", permanent=False)
            return _Outcome.PEER_FAILED
        self._delivered(item, result)
        return _Outcome.DELIVERED

    def _delivered(self, item: Path, result: DeliveryResult) -> None:
        envelope_id = envelope_id_of(item.name)
        record = self._record(item)
        sent_dir = fsutil.make_private_dir(self.spool.path("sent") / self.peer_dir)
        target = sent_dir / item.name
        if os.path.lexists(target):
            # Only an operator copying folders by hand gets here: sent/ already has it.
            fsutil.remove_tree(item)
        else:
            fsutil.rename_durably(item, target)
        # Retention counts from delivery, so the entry's time becomes the delivery time.
        os.utime(target, follow_symlinks=False)
        self._records.pop(item.name, None)
        if record is not None:
            self.store.remove_record(self.peer_dir, item.name)

        if self._state.failures or self._state.paused_until is not None:
            LOGGER.info(
                "delivery to %s works again after %d failed attempts",
                self.peer.id,
                self._state.failures,
            )
            self._reset_state()
        attempt = (record.attempts if record else 0) + 1
        self.audit.record(
            "envelope_sent",
            envelope_id=envelope_id,
            peer=self.peer.id,
            attempt=attempt,
            transport=self.peer.transport.kind if self.peer.transport else None,
            outcome="already_delivered" if result.already_present else "ok",
        )
        LOGGER.info("delivered envelope %s to %s", envelope_id, self.peer.id)

    # -- failures --------------------------------------------------------------------

    def _record(self, item: Path) -> EnvelopeRecord | None:
        if item.name not in self._records:
            self._records[item.name] = self.store.load_record(self.peer_dir, item.name)
        return self._records[item.name]

    def _queued_at(self, item: Path) -> float:
        record = self._record(item)
        if record is not None:
            return record.queued_at
        try:
            # The envelope's folder was renamed into the outbox right after sealing.
            return item.lstat().st_mtime
        except FileNotFoundError:
            return self.clock()

    def _note_attempt(self, item: Path, error: str) -> EnvelopeRecord:
        """Count a failed attempt on the envelope's record and write it."""
        record = self._record(item) or EnvelopeRecord(
            envelope=item.name, peer=self.peer.id, queued_at=self._queued_at(item)
        )
        record.attempts += 1
        record.last_attempt = self.clock()
        record.last_error = error
        self.store.save_record(self.peer_dir, record)
        self._records[item.name] = record
        return record

    def _note_peer_failure(self, item: Path, error: str, *, permanent: bool) -> None:
        """Close the peer's gate after a failed attempt, audit and log it."""
        now = self.clock()
        record = self._note_attempt(item, error)
        state = self._state
        state.failures += 1
        state.last_error = error
        state.last_failure = now
        envelope_id = envelope_id_of(item.name)
        if permanent:
            state.paused_since = state.paused_since or now
            state.paused_until = now + self.settings.paused_retry_seconds
            state.paused_reason = error
            state.next_attempt = state.paused_until
            outcome = "paused"
            LOGGER.error(
                "delivery to %s is paused for %.0f s after a permanent error: %s. Fix the "
                "peer's transport config, then run `jmix-agent retry --peer %s` or send "
                "SIGHUP",
                self.peer.id,
                self.settings.paused_retry_seconds,
                error,
                self.peer.id,
            )
        else:
            delay = backoff_delay(
                state.failures,
                self.settings.retry_initial_seconds,
                self.settings.retry_max_seconds,
                self.rng,
            )
            state.next_attempt = now + delay
            outcome = "retry"
            LOGGER.warning(
                "delivery of envelope %s to %s failed (attempt %d, next in %.0f s): %s",
                envelope_id,
                self.peer.id,
                record.attempts,
                delay,
                error,
            )
        self.store.save_peer(self.peer_dir, state)
        self.audit.record(
            "send_failed",
            envelope_id=envelope_id,
            peer=self.peer.id,
            attempt=record.attempts,
            reason=error,
            outcome=outcome,
        )

    def _fail_expired(self, items: list[Path], now: float) -> None:
        """Move envelopes older than the maximum age to failed/, while the peer is failing."""
        max_age = self.settings.max_age_hours * 3600.0
        for item in items:
            if now - self._queued_at(item) < max_age:
                continue
            reason = (
                f"not delivered within {self.settings.max_age_hours:g} h; "
                f"last error: {self._state.last_error or 'none recorded'}"
            )
            self._fail(item, self._record(item), reason)

    def _fail(self, item: Path, record: EnvelopeRecord | None, reason: str) -> None:
        """Record why an envelope failed, then move it to failed/<peer>/."""
        envelope_id = envelope_id_of(item.name)
        record = record or EnvelopeRecord(
            envelope=item.name, peer=self.peer.id, queued_at=self._queued_at(item)
        )
        record.state = FAILED
        record.failed_at = self.clock()
        record.reason = reason

        # The record first: a crash before the rename leaves the envelope in the outbox,
        # where the next pass fails it again.
        self.store.save_record(self.peer_dir, record)
        failed_dir = fsutil.make_private_dir(self.spool.root / "failed" / self.peer_dir)
        try:
            fsutil.rename_durably(item, failed_dir / item.name)
        except FileNotFoundError:
            return
        self._records.pop(item.name, None)

        self.audit.record(
            "send_failed",
            envelope_id=envelope_id,
            peer=self.peer.id,
            attempt=record.attempts,
            reason=reason,
            outcome="failed",
        )
        LOGGER.error(
            "envelope %s for %s moved to failed/: %s. Once the cause is fixed, run "
            "`jmix-agent retry %s`",
            envelope_id,
            self.peer.id,
            reason,
            envelope_id,
        )

    # -- the gate --------------------------------------------------------------------

    def _open_gate(self, reason: str, *, keep_failures: bool) -> None:
        """Allow an attempt now, ending any pause."""
        state = self._state
        if state.paused_until is None and state.next_attempt == 0.0:
            if keep_failures or state.failures == 0:
                return
        if state.paused_until is not None or state.next_attempt > self.clock():
            LOGGER.info("retrying deliveries to %s now: %s", self.peer.id, reason)
        state.next_attempt = 0.0
        state.paused_since = state.paused_until = state.paused_reason = None
        if not keep_failures:
            state.failures = 0
        self.store.save_peer(self.peer_dir, state)

    def _reset_state(self) -> None:
        self._state.failures = 0
        self._state.next_attempt = 0.0
        self._state.last_error = None
        self._state.paused_since = self._state.paused_until = self._state.paused_reason = None
        self.store.save_peer(self.peer_dir, self._state)
