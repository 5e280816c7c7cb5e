"""Outbound pipeline: quiet studies become batches, and batches become envelopes.

States and their moves (each a single rename):

    incoming/<study>/ --quiet--> ready/<batch>/ --sealed for every peer--> sealed/<batch>/
    outbox/<peer>/<envelope>      (then delivered by agent.pipeline.sender)

An envelope's id is derived from its batch id and peer id, so a crash between sealing
and recording it never produces a second envelope with another id. The sealer finds the
envelope already in the outbox (or sent, or failed) and skips it.

Before the first envelope of a batch is sealed, its plan is written into the batch
(``plan.json``): the SHA-256 of every instance and, for each routed peer, the instances
that peer gets. An instance that an earlier batch of the same study already planned for
that peer with the same bytes is left out, so a sender that resends a study after an
abort, or the same study from two modalities, does not make the peer import it twice.
The plan is fixed once written, which keeps a resumed batch identical after a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import fsutil
from agent.audit import AuditSink
from agent.config import Config, PeerConfig, RouteConfig
from agent.dicom.inspect import build_metadata
from agent.identity import LocalIdentity
from agent.jmix.profiles import get_profile
from agent.jmix.seal import Party, PayloadFile, Requester, seal_envelope
from agent.pipeline.delivery import ENVELOPE_SUFFIXES, safe_dir_name
from agent.pipeline.spool import SOURCES_DIR, Spool

__all__ = [
    "BATCH_FILE",
    "ENVELOPE_SUFFIXES",
    "PLAN_FILE",
    "Batch",
    "OutboundPipeline",
    "Plan",
    "envelope_id_for",
    "peers_for",
    "safe_dir_name",
]

LOGGER = logging.getLogger(__name__)
BATCH_FILE = "batch.json"
PLAN_FILE = "plan.json"
ENVELOPE_NAMESPACE = uuid.UUID("5b0f3a52-9a55-4d36-8a43-3f5b0e2a8c11")
SEAL_SPACE_MARGIN = 1024 * 1024
"""Free space in bytes needed beyond the instances' size before an envelope is sealed."""


def envelope_id_for(batch_id: str, peer_id: str) -> uuid.UUID:
    """Return the stable envelope id of one batch sealed for one peer."""
    return uuid.uuid5(ENVELOPE_NAMESPACE, f"{batch_id}\n{peer_id}")


def is_instance_file(path: Path) -> bool:
    """Return True for a stored instance; temporary names start with a dot."""
    return path.name.endswith(".dcm") and not path.name.startswith(".")


@dataclass(frozen=True)
class Batch:
    """A complete study batch in ``ready/``."""

    path: Path
    batch_id: str
    study_uid: str
    sources: tuple[str, ...]
    created: float = 0.0

    def instances(self) -> list[Path]:
        """Return the instance files of the batch, sorted by name."""
        return sorted(
            p
            for p in self.path.iterdir()
            if is_instance_file(p) and p.is_file() and not p.is_symlink()
        )


