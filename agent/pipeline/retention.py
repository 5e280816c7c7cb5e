"""Retention: delete sealed batches and sent envelopes once every routed peer has them.

A batch in ``sealed/`` is deleted, together with its envelopes in ``sent/<peer>/``, when
every envelope its plan calls for is in ``sent/`` and the newest delivery is older than
``retention_hours``. The delivery time is the modification time the sender gives the
envelope when it moves it to ``sent/``. A batch whose plan routes it to no peer is kept,
because no peer has it yet. So is a batch with an envelope in ``outbox/`` or ``failed/``.
A sent envelope whose batch is gone (deleted by an earlier, interrupted sweep) is deleted
once it is older than the retention period.

Deletion first renames the batch into ``work/``, which the next start clears, so a crash
never leaves half a batch in ``sealed/``.

NOTE: the plans of deleted batches are gone too, so an instance sent again after the
retention period is no longer recognised as already sent and goes out once more.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agent import fsutil
from agent.pipeline.delivery import ENVELOPE_SUFFIXES, DeliveryStore, safe_dir_name
from agent.pipeline.outbound import PLAN_FILE, Plan, envelope_id_for
from agent.pipeline.spool import Spool

LOGGER = logging.getLogger(__name__)


def _find_sent(spool: Spool, peer_dir: str, envelope_id: str) -> Path | None:
    for suffix in ENVELOPE_SUFFIXES:
        candidate = spool.path("sent") / peer_dir / f"{envelope_id}{suffix}"
        if os.path.lexists(candidate):
            return candidate
    return None


class RetentionSweeper:
    """Deletes delivered data after the retention period; run from the main loop."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.store = DeliveryStore(spool.root)

    def sweep(self, retention_hours: float, now: float) -> int:
        """Delete every batch and sent envelope past retention; return how many batches."""
        retention = retention_hours * 3600.0
        referenced: set[str] = set()
        deleted = 0
        for state in ("ready", "sealed"):
            for batch_dir in sorted(self.spool.path(state).iterdir()):
                if batch_dir.name.startswith("."):
                    continue
                plan = Plan.load(batch_dir / PLAN_FILE)
                if plan is None:
                    continue
                envelopes = self._envelopes(batch_dir.name, plan)
                referenced.update(envelope_id for _peer_dir, envelope_id in envelopes)
                if state == "sealed" and self._expired(batch_dir, plan, envelopes, retention, now):
                    self._delete(batch_dir, envelopes)
                    deleted += 1
        self._delete_orphans(referenced, retention, now)
        return deleted

    @staticmethod
    def _envelopes(batch_id: str, plan: Plan) -> list[tuple[str, str]]:
        """Return (peer folder, envelope id) of every envelope the plan calls for."""
        return [
            (safe_dir_name(peer_id), str(envelope_id_for(batch_id, peer_id)))
            for peer_id, names in plan.peers.items()
            if names
        ]

    def _expired(
        self,
        batch_dir: Path,
        plan: Plan,
        envelopes: list[tuple[str, str]],
        retention: float,
        now: float,
    ) -> bool:
        if not plan.peers:
            return False
        delivered_at = (batch_dir / PLAN_FILE).stat().st_mtime
        for peer_dir, envelope_id in envelopes:
            sent = _find_sent(self.spool, peer_dir, envelope_id)
            if sent is None:
                return False
            delivered_at = max(delivered_at, sent.lstat().st_mtime)
        return now - delivered_at >= retention

    def _delete(self, batch_dir: Path, envelopes: list[tuple[str, str]]) -> None:
        trash = self.spool.path("work") / f"retention-{batch_dir.name}"
        fsutil.remove_tree(trash)
        fsutil.rename_durably(batch_dir, trash)
        for peer_dir, envelope_id in envelopes:
            sent = _find_sent(self.spool, peer_dir, envelope_id)
            if sent is not None:
                fsutil.remove_tree(sent)
                self.store.remove_record(peer_dir, sent.name)
        fsutil.remove_tree(trash)
        LOGGER.info(
            "retention: deleted batch %s and its %d sent envelopes", batch_dir.name, len(envelopes)
        )

    def _delete_orphans(self, referenced: set[str], retention: float, now: float) -> None:
        sent_root = self.spool.path("sent")
        for peer_dir in sent_root.iterdir() if sent_root.is_dir() else []:
            if not peer_dir.is_dir():
                continue
            for entry in peer_dir.iterdir():
                if entry.name.startswith(".") or entry.name.split(".", 1)[0] in referenced:
                    continue
                if now - entry.lstat().st_mtime < retention:
                    continue
                fsutil.remove_tree(entry)
                self.store.remove_record(peer_dir.name, entry.name)
                LOGGER.info("retention: deleted sent envelope %s/%s", peer_dir.name, entry.name)
