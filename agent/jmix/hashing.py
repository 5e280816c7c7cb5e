"""The payload_hash rules of the JMIX dialects, computed over a plaintext payload folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entries(root: Path) -> tuple[list[str], list[str]]:
    """Return (folders, files) below ``root`` as POSIX relative paths, links skipped."""
    folders: list[str] = []
    files: list[str] = []
    for directory, subdirs, names in os.walk(root):
        relative = Path(directory).relative_to(root)
        for name in subdirs:
            folders.append((relative / name).as_posix())
        for name in names:
            path = Path(directory) / name
            if not path.is_symlink():
                files.append((relative / name).as_posix())
    return folders, files


def path_walk_hash(root: Path) -> str:
    """jmix-rs and jmix-js: one SHA-256 over each file's ``path + "\\n" + bytes``, path order."""
    _folders, files = _entries(root)
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode("utf-8") + b"\n")
        with (root / name).open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def line_list_hash(root: Path) -> str:
    """Spec and jmix-php, plain: SHA-256 of ``dir:<p>`` / ``file:<p>:<size>:<sha256>`` lines."""
    folders, files = _entries(root)
    lines = {name: f"dir:{name}\n" for name in folders}
    for name in files:
        path = root / name
        lines[name] = f"file:{name}:{path.stat().st_size}:{sha256_file(path)}\n"
    text = "".join(lines[name] for name in sorted(lines, key=lambda n: n.encode("utf-8")))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
