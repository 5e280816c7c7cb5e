"""The spool: one directory per state, items moved between states by rename(2).

Layout under the state directory::

    incoming/<study-uid>/<sop-uid>.dcm    instances as received, grouped by study
    incoming/<study-uid>/.sources/<name>  one empty marker per source (AE title, watch folder)
    ready/<batch-id>/                     a study batch judged complete, waiting to be sealed
    sealed/<batch-id>/                    sealed for every routed peer, kept for retention
    outbox/<peer>/<envelope-id>.JMIX/     sealed envelope waiting to be sent
    sent/<peer>/<envelope-id>.JMIX/       delivered
    failed/<peer>/<envelope-id>.JMIX/     not delivered in time, waiting for an operator
    delivery/<peer>/                      retry schedule (see agent.pipeline.delivery)
    inbox/                                inbound envelopes as received (default inbox)
    work/                                 private staging; work/in-* are inbound claims
    ledger/                               seen envelope ids
    quarantine/                           rejected input with reason.json (default)

A crash leaves every item in exactly one state because each move is a single rename on
one filesystem, and every file is written with :mod:`agent.fsutil`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent import fsutil
from agent.dicom.uids import InstanceInfo, validate_uid

STATES = (
    "incoming",
    "ready",
    "sealed",
    "outbox",
    "sent",
    "failed",
    "delivery",
    "inbox",
    "work",
    "ledger",
    "quarantine",
)
SOURCES_DIR = ".sources"
_SAFE_SOURCE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class SpoolFullError(OSError):
    """The spool's filesystem is below the configured free-space threshold."""


def source_marker(kind: str, value: str) -> str:
    """Return a file-name-safe marker for a source such as ``("ae", "CT_SCANNER")``.

    The value comes from the network (an AE title) or config; anything outside a small
    safe alphabet is hex-encoded so it can never form a path.
    """
    stripped = value.strip()
    if _SAFE_SOURCE.fullmatch(stripped) and not stripped.startswith("."):
        return f"{kind}-{stripped}"
    return f"{kind}-x{stripped.encode('utf-8', 'replace').hex()[:120]}"


@dataclass(frozen=True)
class StoredInstance:
    """A stored instance's path, and whether it replaced a file of the same SOP instance."""

    path: Path
    replaced: bool


class Spool:
    """The on-disk state of the agent; safe to use from several threads."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        self._study_locks: dict[str, threading.Lock] = {}
        for state in STATES:
            fsutil.make_private_dir(root / state)

    def path(self, state: str) -> Path:
        """Return the directory of one state."""
        return self.root / state

    # -- disk guard -------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Return the bytes available to this process on the spool's filesystem."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def check_space(self) -> None:
        """Raise SpoolFullError if free space is below the configured threshold."""
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes:
            raise SpoolFullError(f"free space on {self.root} is below {self.min_free_bytes} bytes")

    # -- ingest -----------------------------------------------------------------------

    def store_instance(
        self, info: InstanceInfo, write: Callable[[BinaryIO], None], source: str
    ) -> StoredInstance:
        """Write one instance durably into ``incoming/<study>/<sop>.dcm``.

        ``write`` receives the open temporary file and writes the complete Part 10
        bytes. The call returns only after the file and its directory entry are on disk,
        so the caller may then acknowledge the instance. ``source`` is a marker from
        :func:`source_marker`. Raises SpoolFullError, InvalidUIDError or OSError.
        """
        study_uid = validate_uid(info.study_uid, "StudyInstanceUID")
        sop_uid = validate_uid(info.sop_instance_uid, "SOPInstanceUID")
        self.check_space()

        study_dir = self.root / "incoming" / study_uid
        # The study lock keeps promotion from renaming the directory mid-write.
        with self.study_lock(study_uid):
            created = not study_dir.exists()
            fsutil.make_private_dir(study_dir / SOURCES_DIR)
            if created:
                fsutil.fsync_dir(study_dir.parent)
            marker = study_dir / SOURCES_DIR / source
            if not marker.exists():
                fsutil.write_bytes_durably(marker, b"")

            final = study_dir / f"{sop_uid}.dcm"
            replaced = final.exists()
            with fsutil.atomic_writer(final) as handle:
                write(handle)
            # The study's quiet period runs from its last instance.
            os.utime(study_dir)
        return StoredInstance(final, replaced)

    def study_lock(self, study_uid: str) -> threading.Lock:
        """Return the lock that serialises writes to and promotion of one study."""
        with self._lock:
            return self._study_locks.setdefault(study_uid, threading.Lock())

    def incoming_studies(self) -> list[Path]:
        """Return the study directories in ``incoming/``."""
        base = self.root / "incoming"
        return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def last_activity(self, study_dir: Path) -> float:
        """Return the newest modification time of a study directory or its instances."""
        newest = study_dir.stat().st_mtime
        with os.scandir(study_dir) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        return newest

    def quiet_studies(self, quiet_seconds: float, now: float | None = None) -> list[Path]:
        """Return incoming studies with no new instance for ``quiet_seconds``."""
        current = time.time() if now is None else now
        return [
            study
            for study in self.incoming_studies()
            if current - self.last_activity(study) >= quiet_seconds
        ]
