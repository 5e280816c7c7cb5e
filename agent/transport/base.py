"""The interface every transport implements, its errors, and the source walk they share.

A transport places one local item (a sealed envelope directory such as ``<id>.JMIX/`` or a
single ``.zip`` file) in a destination directory under a given name, so that a receiver
polling that directory sees either nothing or the whole item:

1. If ``<destination>/<name>`` already exists, nothing is written and the result says
   so. A retry after a lost acknowledgement is therefore harmless.
2. Otherwise the item is written under a hidden temporary name in the same destination
   directory (see :func:`temp_name`), flushed where the destination supports it, and
   renamed onto ``name`` in one step.

Receivers must ignore names that start with a dot. A temporary name is left behind only
when the transport could not remove it, for example because the connection dropped;
such leftovers match ``.<name>.partial-*``.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

PARTIAL_MARKER = ".partial-"


class TransportError(Exception):
    """A delivery or connection check failed.

    ``permanent`` is True when retrying with the same configuration cannot succeed, for
    example a changed host key or a rejected client key. The caller should then stop
    the fast retry schedule and alert an operator. Transient errors (connection
    refused, timeouts, dropped connections, remote permission or space problems) may
    succeed later without any change on this side.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


class HostKeyError(TransportError):
    """The server offered a host key that is not pinned in the configuration."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


class AuthenticationError(TransportError):
    """The server rejected the client key, or the client key file cannot be used."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


class SourceError(TransportError):
    """The local item cannot be delivered as it is.

    It is missing, is a symbolic link, or contains something other than regular files
    and directories. Retrying cannot help, so the error is permanent.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome of one successful :meth:`Transport.deliver` call.

    ``already_present`` is True when ``<destination>/<name>`` existed before the call, in
    which case nothing was written and ``files`` and ``total_bytes`` are 0.
    ``location`` is a human-readable address of the final name, for logs and audit.
    """

    location: str
    already_present: bool
    files: int = 0
    total_bytes: int = 0


class Transport(Protocol):
    """Delivers local items into one destination directory of one peer."""

    def deliver(self, local: Path, name: str) -> DeliveryResult:
        """Place ``local`` at ``<destination>/<name>`` atomically, or report it already there.

        ``local`` is a regular file or a directory tree of regular files and
        directories; it is never followed through a symbolic link. ``name`` must be a
        single path component that does not start with a dot (see :func:`validate_name`).

        Raises ValueError for an invalid ``name``, SourceError for an unusable
        ``local``, and TransportError (or a subclass) when the destination cannot be
        reached or written. After an error no file exists under ``name``; a hidden
        temporary name may remain only if it could not be removed.
        """
        ...

    def close(self) -> None:
        """Release connections and other resources; deliver may reopen them later."""
        ...


@dataclass(frozen=True)
class SourceTree:
    """The checked contents of a local item, in the order they must be created.

    ``directories`` and ``files`` are relative POSIX paths, with the size of each file.
    Parents come before their children, so creating them in list order never needs a
    missing parent. For a single file, ``is_directory`` is False and both lists are
    empty.
    """

    root: Path
    is_directory: bool
    directories: list[PurePosixPath]
    files: list[tuple[PurePosixPath, int]]
    total_bytes: int

    @property
    def file_count(self) -> int:
        """The number of regular files in the item."""
        return len(self.files) if self.is_directory else 1


def validate_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a safe, visible, single path component.

    A leading dot is rejected because receivers skip hidden names, and temporary
    names start with a dot.
    """
    if not name or name in (".", ".."):
        raise ValueError(f"delivery name {name!r} is empty or a relative directory name")
    if "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"delivery name {name!r} contains a path separator or NUL byte")
    if name.startswith("."):
        raise ValueError(f"delivery name {name!r} starts with a dot, so receivers would skip it")


def temp_name(name: str) -> str:
    """Return a new hidden temporary name for delivering ``name``."""
    return f".{name}{PARTIAL_MARKER}{secrets.token_hex(8)}"


def scan_source(local: Path) -> SourceTree:
    """List a local item without following symbolic links, or raise SourceError.

    The item itself and everything below it must be a regular file or a directory. A
    symbolic link anywhere is rejected rather than skipped, because a delivered
    envelope that silently lacks a file would only fail later, at the receiver.
    """
    try:
        root_stat = local.lstat()
    except FileNotFoundError:
        raise SourceError(f"cannot deliver {str(local)!r}: it does not exist") from None
    except OSError as exc:
        raise SourceError(f"cannot deliver {str(local)!r}: {exc.strerror}") from exc

    if stat.S_ISREG(root_stat.st_mode):
        return SourceTree(
            root=local,
            is_directory=False,
            directories=[],
            files=[],
            total_bytes=root_stat.st_size,
        )
    if not stat.S_ISDIR(root_stat.st_mode):
        raise SourceError(
            f"cannot deliver {str(local)!r}: it is not a regular file or directory "
            f"({_describe_mode(root_stat.st_mode)})"
        )

    directories: list[PurePosixPath] = []
    files: list[tuple[PurePosixPath, int]] = []
    pending = [PurePosixPath()]
    while pending:
        relative = pending.pop(0)
        for child, entry_stat in _list_directory(local, relative):
            if stat.S_ISDIR(entry_stat.st_mode):
                directories.append(child)
                pending.append(child)
            elif stat.S_ISREG(entry_stat.st_mode):
                files.append((child, entry_stat.st_size))
            else:
                raise SourceError(
                    f"cannot deliver {str(local)!r}: {str(child)!r} is a "
                    f"{_describe_mode(entry_stat.st_mode)}, and only regular files "
                    "and directories are delivered"
                )
    return SourceTree(
        root=local,
        is_directory=True,
        directories=directories,
        files=files,
        total_bytes=sum(size for _path, size in files),
    )


def _list_directory(
    root: Path, relative: PurePosixPath
) -> list[tuple[PurePosixPath, os.stat_result]]:
    """Return the entries of ``root/relative`` sorted by name, with their lstat results."""
    try:
        with os.scandir(root / relative) as entries:
            return [
                (relative / entry.name, entry.stat(follow_symlinks=False))
                for entry in sorted(entries, key=lambda entry: entry.name)
            ]
    except OSError as exc:
        raise SourceError(
            f"cannot deliver {str(root)!r}: listing {str(relative)!r} failed: {exc.strerror}"
        ) from exc


def _describe_mode(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"
