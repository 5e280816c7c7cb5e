"""Whole-envelope containers: reading ``.zip``, ``.tar`` and ``.tar.gz``, writing ``.zip``.

An envelope usually travels as a folder, but the spec's usage table also names a ``.zip``
(upload) and a ``.tar.gz`` (archival), and jmix-rs writes ``<id>.zip`` with the envelope's
files at the root of the archive. The reader accepts ``manifest.json`` at the archive root
or under exactly one top-level folder (such as ``<id>.JMIX/``); a ``__MACOSX/`` folder
added by macOS is ignored.

Extraction goes into private staging under the caller's work folder and follows the rules
of the payload tar. Only regular files and folders are allowed, with no absolute names,
``..``, backslashes, control characters or duplicates. The member count, file size, total
size and expansion ratio are checked while bytes are written.

The writer puts the envelope's files at the root of the zip, as jmix-rs does and as the
spec's API expects ("a top-level manifest.json"). Entries are ``manifest.json`` first,
then the other files in name order, with the envelope's timestamp and mode 0644, so the
same envelope folder always gives the same bytes. JSON is deflated; the encrypted
payload is stored, because ciphertext does not compress.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from agent import fsutil
from agent.jmix.errors import EnvelopeFormatError, UnsafeArchiveError
from agent.jmix.tarsafe import (
    CHUNK,
    ArchiveLimits,
    ExtractedFile,
    MemberWriter,
    extract_tar,
    safe_member_name,
)

ZIP = "zip"
TAR = "tar"
CONTAINER_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
IGNORED_TOP_FOLDERS = frozenset({"__MACOSX"})
COMPRESSED_SUFFIXES = (".json", ".jws", ".md")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_ZIP_EARLIEST = (1980, 1, 1, 0, 0, 0)


def sniff_container(path: Path) -> str | None:
    """Return ``"zip"`` or ``"tar"`` (gzip or not) from a file's first bytes, else None."""
    with path.open("rb") as handle:
        head = handle.read(512)
    if head[:4] in _ZIP_MAGIC:
        return ZIP
    if head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar":
        return TAR
    return None


def container_stem(name: str) -> str:
    """Return a container's file name without its archive suffix (``<id>.zip`` -> ``<id>``)."""
    lowered = name.lower()
    for suffix in CONTAINER_SUFFIXES:
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


# -- finding the envelope inside ------------------------------------------------------------


def package_prefix(names: Iterable[str]) -> str:
    """Return ``""`` or ``"<top>/"``: where ``manifest.json`` sits among the member names.

    Raises EnvelopeFormatError (``manifest_missing``) unless there is a manifest at the
    root, or all members sit under one top-level folder that contains one.
    """
    kept = [name for name in names if name.split("/", 1)[0] not in IGNORED_TOP_FOLDERS]
    if "manifest.json" in kept:
        return ""
    tops = {name.split("/", 1)[0] for name in kept}
    if len(tops) == 1:
        (top,) = tops
        if f"{top}/manifest.json" in kept:
            return f"{top}/"
    raise EnvelopeFormatError(
        "manifest.json not found at the container's root or under exactly one top-level folder",
        code="manifest_missing",
    )


@dataclass(frozen=True)
class UnpackedContainer:
    """An extracted container: the folder holding manifest.json, and the names it came by."""

    root: Path
    kind: str
    top_folder: str | None
    files: int


def unpack_container(archive: Path, destination: Path, limits: ArchiveLimits) -> UnpackedContainer:
    """Extract a zip or tar container into the new folder ``destination`` and find the envelope.

    Raises EnvelopeFormatError (``container_unsupported``) for a file that is neither,
    UnsafeArchiveError for a member that breaks the rules, and EnvelopeFormatError
    (``manifest_missing``) when no envelope is inside. The caller removes ``destination``.
    """
    kind = sniff_container(archive)
    if kind is None:
        raise EnvelopeFormatError(
            f"{archive.name} is neither an envelope folder nor a zip or tar container",
            code="container_unsupported",
        )
    destination.mkdir(mode=0o700)
    if kind == ZIP:
        extracted = extract_zip(archive, destination, limits)
    else:
        extracted = extract_tar(archive, destination, limits, what="envelope container")
    prefix = package_prefix(item.name for item in extracted)
    top = prefix.rstrip("/") or None
    root = destination / top if top else destination
    if root.is_symlink() or not root.is_dir():
        raise EnvelopeFormatError(
            "the container's envelope folder is missing", code="manifest_missing"
        )
    return UnpackedContainer(root, kind, top, len(extracted))


# -- zip extraction -------------------------------------------------------------------------


def _check_zip_member(info: zipfile.ZipInfo) -> None:
    """Reject encrypted entries and anything whose Unix mode is not a file or a folder."""
    if info.flag_bits & 0x1:
        raise UnsafeArchiveError(
            f"zip member {info.filename!r} is encrypted", code="unsafe_member_type"
        )
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if mode and kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = "symbolic link" if stat.S_ISLNK(mode) else f"special file (mode {mode:o})"
        raise UnsafeArchiveError(
            f"zip member {info.filename!r} is a {what}; only files and folders are allowed",
            code="unsafe_member_type",
        )


