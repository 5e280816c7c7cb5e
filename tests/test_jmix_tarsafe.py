"""Safe extraction of untrusted payload tars: each malicious archive gets its own code.

Every archive is built here with ``tarfile``. Each rejection test also checks that
nothing appeared next to the destination folder, where a traversal would land.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.jmix.errors import UnsafeArchiveError
from agent.jmix.tarsafe import ArchiveLimits, extract_tar


@dataclass(frozen=True)
class Member:
    """One archive entry: a name, a tar type, and file bytes or a link target."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""


def file(name: str, data: bytes = b"content\n") -> Member:
    return Member(name, data)


def build_tar(members: Iterable[Member], compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.kind
            info.linkname = member.linkname
            info.mode = 0o755 if member.kind == tarfile.DIRTYPE else 0o644
            if member.kind == tarfile.REGTYPE:
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
            else:
                tar.addfile(info)
    data = buffer.getvalue()
    return gzip.compress(data) if compress else data


@dataclass
class Sandbox:
    """A tmp folder containing the archive, an empty destination and one bystander file."""

    root: Path
    archive: Path
    destination: Path

    def outside(self) -> list[str]:
        """Return every path under root except the archive and the destination's contents."""
        entries = []
        for path in sorted(self.root.rglob("*")):
            if path == self.archive or self.destination in path.parents:
                continue
            entries.append(path.relative_to(self.root).as_posix())
        return entries


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    destination = tmp_path / "dest"
    destination.mkdir()
    (tmp_path / "outside.txt").write_bytes(b"must stay untouched\n")
    return Sandbox(tmp_path, tmp_path / "payload.tar", destination)


def extract(sandbox: Sandbox, data: bytes, limits: ArchiveLimits | None = None) -> list[str]:
    sandbox.archive.write_bytes(data)
    files = extract_tar(sandbox.archive, sandbox.destination, limits or ArchiveLimits())
    return [item.name for item in files]


def rejected_code(sandbox: Sandbox, data: bytes, limits: ArchiveLimits | None = None) -> str:
    before = sandbox.outside()
    with pytest.raises(UnsafeArchiveError) as caught:
        extract(sandbox, data, limits)
    assert sandbox.outside() == before
    assert (sandbox.root / "outside.txt").read_bytes() == b"must stay untouched\n"
    return caught.value.code


# -- accepted archives ---------------------------------------------------------------------------


def test_plain_tar_extracts(sandbox: Sandbox) -> None:
    data = build_tar(
        [
            Member("dicom", kind=tarfile.DIRTYPE),
            file("dicom/a.dcm", b"A" * 10),
            file("metadata.json", b"{}"),
        ]
    )
    names = extract(sandbox, data)
    assert names == ["dicom/a.dcm", "metadata.json"]
    assert (sandbox.destination / "dicom" / "a.dcm").read_bytes() == b"A" * 10


def test_dot_prefix_stripped(sandbox: Sandbox) -> None:
    data = build_tar([Member("./", kind=tarfile.DIRTYPE), file("./dicom/a.dcm")])
    assert extract(sandbox, data) == ["dicom/a.dcm"]


def test_missing_directory_entries(sandbox: Sandbox) -> None:
    assert extract(sandbox, build_tar([file("a/b/c/d.dcm")])) == ["a/b/c/d.dcm"]


def test_empty_placeholder_dropped(sandbox: Sandbox) -> None:
    data = build_tar([file("dicom/.jmix-empty", b""), file("metadata.json")])
    assert extract(sandbox, data) == ["metadata.json"]
    assert not (sandbox.destination / "dicom" / ".jmix-empty").exists()


def test_gzip_tar_extracts(sandbox: Sandbox) -> None:
    data = build_tar([file("metadata.json", b"{}")], compress=True)
    assert extract(sandbox, data) == ["metadata.json"]


def test_extracted_files_private(sandbox: Sandbox) -> None:
    extract(sandbox, build_tar([file("metadata.json")]))
    mode = (sandbox.destination / "metadata.json").stat().st_mode
    assert mode & 0o077 == 0


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../escaped.txt",
        "dicom/../../escaped.txt",
        "..",
    ],
)
def test_parent_traversal_rejected(sandbox: Sandbox, name: str) -> None:
    assert rejected_code(sandbox, build_tar([file(name)])) == "unsafe_path"
    assert not (sandbox.root / "escaped.txt").exists()


def test_absolute_path_rejected(sandbox: Sandbox) -> None:
    target = sandbox.root / "absolute.txt"
    assert rejected_code(sandbox, build_tar([file(str(target))])) == "unsafe_path"
    assert not target.exists()


