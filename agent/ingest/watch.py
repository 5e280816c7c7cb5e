"""Drop folders: DICOM files copied into a directory are moved into the spool.

A file is taken once it looks finished, and is deleted from the folder only after the
spool has stored it durably:

1. Notice it, from a watchdog event, the startup scan, or the periodic rescan that
   catches events the operating system dropped.
2. Wait until its inode, size and modification time have not changed for
   ``stable_seconds``, so a copy in progress is left alone.
3. Parse its header and walk its data elements (:func:`check_complete`). A file that
   ends inside an element is still being written by a paused writer, so it is left in
   place. It is quarantined only if it stays incomplete for ``incomplete_seconds``.
4. Store its bytes unchanged with :meth:`Spool.store_instance`. A file without a preamble
   gets the standard one, so the spool holds only conformant Part 10 files.
5. Delete the source, unless it changed during the copy, in which case it is taken again
   once it is stable.

A file that is not a DICOM instance is moved to ``quarantine_dir`` as
``<UTC timestamp>-<safe name>`` with ``<same>.reason.json`` beside it, and audited as
``file_rejected``.

Skipped: names starting with a dot (in any path component), common temporary-file
suffixes, anything that is not a regular file, and symbolic links. Symbolic links are
never followed: directories are walked without following links, and files are opened
with ``O_NOFOLLOW``.

Exports often name folders or files after patients, so a file's path never appears in
logs, audit records or quarantine names: they show a label made from a hash of the path
(:func:`_label`), and the quarantined file's reason file holds the real path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from agent import fsutil
from agent.audit import AuditSink
from agent.dicom.inspect import (
    PART10_PREFIX,
    IncompleteInstanceError,
    InvalidInstanceError,
    check_complete,
    disable_pydicom_value_validation,
    has_part10_prefix,
    read_instance_info,
)
from agent.dicom.uids import InstanceInfo, InvalidUIDError
from agent.pipeline.spool import Spool, SpoolFullError, source_marker

LOGGER = logging.getLogger(__name__)

TEMP_SUFFIXES = (
    ".tmp",
    ".temp",
    ".part",
    ".partial",
    ".crdownload",
    ".download",
    ".filepart",
    ".swp",
    "~",
)
"""Name endings that writers use while a file is in progress; such files are never taken."""

RESCAN_SECONDS = 60.0
"""Interval of the full rescan, which picks up files whose events were lost."""

RETRY_SECONDS = 10.0
"""Wait before retrying a file after a transient failure (spool full, I/O error)."""

DEFAULT_INCOMPLETE_SECONDS = 600.0
"""How long a stable but truncated file is left for its writer before it is quarantined.

Ten minutes outlasts the network stalls that pause a copy to a share. If it is too short,
a file is quarantined while its writer is still going to finish it.
"""

OnStored = Callable[[InstanceInfo, str], None]
"""Called with the stored instance and its source marker after each successful store."""

_Signature = tuple[int, int, int]
"""A file's (inode, size, modification time in ns): unchanged means no write happened."""


class _Outcome(Enum):
    STORED = "stored"
    QUARANTINED = "quarantined"
    WAITING = "waiting"
    RETRY = "retry"
    CHANGED = "changed"
    GONE = "gone"


@dataclass
class _Candidate:
    """A file seen in the folder, with the time its current signature was first seen."""

    signature: _Signature | None = None
    since: float = 0.0
    retry_at: float = 0.0
    reported: set[str] = field(default_factory=set)


