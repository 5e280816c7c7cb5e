"""The local audit log: JSON Lines, append-only, one record per event, hash-chained.

Each record carries ``prev``, the SHA-256 of the previous line's exact bytes (the first
record's ``prev`` is 64 zeros), and ``seq``, its position. Changing, removing or
reordering records therefore breaks the chain at the first affected record, which
:func:`verify_log` reports. The chain alone cannot show that the newest records were
cut off or that the last one was edited, so a sidecar ``<log>.head`` holds the
sequence number and hash of the newest record, rewritten atomically after each append.
Records hold ids and UIDs, never patient attributes: callers pass only the fields listed
in :data:`ALLOWED_FIELDS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from agent import fsutil

GENESIS = "0" * 64

EVENTS = frozenset(
    {
        "agent_started",
        "agent_stopped",
        "association_rejected",
        "instances_received",
        "instance_rejected",
        "study_complete",
        "envelope_sealed",
        "envelope_sent",
        "send_failed",
        "envelope_received",
        "envelope_imported",
        "envelope_duplicate",
        "envelope_rejected",
        "file_rejected",
    }
)

ALLOWED_FIELDS = frozenset(
    {
        "envelope_id",
        "study_uid",
        "batch_id",
        "peer",
        "outcome",
        "reason",
        "source",
        "calling_ae",
        "count",
        "bytes",
        "path",
        "attempt",
        "dialect",
        "hash_rule",
        "transport",
        "profile",
    }
)


class AuditSink(Protocol):
    """Anything that records audit events (the log itself, or a test double)."""

    def record(self, event: str, **fields: Any) -> None:
        """Append one record for ``event`` with the given fields."""


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


class AuditLog:
    """An append-only, hash-chained JSON Lines file, safe to use from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._prev, self._seq = self._tail()

    def _tail(self) -> tuple[str, int]:
        """Return the hash and sequence number of the last complete record."""
        if not self.path.exists():
            return GENESIS, 0
        prev, seq = GENESIS, 0
        with self.path.open("rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    # A torn final write (power cut mid-append) is cut off; the chain
                    # resumes from the last whole record.
                    break
                prev = _line_hash(line)
                seq += 1
        return prev, seq

    def record(self, event: str, **fields: Any) -> None:
        """Append one record and flush it to disk before returning."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        unknown = set(fields) - ALLOWED_FIELDS
        if unknown:
            raise ValueError(f"audit fields not allowed: {sorted(unknown)}")

        with self._lock:
            entry: dict[str, Any] = {
                "seq": self._seq + 1,
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "event": event,
            }
            entry.update({key: value for key, value in fields.items() if value is not None})
            entry["prev"] = self._prev
            line = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()

            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                self._truncate_torn_tail(fd)
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsutil.fsync_dir(self.path.parent)
            self._prev = _line_hash(line)
            self._seq += 1
            head = json.dumps({"seq": self._seq, "hash": self._prev}).encode()
            fsutil.write_bytes_durably(head_path(self.path), head, mode=0o640)

    def _truncate_torn_tail(self, fd: int) -> None:
        """Cut a partial last line left by a crash so the new record starts on its own line."""
        size = os.fstat(fd).st_size
        if size == 0:
            return
        with self.path.open("rb") as handle:
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            handle.seek(0)
            data = handle.read()
        os.ftruncate(fd, data.rfind(b"\n") + 1)


def head_path(path: Path) -> Path:
    """Return the path of the sidecar that anchors the newest record."""
    return path.with_name(path.name + ".head")


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the records of an audit log in order (no chain check)."""
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


@dataclass(frozen=True)
class ChainReport:
    """Result of checking an audit log's hash chain."""

    records: int
    ok: bool
    first_bad_line: int | None = None
    problem: str | None = None


def verify_log(path: Path) -> ChainReport:
    """Check every record's ``prev`` and ``seq``; report the first line that breaks the chain."""
    prev, count = GENESIS, 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                return ChainReport(count, False, number, "last record is truncated")
            try:
                entry = json.loads(line)
            except ValueError:
                return ChainReport(count, False, number, "record is not valid JSON")
            if not isinstance(entry, dict):
                return ChainReport(count, False, number, "record is not a JSON object")
            if entry.get("prev") != prev:
                return ChainReport(
                    count,
                    False,
                    number,
                    "previous-record hash does not match: a record before it was changed, "
                    "removed or reordered, or this one was",
                )
            if entry.get("seq") != number:
                return ChainReport(count, False, number, f"sequence number is not {number}")
            prev = _line_hash(line)
            count += 1
    return _check_head(path, count, prev)


def _check_head(path: Path, count: int, last_hash: str) -> ChainReport:
    """Compare the end of the chain with the head sidecar, when there is one."""
    head_file = head_path(path)
    if not head_file.exists():
        return ChainReport(count, True)
    try:
        head = json.loads(head_file.read_bytes())
        seq, digest = int(head["seq"]), str(head["hash"])
    except (ValueError, KeyError, TypeError):
        return ChainReport(count, False, count + 1, f"{head_file.name} is unreadable")
    if seq > count:
        return ChainReport(
            count,
            False,
            count + 1,
            f"records {count + 1} to {seq} are missing: the log was truncated",
        )
    if seq == count and digest != last_hash:
        return ChainReport(count, False, count, "the last record was changed")
    # seq < count: a crash between appending a record and rewriting the head.
    return ChainReport(count, True)
