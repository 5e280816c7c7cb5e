"""Start-up reconciliation and periodic housekeeping of the spool.

After a crash every item is still in exactly one state folder, because each move is one
rename. What a crash can leave besides that is removed here:

- temporary names (``.tmp-*``) of writes that never reached their rename, in every state
  folder and at the top of the import folder;
- private staging under ``work/``, except inbound claims (``work/in-*``), which hold an
  envelope taken from the inbox and are processed again by the inbound pipeline;
- hidden partial uploads (``.<name>.partial-*``) that a sender left in our inbox when it
  lost its connection or was killed, once nothing has written to them for a while.

Everything else resumes by itself. Studies in ``incoming/`` are promoted once quiet, and
batches in ``ready/`` are sealed (a half-sealed batch finds its envelopes already in the
outbox). Envelopes in ``outbox/`` are sent, and drop folders and the inbox are scanned
when the agent starts.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent import fsutil
from agent.pipeline.spool import Spool
from agent.transport.base import PARTIAL_MARKER

LOGGER = logging.getLogger(__name__)

CLAIM_PREFIX = "in-"
"""Prefix of inbound claims under ``work/``; see :meth:`InboundPipeline.recover_claims`."""

_NESTED_STATES = ("incoming", "ready", "outbox", "sent", "failed", "delivery")
"""State folders whose temporary names sit one level down (in a study, batch or peer folder)."""


@dataclass(frozen=True)
class SpoolSummary:
    """Counts of the work in the spool after reconciliation, for the start-up log line."""

    removed: int
    incoming_studies: int
    ready_batches: int
    outbox_envelopes: int
    inbound_claims: int


def _remove_temporaries(directory: Path) -> int:
    removed = 0
    if not directory.is_dir():
        return 0
    for leftover in directory.glob(f"{fsutil.TEMP_PREFIX}*"):
        fsutil.remove_tree(leftover)
        removed += 1
    return removed


def remove_leftovers(spool: Spool, import_dir: Path | None) -> int:
    """Delete what interrupted writes left behind; return how many entries were removed.

    Call before intake and senders start, because a temporary name is a leftover only
    when nothing is writing it.
    """
    removed = 0
    for entry in spool.path("work").iterdir():
        if not entry.name.startswith(CLAIM_PREFIX):
            fsutil.remove_tree(entry)
            removed += 1
    for state in _NESTED_STATES:
        base = spool.root / state
        removed += _remove_temporaries(base)
        if base.is_dir():
            for child in base.iterdir():
                if child.is_dir() and not child.is_symlink():
                    removed += _remove_temporaries(child)
    removed += _remove_temporaries(spool.path("ledger"))
    if import_dir is not None:
        removed += _remove_temporaries(import_dir)
    return removed


def summarise(spool: Spool, removed: int) -> SpoolSummary:
    """Count the work waiting in the spool."""

    def count(directory: Path, depth: int = 1) -> int:
        if not directory.is_dir():
            return 0
        entries = [p for p in directory.iterdir() if not p.name.startswith(".")]
        if depth == 1:
            return len(entries)
        return sum(count(entry, depth - 1) for entry in entries if entry.is_dir())

    claims = sum(1 for p in spool.path("work").glob(f"{CLAIM_PREFIX}*"))
    return SpoolSummary(
        removed=removed,
        incoming_studies=count(spool.path("incoming")),
        ready_batches=count(spool.path("ready")),
        outbox_envelopes=count(spool.path("outbox"), depth=2),
        inbound_claims=claims,
    )


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for current, directories, files in os.walk(path):
            for name in (*directories, *files):
                try:
                    newest = max(newest, os.lstat(os.path.join(current, name)).st_mtime)
                except FileNotFoundError:
                    continue
    return newest


def remove_stale_uploads(inbox: Path, max_age: float, now: float | None = None) -> int:
    """Delete hidden partial uploads in ``inbox`` unchanged for ``max_age`` seconds.

    A sender that is still uploading keeps writing, so its partial upload stays young.
    If an old one belongs to a sender that only stalled, its final rename fails and it
    uploads again. Returns how many were removed.
    """
    current = time.time() if now is None else now
    removed = 0
    for entry in inbox.iterdir():
        if not entry.name.startswith(".") or PARTIAL_MARKER not in entry.name:
            continue
        try:
            age = current - _newest_mtime(entry)
        except FileNotFoundError:
            continue
        if age < max_age:
            continue
        fsutil.remove_tree(entry)
        removed += 1
        LOGGER.info(
            "removed partial upload %r from the inbox, unchanged for %.0f s", entry.name, age
        )
    return removed
