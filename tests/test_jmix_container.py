"""Envelope containers: sealing into one .zip, and opening .zip, .tar and .tar.gz safely.

Hostile archives are built here with zipfile and tarfile; each must be rejected with its
own code, and nothing may appear outside the work folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from jmixkit import bundled_ct_study

from agent.cli import main
from agent.dicom.inspect import build_metadata
from agent.jmix.assertion import TrustedKeys
from agent.jmix.container import package_prefix, peek_container, write_zip, zip_order
from agent.jmix.errors import JmixError
from agent.jmix.profiles import get_profile
from agent.jmix.reader import EnvelopeRejected, OpenedEnvelope, OpenPolicy, open_envelope
from agent.jmix.seal import Party, PayloadFile, SealResult, seal_envelope
from agent.jmix.tarsafe import ArchiveLimits

SENDER = Party("org:test.site-a", "Site A", "pacs@site-a.test")
RECEIVER = Party("org:test.site-b", "Site B", "pacs@site-b.test")


def ct_study() -> list[Path]:
    return bundled_ct_study(3)


def sha256_path(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Site:
    """Keys of a sender and a receiver, and a scratch folder."""

    root: Path
    signing: Ed25519PrivateKey
    recipient: X25519PrivateKey

    def seal(
        self, envelope_format: str = "zip", profile: str = "spec", **options: Any
    ) -> SealResult:
        sources = ct_study()
        out = self.root / f"out-{envelope_format}-{profile}"
        out.mkdir(exist_ok=True)
        return seal_envelope(
            [PayloadFile(f"dicom/{path.name}.dcm", path) for path in sources],
            build_metadata(sources),
            out,
            SENDER,
            self.signing,
            RECEIVER,
            self.recipient.public_key(),
            profile=get_profile(profile),
            envelope_format=envelope_format,
            **options,
        )

    def policy(self, **overrides: Any) -> OpenPolicy:
        raw = self.signing.public_key().public_bytes_raw()
        settings: dict[str, Any] = {
            "recipient_keys": (self.recipient,),
            "trusted": TrustedKeys({SENDER.id: [raw]}),
            "our_id": RECEIVER.id,
        }
        settings.update(overrides)
        return OpenPolicy(**settings)

    def work(self) -> Path:
        index = len(list(self.root.glob("work-*")))
        path = self.root / f"work-{index}"
        path.mkdir()
        return path

    def open(self, envelope: Path, **overrides: Any) -> OpenedEnvelope:
        return open_envelope(envelope, self.policy(**overrides), self.work())

    def reject(self, envelope: Path, **overrides: Any) -> EnvelopeRejected:
        with pytest.raises(EnvelopeRejected) as caught:
            self.open(envelope, **overrides)
        return caught.value


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


def payload_hashes(opened: OpenedEnvelope) -> list[str]:
    return sorted(sha256_path(path) for path in (opened.payload_dir / "dicom").iterdir())


def source_hashes() -> list[str]:
    return sorted(sha256_path(path) for path in ct_study())


# -- writing a zip ----------------------------------------------------------------------------


def test_zip_seal_single_file(site: Site) -> None:
    sealed = site.seal("zip")
    assert sealed.path.name == f"{sealed.envelope_id}.zip"
    assert sealed.path.is_file()
    assert [path.name for path in sealed.path.parent.iterdir()] == [sealed.path.name]


def test_zip_entries_at_root_manifest_first(site: Site) -> None:
    sealed = site.seal("zip")
    with zipfile.ZipFile(sealed.path) as bundle:
        names = bundle.namelist()
    assert names == ["manifest.json", "audit.json", "payload.encrypted"]
    # The rule of the spec's API and of jmix-rs and harmony: manifest.json at the top.
    assert package_prefix(names) == ""


def test_zip_entry_metadata(site: Site) -> None:
    sealed = site.seal("zip")
    with zipfile.ZipFile(sealed.path) as bundle:
        infos = {info.filename: info for info in bundle.infolist()}
        manifest = json.loads(bundle.read("manifest.json"))
    moment = datetime.fromisoformat(manifest["timestamp"].replace("Z", "+00:00"))
    # Zip stores local times in 2-second steps.
    expected = (*moment.timetuple()[:5], moment.second - moment.second % 2)
    for info in infos.values():
        assert info.date_time == expected, info.filename
        assert stat.S_IMODE(info.external_attr >> 16) == 0o644, info.filename
        assert stat.S_ISREG(info.external_attr >> 16), info.filename
    assert infos["payload.encrypted"].compress_type == zipfile.ZIP_STORED
    assert infos["manifest.json"].compress_type == zipfile.ZIP_DEFLATED


def test_zip_writer_deterministic(site: Site, tmp_path: Path) -> None:
    sealed = site.seal("folder")
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    first, second = tmp_path / "first.zip", tmp_path / "second.zip"
    write_zip(sealed.path, first, moment)
    write_zip(sealed.path, second, moment)
    assert first.read_bytes() == second.read_bytes()
    assert zip_order(sealed.path) == ["manifest.json", "audit.json", "payload.encrypted"]


def test_zip_writer_keeps_existing(site: Site, tmp_path: Path) -> None:
    sealed = site.seal("folder")
    target = tmp_path / "existing.zip"
    target.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        write_zip(sealed.path, target, datetime.now(UTC))
    assert target.read_bytes() == b"keep"


def test_zip_same_id_exists(site: Site) -> None:
    sealed = site.seal("zip")
    with pytest.raises(FileExistsError):
        site.seal("zip", envelope_id=uuid.UUID(sealed.envelope_id))
    assert sorted(path.name for path in sealed.path.parent.iterdir()) == [sealed.path.name]


def test_unknown_format_rejected(site: Site) -> None:
    with pytest.raises(ValueError, match="unknown envelope format"):
        site.seal("rar")


# -- opening containers -----------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["spec", "jmix-rs", "jmix-js"])
def test_zip_roundtrip_each_profile(site: Site, profile: str) -> None:
    sealed = site.seal("zip", profile)
    opened = site.open(sealed.path)
    assert opened.container == "zip"
    assert opened.envelope_id == sealed.envelope_id
    assert payload_hashes(opened) == source_hashes()
    assert all(check.ok for check in opened.checks)


def test_zip_name_checked(site: Site) -> None:
    sealed = site.seal("zip")
    renamed = sealed.path.with_name("f0e1d2c3-0000-4000-8000-000000000000.zip")
    sealed.path.rename(renamed)

    rejected = site.reject(renamed)

    assert rejected.code == "name_mismatch"
    assert rejected.envelope_id == sealed.envelope_id
    assert site.open(renamed, require_name_match=False).envelope_id == sealed.envelope_id


def zip_folder(
    folder: Path, target: Path, prefix: str, extra: dict[str, bytes] | None = None
) -> None:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                bundle.write(path, prefix + path.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            bundle.writestr(name, data)


def test_zip_with_top_folder_opens(site: Site) -> None:
    sealed = site.seal("folder")
    container = site.root / f"{sealed.envelope_id}.zip"
    zip_folder(sealed.path, container, f"{sealed.path.name}/")

    opened = site.open(container)

    assert opened.container == "zip"
    assert payload_hashes(opened) == source_hashes()


def test_zip_top_folder_name_checked(site: Site) -> None:
    sealed = site.seal("folder")
    container = site.root / f"{sealed.envelope_id}.zip"
    zip_folder(sealed.path, container, "other.JMIX/")
    assert site.reject(container).code == "name_mismatch"


def test_zip_macos_folder_ignored(site: Site) -> None:
    sealed = site.seal("folder")
    container = site.root / f"{sealed.envelope_id}.zip"
    extra = {"__MACOSX/._manifest.json": b"\x00\x05\x16\x07"}
    zip_folder(sealed.path, container, f"{sealed.path.name}/", extra)
    assert site.open(container).envelope_id == sealed.envelope_id


def test_zip_two_top_folders_rejected(site: Site) -> None:
    sealed = site.seal("folder")
    container = site.root / f"{sealed.envelope_id}.zip"
    zip_folder(sealed.path, container, f"{sealed.path.name}/", {"second/manifest.json": b"{}"})
    rejected = site.reject(container)
    assert rejected.code == "manifest_missing"
    assert rejected.checks[-1].name == "layout"


def test_zip_without_manifest_rejected(site: Site) -> None:
    container = site.root / "empty.zip"
    with zipfile.ZipFile(container, "w") as bundle:
        bundle.writestr("readme.txt", b"no envelope here")
    assert site.reject(container).code == "manifest_missing"


def tar_folder(folder: Path, target: Path, mode: str, prefix: str) -> None:
    with tarfile.open(target, mode) as bundle:
        for path in sorted(folder.rglob("*")):
            bundle.add(path, prefix + path.relative_to(folder).as_posix(), recursive=False)


@pytest.mark.parametrize(
    ("suffix", "mode", "in_folder"),
    [
        (".tar", "w", True),
        (".tar", "w", False),
        (".tar.gz", "w:gz", True),
        (".tgz", "w:gz", False),
    ],
)
def test_tar_containers_open(site: Site, suffix: str, mode: str, in_folder: bool) -> None:
    sealed = site.seal("folder")
    container = site.root / f"{sealed.envelope_id}{suffix}"
    tar_folder(sealed.path, container, mode, f"{sealed.path.name}/" if in_folder else "")

    opened = site.open(container)

    assert opened.container == "tar"
    assert payload_hashes(opened) == source_hashes()
    assert all(check.ok for check in opened.checks)


def test_plain_file_not_a_container(site: Site) -> None:
    path = site.root / "notes.txt"
    path.write_text("not an envelope\n")
    rejected = site.reject(path)
    assert rejected.code == "container_unsupported"


def test_missing_envelope_reported(site: Site) -> None:
    assert site.reject(site.root / "absent.zip").code == "envelope_missing"


def test_container_extracted_inside_work(site: Site) -> None:
    sealed = site.seal("zip")
    work = site.work()
    opened = open_envelope(sealed.path, site.policy(), work)
    assert opened.payload_dir.is_relative_to(work)
    assert (work / "envelope" / "manifest.json").is_file()


def test_zip_flipped_ciphertext_rejected(site: Site, tmp_path: Path) -> None:
    sealed = site.seal("folder")
    encrypted = sealed.path / "payload.encrypted"
    data = bytearray(encrypted.read_bytes())
    data[100] ^= 0x01
    encrypted.write_bytes(bytes(data))
    container = tmp_path / f"{sealed.envelope_id}.zip"
    write_zip(sealed.path, container, datetime.now(UTC))

    rejected = site.reject(container)

    assert rejected.code in {"decrypt_failed", "payload_hash_mismatch"}
    assert not any((tmp_path / name).exists() for name in ("payload", "raw"))


def test_zip_corrupt_member_rejected(site: Site) -> None:
    sealed = site.seal("zip")
    data = bytearray(sealed.path.read_bytes())
    # Flip a byte inside the stored ciphertext: the zip's CRC-32 no longer matches.
    offset = data.index(b"payload.encrypted") + len("payload.encrypted") + 200
    data[offset] ^= 0x01
    sealed.path.write_bytes(bytes(data))
    assert site.reject(sealed.path).code == "archive_invalid"


# -- hostile zips -----------------------------------------------------------------------------


def hostile_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        for info, data in entries:
            bundle.writestr(info, data)
    return path


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def fifo_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return info


HOSTILE_CASES: dict[str, tuple[list[tuple[Any, bytes]], str]] = {
    "symlink": ([(symlink_info("manifest.json"), b"/etc/passwd")], "unsafe_member_type"),
    "fifo": ([(fifo_info("payload.encrypted"), b"")], "unsafe_member_type"),
    "dot-dot": ([("../escaped.txt", b"x")], "unsafe_path"),
    "nested dot-dot": ([("a/../../escaped.txt", b"x")], "unsafe_path"),
    "absolute": ([("/tmp/escaped.txt", b"x")], "unsafe_path"),
    "backslash": ([("..\\escaped.txt", b"x")], "unsafe_path"),
    "control character": ([("bad\x1bname", b"x")], "unsafe_path"),
    "duplicate": ([("manifest.json", b"{}"), ("manifest.json", b"{}")], "duplicate_member"),
    "file then folder": ([("a", b"x"), ("a/b", b"y")], "duplicate_member"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CASES))
def test_hostile_zip_rejected(site: Site, case: str) -> None:
    entries, code = HOSTILE_CASES[case]
    outside = site.root / "escaped.txt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        container = hostile_zip(site.root / "hostile.zip", entries)
    work = site.work()

    with pytest.raises(EnvelopeRejected) as caught:
        open_envelope(container, site.policy(), work)

    assert caught.value.code == code
    assert caught.value.checks[-1].name == "layout"
    assert not outside.exists()
    assert not (work / "escaped.txt").exists()


def test_encrypted_zip_member_rejected(site: Site) -> None:
    container = hostile_zip(site.root / "locked.zip", [("manifest.json", b"{}")])
    data = bytearray(container.read_bytes())
    # Set bit 0 (encrypted) of the general purpose flags in the local and central headers.
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        position = data.index(signature) + offset
        data[position] |= 0x01
    container.write_bytes(bytes(data))
    assert site.reject(container).code == "unsafe_member_type"


def test_zip_member_count_limit(site: Site) -> None:
    entries: list[tuple[Any, bytes]] = [(f"f{index}.txt", b"x") for index in range(6)]
    container = hostile_zip(site.root / "many.zip", entries)
    rejected = site.reject(container, limits=ArchiveLimits(max_members=5))
    assert rejected.code == "archive_too_many_members"


def test_zip_file_size_limit(site: Site) -> None:
    container = hostile_zip(site.root / "big.zip", [("manifest.json", b"x" * 2048)])
    rejected = site.reject(container, limits=ArchiveLimits(max_file_bytes=1024))
    assert rejected.code == "archive_too_large"


def test_zip_total_size_limit(site: Site) -> None:
    entries: list[tuple[Any, bytes]] = [(f"f{index}.bin", b"x" * 600) for index in range(4)]
    container = hostile_zip(site.root / "total.zip", entries)
    limits = ArchiveLimits(max_file_bytes=1024, max_total_bytes=2000)
    assert site.reject(container, limits=limits).code == "archive_too_large"


def test_zip_bomb_ratio_stopped(site: Site) -> None:
    container = hostile_zip(site.root / "bomb.zip", [("zeros.bin", b"\x00" * (8 * 1024 * 1024))])
    work = site.work()
    with pytest.raises(EnvelopeRejected) as caught:
        open_envelope(container, site.policy(limits=ArchiveLimits(max_ratio=10.0)), work)
    assert caught.value.code == "archive_ratio"
    written = sum(path.stat().st_size for path in work.rglob("*") if path.is_file())
    assert written <= 2 * 1024 * 1024


def test_zip_lying_size_stopped(site: Site) -> None:
    """A central directory that understates a member's size does not bypass the limit."""
    container = hostile_zip(site.root / "liar.zip", [("data.bin", b"y" * 4096)])
    data = bytearray(container.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 24 : central + 28] = (16).to_bytes(4, "little")
    container.write_bytes(bytes(data))
    rejected = site.reject(container, limits=ArchiveLimits(max_file_bytes=1024))
    assert rejected.code in {"archive_too_large", "archive_invalid"}


