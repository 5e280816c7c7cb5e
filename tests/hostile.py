"""Hostile envelopes: bad variants of one good envelope, each with the code it must get.

:class:`EnvelopeForge` seals a genuine envelope with a peer's real signing key for the
receiver's real encryption key, then breaks one thing in it. Some cases must get past
decryption to reach the check they target: tar members, bombs, ``files.json``, non-DICOM
files and re-signed manifests. Those build the payload tar by hand, encrypt it to the
receiver with :class:`StreamEncryptor` and re-sign the manifest with the sender's real key.
The broken part is then the only difference from what a genuine sender would produce.

:data:`CASES` lists every case with its expected rejection code. The cases assume the
receiver that :func:`build_receiver` configures: :data:`RECEIVER_INBOUND_SETTINGS` in its
``[inbound]`` table (the bomb and timestamp cases are sized against them), the sender
pinned with both its signing key and :attr:`EnvelopeForge.revoked_key` (also listed in
``revoked_fingerprints``), and a second peer whose id is
:attr:`EnvelopeForge.impersonated_id`.

:func:`deliver` copies entries into an inbox under a hidden name and renames them in, the
way a well-behaved transport does.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.audit import read_records
from agent.demo import Site, sample_paths, write_config
from agent.dicom.inspect import build_metadata, read_instance_info
from agent.jmix.assertion import sign_assertion
from agent.jmix.crypto import EncryptionParams, StreamEncryptor, decrypt_stream
from agent.jmix.keys import b64decode, b64encode, fingerprint, public_b64
from agent.jmix.profiles import SPEC
from agent.jmix.seal import Party, PayloadFile, seal_envelope
from agent.jmix.timeutil import format_timestamp, utc_now

MIB = 1024 * 1024

# What the receiving agent's [inbound] table must hold. The bomb cases are sized against
# these limits and the timestamp cases against the window.
MAX_ENVELOPE_BYTES = 4 * MIB
MAX_MEMBERS = 50
MAX_EXPANSION_RATIO = 200.0
MAX_ENVELOPE_AGE_HOURS = 24.0
MAX_CLOCK_SKEW_SECONDS = 300.0
RECEIVER_INBOUND_SETTINGS: dict[str, int | float] = {
    "max_envelope_bytes": MAX_ENVELOPE_BYTES,
    "max_members": MAX_MEMBERS,
    "max_expansion_ratio": MAX_EXPANSION_RATIO,
    "max_envelope_age_hours": MAX_ENVELOPE_AGE_HOURS,
    "max_clock_skew_seconds": MAX_CLOCK_SKEW_SECONDS,
}

_KEEP = object()


@dataclass(frozen=True)
class Member:
    """One payload tar entry: a name, a tar type, and file bytes or a link target."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""