def extract_zip(archive: Path, destination: Path, limits: ArchiveLimits) -> list[ExtractedFile]:
    """Extract ``archive`` into the empty folder ``destination`` under ``limits``.

    Returns the regular files written. The member count is checked against the central
    directory before anything is written. Sizes and the expansion ratio (against the
    archive's size on disk) are checked while writing, because the sizes a zip declares
    can lie. On error the caller discards ``destination``.
    """
    writer = MemberWriter(destination, limits, max(archive.stat().st_size, 1), kind="zip")
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            if len(members) > limits.max_members:
                raise UnsafeArchiveError(
                    f"zip has more than {limits.max_members} members",
                    code="archive_too_many_members",
                )
            for info in members:
                _check_zip_member(info)
                placed = writer.target_for(info.filename)
                if placed is None:
                    continue
                name, target = placed
                if info.is_dir():
                    writer.add_directory(target)
                    continue
                with bundle.open(info) as source:
                    writer.add_file(name, target, info.file_size, source)
    except zipfile.BadZipFile as exc:
        raise UnsafeArchiveError(
            f"envelope container is not a readable zip: {exc}", code="archive_invalid"
        ) from exc
    except (EOFError, NotImplementedError) as exc:
        raise UnsafeArchiveError(
            f"envelope container zip cannot be read: {exc}", code="archive_invalid"
        ) from exc
    return writer.files


# -- reading only the manifest (inspect) ------------------------------------------------------


@dataclass(frozen=True)
class ContainerListing:
    """A container's manifest bytes and the names at the envelope's root, without extracting."""

    manifest: bytes
    root_names: list[str]
    top_folder: str | None


def peek_container(archive: Path, manifest_limit: int) -> ContainerListing:
    """Read ``manifest.json`` and list the envelope's top-level names from a container.

    Nothing is written to disk. Member names are checked like extraction checks them,
    and a manifest larger than ``manifest_limit`` bytes is rejected.
    """
    kind = sniff_container(archive)
    if kind is None:
        raise EnvelopeFormatError(
            f"{archive.name} is neither an envelope folder nor a zip or tar container",
            code="container_unsupported",
        )
    names: list[str] = []
    manifests: dict[str, bytes] = {}
    try:
        if kind == ZIP:
            with zipfile.ZipFile(archive) as bundle:
                for info in bundle.infolist():
                    _check_zip_member(info)
                    name = safe_member_name(info.filename)
                    if not name or info.is_dir():
                        continue
                    names.append(name)
                    if _is_manifest_candidate(name, manifests):
                        _check_manifest_size(info.file_size, manifest_limit)
                        with bundle.open(info) as handle:
                            manifests[name] = _read_bounded(handle, manifest_limit)
        else:
            with tarfile.open(archive, mode="r|*") as bundle:
                for member in bundle:
                    name = safe_member_name(member.name)
                    if not name or not member.isfile():
                        continue
                    names.append(name)
                    if _is_manifest_candidate(name, manifests):
                        _check_manifest_size(member.size, manifest_limit)
                        data = bundle.extractfile(member)
                        if data is not None:
                            manifests[name] = _read_bounded(data, manifest_limit)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise UnsafeArchiveError(
            f"envelope container cannot be read: {exc}", code="archive_invalid"
        ) from exc
    prefix = package_prefix(names)
    root_names = sorted(
        {name[len(prefix) :].split("/", 1)[0] for name in names if name.startswith(prefix)}
    )
    return ContainerListing(manifests[f"{prefix}manifest.json"], root_names, prefix[:-1] or None)


def _is_manifest_candidate(name: str, found: dict[str, bytes]) -> bool:
    """Return True for ``manifest.json`` or ``<top>/manifest.json``, at most two of them."""
    parts = PurePosixPath(name).parts
    return parts[-1] == "manifest.json" and len(parts) <= 2 and len(found) < 2


def _check_manifest_size(size: int, limit: int) -> None:
    if size > limit:
        raise EnvelopeFormatError(
            f"manifest.json is larger than {limit} bytes", code="json_too_large"
        )


def _read_bounded(handle: object, limit: int) -> bytes:
    data: bytes = handle.read(limit + 1)  # type: ignore[attr-defined]
    _check_manifest_size(len(data), limit)
    return data


# -- writing ------------------------------------------------------------------------------------


def _zip_time(moment: datetime) -> tuple[int, int, int, int, int, int]:
    value = moment.astimezone(UTC)
    stamp = (value.year, value.month, value.day, value.hour, value.minute, value.second)
    return max(stamp, _ZIP_EARLIEST)


def zip_order(folder: Path) -> list[str]:
    """Return the folder's regular files as POSIX paths: manifest.json first, then by name."""
    names = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not path.is_symlink()
    )
    if "manifest.json" in names:
        names.remove("manifest.json")
        names.insert(0, "manifest.json")
    return names


def write_zip(folder: Path, target: Path, moment: datetime) -> None:
    """Write the envelope ``folder`` as the zip ``target`` (durably; must not exist yet).

    Entries sit at the root of the zip in :func:`zip_order`, stamped with ``moment`` in
    UTC (zip times have a 2-second resolution and no zone).
    """
    if target.exists():
        raise FileExistsError(f"envelope {target} already exists")
    date_time = _zip_time(moment)
    with fsutil.atomic_writer(target) as sink, zipfile.ZipFile(sink, "w") as bundle:
        for name in zip_order(folder):
            source = folder / name
            info = zipfile.ZipInfo(name, date_time)
            info.create_system = 3  # Unix, so that readers honour the mode below
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = (
                zipfile.ZIP_DEFLATED if name.endswith(COMPRESSED_SUFFIXES) else zipfile.ZIP_STORED
            )
            info.file_size = source.stat().st_size
            with source.open("rb") as reader, bundle.open(info, "w") as writer:
                shutil.copyfileobj(reader, writer, CHUNK)