def test_tar_container_symlink_rejected(site: Site) -> None:
    container = site.root / "link.tar"
    with tarfile.open(container, "w") as bundle:
        info = tarfile.TarInfo("manifest.json")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        bundle.addfile(info)
    assert site.reject(container).code == "unsafe_member_type"


def test_tar_container_dot_dot_rejected(site: Site) -> None:
    container = site.root / "climb.tar.gz"
    with tarfile.open(container, "w:gz") as bundle:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        bundle.addfile(info, io.BytesIO(b"x"))
    assert site.reject(container).code == "unsafe_path"
    assert not (site.root / "escaped.txt").exists()


# -- reading without extracting (inspect) -----------------------------------------------------


def test_peek_zip_manifest(site: Site) -> None:
    sealed = site.seal("zip")
    listing = peek_container(sealed.path, 1024 * 1024)
    assert json.loads(listing.manifest)["id"] == sealed.envelope_id
    assert listing.root_names == ["audit.json", "manifest.json", "payload.encrypted"]
    assert listing.top_folder is None


def test_peek_tar_with_folder(site: Site) -> None:
    sealed = site.seal("folder")
    container = site.root / "envelope.tar.gz"
    tar_folder(sealed.path, container, "w:gz", f"{sealed.path.name}/")
    listing = peek_container(container, 1024 * 1024)
    assert json.loads(listing.manifest)["id"] == sealed.envelope_id
    assert listing.top_folder == sealed.path.name
    assert listing.root_names == ["audit.json", "manifest.json", "payload.encrypted"]


