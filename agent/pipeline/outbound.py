"""Outbound pipeline: quiet studies become batches, batches become envelopes, envelopes go out.

States and their moves (each a single rename):

    incoming/<study>/ --quiet--> ready/<batch>/ --sealed for every peer--> sealed/<batch>/
    outbox/<peer>/<envelope>  --delivered-->  sent/<peer>/<envelope>

An envelope's id is derived from its batch id and peer id, so a crash between sealing
and recording it never produces a second envelope with another id: the sealer sees the
envelope already in the outbox (or sent) and moves on.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import fsutil
from agent.audit import AuditSink
from agent.config import Config, PeerConfig, RouteConfig
from agent.dicom.inspect import build_metadata
from agent.identity import LocalIdentity
from agent.jmix.profiles import get_profile
from agent.jmix.seal import Party, PayloadFile, seal_envelope
from agent.pipeline.spool import SOURCES_DIR, Spool
from agent.transport.base import Transport, TransportError

LOGGER = logging.getLogger(__name__)
BATCH_FILE = "batch.json"
ENVELOPE_NAMESPACE = uuid.UUID("5b0f3a52-9a55-4d36-8a43-3f5b0e2a8c11")
ENVELOPE_SUFFIXES = (".JMIX", ".jmix", ".zip")


def safe_dir_name(peer_id: str) -> str:
    """Return a file-name-safe folder name for a peer id from config."""
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in peer_id)


def envelope_id_for(batch_id: str, peer_id: str) -> uuid.UUID:
    """Return the stable envelope id of one batch sealed for one peer."""
    return uuid.uuid5(ENVELOPE_NAMESPACE, f"{batch_id}\n{peer_id}")


@dataclass(frozen=True)
class Batch:
    """A complete study batch in ``ready/``."""

    path: Path
    batch_id: str
    study_uid: str
    sources: tuple[str, ...]

    def instances(self) -> list[Path]:
        """Return the instance files of the batch, sorted by name."""
        return sorted(p for p in self.path.glob("*.dcm") if p.is_file() and not p.is_symlink())


def _route_matches(route: RouteConfig, sources: Sequence[str], modalities: set[str]) -> bool:
    if route.calling_ae and not any(f"ae-{ae}" in sources for ae in route.calling_ae):
        return False
    if route.watch and not any(f"watch-{name}" in sources for name in route.watch):
        return False
    return not route.modality or bool(modalities & set(route.modality))


def peers_for(config: Config, sources: Sequence[str], modalities: set[str]) -> list[PeerConfig]:
    """Return the peers every matching route sends to, in config order, without repeats."""
    wanted: set[str] = set()
    for route in config.routes:
        if _route_matches(route, sources, modalities):
            wanted.update(route.to)
    return [peer for peer in config.peers if peer.id in wanted]


class OutboundPipeline:
    """Promotes quiet studies and seals ready batches; driven by the daemon's main loop."""

    def __init__(
        self, config: Config, spool: Spool, identity: LocalIdentity, audit: AuditSink
    ) -> None:
        self.config = config
        self.spool = spool
        self.identity = identity
        self.audit = audit

    # -- incoming -> ready ------------------------------------------------------------------

    def promote_quiet_studies(self) -> int:
        """Move every study that has been quiet long enough into ``ready/``."""
        moved = 0
        for study_dir in self.spool.quiet_studies(self.config.study_quiet_seconds):
            with self.spool.study_lock(study_dir.name):
                if not study_dir.exists():
                    continue
                if (
                    time.time() - self.spool.last_activity(study_dir)
                    < self.config.study_quiet_seconds
                ):
                    continue
                batch_file = study_dir / BATCH_FILE
                if batch_file.exists():
                    batch_id = json.loads(batch_file.read_bytes())["batch_id"]
                else:
                    batch_id = str(uuid.uuid4())
                    record = {"batch_id": batch_id, "study_uid": study_dir.name}
                    fsutil.write_bytes_durably(batch_file, json.dumps(record).encode())
                count = len(list(study_dir.glob("*.dcm")))
                fsutil.rename_durably(study_dir, self.spool.path("ready") / batch_id)
            moved += 1
            self.audit.record(
                "study_complete",
                study_uid=study_dir.name,
                batch_id=batch_id,
                count=count,
                outcome="ok",
            )
            LOGGER.info("study batch %s complete with %d instances", batch_id, count)
        return moved

    # -- ready -> outbox ------------------------------------------------------------------

    def ready_batches(self) -> list[Batch]:
        """Return the batches waiting in ``ready/``."""
        batches = []
        for path in sorted(self.spool.path("ready").iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            record = json.loads((path / BATCH_FILE).read_bytes())
            sources_dir = path / SOURCES_DIR
            sources = (
                tuple(sorted(p.name for p in sources_dir.iterdir())) if sources_dir.is_dir() else ()
            )
            batches.append(Batch(path, record["batch_id"], record["study_uid"], sources))
        return batches

    def seal_ready(self) -> int:
        """Seal each ready batch for every routed peer, then move it to ``sealed/``."""
        sealed = 0
        for batch in self.ready_batches():
            try:
                sealed += self._seal_batch(batch)
            except Exception:
                # One bad batch must not stop the others; it stays in ready/ for a retry.
                LOGGER.exception("sealing batch %s failed; it stays in ready/", batch.batch_id)
        return sealed

    def _seal_batch(self, batch: Batch) -> int:
        instances = batch.instances()
        metadata = build_metadata(instances)
        modalities = {
            str(series.get("modality", "")).upper()
            for series in metadata.get("studies", {}).get("series", [])
        }
        peers = peers_for(self.config, batch.sources, modalities)
        if not peers:
            LOGGER.warning(
                "batch %s matches no route; it is kept in sealed/ without being sent",
                batch.batch_id,
            )
        files = [PayloadFile(f"dicom/{path.name}", path) for path in instances]
        count = 0
        for peer in peers:
            if self._seal_for_peer(batch, peer, files, metadata):
                count += 1
        fsutil.rename_durably(batch.path, self.spool.path("sealed") / batch.path.name)
        return count

    def _seal_for_peer(
        self, batch: Batch, peer: PeerConfig, files: list[PayloadFile], metadata: dict[str, Any]
    ) -> bool:
        envelope_id = envelope_id_for(batch.batch_id, peer.id)
        peer_dir = safe_dir_name(peer.id)
        for state in ("outbox", "sent", "failed"):
            for suffix in ENVELOPE_SUFFIXES:
                if (self.spool.root / state / peer_dir / f"{envelope_id}{suffix}").exists():
                    return False
        outbox = fsutil.make_private_dir(self.spool.path("outbox") / peer_dir)
        profile = get_profile(peer.profile)
        result = seal_envelope(
            files,
            metadata,
            outbox,
            Party(self.identity.id, self.identity.name, self.identity.contact),
            self.identity.signing_key,
            Party(peer.id, peer.name, peer.contact),
            peer.encryption_public_key,
            profile=profile,
            envelope_id=envelope_id,
        )
        self.audit.record(
            "envelope_sealed",
            envelope_id=result.envelope_id,
            study_uid=batch.study_uid,
            batch_id=batch.batch_id,
            peer=peer.id,
            count=result.files,
            bytes=result.payload_bytes,
            profile=profile.name,
            outcome="ok",
        )
        LOGGER.info(
            "sealed envelope %s for %s (%d files)", result.envelope_id, peer.id, result.files
        )
        return True


@dataclass
class _RetryState:
    attempts: int = 0
    next_try: float = 0.0


class PeerSender(threading.Thread):
    """Delivers one peer's outbox in its own thread, so a dead peer delays no other."""

    BACKOFF_START = 2.0
    BACKOFF_CAP = 300.0

    def __init__(
        self,
        peer: PeerConfig,
        transport: Transport,
        spool: Spool,
        audit: AuditSink,
        stop: threading.Event,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name=f"send-{peer.id}", daemon=True)
        self.peer = peer
        self.transport = transport
        self.spool = spool
        self.audit = audit
        self.stop_event = stop
        self.poll_interval = poll_interval
        self.clock = clock
        self.peer_dir = safe_dir_name(peer.id)
        self._retry: dict[str, _RetryState] = {}

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.send_pending()
            except Exception:
                LOGGER.exception("sender for %s failed unexpectedly; retrying", self.peer.id)
            self.stop_event.wait(self.poll_interval)
        self.transport.close()

    def pending(self) -> list[Path]:
        """Return the envelopes waiting in this peer's outbox, oldest first."""
        outbox = self.spool.path("outbox") / self.peer_dir
        if not outbox.is_dir():
            return []
        items = [
            p
            for p in outbox.iterdir()
            if not p.name.startswith(".") and p.suffix in ENVELOPE_SUFFIXES
        ]
        return sorted(items, key=lambda p: p.stat().st_mtime)

    def send_pending(self) -> int:
        """Try every due envelope once; return how many were delivered."""
        delivered = 0
        for item in self.pending():
            if self.stop_event.is_set():
                break
            state = self._retry.setdefault(item.name, _RetryState())
            if self.clock() < state.next_try:
                continue
            if self._send_one(item, state):
                delivered += 1
                self._retry.pop(item.name, None)
        return delivered

    def _send_one(self, item: Path, state: _RetryState) -> bool:
        envelope_id = item.name.split(".")[0]
        state.attempts += 1
        try:
            result = self.transport.deliver(item, item.name)
        except TransportError as exc:
            delay = min(self.BACKOFF_CAP, self.BACKOFF_START * 2 ** (state.attempts - 1))
            delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security
            state.next_try = self.clock() + delay
            LOGGER.warning(
                "delivery of envelope %s to %s failed (attempt %d, next in %.0f s): %s",
                envelope_id,
                self.peer.id,
                state.attempts,
                delay,
                exc,
            )
            self.audit.record(
                "send_failed",
                envelope_id=envelope_id,
                peer=self.peer.id,
                attempt=state.attempts,
                reason=str(exc),
                outcome="retry",
            )
            return False
        sent_dir = fsutil.make_private_dir(self.spool.path("sent") / self.peer_dir)
        fsutil.rename_durably(item, sent_dir / item.name)
        already = bool(getattr(result, "already_present", False))
        self.audit.record(
            "envelope_sent",
            envelope_id=envelope_id,
            peer=self.peer.id,
            attempt=state.attempts,
            transport=self.peer.transport.kind if self.peer.transport else None,
            outcome="already_delivered" if already else "ok",
        )
        LOGGER.info("delivered envelope %s to %s", envelope_id, self.peer.id)
        return True
