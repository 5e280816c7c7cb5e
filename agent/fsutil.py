"""Crash-safe file operations shared by every layer.

Every file that matters is written the same way: a temporary name in the target's own
directory, the bytes, ``fsync``, ``rename`` onto the final name, then ``fsync`` of the
directory so that the rename itself survives a power cut. A reader therefore sees either
the old state or the whole new file, never a partial one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"
"""Prefix of every temporary name; scanners skip names that start with a dot."""

COPY_CHUNK = 1024 * 1024


def temp_name(final: Path) -> Path:
    """Return an unused temporary path beside ``final`` (same directory, so same filesystem)."""
    return final.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}-{final.name}")


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries, making earlier renames and creations durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(final: Path, mode: int = 0o600) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``final``; on clean exit make it ``final`` durably.

    If the body raises, the temporary file is removed and ``final`` is untouched.
    """
    tmp = temp_name(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)


def write_bytes_durably(final: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``final`` with the temp-fsync-rename-fsync sequence."""
    with atomic_writer(final, mode) as handle:
        handle.write(data)


def copy_file_durably(source: Path, final: Path, mode: int = 0o600) -> None:
    """Copy ``source`` to ``final`` in bounded chunks, durably and atomically."""
    with source.open("rb") as reader, atomic_writer(final, mode) as writer:
        shutil.copyfileobj(reader, writer, COPY_CHUNK)


def rename_durably(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` (same filesystem) and flush both directories.

    Fails with ``FileExistsError``/``OSError`` rather than replacing a non-empty
    directory, so a state move never silently merges two items.
    """
    os.rename(source, target)
    fsync_dir(target.parent)
    if source.parent != target.parent:
        fsync_dir(source.parent)


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if missing; return it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree if it exists, without following links."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """Flush every regular file and directory below ``root`` (used before publishing a tree)."""
    for directory, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))