def test_peek_manifest_size_limit(site: Site) -> None:
    container = hostile_zip(site.root / "large.zip", [("manifest.json", b" " * 4096)])
    with pytest.raises(JmixError) as caught:
        peek_container(container, 1024)
    assert caught.value.code == "json_too_large"


# -- the command line -------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def key_files(site: Site) -> tuple[Path, str, str]:
    """Write the recipient's private key; return it with the two public keys as base64."""
    import base64

    from agent.jmix.keys import private_pem

    private = site.root / "recipient.pem"
    private.write_bytes(private_pem(site.recipient))
    recipient = base64.b64encode(site.recipient.public_key().public_bytes_raw()).decode()
    signer = base64.b64encode(site.signing.public_key().public_bytes_raw()).decode()
    return private, recipient, signer


@pytest.fixture
def dicom_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "dicom"
    folder.mkdir()
    for source in ct_study():
        shutil.copyfile(source, folder / source.name)
    return folder


def test_cli_seal_zip_then_verify(
    site: Site, dicom_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.jmix.keys import private_pem

    signing_file = site.root / "signing.pem"
    signing_file.write_bytes(private_pem(site.signing))
    private, recipient, signer = key_files(site)
    out = site.root / "cli-out"
    argv = ["seal", str(dicom_folder), "-o", str(out), "--format", "zip", "--json"]
    argv += ["--recipient", recipient, "--signing-key", str(signing_file)]

    assert run_cli(argv) == 0
    envelope = Path(json.loads(capsys.readouterr().out)["envelope"])
    assert envelope.suffix == ".zip"

    assert run_cli(["verify", str(envelope), "--key", str(private), "--trust", signer]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith(("PASS ", "SKIP ")) for line in lines), lines
    # Without a config there is no local identity, so the receiver check is skipped.
    assert [line.split(":")[0] for line in lines if line.startswith("SKIP ")] == ["SKIP receiver"]
    assert any("zip container" in line for line in lines)


def test_cli_open_zip_json(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    sealed = site.seal("zip")
    private, _recipient, signer = key_files(site)
    output = site.root / "received"
    argv = ["open", str(sealed.path), "-o", str(output), "--key", str(private)]
    argv += ["--trust", signer, "--json"]

    assert run_cli(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True
    assert document["container"] == "zip"
    assert sorted(sha256_path(p) for p in (output / "dicom").iterdir()) == source_hashes()


def test_cli_inspect_zip(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    sealed = site.seal("zip")
    assert run_cli(["inspect", str(sealed.path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["id"] == sealed.envelope_id
    assert summary["files"] == ["audit.json", "manifest.json", "payload.encrypted"]
    assert summary["encrypted"] is True


def test_cli_inspect_tar(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    sealed = site.seal("folder")
    container = site.root / "envelope.tar"
    tar_folder(sealed.path, container, "w", "")
    assert run_cli(["inspect", str(container), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == sealed.envelope_id


def test_cli_verify_hostile_zip_fails(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    private, _recipient, signer = key_files(site)
    container = hostile_zip(site.root / "hostile.zip", [("../escaped.txt", b"x")])
    argv = ["verify", str(container), "--key", str(private), "--trust", signer]
    assert run_cli(argv) == 1
    captured = capsys.readouterr()
    assert "FAIL layout: " in captured.out
    assert "unsafe_path" in captured.err


def test_fifo_not_a_container(site: Site) -> None:
    fifo = site.root / "envelope.zip"
    os.mkfifo(fifo)
    rejected = site.reject(fifo)
    assert rejected.code == "container_unsupported"