@dataclass(frozen=True)
class Plan:
    """The plan of one batch: every instance's SHA-256, and the instances each peer gets."""

    study_uid: str
    digests: dict[str, str]
    peers: dict[str, list[str]]

    @classmethod
    def load(cls, path: Path) -> Plan | None:
        """Read a plan file; None if it is missing."""
        try:
            document = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        return cls(document["study_uid"], document["digests"], document["peers"])

    def save(self, path: Path) -> None:
        """Write the plan durably."""
        document = {"study_uid": self.study_uid, "digests": self.digests, "peers": self.peers}
        fsutil.write_bytes_durably(path, json.dumps(document, indent=1, sort_keys=True).encode())

    def sent_to(self, peer_id: str) -> set[tuple[str, str]]:
        """Return (file name, SHA-256) of each instance this batch sends to ``peer_id``."""
        return {(name, self.digests[name]) for name in self.peers.get(peer_id, [])}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(fsutil.COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def _modalities(metadata: dict[str, Any]) -> set[str]:
    return {
        str(series.get("modality", "")).upper()
        for series in metadata.get("studies", {}).get("series", [])
    }


class OutboundPipeline:
    """Promotes quiet studies and seals ready batches; driven by the daemon's main loop.

    ``config`` may be replaced between rounds (SIGHUP); a batch whose plan is written
    keeps the peers chosen then.
    """

    def __init__(
        self, config: Config, spool: Spool, identity: LocalIdentity, audit: AuditSink
    ) -> None:
        self.config = config
        self.spool = spool
        self.identity = identity
        self.audit = audit
        # The study of each batch in ready/ and sealed/, read once from its batch.json.
        self._batch_studies: dict[str, str] = {}
        self._waiting_for_space: set[str] = set()

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
                # No write is in progress under the lock, so a temporary name is a
                # leftover of a crash in the middle of a store.
                for leftover in study_dir.glob(f"{fsutil.TEMP_PREFIX}*"):
                    fsutil.remove_tree(leftover)
                count = sum(1 for path in study_dir.iterdir() if is_instance_file(path))
                if count == 0:
                    # Only source markers: a crash came between them and the first instance.
                    fsutil.remove_tree(study_dir)
                    continue
                batch_file = study_dir / BATCH_FILE
                if batch_file.exists():
                    batch_id = json.loads(batch_file.read_bytes())["batch_id"]
                else:
                    batch_id = str(uuid.uuid4())
                    record = {
                        "batch_id": batch_id,
                        "study_uid": study_dir.name,
                        "created": time.time(),
                    }
                    fsutil.write_bytes_durably(batch_file, json.dumps(record).encode())
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
        """Return the batches waiting in ``ready/``, oldest first."""
        batches = []
        for path in self.spool.path("ready").iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            record = json.loads((path / BATCH_FILE).read_bytes())
            sources_dir = path / SOURCES_DIR
            sources = (
                tuple(sorted(p.name for p in sources_dir.iterdir())) if sources_dir.is_dir() else ()
            )
            created = float(record.get("created") or path.stat().st_mtime)
            batches.append(Batch(path, record["batch_id"], record["study_uid"], sources, created))
        # Oldest first, so that a follow-up batch is planned after the batch it follows.
        return sorted(batches, key=lambda batch: (batch.created, batch.batch_id))

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
        metadata_by_names: dict[tuple[str, ...], dict[str, Any]] = {}
        plan = self.plan(batch, metadata_by_names)
        count = 0
        for peer_id, names in plan.peers.items():
            if not names:
                continue
            try:
                peer = self.config.peer(peer_id)
            except KeyError:
                plan = self._drop_removed_peer(batch, plan, peer_id)
                continue
            paths = [batch.path / name for name in names]
            if not self._space_for(batch, paths):
                return count
            key = tuple(names)
            if key not in metadata_by_names:
                metadata_by_names[key] = build_metadata(paths)
            files = [PayloadFile(f"dicom/{path.name}", path) for path in paths]
            if self._seal_for_peer(batch, peer, files, metadata_by_names[key]):
                count += 1
        fsutil.rename_durably(batch.path, self.spool.path("sealed") / batch.path.name)
        return count

    # -- plans ----------------------------------------------------------------------------

    def plan(
        self, batch: Batch, metadata_by_names: dict[tuple[str, ...], dict[str, Any]] | None = None
    ) -> Plan:
        """Return the batch's plan, writing it first if this is the batch's first round.

        The metadata built for routing is added to ``metadata_by_names`` for reuse.
        """
        plan_path = batch.path / PLAN_FILE
        existing = Plan.load(plan_path)
        if existing is not None:
            return existing

        instances = batch.instances()
        digests = {path.name: _sha256_file(path) for path in instances}
        metadata = build_metadata(instances)
        if metadata_by_names is not None:
            metadata_by_names[tuple(sorted(digests))] = metadata
        peers = peers_for(self.config, batch.sources, _modalities(metadata))
        if not peers:
            LOGGER.warning(
                "batch %s matches no route; it is kept in sealed/ without being sent",
                batch.batch_id,
            )
        planned: dict[str, list[str]] = {}
        for peer in peers:
            already = self._already_planned(batch, peer.id)
            names = [name for name in sorted(digests) if (name, digests[name]) not in already]
            skipped = len(digests) - len(names)
            if skipped:
                LOGGER.info(
                    "batch %s: %d of %d instances were already sent to %s by an earlier "
                    "batch of the study and are left out",
                    batch.batch_id,
                    skipped,
                    len(digests),
                    peer.id,
                )
            resent = sum(1 for name in names if name in {sent for sent, _digest in already})
            if resent:
                LOGGER.info(
                    "batch %s: %d instances went to %s before with other bytes (another "
                    "encoding or a correction) and are sent again",
                    batch.batch_id,
                    resent,
                    peer.id,
                )
            planned[peer.id] = names
        plan = Plan(batch.study_uid, digests, planned)
        plan.save(plan_path)
        return plan

    def _already_planned(self, batch: Batch, peer_id: str) -> set[tuple[str, str]]:
        """Return (name, SHA-256) of instances other batches of the study plan for a peer."""
        covered: set[tuple[str, str]] = set()
        present: set[str] = set()
        for state in ("ready", "sealed"):
            for path in self.spool.path(state).iterdir():
                if path.name.startswith(".") or path.name == batch.path.name:
                    continue
                present.add(path.name)
                if self._study_of(path) != batch.study_uid:
                    continue
                plan = Plan.load(path / PLAN_FILE)
                if plan is not None:
                    covered |= plan.sent_to(peer_id)
        # Forget batches removed by retention.
        for name in set(self._batch_studies) - present - {batch.path.name}:
            del self._batch_studies[name]
        return covered

    def _study_of(self, batch_dir: Path) -> str | None:
        """Return the study UID of a batch folder, or None if it has no readable batch.json."""
        study = self._batch_studies.get(batch_dir.name)
        if study is None:
            try:
                study = str(json.loads((batch_dir / BATCH_FILE).read_bytes())["study_uid"])
            except (OSError, ValueError, KeyError):
                return None
            self._batch_studies[batch_dir.name] = study
        return study

    def _drop_removed_peer(self, batch: Batch, plan: Plan, peer_id: str) -> Plan:
        LOGGER.warning(
            "batch %s was planned for %s, which is no longer a configured peer; "
            "it is not sealed for that peer",
            batch.batch_id,
            peer_id,
        )
        peers = {key: value for key, value in plan.peers.items() if key != peer_id}
        updated = Plan(plan.study_uid, plan.digests, peers)
        updated.save(batch.path / PLAN_FILE)
        return updated

    def _space_for(self, batch: Batch, paths: list[Path]) -> bool:
        """Return True if the spool has room for an envelope of these instances."""
        needed = sum(path.stat().st_size for path in paths) + SEAL_SPACE_MARGIN
        free = self.spool.free_bytes()
        if free >= needed:
            self._waiting_for_space.discard(batch.batch_id)
            return True
        if batch.batch_id not in self._waiting_for_space:
            self._waiting_for_space.add(batch.batch_id)
            LOGGER.error(
                "not enough free space in %s to seal batch %s (%d MiB needed, %d MiB free); "
                "it stays in ready/ until space is freed",
                self.spool.root,
                batch.batch_id,
                needed // 2**20,
                free // 2**20,
            )
        return False

    # -- one envelope -----------------------------------------------------------------

    def _requester(self) -> Requester | None:
        """Return the configured requester, whose assertion we sign with our own key."""
        identity = self.config.identity
        if identity.requester_id is None:
            return None
        party = Party(identity.requester_id, identity.requester_name or identity.requester_id)
        return Requester(party, self.identity.signing_key)

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
            envelope_format=peer.envelope_format,
            jws=peer.jws,
            requester=self._requester(),
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