def test_backslash_rejected(sandbox: Sandbox) -> None:
    assert rejected_code(sandbox, build_tar([file("..\\escaped.txt")])) == "unsafe_path"


@pytest.mark.parametrize("name", ["a\x1bb.txt", "line\nbreak.txt", "del\x7f.txt", "tab\t.txt"])
def test_control_characters_rejected(sandbox: Sandbox, name: str) -> None:
    assert rejected_code(sandbox, build_tar([file(name)])) == "unsafe_path"


def test_duplicate_name_rejected(sandbox: Sandbox) -> None:
    data = build_tar([file("dicom/a.dcm", b"first"), file("dicom/a.dcm", b"second")])
    assert rejected_code(sandbox, data) == "duplicate_member"


def test_duplicate_after_normalising(sandbox: Sandbox) -> None:
    data = build_tar([file("dicom/a.dcm", b"first"), file("./dicom//a.dcm", b"second")])
    assert rejected_code(sandbox, data) == "duplicate_member"


def test_file_then_folder_rejected(sandbox: Sandbox) -> None:
    data = build_tar([file("dicom", b"a file"), file("dicom/a.dcm")])
    assert rejected_code(sandbox, data) == "duplicate_member"


# -- member types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "member",
    [
        Member("link", kind=tarfile.SYMTYPE, linkname="../"),
        Member("abs-link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
        Member("hard", kind=tarfile.LNKTYPE, linkname="../outside.txt"),
        Member("fifo", kind=tarfile.FIFOTYPE),
        Member("char", kind=tarfile.CHRTYPE),
        Member("block", kind=tarfile.BLKTYPE),
    ],
    ids=["symlink", "absolute-symlink", "hardlink", "fifo", "char-device", "block-device"],
)
def test_special_member_rejected(sandbox: Sandbox, member: Member) -> None:
    data = build_tar([member, file(f"{member.name}/through.txt")])
    assert rejected_code(sandbox, data) == "unsafe_member_type"
    assert not os.path.lexists(sandbox.destination / member.name)


def test_hardlink_leaves_target_alone(sandbox: Sandbox) -> None:
    data = build_tar(
        [
            file("target.txt", b"inside"),
            Member("hard", kind=tarfile.LNKTYPE, linkname="target.txt"),
        ]
    )
    assert rejected_code(sandbox, data) == "unsafe_member_type"
    assert not (sandbox.destination / "hard").exists()


# -- limits --------------------------------------------------------------------------------------


def test_too_many_members_rejected(sandbox: Sandbox) -> None:
    data = build_tar([file(f"f{index}.txt") for index in range(4)])
    limits = ArchiveLimits(max_members=3)
    assert rejected_code(sandbox, data, limits) == "archive_too_many_members"


def test_member_count_at_limit(sandbox: Sandbox) -> None:
    data = build_tar([file(f"f{index}.txt") for index in range(3)])
    assert len(extract(sandbox, data, ArchiveLimits(max_members=3))) == 3


def test_oversized_file_rejected(sandbox: Sandbox) -> None:
    data = build_tar([file("big.bin", b"x" * 1000)])
    limits = ArchiveLimits(max_file_bytes=100)
    assert rejected_code(sandbox, data, limits) == "archive_too_large"
    assert not (sandbox.destination / "big.bin").exists()


def test_total_size_rejected(sandbox: Sandbox) -> None:
    data = build_tar([file(f"f{index}.bin", b"x" * 600) for index in range(3)])
    limits = ArchiveLimits(max_file_bytes=1000, max_total_bytes=1500)
    assert rejected_code(sandbox, data, limits) == "archive_too_large"


def test_gzip_bomb_rejected(sandbox: Sandbox) -> None:
    data = build_tar([file("zeros.bin", bytes(4 * 1024 * 1024))], compress=True)
    limits = ArchiveLimits(max_ratio=10.0)
    assert rejected_code(sandbox, data, limits) == "archive_ratio"
    written = sandbox.destination / "zeros.bin"
    assert not written.exists() or written.stat().st_size < 4 * 1024 * 1024


# -- damaged archives ------------------------------------------------------------------------


def test_not_a_tar_rejected(sandbox: Sandbox) -> None:
    assert rejected_code(sandbox, b"this is not a tar archive\n" * 40) == "archive_invalid"


def test_truncated_tar_rejected(sandbox: Sandbox) -> None:
    data = build_tar([file("big.bin", b"x" * 5000)])
    assert rejected_code(sandbox, data[:1536]) == "archive_invalid"
