"""Safe extraction of an untrusted payload tar into a private staging directory.

Only regular files and directories are extracted. Absolute names, ``..``, backslashes,
control characters, links, devices, FIFOs and duplicate names are rejected, and the
member count, each file's size, the total size and (for gzip) the expansion ratio are
enforced while bytes are written, so a bomb is stopped before it fills the disk.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.jmix.errors import UnsafeArchiveError

CHUNK = 1024 * 1024
PLACEHOLDER = ".jmix-empty"
# Linux NAME_MAX, and a bound on whole names well inside PATH_MAX (4096) once the staging
# folder is prepended, so a long name is rejected here instead of failing in open(2).
MAX_NAME_COMPONENT_BYTES = 255
MAX_NAME_BYTES = 1024


@dataclass(frozen=True)
class ArchiveLimits:
    """Upper bounds applied to every untrusted archive."""

    max_members: int = 100_000
    max_file_bytes: int = 8 * 1024**3
    max_total_bytes: int = 64 * 1024**3
    max_ratio: float = 200.0
    """Largest allowed uncompressed/compressed ratio for gzip archives."""


def safe_member_name(name: str) -> str:
    """Return a normalised relative POSIX name, or raise UnsafeArchiveError."""
    if not name or "\x00" in name:
        raise UnsafeArchiveError("archive member with an empty name", code="unsafe_path")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in name):
        raise UnsafeArchiveError(
            f"archive member name {name!r} contains control characters", code="unsafe_path"
        )
    if "\\" in name:
        raise UnsafeArchiveError(
            f"archive member {name!r} contains a backslash", code="unsafe_path"
        )
    if name.startswith("/"):
        raise UnsafeArchiveError(f"archive member {name!r} is an absolute path", code="unsafe_path")
    parts = [part for part in PurePosixPath(name).parts if part != "."]
    if any(part == ".." for part in parts):
        raise UnsafeArchiveError(
            f"archive member {name!r} climbs out with '..'", code="unsafe_path"
        )
    encoded = [part.encode("utf-8", "surrogateescape") for part in parts]
    if sum(len(part) + 1 for part in encoded) > MAX_NAME_BYTES or any(
        len(part) > MAX_NAME_COMPONENT_BYTES for part in encoded
    ):
        raise UnsafeArchiveError(
            f"archive member name {name[:60]!r}... is too long (at most "
            f"{MAX_NAME_COMPONENT_BYTES} bytes per part and {MAX_NAME_BYTES} in all)",
            code="unsafe_path",
        )
    if not parts:
        return ""
    return "/".join(parts)


@dataclass(frozen=True)
class ExtractedFile:
    """One regular file written during extraction."""

    name: str
    size: int
    sha256: str
    """Hex SHA-256 of the bytes written, so callers need not read the file again."""


def _check_type(member: tarfile.TarInfo) -> None:
    if member.isfile() or member.isdir():
        return
    kind = (
        "symbolic link"
        if member.issym()
        else "hard link"
        if member.islnk()
        else "device"
        if member.isdev() and not member.isfifo()
        else "FIFO"
        if member.isfifo()
        else f"type {member.type!r}"
    )
    raise UnsafeArchiveError(
        f"archive member {member.name!r} is a {kind}; only files and folders are allowed",
        code="unsafe_member_type",
    )


class MemberWriter:
    """Places the members of one untrusted archive into ``destination`` under ``limits``.

    Shared by the tar and zip extractors so that both apply the same rules: a safe name,
    no name twice, folders created only through folders, and the per-file, total and
    ratio limits checked while bytes are written. ``compressed_size`` (the archive's size
    on disk) enables the ratio check; ``kind`` names the archive in messages.
    """

    def __init__(
        self,
        destination: Path,
        limits: ArchiveLimits,
        compressed_size: int | None,
        kind: str = "archive",
    ) -> None:
        self.destination = destination
        self.limits = limits
        self.compressed_size = compressed_size
        self.kind = kind
        self.files: list[ExtractedFile] = []
        self.total = 0
        self._seen: set[str] = set()

    def target_for(self, raw_name: str) -> tuple[str, Path] | None:
        """Return the checked name and target path of a member, or None for the root entry."""
        name = safe_member_name(raw_name)
        if not name:
            return None
        if name in self._seen:
            raise UnsafeArchiveError(
                f"{self.kind} member {name!r} appears twice", code="duplicate_member"
            )
        self._seen.add(name)
        return name, self.destination / name

    def add_directory(self, target: Path) -> None:
        """Create a folder member."""
        make_dirs(self.destination, target)

    def add_file(self, name: str, target: Path, declared_size: int, source: object) -> None:
        """Write a file member from ``source`` (read until exhausted), enforcing the limits."""
        if declared_size > self.limits.max_file_bytes:
            raise UnsafeArchiveError(
                f"{self.kind} member {name!r} is {declared_size} bytes; the limit is "
                f"{self.limits.max_file_bytes}",
                code="archive_too_large",
            )
        make_dirs(self.destination, target.parent)
        written, digest = write_member(
            source, target, self.limits, self.total, self.compressed_size
        )
        self.total += written
        if PurePosixPath(name).name == PLACEHOLDER:
            target.unlink()
            return
        self.files.append(ExtractedFile(name, written, digest))


def extract_tar(
    archive: Path, destination: Path, limits: ArchiveLimits, what: str = "payload"
) -> list[ExtractedFile]:
    """Extract ``archive`` (tar, optionally gzip) into the empty folder ``destination``.

    Returns the regular files written; ``what`` names the archive in error messages. On
    error the caller discards ``destination``.
    """
    with archive.open("rb") as raw:
        gzip = raw.read(2) == b"\x1f\x8b"
    writer = MemberWriter(destination, limits, max(archive.stat().st_size, 1) if gzip else None)
    count = 0
    try:
        handle = tarfile.open(archive, mode="r|gz" if gzip else "r|")
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(
            f"{what} is not a readable tar: {exc}", code="archive_invalid"
        ) from exc
    with handle:
        try:
            for member in handle:
                count += 1
                if count > limits.max_members:
                    raise UnsafeArchiveError(
                        f"archive has more than {limits.max_members} members",
                        code="archive_too_many_members",
                    )
                _check_type(member)
                placed = writer.target_for(member.name)
                if placed is None:
                    continue
                name, target = placed
                if member.isdir():
                    writer.add_directory(target)
                    continue
                source = handle.extractfile(member)
                if source is None:
                    raise UnsafeArchiveError(
                        f"archive member {name!r} has no data", code="archive_invalid"
                    )
                writer.add_file(name, target, member.size, source)
        except tarfile.TarError as exc:
            raise UnsafeArchiveError(
                f"{what} tar is corrupt: {exc}", code="archive_invalid"
            ) from exc
        except EOFError as exc:
            raise UnsafeArchiveError(f"{what} tar is truncated", code="archive_invalid") from exc
    return writer.files


def make_dirs(root: Path, directory: Path) -> None:
    """Create ``directory`` below ``root``, refusing to pass through anything but folders."""
    relative = directory.relative_to(root)
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink() or (current.exists() and not current.is_dir()):
            raise UnsafeArchiveError(
                f"archive member {str(relative)!r} collides with a file", code="duplicate_member"
            )
        if not current.exists():
            current.mkdir(mode=0o700)


def write_member(
    source: object, target: Path, limits: ArchiveLimits, total_before: int, compressed: int | None
) -> tuple[int, str]:
    """Copy one member's bytes from ``source`` into the new file ``target``.

    Returns the size and hex SHA-256 of what was written.

    The per-file, total and (with ``compressed``, the archive's size) ratio limits are
    checked after every chunk, so a bomb stops before it fills the disk.
    """
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise UnsafeArchiveError(
            f"archive member {target.name!r} collides with another", code="duplicate_member"
        ) from None
    written = 0
    digest = hashlib.sha256()
    read = source.read  # type: ignore[attr-defined]
    with os.fdopen(fd, "wb") as sink:
        while chunk := read(CHUNK):
            written += len(chunk)
            total = total_before + written
            if written > limits.max_file_bytes or total > limits.max_total_bytes:
                raise UnsafeArchiveError(
                    f"archive expands beyond the limit of {limits.max_total_bytes} bytes",
                    code="archive_too_large",
                )
            if compressed is not None and total > limits.max_ratio * compressed and total > CHUNK:
                raise UnsafeArchiveError(
                    f"archive expands more than {limits.max_ratio:g} times; refusing a bomb",
                    code="archive_ratio",
                )
            digest.update(chunk)
            sink.write(chunk)
    return written, digest.hexdigest()