@dataclass
class EnvelopeForge:
    """Seals genuine envelopes from ``sender`` to ``receiver`` and breaks them on request.

    ``receiver_key`` is the receiver's private encryption key: the forge seals to its
    public half and reads genuine payloads back with it, so a re-packed payload starts
    from exactly what :func:`seal_envelope` wrote.
    """

    sender: Party
    signing_key: Ed25519PrivateKey
    receiver: Party
    receiver_key: X25519PrivateKey
    dicom_files: Sequence[Path]
    impersonated_id: str
    revoked_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    stranger_signing_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    stranger_encryption_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)

    @property
    def revoked_fingerprint(self) -> str:
        """The fingerprint the receiver lists in ``revoked_fingerprints``."""
        return fingerprint(self.revoked_key.public_key())

    # -- genuine envelopes -----------------------------------------------------------------

    def seal(
        self,
        directory: Path,
        *,
        recipient: X25519PublicKey | None = None,
        envelope_id: uuid.UUID | None = None,
    ) -> Path:
        """Seal a genuine envelope into ``directory`` and return its folder."""
        directory.mkdir(parents=True, exist_ok=True)
        sources = list(self.dicom_files)
        payload = [
            PayloadFile(f"dicom/{read_instance_info(path).sop_instance_uid}.dcm", path)
            for path in sources
        ]
        result = seal_envelope(
            payload,
            build_metadata(sources),
            directory,
            self.sender,
            self.signing_key,
            self.receiver,
            recipient or self.receiver_key.public_key(),
            envelope_id=envelope_id,
        )
        return result.path

    # -- manifest editing ------------------------------------------------------------------

    @staticmethod
    def read_manifest(envelope: Path) -> dict[str, Any]:
        document: dict[str, Any] = json.loads((envelope / "manifest.json").read_bytes())
        return document

    @staticmethod
    def write_manifest(envelope: Path, manifest: Any) -> None:
        # ensure_ascii writes unpaired surrogates, which UTF-8 cannot encode, as \u escapes.
        (envelope / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    def resign(
        self,
        manifest: dict[str, Any],
        *,
        key: Ed25519PrivateKey | None = None,
        signed_fields: Sequence[str] | None = None,
        expires_at: object = _KEEP,
    ) -> None:
        """Replace the sender assertion with a fresh one over the manifest as it is now.

        By default the same fields are signed with the sender's real key and the old
        expiry is kept, so the new assertion is valid unless the caller changes that.
        """
        old = manifest["sender"].pop("assertion")
        fields = list(signed_fields if signed_fields is not None else old["signed_fields"])
        expiry = old.get("expires_at") if expires_at is _KEEP else expires_at
        assert expiry is None or isinstance(expiry, str)
        manifest["sender"]["assertion"] = sign_assertion(
            manifest, key or self.signing_key, fields, expiry
        )

    # -- payload editing -------------------------------------------------------------------

    def payload_members(self, envelope: Path) -> list[Member]:
        """Decrypt a genuine envelope's payload and return its tar entries in order."""
        encryption = self.read_manifest(envelope)["security"]["encryption"]
        params = EncryptionParams(
            b64decode(encryption["ephemeral_public_key"], "ephemeral_public_key"),
            b64decode(encryption["iv"], "iv"),
            b64decode(encryption["auth_tag"], "auth_tag"),
        )
        plain = io.BytesIO()
        with (envelope / SPEC.encrypted_file).open("rb") as source:
            decrypt_stream(source, plain, self.receiver_key, params, SPEC.hkdf_info)
        plain.seek(0)
        members = []
        with tarfile.open(fileobj=plain, mode="r:") as tar:
            for info in tar:
                handle = tar.extractfile(info)
                data = handle.read() if handle else b""
                members.append(Member(info.name, data, info.type, info.linkname))
        return members

    def repack(
        self, envelope: Path, payload: Sequence[Member] | bytes, compress: bool = False
    ) -> None:
        """Encrypt a new payload into ``envelope`` and re-sign its manifest with the real key.

        ``payload`` is a list of tar entries, or the exact plaintext bytes to encrypt.
        """
        plaintext = payload if isinstance(payload, bytes) else tar_bytes(payload, compress)
        with (envelope / SPEC.encrypted_file).open("wb") as sink:
            encryptor = StreamEncryptor(sink, self.receiver_key.public_key(), SPEC.hkdf_info)
            for start in range(0, len(plaintext), MIB):
                encryptor.write(plaintext[start : start + MIB])
            params = encryptor.finish()
        manifest = self.read_manifest(envelope)
        manifest["security"]["encryption"] = {
            "algorithm": "AES-256-GCM",
            "ephemeral_public_key": b64encode(params.ephemeral_public_key),
            "iv": b64encode(params.iv),
            "auth_tag": b64encode(params.auth_tag),
        }
        manifest["security"]["payload_hash"] = "sha256:" + encryptor.ciphertext_sha256.hexdigest()
        self.resign(manifest)
        self.write_manifest(envelope, manifest)


# -- tar and files.json helpers ---------------------------------------------------------


def _tar_info(member: Member) -> tarfile.TarInfo:
    info = tarfile.TarInfo(member.name)
    info.type = member.kind
    info.linkname = member.linkname
    info.mode = 0o755 if member.kind == tarfile.DIRTYPE else 0o644
    if member.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    if member.kind == tarfile.REGTYPE:
        info.size = len(member.data)
    return info


def tar_bytes(members: Iterable[Member], compress: bool = False, finished: bool = True) -> bytes:
    """Return a GNU tar holding ``members`` as given, gzip-compressed on request.

    With ``finished`` false the end-of-archive blocks are left off, so more raw blocks
    can follow.
    """
    if not finished:
        blocks = []
        for member in members:
            blocks.append(_tar_info(member).tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
            blocks.append(member.data + bytes(-len(member.data) % tarfile.BLOCKSIZE))
        return b"".join(blocks)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            info = _tar_info(member)
            tar.addfile(info, io.BytesIO(member.data) if member.kind == tarfile.REGTYPE else None)
    data = buffer.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def file_listing(members: Sequence[Member]) -> list[dict[str, Any]]:
    """Return the files.json the sealer would write for these regular files."""
    return [
        {
            "file": member.name,
            "hash": "sha256:" + hashlib.sha256(member.data).hexdigest(),
            "size_bytes": len(member.data),
        }
        for member in members
        if member.kind == tarfile.REGTYPE and member.name != "files.json"
    ]


def with_listing(members: Sequence[Member], listing: Any) -> list[Member]:
    """Return ``members`` with files.json replaced by ``listing`` (JSON, or raw bytes)."""
    data = listing if isinstance(listing, bytes) else json.dumps(listing, indent=2).encode()
    return [Member("files.json", data) if m.name == "files.json" else m for m in members]


def relisted(members: Sequence[Member]) -> list[Member]:
    """Return ``members`` with a files.json that lists them all correctly."""
    return with_listing(members, file_listing(members))


def dicom_member(members: Sequence[Member]) -> Member:
    return next(member for member in members if member.name.startswith("dicom/"))


def replaced(members: Sequence[Member], old: Member, new: Member) -> list[Member]:
    return [new if member is old else member for member in members]


# -- cases ------------------------------------------------------------------------------

Build = Callable[[EnvelopeForge, Path], Path]


@dataclass(frozen=True)
class HostileCase:
    """One bad inbox entry: how to build it, and the rejection code it must get."""

    name: str
    code: str
    build: Build


def _flip(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


def _flip_b64(text: str, index: int = 0) -> str:
    return b64encode(_flip(b64decode(text, "value"), index))


def manifest_edit(edit: Callable[[dict[str, Any]], object]) -> Build:
    """Change the manifest after signing, without re-signing."""

    def build(forge: EnvelopeForge, directory: Path) -> Path:
        envelope = forge.seal(directory)
        manifest = forge.read_manifest(envelope)
        edit(manifest)
        forge.write_manifest(envelope, manifest)
        return envelope

    return build


def signed_edit(edit: Callable[[dict[str, Any]], object]) -> Build:
    """Change the manifest, then re-sign it with the sender's real key."""

    def build(forge: EnvelopeForge, directory: Path) -> Path:
        envelope = forge.seal(directory)
        manifest = forge.read_manifest(envelope)
        edit(manifest)
        forge.resign(manifest)
        forge.write_manifest(envelope, manifest)
        return envelope

    return build


def manifest_bytes(make: Callable[[dict[str, Any]], bytes]) -> Build:
    """Replace manifest.json with raw bytes made from the genuine manifest."""

    def build(forge: EnvelopeForge, directory: Path) -> Path:
        envelope = forge.seal(directory)
        (envelope / "manifest.json").write_bytes(make(forge.read_manifest(envelope)))
        return envelope

    return build


def payload_edit(
    edit: Callable[[list[Member]], Sequence[Member] | bytes], compress: bool = False
) -> Build:
    """Re-pack the genuine payload after ``edit``, encrypted and signed for real."""

    def build(forge: EnvelopeForge, directory: Path) -> Path:
        envelope = forge.seal(directory)
        forge.repack(envelope, edit(forge.payload_members(envelope)), compress)
        return envelope

    return build


def file_edit(name: str, edit: Callable[[Path], object]) -> Build:
    """Change one file of the envelope folder (``payload.encrypted``, ``manifest.json``)."""

    def build(forge: EnvelopeForge, directory: Path) -> Path:
        envelope = forge.seal(directory)
        edit(envelope / name)
        return envelope

    return build


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Return an edit that sets a dotted manifest path (array positions as numbers)."""

    def edit(manifest: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = manifest
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return edit


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = manifest
        for part in parents:
            target = target[part]
        del target[last]

    return edit


def _change_encryption(name: str, change: Callable[[str], str]) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        block = manifest["security"]["encryption"]
        block[name] = change(block[name])

    return edit


def _renamed_id(forge: EnvelopeForge, directory: Path) -> Path:
    """Give a signed envelope a new id, renaming its folder to match."""
    envelope = forge.seal(directory)
    manifest = forge.read_manifest(envelope)
    manifest["id"] = str(uuid.uuid4())
    forge.write_manifest(envelope, manifest)
    return envelope.rename(envelope.with_name(f"{manifest['id']}.JMIX"))


def _folder_name_mismatch(forge: EnvelopeForge, directory: Path) -> Path:
    envelope = forge.seal(directory)
    return envelope.rename(envelope.with_name(f"{uuid.uuid4()}.JMIX"))


def _sealed_to_stranger(forge: EnvelopeForge, directory: Path) -> Path:
    return forge.seal(directory, recipient=forge.stranger_encryption_key.public_key())


def _symlinked_envelope(forge: EnvelopeForge, directory: Path) -> Path:
    """A link in the inbox pointing at a genuine envelope kept elsewhere."""
    target = forge.seal(directory / "link-targets")
    link = directory / target.name
    link.symlink_to(target)
    return link


def _timestamp(offset: timedelta) -> Callable[[dict[str, Any]], None]:
    return _set("timestamp", format_timestamp(utc_now() + offset))


def _expired_now() -> str:
    return format_timestamp(utc_now() - timedelta(hours=1))


def _signed_fields_without(*paths: str) -> Build:
    """Re-sign with the real key over every field except ``paths``."""

    def build(forge: EnvelopeForge, directory: Path) -> Path:
        envelope = forge.seal(directory)
        manifest = forge.read_manifest(envelope)
        fields = [f for f in manifest["sender"]["assertion"]["signed_fields"] if f not in paths]
        forge.resign(manifest, signed_fields=fields)
        forge.write_manifest(envelope, manifest)
        return envelope

    return build


def _signed_by(key_of: Callable[[EnvelopeForge], Ed25519PrivateKey]) -> Build:
    def build(forge: EnvelopeForge, directory: Path) -> Path:
        envelope = forge.seal(directory)
        manifest = forge.read_manifest(envelope)
        forge.resign(manifest, key=key_of(forge))
        forge.write_manifest(envelope, manifest)
        return envelope

    return build


def _impersonation(resigned: bool) -> Build:
    """Claim to be another pinned peer, with our own key's signature kept or renewed."""

    def build(forge: EnvelopeForge, directory: Path) -> Path:
        envelope = forge.seal(directory)
        manifest = forge.read_manifest(envelope)
        manifest["sender"]["id"] = forge.impersonated_id
        if resigned:
            forge.resign(manifest)
        forge.write_manifest(envelope, manifest)
        return envelope

    return build


def _mislabelled_fingerprint(manifest: dict[str, Any]) -> None:
    stranger = Ed25519PrivateKey.generate().public_key()
    manifest["sender"]["assertion"]["signing_key"]["fingerprint"] = fingerprint(stranger)


def _flip_signature(manifest: dict[str, Any]) -> None:
    assertion = manifest["sender"]["assertion"]
    assertion["signature"] = _flip_b64(assertion["signature"])


def _extra_receiver(manifest: dict[str, Any]) -> None:
    manifest["receiver"].append({"id": "org:demo.eavesdropper", "name": "Eavesdropper"})


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _replace_with_link(path: Path) -> None:
    """Replace a file by a link to an identical copy outside the envelope."""
    outside = path.parent.parent / f"outside-{path.parent.name}-{path.name}"
    shutil.copyfile(path, outside)
    path.unlink()
    path.symlink_to(outside)


def _truncate(fraction: float) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return edit


def _flip_file_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(_flip(data, len(data) // 2))


def _nested_json(manifest: dict[str, Any]) -> bytes:
    depth = 100_000
    return b'{"id": ' + b"[" * depth + b"]" * depth + b"}"


def _duplicate_id_key(manifest: dict[str, Any]) -> bytes:
    """Put a forged id before the signed one, for a parser that keeps the first copy."""
    text = json.dumps(manifest, indent=2)
    return text.replace("{", '{\n  "id": "' + str(uuid.uuid4()) + '",', 1).encode()


def _with_members(*extra: Member) -> Callable[[list[Member]], list[Member]]:
    """Add tar entries after the genuine ones, keeping files.json as sealed."""
    return lambda members: [*members, *extra]


def _first_then(*extra: Member) -> Callable[[list[Member]], list[Member]]:
    """Put tar entries before the genuine ones, so they are extracted first."""
    return lambda members: [*extra, *members]


def _hash_mismatch(members: list[Member]) -> list[Member]:
    listing = file_listing(members)
    listing[0]["hash"] = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    return with_listing(members, listing)


def _size_mismatch(members: list[Member]) -> list[Member]:
    listing = file_listing(members)
    listing[0]["size_bytes"] += 1
    return with_listing(members, listing)


def _listed_but_missing(members: list[Member]) -> list[Member]:
    listing = file_listing(members)
    listing.append({"file": "dicom/1.2.3.4.5.dcm", "hash": listing[0]["hash"], "size_bytes": 1})
    return with_listing(members, listing)


def _unlisted_extra(members: list[Member]) -> list[Member]:
    original = dicom_member(members)
    return [*members, Member("dicom/1.2.3.4.5.6.dcm", original.data)]


def _listed_twice(members: list[Member]) -> list[Member]:
    listing = file_listing(members)
    return with_listing(members, [*listing, listing[0]])


def _changed_dicom_byte(members: list[Member]) -> list[Member]:
    original = dicom_member(members)
    return replaced(members, original, Member(original.name, _flip(original.data, 200)))


def _not_dicom(data: bytes) -> Callable[[list[Member]], list[Member]]:
    """Replace the DICOM file by ``data``, listed correctly in files.json."""

    def edit(members: list[Member]) -> list[Member]:
        original = dicom_member(members)
        return relisted(replaced(members, original, Member(original.name, data)))

    return edit


def _truncated_dicom(members: list[Member]) -> list[Member]:
    original = dicom_member(members)
    return relisted(replaced(members, original, Member(original.name, original.data[:200])))


def _many_members(members: list[Member]) -> list[Member]:
    extra = [Member(f"dicom/extra-{index}.dcm", b"x") for index in range(MAX_MEMBERS + 10)]
    return relisted([*members, *extra])


def _over_total(members: list[Member]) -> list[Member]:
    """Two files under the per-file limit whose sum exceeds the total (compressible in part)."""
    half = MAX_ENVELOPE_BYTES // 2 + MIB // 2
    noise = os.urandom(MAX_ENVELOPE_BYTES // 3)
    padding = bytes(half - len(noise))
    extra = [Member(f"dicom/large-{index}.bin", noise + padding) for index in range(2)]
    return [*members, *extra]


def _ratio_bomb(members: list[Member]) -> list[Member]:
    """Zeros alone: 3 MiB that gzip packs into a few KiB, under the total limit.

    The genuine DICOM file is left out because it barely compresses, which would keep
    the archive-wide ratio under the limit.
    """
    return [Member("dicom/zeros.bin", bytes(MAX_ENVELOPE_BYTES - MIB))]


def _over_plaintext_limit(members: list[Member]) -> list[Member]:
    return [*members, Member("dicom/zeros.bin", bytes(MAX_ENVELOPE_BYTES + MIB))]


def _lying_size_header(members: list[Member]) -> bytes:
    """A member header that claims 100 GiB, followed by a few real bytes and no end."""
    huge = tarfile.TarInfo("dicom/huge.dcm")
    huge.size = 100 * 1024**3
    header = huge.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    return tar_bytes(members, finished=False) + header + bytes(4096)


def _truncated_tar(members: list[Member]) -> bytes:
    return tar_bytes(members)[:1000]


def _not_a_tar(members: list[Member]) -> bytes:
    return b"this is not a tar archive\n" * 200


def _receiver_not_list(manifest: dict[str, Any]) -> None:
    manifest["receiver"] = manifest["receiver"][0]


def _receiver_entry_string(manifest: dict[str, Any]) -> None:
    manifest["receiver"] = [manifest["receiver"][0]["id"]]


def _zero_key(_text: str) -> str:
    return b64encode(bytes(32))


def _short_b64(text: str) -> str:
    return b64encode(b64decode(text, "value")[:-1])


_SIGNED_FIELD_CHANGES: list[tuple[str, str, Callable[[dict[str, Any]], object]]] = [
    ("signed-version-changed", "signature_invalid", _set("version", "1.1")),
    ("signed-timestamp-changed", "signature_invalid", _timestamp(timedelta(seconds=-5))),
    ("signed-sender-name-changed", "signature_invalid", _set("sender.name", "Site A (forged)")),
    (
        "signed-classification-changed",
        "signature_invalid",
        _set("security.classification", "public"),
    ),
    (
        "signed-payload-hash-changed",
        "signature_invalid",
        _set("security.payload_hash", "sha256:" + "0" * 64),
    ),
    ("signed-receiver-id-changed", "signature_invalid", _set("receiver.0.id", "org:demo.other")),
    ("signed-receiver-name-changed", "signature_invalid", _set("receiver.0.name", "Other")),
    (
        "signed-algorithm-changed",
        "signature_invalid",
        _set("security.encryption.algorithm", "AES-128-GCM"),
    ),
    (
        "signed-iv-changed",
        "signature_invalid",
        _change_encryption("iv", _flip_b64),
    ),
    (
        "signed-tag-changed",
        "signature_invalid",
        _change_encryption("auth_tag", _flip_b64),
    ),
    (
        "signed-ephemeral-key-changed",
        "signature_invalid",
        _change_encryption("ephemeral_public_key", _flip_b64),
    ),
    ("extra-receiver-added", "assertion_incomplete", _extra_receiver),
]

_MANIFEST_EDITS: list[tuple[str, str, Callable[[dict[str, Any]], object]]] = [
    ("assertion-removed", "assertion_missing", _delete("sender.assertion")),
    ("assertion-not-object", "assertion_missing", _set("sender.assertion", "signed")),
    ("signing-key-removed", "assertion_malformed", _delete("sender.assertion.signing_key")),
    (
        "signing-key-not-ed25519",
        "assertion_malformed",
        _set("sender.assertion.signing_key.alg", "RSA"),
    ),
    ("signature-not-base64", "assertion_malformed", _set("sender.assertion.signature", "!!!")),
    ("signature-byte-changed", "signature_invalid", _flip_signature),
    ("signed-fields-empty", "assertion_malformed", _set("sender.assertion.signed_fields", [])),
    (
        "signed-field-nonexistent",
        "signed_field_missing",
        lambda m: m["sender"]["assertion"]["signed_fields"].append("security.notes"),
    ),
    ("fingerprint-mismatch", "fingerprint_mismatch", _mislabelled_fingerprint),
    ("id-number", "manifest_invalid", _set("id", 12345)),
    ("id-missing", "manifest_invalid", _delete("id")),
    ("id-not-uuid", "manifest_invalid", _set("id", "../../etc/passwd")),
    ("timestamp-no-zone", "manifest_invalid", _set("timestamp", "2025-01-01T10:00:00")),
    ("timestamp-not-a-date", "manifest_invalid", _set("timestamp", "yesterday")),
    ("timestamp-number", "manifest_invalid", _set("timestamp", 1735725600)),
    ("timestamp-out-of-range", "manifest_invalid", _set("timestamp", "9999-12-31T23:59:59-05:00")),
    ("sender-missing", "manifest_invalid", _delete("sender")),
    ("sender-string", "manifest_invalid", _set("sender", "org:demo.site-a")),
    ("sender-id-number", "manifest_invalid", _set("sender.id", 7)),
    ("receiver-not-list", "manifest_invalid", _receiver_not_list),
    ("receiver-empty", "manifest_invalid", _set("receiver", [])),
    ("receiver-entry-string", "manifest_invalid", _receiver_entry_string),
    ("security-not-object", "manifest_invalid", _set("security", "encrypted")),
    ("payload-hash-number", "manifest_invalid", _set("security.payload_hash", 42)),
    # JCS has no canonical form for these, so the signed bytes cannot even be rebuilt.
    ("signed-field-unpaired-surrogate", "assertion_malformed", _set("sender.name", "Site \ud800")),
    ("signed-field-huge-integer", "assertion_malformed", _set("version", 2**60)),
]

_RESIGNED_EDITS: list[tuple[str, str, Callable[[dict[str, Any]], object]]] = [
    ("iv-byte-changed-resigned", "decrypt_failed", _change_encryption("iv", _flip_b64)),
    ("tag-byte-changed-resigned", "decrypt_failed", _change_encryption("auth_tag", _flip_b64)),
    (
        "ephemeral-key-byte-changed-resigned",
        "decrypt_failed",
        _change_encryption("ephemeral_public_key", lambda text: _flip_b64(text, 5)),
    ),
    (
        "ephemeral-key-low-order-resigned",
        "ephemeral_key_invalid",
        _change_encryption("ephemeral_public_key", _zero_key),
    ),
    ("iv-short-resigned", "manifest_invalid", _change_encryption("iv", _short_b64)),
    ("tag-short-resigned", "manifest_invalid", _change_encryption("auth_tag", _short_b64)),
    ("iv-not-base64-resigned", "manifest_invalid", _change_encryption("iv", lambda _t: "***")),
    (
        "algorithm-unknown-resigned",
        "algorithm_unsupported",
        _set("security.encryption.algorithm", "ChaCha20-Poly1305"),
    ),
    (
        "algorithm-missing-resigned",
        "algorithm_unsupported",
        _delete("security.encryption.algorithm"),
    ),
    ("addressed-to-someone-else", "not_for_us", _set("receiver.0.id", "org:demo.someone-else")),
    ("timestamp-too-old", "timestamp_too_old", _timestamp(-timedelta(hours=48))),
    ("timestamp-in-future", "timestamp_in_future", _timestamp(timedelta(hours=1))),
]


def _encryption_block_removed(forge: EnvelopeForge, directory: Path) -> Path:
    envelope = forge.seal(directory)
    manifest = forge.read_manifest(envelope)
    del manifest["security"]["encryption"]
    fields = manifest["sender"]["assertion"]["signed_fields"]
    forge.resign(manifest, signed_fields=[f for f in fields if f != "security.encryption"])
    forge.write_manifest(envelope, manifest)
    return envelope


def _expired_assertion(forge: EnvelopeForge, directory: Path) -> Path:
    envelope = forge.seal(directory)
    manifest = forge.read_manifest(envelope)
    forge.resign(manifest, expires_at=_expired_now())
    forge.write_manifest(envelope, manifest)
    return envelope


def _expiry_malformed(forge: EnvelopeForge, directory: Path) -> Path:
    envelope = forge.seal(directory)
    manifest = forge.read_manifest(envelope)
    forge.resign(manifest, expires_at="next week")
    forge.write_manifest(envelope, manifest)
    return envelope


def _manifest_replaced(make: Callable[[Path], object]) -> Build:
    """Remove manifest.json or put something other than a regular file in its place."""

    def build(forge: EnvelopeForge, directory: Path) -> Path:
        envelope = forge.seal(directory)
        path = envelope / "manifest.json"
        make(path)
        return envelope

    return build


def _manifest_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _manifest_missing(path: Path) -> None:
    path.unlink()


def _oversized_manifest(manifest: dict[str, Any]) -> bytes:
    manifest["padding"] = " " * (MIB + 1)
    return json.dumps(manifest).encode()


def _tar_cases() -> list[HostileCase]:
    """Payload tar entries the extractor must reject, each re-encrypted and re-signed."""
    return [
        HostileCase(
            "tar-dotdot", "unsafe_path", payload_edit(_with_members(Member("../escape.dcm", b"x")))
        ),
        HostileCase(
            "tar-dotdot-nested",
            "unsafe_path",
            payload_edit(_with_members(Member("dicom/../../escape.dcm", b"x"))),
        ),
        HostileCase(
            "tar-absolute",
            "unsafe_path",
            payload_edit(_with_members(Member("/tmp/escape.dcm", b"x"))),
        ),
        HostileCase(
            "tar-symlink",
            "unsafe_member_type",
            payload_edit(
                _with_members(
                    Member("dicom/link.dcm", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
                )
            ),
        ),
        HostileCase(
            "tar-symlink-then-write-through",
            "unsafe_member_type",
            payload_edit(_first_then(Member("dicom", kind=tarfile.SYMTYPE, linkname="/tmp"))),
        ),
        HostileCase(
            "tar-hardlink",
            "unsafe_member_type",
            payload_edit(
                lambda m: [
                    *m,
                    Member("dicom/hard.dcm", kind=tarfile.LNKTYPE, linkname=dicom_member(m).name),
                ]
            ),
        ),
        HostileCase(
            "tar-char-device",
            "unsafe_member_type",
            payload_edit(_with_members(Member("dicom/null", kind=tarfile.CHRTYPE))),
        ),
        HostileCase(
            "tar-block-device",
            "unsafe_member_type",
            payload_edit(_with_members(Member("dicom/sda", kind=tarfile.BLKTYPE))),
        ),
        HostileCase(
            "tar-fifo",
            "unsafe_member_type",
            payload_edit(_with_members(Member("dicom/pipe", kind=tarfile.FIFOTYPE))),
        ),
        HostileCase(
            "tar-duplicate-name",
            "duplicate_member",
            payload_edit(lambda m: [*m, dicom_member(m)]),
        ),
        HostileCase(
            "tar-file-then-folder",
            "duplicate_member",
            payload_edit(lambda m: [*m, Member(dicom_member(m).name + "/inner.dcm", b"x")]),
        ),
        HostileCase(
            "tar-control-characters",
            "unsafe_path",
            payload_edit(_with_members(Member("dicom/evil\x1b[2J\n.dcm", b"x"))),
        ),
        HostileCase(
            "tar-backslash",
            "unsafe_path",
            payload_edit(_with_members(Member("dicom\\..\\..\\escape.dcm", b"x"))),
        ),
        HostileCase(
            "tar-long-name-part",
            "unsafe_path",
            payload_edit(_with_members(Member("dicom/" + "a" * 300 + ".dcm", b"x"))),
        ),
        HostileCase(
            "tar-long-path",
            "unsafe_path",
            payload_edit(_with_members(Member("dicom/" + "d/" * 600 + "x.dcm", b"x"))),
        ),
        HostileCase("tar-not-a-tar", "archive_invalid", payload_edit(_not_a_tar)),
        HostileCase("tar-truncated", "archive_invalid", payload_edit(_truncated_tar)),
        HostileCase("tar-empty-plaintext", "archive_invalid", payload_edit(lambda _m: b"")),
        HostileCase("bomb-member-count", "archive_too_many_members", payload_edit(_many_members)),
        HostileCase(
            "bomb-total-size", "archive_too_large", payload_edit(_over_total, compress=True)
        ),
        HostileCase("bomb-size-header", "archive_too_large", payload_edit(_lying_size_header)),
        HostileCase("bomb-ratio", "archive_ratio", payload_edit(_ratio_bomb, compress=True)),
        HostileCase(
            "bomb-plaintext-size", "payload_too_large", payload_edit(_over_plaintext_limit)
        ),
    ]


def _files_cases() -> list[HostileCase]:
    """files.json and DICOM content the later checks must catch."""
    return [
        HostileCase("files-hash-mismatch", "file_hash_mismatch", payload_edit(_hash_mismatch)),
        HostileCase("files-size-mismatch", "file_hash_mismatch", payload_edit(_size_mismatch)),
        HostileCase(
            "files-dicom-byte-changed", "file_hash_mismatch", payload_edit(_changed_dicom_byte)
        ),
        HostileCase("files-listed-missing", "file_missing", payload_edit(_listed_but_missing)),
        HostileCase("files-unlisted-extra", "file_unlisted", payload_edit(_unlisted_extra)),
        HostileCase("files-listed-twice", "files_json_invalid", payload_edit(_listed_twice)),
        HostileCase(
            "files-json-not-json",
            "json_invalid",
            payload_edit(lambda m: with_listing(m, b"{not json")),
        ),
        HostileCase(
            "files-json-string",
            "files_json_invalid",
            payload_edit(lambda m: with_listing(m, "dicom/everything.dcm")),
        ),
        HostileCase(
            "dicom-is-pdf",
            "dicom_invalid",
            payload_edit(_not_dicom(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n")),
        ),
        HostileCase(
            "dicom-is-script",
            "dicom_invalid",
            payload_edit(_not_dicom(b"#!/bin/sh\nrm -rf /srv/pacs\n")),
        ),
        HostileCase("dicom-empty-file", "dicom_invalid", payload_edit(_not_dicom(b""))),
        HostileCase(
            "dicom-prefix-then-garbage",
            "dicom_invalid",
            payload_edit(_not_dicom(bytes(128) + b"DICM" + b"\xff" * 64)),
        ),
        HostileCase("dicom-truncated-header", "dicom_invalid", payload_edit(_truncated_dicom)),
    ]


def zip_bytes(entries: Iterable[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    """Return a zip holding ``entries`` (a name or a prepared ZipInfo, and its bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for info, data in entries:
            bundle.writestr(info, data)
    return buffer.getvalue()


def envelope_entries(envelope: Path) -> list[tuple[zipfile.ZipInfo | str, bytes]]:
    return [(path.name, path.read_bytes()) for path in sorted(envelope.iterdir())]


def container(make: Callable[[Path], bytes], suffix: str = ".zip") -> Build:
    """Seal a genuine envelope and replace it by one container file made from it."""

    def build(forge: EnvelopeForge, directory: Path) -> Path:
        envelope = forge.seal(directory / "sealed")
        target = directory / (envelope.name.removesuffix(".JMIX") + suffix)
        target.write_bytes(make(envelope))
        return target

    return build


def _zip_with(name: str, data: bytes = b"x") -> Callable[[Path], bytes]:
    return lambda envelope: zip_bytes([*envelope_entries(envelope), (name, data)])


def _zip_symlink(envelope: Path) -> bytes:
    link = zipfile.ZipInfo("payload.link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_bytes([*envelope_entries(envelope), (link, b"/etc/passwd")])


def _zip_bomb(_envelope: Path) -> bytes:
    """Zeros alone, which deflate packs about a thousand times."""
    return zip_bytes([("zeros.bin", bytes(MAX_ENVELOPE_BYTES - MIB))])


def _tar_container_hardlink(envelope: Path) -> bytes:
    members = [Member(path.name, path.read_bytes()) for path in sorted(envelope.iterdir())]
    members.append(Member("copy.json", kind=tarfile.LNKTYPE, linkname="manifest.json"))
    return tar_bytes(members, compress=True)


def _not_a_container(forge: EnvelopeForge, directory: Path) -> Path:
    target = directory / f"{uuid.uuid4()}.zip"
    target.write_bytes(b"an ordinary text file, not an envelope\n")
    return target


def _fifo_entry(forge: EnvelopeForge, directory: Path) -> Path:
    target = directory / f"{uuid.uuid4()}.JMIX"
    os.mkfifo(target)
    return target


def _container_cases() -> list[HostileCase]:
    """Whole envelopes delivered as one file, or as something that is not an envelope."""
    return [
        HostileCase("inbox-plain-file", "container_unsupported", _not_a_container),
        HostileCase("inbox-fifo", "container_unsupported", _fifo_entry),
        HostileCase("zip-dotdot", "unsafe_path", container(_zip_with("../escape.json"))),
        HostileCase("zip-absolute", "unsafe_path", container(_zip_with("/tmp/escape.json"))),
        HostileCase("zip-symlink", "unsafe_member_type", container(_zip_symlink)),
        HostileCase("zip-bomb", "archive_ratio", container(_zip_bomb)),
        HostileCase("zip-no-manifest", "manifest_missing", container(lambda _e: zip_bytes([]))),
        HostileCase(
            "zip-truncated",
            "archive_invalid",
            container(lambda e: zip_bytes(envelope_entries(e))[:-30]),
        ),
        HostileCase(
            "tar-container-hardlink",
            "unsafe_member_type",
            container(_tar_container_hardlink, ".tar.gz"),
        ),
    ]


def _all_cases() -> list[HostileCase]:
    cases: list[HostileCase] = [
        # Payload bytes and crypto parameters.
        HostileCase(
            "ciphertext-byte-changed",
            "decrypt_failed",
            file_edit("payload.encrypted", _flip_file_byte),
        ),
        HostileCase(
            "ciphertext-truncated", "decrypt_failed", file_edit("payload.encrypted", _truncate(0.5))
        ),
        HostileCase(
            "ciphertext-empty", "decrypt_failed", file_edit("payload.encrypted", _truncate(0.0))
        ),
        HostileCase(
            "ciphertext-extended",
            "decrypt_failed",
            file_edit("payload.encrypted", lambda p: p.write_bytes(p.read_bytes() + b"\0")),
        ),
        HostileCase(
            "ciphertext-missing", "payload_missing", file_edit("payload.encrypted", Path.unlink)
        ),
        HostileCase("ciphertext-fifo", "payload_missing", file_edit("payload.encrypted", _fifo)),
        HostileCase(
            "ciphertext-symlink", "symlink", file_edit("payload.encrypted", _replace_with_link)
        ),
        HostileCase("sealed-to-someone-else", "decrypt_failed", _sealed_to_stranger),
        HostileCase("encryption-block-removed", "manifest_invalid", _encryption_block_removed),
        # The signature and who made it.
        HostileCase("signed-id-changed", "signature_invalid", _renamed_id),
        HostileCase("signed-sender-id-changed", "key_not_pinned", _impersonation(False)),
        HostileCase("sender-impersonated-resigned", "key_not_pinned", _impersonation(True)),
        HostileCase(
            "signed-by-unpinned-key", "key_not_pinned", _signed_by(lambda f: f.stranger_signing_key)
        ),
        HostileCase("signed-by-revoked-key", "key_revoked", _signed_by(lambda f: f.revoked_key)),
        HostileCase("assertion-expired", "assertion_expired", _expired_assertion),
        HostileCase("assertion-expiry-malformed", "assertion_malformed", _expiry_malformed),
        HostileCase(
            "partly-signed-no-payload-hash",
            "assertion_incomplete",
            _signed_fields_without("security.payload_hash"),
        ),
        HostileCase(
            "partly-signed-no-encryption",
            "assertion_incomplete",
            _signed_fields_without("security.encryption"),
        ),
        HostileCase(
            "partly-signed-no-timestamp",
            "assertion_incomplete",
            _signed_fields_without("timestamp"),
        ),
        HostileCase(
            "partly-signed-no-receiver",
            "assertion_incomplete",
            _signed_fields_without("receiver.0.id"),
        ),
        HostileCase("partly-signed-no-id", "assertion_incomplete", _signed_fields_without("id")),
        # The manifest file itself and the folder around it.
        HostileCase("folder-name-mismatch", "name_mismatch", _folder_name_mismatch),
        HostileCase("manifest-missing", "manifest_missing", _manifest_replaced(_manifest_missing)),
        HostileCase("manifest-folder", "manifest_missing", _manifest_replaced(_manifest_folder)),
        HostileCase("manifest-fifo", "manifest_missing", _manifest_replaced(_fifo)),
        HostileCase("manifest-symlink", "manifest_missing", _manifest_replaced(_replace_with_link)),
        HostileCase("manifest-too-large", "json_too_large", manifest_bytes(_oversized_manifest)),
        HostileCase("manifest-not-json", "json_invalid", manifest_bytes(lambda _m: b"{not json")),
        HostileCase("manifest-empty", "json_invalid", manifest_bytes(lambda _m: b"")),
        HostileCase(
            "manifest-bad-utf8", "json_invalid", manifest_bytes(lambda _m: b'{"id": "\xff\xfe"}')
        ),
        HostileCase("manifest-nan", "json_invalid", manifest_bytes(lambda _m: b'{"id": NaN}')),
        HostileCase("manifest-deeply-nested", "json_invalid", manifest_bytes(_nested_json)),
        HostileCase("manifest-duplicate-key", "json_invalid", manifest_bytes(_duplicate_id_key)),
        HostileCase(
            "manifest-array",
            "manifest_invalid",
            manifest_bytes(lambda m: json.dumps([m]).encode()),
        ),
        HostileCase(
            "manifest-string", "manifest_invalid", manifest_bytes(lambda _m: b'"manifest"')
        ),
        HostileCase("symlinked-envelope", "symlink", _symlinked_envelope),
    ]
    cases += [
        HostileCase(name, code, manifest_edit(edit)) for name, code, edit in _SIGNED_FIELD_CHANGES
    ]
    cases += [HostileCase(name, code, manifest_edit(edit)) for name, code, edit in _MANIFEST_EDITS]
    cases += [HostileCase(name, code, signed_edit(edit)) for name, code, edit in _RESIGNED_EDITS]
    cases += _tar_cases()
    cases += _files_cases()
    cases += _container_cases()
    return cases


CASES: tuple[HostileCase, ...] = tuple(_all_cases())


# -- delivery and inspection ------------------------------------------------------------


def copy_entry(source: Path, target: Path) -> None:
    """Copy an inbox entry as it is: links stay links and FIFOs are re-created, not read."""

    def copy_one(src: str, dst: str) -> None:
        if stat.S_ISFIFO(os.lstat(src).st_mode):
            os.mkfifo(dst)
        else:
            shutil.copy2(src, dst)

    if source.is_symlink():
        target.symlink_to(os.readlink(source))
    elif source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=copy_one)
    else:
        copy_one(str(source), str(target))


def deliver(entries: Sequence[Path], inbox: Path) -> None:
    """Copy every entry into ``inbox`` under a hidden name, then rename them all in."""
    hidden = []
    for entry in entries:
        temporary = inbox / f".{entry.name}.partial"
        copy_entry(entry, temporary)
        hidden.append((temporary, inbox / entry.name))
    for temporary, final in hidden:
        temporary.rename(final)


def tree_digest(path: Path) -> dict[str, str]:
    """Describe an entry and everything below it, without following links or reading FIFOs."""
    found: dict[str, str] = {}
    pending = [path]
    while pending:
        current = pending.pop()
        relative = current.relative_to(path).as_posix()
        mode = os.lstat(current).st_mode
        if stat.S_ISLNK(mode):
            found[relative] = "link:" + os.readlink(current)
        elif stat.S_ISDIR(mode):
            found[relative] = "dir"
            pending.extend(current.iterdir())
        elif stat.S_ISFIFO(mode):
            found[relative] = "fifo"
        else:
            found[relative] = "sha256:" + hashlib.sha256(current.read_bytes()).hexdigest()
    return found


def quarantine_records(quarantine: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Return each quarantine folder with its parsed reason.json, oldest first."""
    found = []
    for reason_file in sorted(quarantine.glob("*/reason.json")):
        found.append((reason_file.parent, json.loads(reason_file.read_text())))
    return sorted(found, key=lambda item: item[1]["rejected_at"])


def quarantine_reasons(quarantine: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Map each quarantined inbox name to its quarantine folder and parsed reason.json."""
    return {
        reason["inbox_name"]: (folder, reason) for folder, reason in quarantine_records(quarantine)
    }


# -- a receiving agent to run the cases against -------------------------------------------


@dataclass
class Receiver:
    """Site B, which receives, and the forge that makes envelopes from site A for it."""

    sender: Site
    site: Site
    other_peer: Site
    forge: EnvelopeForge

    def write_config(self, extra_signing_keys: Sequence[Ed25519PrivateKey] = ()) -> None:
        """Write B's config: peers A and C, A's revoked key, and the inbound limits.

        ``extra_signing_keys`` are pinned for A as well, as after a key rotation.
        """
        card_a = self.sender.identity().card()
        card_a["signing_key"] = [
            card_a["signing_key"],
            public_b64(self.forge.revoked_key.public_key()),
            *(public_b64(key.public_key()) for key in extra_signing_keys),
        ]
        card_c = self.other_peer.identity().card()
        write_config(self.site, [{"card": card_a}, {"card": card_c}])
        inbound = [f"{key} = {value}" for key, value in RECEIVER_INBOUND_SETTINGS.items()]
        inbound.append(f"revoked_fingerprints = {json.dumps([self.forge.revoked_fingerprint])}")
        text = self.site.config_path.read_text()
        assert text.count("\n[audit]\n") == 1, "write_config no longer ends with [audit]"
        text = text.replace("\n[audit]\n", "\n" + "\n".join(inbound) + "\n[audit]\n")
        self.site.config_path.write_text(text)


def build_receiver(root: Path) -> Receiver:
    """Create sites A (sender, keys only), B (receiver, with config) and C (another peer)."""
    sites = [
        Site("Site A Imaging", root / "site-a", "org:demo.site-a"),
        Site("Site B Radiology", root / "site-b", "org:demo.site-b"),
        Site("Site C Clinic", root / "site-c", "org:demo.site-c"),
    ]
    for site in sites:
        site.root.mkdir(parents=True)
        site.create_keys()
    sender, receiver, other = sites
    sender_identity = sender.identity()
    receiver_identity = receiver.identity()
    forge = EnvelopeForge(
        Party(sender_identity.id, sender_identity.name),
        sender_identity.signing_key,
        Party(receiver_identity.id, receiver_identity.name),
        receiver_identity.encryption_keys[0],
        sample_paths(["CT_small.dcm"]),
        impersonated_id=other.entity_id,
    )
    receiver.inbox.mkdir(parents=True)
    setup = Receiver(sender, receiver, other, forge)
    setup.write_config()
    return setup


def wait_until(condition: Callable[[], object], timeout: float = 60.0) -> bool:
    """Poll ``condition`` every 0.1 s until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def audit_events(site: Site, event: str) -> list[dict[str, Any]]:
    """Return a site's audit records of one event type (none if there is no log yet)."""
    if not site.audit_log.exists():
        return []
    return [record for record in read_records(site.audit_log) if record["event"] == event]
