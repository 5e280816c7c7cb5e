"""The unpacked payload: prefix stripping, plain payload folders and files.json checks."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent import fsutil
from agent.jmix.errors import EnvelopeFormatError, IntegrityError
from agent.jmix.hashing import sha256_file
from agent.jmix.manifest import asserted_hash, read_json
from agent.jmix.tarsafe import ArchiveLimits

MAX_FILES_JSON_BYTES = 64 * 1024 * 1024


def strip_payload_prefix(raw_dir: Path, names: list[str]) -> Path:
    """Return the payload root: ``raw/payload`` when every member sits under ``payload/``."""
    if names and all(name.startswith("payload/") for name in names):
        return raw_dir / "payload"
    return raw_dir


def copy_plain_payload(source: Path, staging: Path, limits: ArchiveLimits) -> list[str]:
    """Copy a plain payload folder into staging, refusing links and special files."""
    names: list[str] = []
    total = 0
    for directory, subdirs, files in os.walk(source):
        relative = Path(directory).relative_to(source)
        (staging / relative).mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in subdirs:
            if (Path(directory) / name).is_symlink():
                raise EnvelopeFormatError(f"payload folder {name!r} is a link", code="symlink")
        for name in files:
            path = Path(directory) / name
            if path.is_symlink() or not path.is_file():
                raise EnvelopeFormatError(
                    f"payload entry {(relative / name).as_posix()!r} is not a regular file",
                    code="unsafe_member_type",
                )
            total += path.stat().st_size
            if len(names) >= limits.max_members or total > limits.max_total_bytes:
                raise EnvelopeFormatError(
                    "plain payload exceeds the size limits", code="archive_too_large"
                )
            fsutil.copy_file_durably(path, staging / relative / name)
            names.append((relative / name).as_posix())
    return sorted(names)


def _file_entries(document: Any) -> list[tuple[str, str | None, int | None]]:
    """Return (file, hash hex or None, size or None) from the spec or jmix-js form."""
    if isinstance(document, dict) and isinstance(document.get("files"), list):
        raw = document["files"]
        key, size_key = "path", "size"
    elif isinstance(document, list):
        raw, key, size_key = document, "file", "size_bytes"
    else:
        raise IntegrityError(
            "files.json is neither a list nor a files object", code="files_json_invalid"
        )
    entries: list[tuple[str, str | None, int | None]] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get(key), str):
            raise IntegrityError(
                "files.json has an entry without a file name", code="files_json_invalid"
            )
        digest = item.get("hash")
        size = item.get(size_key)
        if digest is not None and not isinstance(digest, str):
            raise IntegrityError(
                "files.json has a hash that is not a string", code="files_json_invalid"
            )
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise IntegrityError(
                "files.json has a size that is not an integer", code="files_json_invalid"
            )
        entries.append((item[key], asserted_hash(digest) if digest else None, size))
    return entries


def check_files_json(staging: Path, present: list[str], digests: Mapping[str, str]) -> str:
    """Check files.json's entries; files under a top folder it covers must all be listed.

    ``digests`` maps names to the SHA-256 of files hashed while they were unpacked; other files
    are read again.
    """
    listing = staging / "files.json"
    if not listing.is_file():
        return "no files.json (optional)"
    entries = _file_entries(read_json(listing, MAX_FILES_JSON_BYTES, "files.json"))
    listed: set[str] = set()
    for name, digest, size in entries:
        normal = name.removeprefix("./").removeprefix("payload/")
        target = staging / normal
        if normal in listed:
            raise IntegrityError(f"files.json lists {name!r} twice", code="files_json_invalid")
        listed.add(normal)
        if normal not in present or target.is_symlink() or not target.is_file():
            raise IntegrityError(
                f"files.json lists {name!r}, which is missing", code="file_missing"
            )
        if size is not None and target.stat().st_size != size:
            raise IntegrityError(
                f"{name!r} has a different size than files.json says", code="file_hash_mismatch"
            )
        actual = digests.get(normal) or (sha256_file(target) if digest is not None else None)
        if digest is not None and actual != digest:
            raise IntegrityError(
                f"{name!r} does not match its files.json hash", code="file_hash_mismatch"
            )
    covered = {name.split("/", 1)[0] for name in listed if "/" in name}
    extras = [
        name
        for name in present
        if name != "files.json" and name not in listed and name.split("/", 1)[0] in covered
    ]
    if extras:
        raise IntegrityError(
            f"payload contains files not listed in files.json: {', '.join(map(repr, extras[:5]))}",
            code="file_unlisted",
        )
    return f"{len(listed)} files match files.json"