class _EventForwarder(FileSystemEventHandler):
    """Pass watchdog events to the watcher's worker thread without doing work on them."""

    def __init__(self, watcher: DropFolderWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type == "events_lost":
            self._watcher.request_rescan()
            return
        # A directory is walked when it appears. Its own "modified" events only repeat
        # the events of the files inside it.
        relevant_types = (
            ("created", "moved")
            if event.is_directory
            else ("created", "modified", "closed", "moved")
        )
        if event.event_type in relevant_types:
            raw = event.dest_path if event.event_type == "moved" else event.src_path
            self._watcher.notice(Path(os.fsdecode(raw)))


class DropFolderWatcher:
    """Move DICOM files dropped into ``path`` (and its subfolders) into the spool.

    ``name`` identifies the folder in audit records and source markers.
    ``polling=True`` uses watchdog's PollingObserver, for network shares where inotify
    reports no writes made by other hosts. ``quarantine_dir`` receives rejected files. It
    may be inside ``path``, and is then never scanned. Files are handled one at a time on
    one worker thread.
    """

    def __init__(
        self,
        path: Path,
        spool: Spool,
        audit: AuditSink,
        name: str,
        stable_seconds: float,
        *,
        polling: bool = False,
        quarantine_dir: Path,
        on_stored: OnStored | None = None,
        incomplete_seconds: float = DEFAULT_INCOMPLETE_SECONDS,
    ) -> None:
        """Configure the watcher; nothing happens until :meth:`start`.

        Raises ValueError for a negative ``stable_seconds`` or ``incomplete_seconds``.
        """
        if stable_seconds < 0 or incomplete_seconds < 0:
            raise ValueError("stable_seconds and incomplete_seconds must not be negative")
        self.path = path
        self.name = name
        self.stable_seconds = stable_seconds
        self.incomplete_seconds = incomplete_seconds
        self.polling = polling
        self.quarantine_dir = quarantine_dir
        self.source = source_marker("watch", name)
        self._spool = spool
        self._audit = audit
        self._on_stored = on_stored
        # Stat often enough to notice stability soon after it is reached, at most 1/s.
        self._tick = min(1.0, max(0.05, stable_seconds / 4))

        self._root = Path(os.path.realpath(path))
        self._quarantine_real = Path(os.path.realpath(quarantine_dir))
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._noticed: set[Path] = set()
        self._rescan_requested = True
        self._is_idle = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._candidates: dict[Path, _Candidate] = {}
        self._undeletable: dict[Path, _Signature] = {}
        self._reported_links: set[Path] = set()
        self._received: Counter[str] = Counter()
        self._observer: Any = None
        self._worker: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start watching; files already in the folder are picked up by the first scan.

        Raises FileNotFoundError if the folder does not exist, RuntimeError if started.
        """
        if self._worker is not None:
            raise RuntimeError(f"drop folder watcher {self.name!r} is already running")
        if not self._root.is_dir():
            raise FileNotFoundError(f"drop folder {str(self.path)!r} does not exist")
        # pydicom would otherwise log invalid values it reads, UIDs and patient IDs included.
        disable_pydicom_value_validation()

        # The observer starts first so that nothing written during the first scan is missed.
        self._observer = PollingObserver() if self.polling else Observer()
        self._observer.schedule(_EventForwarder(self), str(self._root), recursive=True)
        self._observer.start()
        self._stopping.clear()
        self._worker = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)
        self._worker.start()
        LOGGER.info(
            "watching drop folder %r at %s (%s, stable after %.1f s)",
            self.name,
            self._root,
            "polling" if self.polling else "inotify",
            self.stable_seconds,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching and join both threads, waiting up to ``timeout`` for each."""
        worker, observer = self._worker, self._observer
        if worker is None:
            return
        self._stopping.set()
        self._wake.set()
        observer.stop()
        observer.join(timeout)
        worker.join(timeout)
        if worker.is_alive():
            LOGGER.error("drop folder watcher %r did not stop within %.0f s", self.name, timeout)
        self._worker = self._observer = None
        LOGGER.info("stopped watching drop folder %r", self.name)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until a pass found nothing left to take or wait for; return False on timeout.

        Idle means every file seen has been stored, quarantined or has vanished. A file
        that is unstable or incomplete keeps the watcher busy.
        """
        deadline = time.monotonic() + timeout
        with self._idle:
            # A full rescan finds files whose watchdog events have not arrived yet.
            self._rescan_requested = True
            self._is_idle = False
            self._wake.set()
            while not self._is_idle:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True

    def notice(self, path: Path) -> None:
        """Queue a path (a file, or a directory to walk) for the worker; thread-safe."""
        with self._lock:
            self._noticed.add(path)
            self._is_idle = False
        self._wake.set()

    def request_rescan(self) -> None:
        """Ask for a full rescan, for example after the OS reported lost events."""
        with self._lock:
            self._rescan_requested = True
            self._is_idle = False
        self._wake.set()

    # -- worker ----------------------------------------------------------------------

    def _run(self) -> None:
        next_rescan = 0.0
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                now = time.monotonic()
                with self._lock:
                    rescan, self._rescan_requested = self._rescan_requested, False
                    noticed, self._noticed = self._noticed, set()
                if rescan or now >= next_rescan:
                    noticed.add(self._root)
                    next_rescan = now + RESCAN_SECONDS
                for path in noticed:
                    self._consider(path)
                self._check_candidates(time.monotonic())
                self._flush_received()
            except Exception:
                # The worker must survive anything one file or one pass can throw.
                LOGGER.exception("drop folder %r: pass failed; retrying", self.name)
                self._wake.wait(RETRY_SECONDS)
                continue

            with self._idle:
                if not self._noticed and not self._rescan_requested:
                    self._is_idle = not self._candidates
                    self._idle.notify_all()
            self._wake.wait(self._tick)
        self._flush_received()

    def _consider(self, path: Path) -> None:
        """Add a file, or every file below a directory, to the candidates."""
        if not self._is_watchable(path):
            return
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            self._walk(path)
        elif stat.S_ISREG(mode):
            self._candidates.setdefault(path, _Candidate())
        elif stat.S_ISLNK(mode) and path not in self._reported_links:
            # Reported once per path, because every rescan finds the link again.
            self._reported_links.add(path)
            LOGGER.warning(
                "drop folder %r: skipping symbolic link %r; links are never followed",
                self.name,
                str(path.relative_to(self._root)),
            )

    def _walk(self, directory: Path) -> None:
        # os.walk lists a link to a directory among the files and never descends into it.
        for current, subdirectories, files in os.walk(directory):
            subdirectories[:] = [
                name for name in subdirectories if self._is_watchable(Path(current, name))
            ]
            for name in [*files, *(n for n in subdirectories if Path(current, n).is_symlink())]:
                path = Path(current, name)
                if self._is_watchable(path):
                    self._consider(path)

    def _is_watchable(self, path: Path) -> bool:
        """Return True for a path inside the folder that is not hidden, temporary or quarantine."""
        try:
            relative = path.relative_to(self._root)
        except ValueError:
            return False
        if any(part.startswith(".") for part in relative.parts):
            return False
        if relative.parts and relative.name.endswith(TEMP_SUFFIXES):
            return False
        return path != self._quarantine_real and self._quarantine_real not in path.parents

    def _check_candidates(self, now: float) -> None:
        for path, candidate in list(self._candidates.items()):
            if self._stopping.is_set():
                return
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                del self._candidates[path]
                continue
            if not stat.S_ISREG(info.st_mode):
                # Replaced by a directory or a link since it was found; a rescan handles it.
                del self._candidates[path]
                continue

            signature = (info.st_ino, info.st_size, info.st_mtime_ns)
            if signature != candidate.signature:
                candidate.signature, candidate.since, candidate.retry_at = signature, now, 0.0
                continue
            if self._undeletable.get(path) == signature:
                # Already stored but could not be deleted; taking it again would loop.
                del self._candidates[path]
                continue
            if now < candidate.retry_at or now - candidate.since < self.stable_seconds:
                continue

            outcome = self._take(path, candidate, now)
            if outcome in (_Outcome.STORED, _Outcome.QUARANTINED, _Outcome.GONE):
                del self._candidates[path]
            elif outcome is _Outcome.CHANGED:
                candidate.signature = None
            elif outcome is _Outcome.WAITING:
                # Re-read the file only after it changes or after one more quiet period.
                candidate.retry_at = now + max(self.stable_seconds, self._tick)
            elif outcome is _Outcome.RETRY:
                candidate.retry_at = now + RETRY_SECONDS

    # -- taking one file -------------------------------------------------------------

    def _take(self, path: Path, candidate: _Candidate, now: float) -> _Outcome:
        """Store one stable file in the spool, or quarantine it; return what happened."""
        relative = str(path.relative_to(self._root))
        # A directory swapped for a symbolic link since the walk would lead outside.
        parent = Path(os.path.realpath(path.parent))
        if parent != self._root and self._root not in parent.parents:
            LOGGER.warning(
                "drop folder %r: %r now resolves outside the folder; skipped",
                self.name,
                _label(relative),
            )
            return _Outcome.GONE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return _Outcome.GONE
        except OSError as exc:
            # ELOOP means a symbolic link replaced the file since it was checked.
            if exc.errno == errno.ELOOP:
                return _Outcome.GONE
            self._report_once(
                candidate, logging.WARNING, "cannot open %r: %s", _label(relative), exc
            )
            return _Outcome.RETRY

        with os.fdopen(fd, "rb") as handle:
            opened = os.fstat(handle.fileno())
            if not stat.S_ISREG(opened.st_mode) or _signature(opened) != candidate.signature:
                return _Outcome.CHANGED
            result = self._store(path, relative, handle, candidate, now)
            if isinstance(result, _Outcome):
                return result
            if _signature(os.fstat(handle.fileno())) != candidate.signature:
                # The spool copy may mix old and new bytes; the next take replaces it.
                LOGGER.warning(
                    "drop folder %r: %r changed while it was copied; it is taken again "
                    "once it is stable",
                    self.name,
                    _label(relative),
                )
                return _Outcome.CHANGED

        self._delete_source(path, relative, opened)
        LOGGER.debug(
            "drop folder %r: stored %r as SOP instance %s of study %s",
            self.name,
            _label(relative),
            result.sop_instance_uid,
            result.study_uid,
        )
        self._received[result.study_uid] += 1
        if self._on_stored is not None:
            try:
                self._on_stored(result, self.source)
            except Exception:
                LOGGER.exception("drop folder %r: on_stored callback failed", self.name)
        return _Outcome.STORED

    def _store(
        self, path: Path, relative: str, handle: BinaryIO, candidate: _Candidate, now: float
    ) -> InstanceInfo | _Outcome:
        """Validate the open file and copy it into the spool; return its info or the outcome."""
        # Completeness first: a file cut inside its header by a paused writer would
        # otherwise fail the header checks and be quarantined as invalid.
        try:
            check_complete(handle)
            info = read_instance_info(handle)
        except IncompleteInstanceError as exc:
            return self._handle_incomplete(path, relative, exc.reason, candidate, now)
        except InvalidInstanceError as exc:
            return self._quarantine(path, relative, exc.reason)
        except OSError as exc:
            LOGGER.warning(
                "drop folder %r: reading %r failed: %s", self.name, _label(relative), exc
            )
            return _Outcome.RETRY

        prefix = b"" if has_part10_prefix(handle) else PART10_PREFIX

        def write(target: BinaryIO) -> None:
            target.write(prefix)
            handle.seek(0)
            shutil.copyfileobj(handle, target, fsutil.COPY_CHUNK)

        try:
            self._spool.store_instance(info, write, self.source)
        except SpoolFullError as exc:
            self._report_once(
                candidate, logging.ERROR, "spool full, %r waits: %s", _label(relative), exc
            )
            return _Outcome.RETRY
        except InvalidUIDError as exc:
            return self._quarantine(path, relative, str(exc))
        except OSError as exc:
            self._report_once(
                candidate,
                logging.ERROR,
                "storing %r in the spool failed: %s",
                _label(relative),
                exc,
            )
            return _Outcome.RETRY
        return info

    def _handle_incomplete(
        self, path: Path, relative: str, reason: str, candidate: _Candidate, now: float
    ) -> _Outcome:
        if now - candidate.since >= self.incomplete_seconds:
            return self._quarantine(
                path, relative, f"{reason} (unchanged for {self.incomplete_seconds:.0f} s)"
            )
        self._report_once(
            candidate,
            logging.INFO,
            "%r is incomplete (%s); waiting for its writer to finish",
            _label(relative),
            reason,
        )
        return _Outcome.WAITING

    def _delete_source(self, path: Path, relative: str, copied: os.stat_result) -> None:
        """Delete the source file if the name still refers to the inode that was copied."""
        try:
            current = os.lstat(path)
            if (current.st_dev, current.st_ino) == (copied.st_dev, copied.st_ino):
                os.unlink(path)
            self._undeletable.pop(path, None)
        except FileNotFoundError:
            pass
        except OSError as exc:
            LOGGER.error(
                "drop folder %r: %r is stored but could not be deleted (%s); it is left in "
                "place and taken again only if it changes",
                self.name,
                _label(relative),
                exc,
            )
            self._undeletable[path] = _signature(copied)

    # -- quarantine and audit --------------------------------------------------------

    def _quarantine(self, path: Path, relative: str, reason: str) -> _Outcome:
        """Move a rejected file to quarantine with a reason file, and audit it."""
        stamp = datetime.now(UTC)
        base = f"{stamp.strftime('%Y%m%dT%H%M%S.%fZ')}-{_label(relative)}"
        try:
            fsutil.make_private_dir(self.quarantine_dir)
            target = self.quarantine_dir / base
            suffix = 1
            while target.exists() or _reason_path(target).exists():
                target = self.quarantine_dir / f"{base}-{suffix}"
                suffix += 1
            size = os.lstat(path).st_size
            _move_file(path, target)
        except FileNotFoundError:
            return _Outcome.GONE
        except OSError as exc:
            LOGGER.error(
                "drop folder %r: moving %r to quarantine failed: %s",
                self.name,
                _label(relative),
                exc,
            )
            return _Outcome.RETRY

        details = {
            "reason": reason,
            "path": relative,
            "watch": self.name,
            "source": self.source,
            "bytes": size,
            "rejected_at": stamp.isoformat(timespec="milliseconds"),
        }
        try:
            fsutil.write_bytes_durably(
                _reason_path(target), json.dumps(details, indent=2, sort_keys=True).encode()
            )
        except OSError as exc:
            # The file is already out of the folder; the log and audit keep the reason.
            LOGGER.error(
                "drop folder %r: writing %s failed: %s", self.name, _reason_path(target).name, exc
            )
        LOGGER.warning(
            "drop folder %r: quarantined %r as %s: %s",
            self.name,
            _label(relative),
            target.name,
            reason,
        )
        self._record("file_rejected", source=self.source, path=_label(relative), reason=reason)
        return _Outcome.QUARANTINED

    def _flush_received(self) -> None:
        """Write one instances_received record per study stored during this pass."""
        received, self._received = self._received, Counter()
        for study_uid, count in sorted(received.items()):
            LOGGER.info("drop folder %r: stored %d instances of a study", self.name, count)
            self._record(
                "instances_received",
                source=self.source,
                study_uid=study_uid,
                count=count,
                outcome="stored",
            )

    def _record(self, event: str, **fields: Any) -> None:
        try:
            self._audit.record(event, **fields)
        except Exception:
            LOGGER.exception("drop folder %r: writing audit record %r failed", self.name, event)

    def _report_once(self, candidate: _Candidate, level: int, message: str, *args: Any) -> None:
        """Log a file's repeated condition once at ``level``, then only at DEBUG."""
        LOGGER.log(
            logging.DEBUG if message in candidate.reported else level,
            "drop folder %r: " + message,
            self.name,
            *args,
        )
        candidate.reported.add(message)


def _label(relative: str) -> str:
    """Return a stable label for a path that reveals nothing of the name itself."""
    return "file-" + hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _signature(info: os.stat_result) -> _Signature:
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def _reason_path(quarantined: Path) -> Path:
    return quarantined.with_name(f"{quarantined.name}.reason.json")


def _move_file(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, copying then deleting across filesystems."""
    try:
        fsutil.rename_durably(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        fsutil.copy_file_durably(source, target)
        with contextlib.suppress(FileNotFoundError):
            source.unlink()
