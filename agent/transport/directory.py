"""Delivery into a local directory: a mounted share or the inbox of a peer on this host.

The copy applies the temp-fsync-rename-fsync rule of :mod:`agent.fsutil` to a whole
tree. Every file and directory is written and flushed under a hidden temporary name in
the destination. The top is then renamed onto its final name, and the destination
directory is flushed so that the rename survives a power cut.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import BinaryIO

from agent import fsutil
from agent.transport.base import (
    DeliveryResult,
    SourceError,
    SourceTree,
    TransportError,
    scan_source,
    temp_name,
    validate_name,
)

LOGGER = logging.getLogger(__name__)

# Hints for destination errors that an operator can fix. They are all transient, because
# a retry succeeds once the share is mounted, writable or has free space.
_HINTS = {
    errno.ENOSPC: "The destination file system is full: free space there.",
    errno.EDQUOT: "The disk quota on the destination is used up: raise or free it.",
    errno.EACCES: "Check that the agent's user may create files in the destination.",
    errno.EPERM: "Check that the agent's user may create files in the destination.",
    errno.EROFS: "The destination file system is mounted read-only.",
    errno.ENOENT: "Check that the destination exists and that the share is mounted.",
    errno.ENOTDIR: "Check that the destination exists and that the share is mounted.",
}


class DirectoryTransport:
    """Delivers items into the directory ``path`` on a local or mounted file system.

    New files get exactly ``file_mode`` and new directories ``dir_mode``, whatever the
    process umask. If a network share is not mounted, its mount point is an ordinary
    local directory, so point ``path`` at a subdirectory that exists only on the share.

    NOTE: the check for an existing final name and the rename are two steps. Another
    writer that creates the same name in between would be replaced if the item is a
    file, or would make the rename fail if it is a non-empty directory. One agent never
    delivers the same name twice at once, so only a second writer can cause this.
    """

    def __init__(self, path: Path, *, file_mode: int = 0o600, dir_mode: int = 0o700) -> None:
        self.path = path
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    def deliver(self, local: Path, name: str) -> DeliveryResult:
        """Copy ``local`` to ``<path>/<name>`` atomically; see :class:`Transport`."""
        validate_name(name)
        source = scan_source(local)
        final = self.path / name

        if not self.path.is_dir():
            raise TransportError(
                f"destination directory {str(self.path)!r} does not exist or is not a "
                "directory. Create it, or mount the share it belongs to. The agent retries."
            )
        if os.path.lexists(final):
            LOGGER.debug("%s already exists; nothing delivered", final)
            return DeliveryResult(location=str(final), already_present=True)

        temp = self.path / temp_name(name)
        try:
            self._write_temp(source, temp)
            fsutil.rename_durably(temp, final)
        except OSError as exc:
            self._remove_temp(temp)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and os.path.lexists(final):
                # Another writer created a non-empty directory under the final name
                # after our check, and rename(2) does not replace one.
                return DeliveryResult(location=str(final), already_present=True)
            raise self._error(name, exc) from exc
        except BaseException:
            self._remove_temp(temp)
            raise

        LOGGER.debug("delivered %s (%d bytes)", final, source.total_bytes)
        return DeliveryResult(
            location=str(final),
            already_present=False,
            files=source.file_count,
            total_bytes=source.total_bytes,
        )

    def close(self) -> None:
        """Do nothing, because a directory transport keeps nothing open between deliveries."""

    def _write_temp(self, source: SourceTree, temp: Path) -> None:
        """Write the whole item under ``temp`` and flush every file and directory."""
        if not source.is_directory:
            self._copy_file(source.root, temp)
            return

        os.mkdir(temp, self.dir_mode)
        os.chmod(temp, self.dir_mode)
        for directory in source.directories:
            os.mkdir(temp / directory, self.dir_mode)
            os.chmod(temp / directory, self.dir_mode)
        for relative, _size in source.files:
            self._copy_file(source.root / relative, temp / relative)

        # The file fsyncs made the contents durable; these make the names durable.
        for directory in source.directories:
            fsutil.fsync_dir(temp / directory)
        fsutil.fsync_dir(temp)

    def _copy_file(self, source: Path, target: Path) -> None:
        """Copy one regular file in bounded chunks and fsync the copy.

        O_NOFOLLOW on the source catches a symbolic link swapped in after the scan.
        """
        try:
            source_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot read {str(source)!r}: {exc.strerror}") from exc

        with os.fdopen(source_fd, "rb") as reader:
            target_fd = os.open(
                target,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                self.file_mode,
            )
            with os.fdopen(target_fd, "wb") as writer:
                os.fchmod(target_fd, self.file_mode)
                while chunk := _read_source(reader, source):
                    writer.write(chunk)
                writer.flush()
                os.fsync(target_fd)

    def _remove_temp(self, temp: Path) -> None:
        fsutil.remove_tree(temp)
        if os.path.lexists(temp):
            LOGGER.warning(
                "could not remove the temporary copy %s; receivers ignore it, "
                "but it can be deleted by hand",
                temp,
            )

    def _error(self, name: str, exc: OSError) -> TransportError:
        reason = exc.strerror or str(exc)
        hint = _HINTS.get(exc.errno or 0, "The agent retries.")
        return TransportError(
            f"delivery of {name!r} to directory {str(self.path)!r} failed: {reason}. {hint}"
        )


def _read_source(reader: BinaryIO, source: Path) -> bytes:
    """Read the next chunk of a source file, raising SourceError if the read fails."""
    try:
        return reader.read(fsutil.COPY_CHUNK)
    except OSError as exc:
        raise SourceError(f"cannot read {str(source)!r}: {exc.strerror}") from exc
