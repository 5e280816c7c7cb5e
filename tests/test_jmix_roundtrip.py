"""Seal and open real DICOM in every writer profile, and reject tampered envelopes.

The wire details each profile must produce (folder suffix, encrypted file name, tar
prefix, HKDF info, payload_hash rule) are written out literally below and checked with
an independent decryptor built from ``cryptography`` primitives, not with our reader.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jmixkit import bundled_ct_study, format_checker
from jsonschema import Draft202012Validator

from agent.dicom.inspect import build_metadata
from agent.jmix.assertion import TrustedKeys
from agent.jmix.profiles import get_profile
from agent.jmix.reader import EnvelopeRejected, OpenedEnvelope, OpenPolicy, open_envelope
from agent.jmix.seal import Party, PayloadFile, SealResult, seal_envelope

SHARED = Path(__file__).resolve().parents[2] / "shared"
SCHEMAS = SHARED / "jmix-spec" / "schemas"

SENDER = Party("org:test.site-a", "Site A", "pacs@site-a.test")
RECEIVER = Party("org:test.site-b", "Site B", "pacs@site-b.test")


@dataclass(frozen=True)
class Dialect:
    """What one writer profile must put on the wire."""

    folder_suffix: str
    encrypted_file: str
    tar_prefix: str
    hkdf_info: bytes
    reported_dialect: str
    reported_hash_rule: str


DIALECTS = {
    "spec": Dialect(
        ".JMIX",
        "payload.encrypted",
        "",
        b"JMIX-payload-encryption",
        "spec/jmix-php",
        "sha256-of-encrypted-file",
    ),
    "jmix-rs": Dialect(
        ".jmix",
        "payload.enc",
        "",
        b"JMIX-AES256-GCM",
        "jmix-rs",
        "sha256-of-plaintext-tar",
    ),
    "jmix-js": Dialect(
        ".JMIX",
        "payload.encrypted",
        "payload/",
        b"JMIX-Payload-Encryption",
        "jmix-js",
        "path-newline-bytes-walk",
    ),
}
PROFILE_NAMES = list(DIALECTS)
ALL_INFOS = [dialect.hkdf_info for dialect in DIALECTS.values()]


# -- inputs and helpers ----------------------------------------------------------------------


def ct_study() -> list[Path]:
    return bundled_ct_study()


def payload_files(sources: list[Path]) -> list[PayloadFile]:
    return [PayloadFile(f"dicom/{path.name}.dcm", path) for path in sources]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


@dataclass(frozen=True)
class Keys:
    signing: Ed25519PrivateKey
    recipient: X25519PrivateKey

    def policy(self, **overrides: Any) -> OpenPolicy:
        raw = self.signing.public_key().public_bytes_raw()
        settings: dict[str, Any] = {
            "recipient_keys": (self.recipient,),
            "trusted": TrustedKeys({SENDER.id: [raw]}),
            "our_id": RECEIVER.id,
        }
        settings.update(overrides)
        return OpenPolicy(**settings)


def seal(
    keys: Keys,
    destination: Path,
    profile: str,
    sources: list[Path],
    recipient: X25519PublicKey | None = None,
) -> SealResult:
    destination.mkdir(parents=True, exist_ok=True)
    return seal_envelope(
        payload_files(sources),
        build_metadata(sources),
        destination,
        SENDER,
        keys.signing,
        RECEIVER,
        recipient or keys.recipient.public_key(),
        profile=get_profile(profile),
    )


def read_manifest(envelope: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((envelope / "manifest.json").read_bytes())
    return document


def decrypt_independently(envelope: Path, recipient: X25519PrivateKey, info: bytes) -> bytes:
    """Decrypt the payload with X25519, HKDF-SHA256 (empty salt) and AES-256-GCM directly."""
    block = read_manifest(envelope)["security"]["encryption"]
    ephemeral = X25519PublicKey.from_public_bytes(base64.b64decode(block["ephemeral_public_key"]))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"", info=info).derive(
        recipient.exchange(ephemeral)
    )
    encrypted = next(
        envelope / name
        for name in ("payload.encrypted", "payload.enc")
        if (envelope / name).is_file()
    )
    tag = base64.b64decode(block["auth_tag"])
    iv = base64.b64decode(block["iv"])
    return AESGCM(key).decrypt(iv, encrypted.read_bytes() + tag, None)


def tar_contents(plaintext: bytes) -> tuple[list[str], dict[str, bytes]]:
    """Return every member name in archive order, and each regular file's bytes."""
    names: list[str] = []
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(plaintext), mode="r:") as tar:
        for member in tar:
            names.append(member.name)
            if member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None
                files[member.name] = handle.read()
    return names, files


def path_walk_hash(files: dict[str, bytes]) -> str:
    """One SHA-256 over ``path + "\\n" + bytes`` of every file, in path order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode("utf-8") + b"\n" + files[name])
    return digest.hexdigest()


def tree_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


# -- one sealed and opened envelope per profile, shared by the read-only tests ----------------


@dataclass(frozen=True)
class RoundTrip:
    profile: str
    keys: Keys
    sources: list[Path]
    sealed: SealResult
    opened: OpenedEnvelope


@pytest.fixture(scope="module")
def module_keys() -> Keys:
    return Keys(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


@pytest.fixture(scope="module", params=PROFILE_NAMES)
def roundtrip(
    request: pytest.FixtureRequest, module_keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> RoundTrip:
    profile: str = request.param
    base = tmp_path_factory.mktemp(f"roundtrip-{profile}")
    sources = ct_study()
    sealed = seal(module_keys, base / "out", profile, sources)
    work = base / "work"
    work.mkdir()
    opened = open_envelope(sealed.path, module_keys.policy(), work)
    return RoundTrip(profile, module_keys, sources, sealed, opened)


def test_roundtrip_payload_identical(roundtrip: RoundTrip) -> None:
    for source in roundtrip.sources:
        unpacked = roundtrip.opened.payload_dir / "dicom" / f"{source.name}.dcm"
        assert sha256_path(unpacked) == sha256_path(source), source.name


def test_roundtrip_file_list(roundtrip: RoundTrip) -> None:
    expected = sorted(
        [f"dicom/{path.name}.dcm" for path in roundtrip.sources] + ["files.json", "metadata.json"]
    )
    unpacked = [
        path.relative_to(roundtrip.opened.payload_dir).as_posix()
        for path in tree_files(roundtrip.opened.payload_dir)
    ]
    assert unpacked == expected
    assert roundtrip.opened.files == expected


def test_roundtrip_sender_verified(roundtrip: RoundTrip) -> None:
    assert roundtrip.opened.sender is not None
    assert roundtrip.opened.sender.entity_id == SENDER.id
    assert roundtrip.opened.sender.trusted_by == "pinned"
    assert all(check.ok for check in roundtrip.opened.checks)


def test_roundtrip_folder_suffix(roundtrip: RoundTrip) -> None:
    dialect = DIALECTS[roundtrip.profile]
    assert roundtrip.sealed.path.name == roundtrip.sealed.envelope_id + dialect.folder_suffix


def test_roundtrip_envelope_files(roundtrip: RoundTrip) -> None:
    dialect = DIALECTS[roundtrip.profile]
    listing = sorted(path.name for path in roundtrip.sealed.path.iterdir())
    assert listing == sorted(["audit.json", "manifest.json", dialect.encrypted_file])


def test_roundtrip_reports_dialect(roundtrip: RoundTrip) -> None:
    assert roundtrip.opened.hkdf_dialect == DIALECTS[roundtrip.profile].reported_dialect


def test_roundtrip_reports_hash_rule(roundtrip: RoundTrip) -> None:
    assert roundtrip.opened.hash_rule == DIALECTS[roundtrip.profile].reported_hash_rule


def test_profile_hkdf_info_decrypts(roundtrip: RoundTrip) -> None:
    dialect = DIALECTS[roundtrip.profile]
    plaintext = decrypt_independently(
        roundtrip.sealed.path, roundtrip.keys.recipient, dialect.hkdf_info
    )
    assert plaintext[257:263] == b"ustar\x00"


def test_other_hkdf_infos_fail(roundtrip: RoundTrip) -> None:
    own = DIALECTS[roundtrip.profile].hkdf_info
    for info in ALL_INFOS:
        if info == own:
            continue
        with pytest.raises(InvalidTag):
            decrypt_independently(roundtrip.sealed.path, roundtrip.keys.recipient, info)


def test_tar_prefix_per_profile(roundtrip: RoundTrip) -> None:
    dialect = DIALECTS[roundtrip.profile]
    plaintext = decrypt_independently(
        roundtrip.sealed.path, roundtrip.keys.recipient, dialect.hkdf_info
    )
    names, files = tar_contents(plaintext)
    if dialect.tar_prefix:
        assert all(name.startswith(dialect.tar_prefix) for name in files)
    else:
        assert not any(name.startswith("payload/") for name in names)
    stripped = sorted(name.removeprefix(dialect.tar_prefix) for name in files)
    assert stripped == roundtrip.opened.files


def test_tar_members_safe(roundtrip: RoundTrip) -> None:
    dialect = DIALECTS[roundtrip.profile]
    plaintext = decrypt_independently(
        roundtrip.sealed.path, roundtrip.keys.recipient, dialect.hkdf_info
    )
    with tarfile.open(fileobj=io.BytesIO(plaintext), mode="r:") as tar:
        members = tar.getmembers()
    assert all(member.isfile() or member.isdir() for member in members)
    assert not any(member.name.startswith(("/", "./")) for member in members)
    assert not any(".." in member.name.split("/") for member in members)


def test_encryption_block_sizes(roundtrip: RoundTrip) -> None:
    block = read_manifest(roundtrip.sealed.path)["security"]["encryption"]
    assert block["algorithm"] == "AES-256-GCM"
    assert len(base64.b64decode(block["ephemeral_public_key"])) == 32
    assert len(base64.b64decode(block["iv"])) == 12
    assert len(base64.b64decode(block["auth_tag"])) == 16


def test_ciphertext_excludes_tag(roundtrip: RoundTrip) -> None:
    dialect = DIALECTS[roundtrip.profile]
    plaintext = decrypt_independently(
        roundtrip.sealed.path, roundtrip.keys.recipient, dialect.hkdf_info
    )
    encrypted = roundtrip.sealed.path / dialect.encrypted_file
    assert encrypted.stat().st_size == len(plaintext)


def test_payload_hash_follows_rule(roundtrip: RoundTrip) -> None:
    dialect = DIALECTS[roundtrip.profile]
    envelope = roundtrip.sealed.path
    plaintext = decrypt_independently(envelope, roundtrip.keys.recipient, dialect.hkdf_info)
    _names, files = tar_contents(plaintext)
    stripped = {name.removeprefix(dialect.tar_prefix): data for name, data in files.items()}
    expected = {
        "sha256-of-encrypted-file": sha256_path(envelope / dialect.encrypted_file),
        "sha256-of-plaintext-tar": sha256_bytes(plaintext),
        "path-newline-bytes-walk": path_walk_hash(stripped),
    }[dialect.reported_hash_rule]
    assert read_manifest(envelope)["security"]["payload_hash"] == "sha256:" + expected
    assert roundtrip.sealed.payload_hash == "sha256:" + expected


def test_files_json_hashes(roundtrip: RoundTrip) -> None:
    payload = roundtrip.opened.payload_dir
    listing = json.loads((payload / "files.json").read_bytes())
    assert sorted(entry["file"] for entry in listing) == [
        name for name in roundtrip.opened.files if name != "files.json"
    ]
    for entry in listing:
        data = (payload / entry["file"]).read_bytes()
        assert entry["hash"] == "sha256:" + sha256_bytes(data), entry["file"]
        assert entry["size_bytes"] == len(data), entry["file"]


# -- schemas ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> Callable[[str, object], list[str]]:
    if not SCHEMAS.is_dir():
        pytest.skip(f"spec schemas not found at {SCHEMAS} (the shared folder is absent)")
    checker = format_checker()

    def validate(schema_name: str, document: object) -> list[str]:
        schema = json.loads((SCHEMAS / schema_name).read_bytes())
        Draft202012Validator.check_schema(schema)
        validator = Draft202012Validator(schema, format_checker=checker)
        return [
            f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors(document)
        ]

    return validate


def test_format_checker_rejects_bad_values() -> None:
    checker = format_checker()
    assert not checker.conforms("2026-13-01T10:00:00Z", "date-time")
    assert not checker.conforms("not-a-uuid", "uuid")
    assert checker.conforms("2026-12-04T19:32:00Z", "date-time")


def test_manifest_matches_schema(roundtrip: RoundTrip, validator: Any) -> None:
    assert validator("manifest.schema.json", read_manifest(roundtrip.sealed.path)) == []


def test_audit_matches_schema(roundtrip: RoundTrip, validator: Any) -> None:
    document = json.loads((roundtrip.sealed.path / "audit.json").read_bytes())
    assert validator("audit.schema.json", document) == []


def test_metadata_matches_schema(roundtrip: RoundTrip, validator: Any) -> None:
    document = json.loads((roundtrip.opened.payload_dir / "metadata.json").read_bytes())
    assert validator("metadata.schema.json", document) == []


def test_files_json_matches_schema(roundtrip: RoundTrip, validator: Any) -> None:
    document = json.loads((roundtrip.opened.payload_dir / "files.json").read_bytes())
    assert validator("files.schema.json", document) == []


def test_metadata_identifies_envelope(roundtrip: RoundTrip) -> None:
    document = json.loads((roundtrip.opened.payload_dir / "metadata.json").read_bytes())
    assert document["id"] == roundtrip.sealed.envelope_id
    assert document["timestamp"] == read_manifest(roundtrip.sealed.path)["timestamp"]


def test_manifest_entities_have_contact(roundtrip: RoundTrip) -> None:
    manifest = read_manifest(roundtrip.sealed.path)
    entities = [manifest["sender"], *manifest["receiver"]]
    if "requester" in manifest:
        entities.append(manifest["requester"])
    for entity in entities:
        assert "contact" in entity, entity["id"]
    assert manifest["sender"]["contact"] == SENDER.contact
    assert manifest["receiver"][0]["contact"] == RECEIVER.contact


# -- tampering --------------------------------------------------------------------------------


@pytest.fixture
def keys() -> Keys:
    return Keys(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


def open_rejected(envelope: Path, policy: OpenPolicy, work: Path) -> EnvelopeRejected:
    work.mkdir(exist_ok=True)
    with pytest.raises(EnvelopeRejected) as caught:
        open_envelope(envelope, policy, work)
    return caught.value


def rewrite_manifest(envelope: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = read_manifest(envelope)
    change(manifest)
    (envelope / "manifest.json").write_text(json.dumps(manifest, indent=2))


def other_base64(text: str) -> str:
    """Return base64 of the same length as ``text`` whose first byte differs."""
    raw = bytearray(base64.b64decode(text))
    raw[0] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_flipped_ciphertext_rejected(keys: Keys, tmp_path: Path, profile: str) -> None:
    sealed = seal(keys, tmp_path / "out", profile, ct_study()[:2])
    encrypted = sealed.path / DIALECTS[profile].encrypted_file
    data = bytearray(encrypted.read_bytes())
    data[len(data) // 2] ^= 0x40
    encrypted.write_bytes(bytes(data))

    work = tmp_path / "work"
    rejected = open_rejected(sealed.path, keys.policy(), work)

    assert rejected.code in {"decrypt_failed", "payload_hash_mismatch"}
    assert not rejected.checks[-1].ok
    assert list(work.rglob("*")) == []


@pytest.mark.parametrize("field", ["iv", "auth_tag", "ephemeral_public_key"])
def test_encryption_field_change_rejected(keys: Keys, tmp_path: Path, field: str) -> None:
    sealed = seal(keys, tmp_path / "out", "spec", ct_study()[:2])

    def change(manifest: dict[str, Any]) -> None:
        block = manifest["security"]["encryption"]
        block[field] = other_base64(block[field])

    rewrite_manifest(sealed.path, change)
    work = tmp_path / "work"
    rejected = open_rejected(sealed.path, keys.policy(), work)

    assert rejected.code == "signature_invalid"
    assert rejected.checks[-1].name == "sender"
    assert list(work.rglob("*")) == []


@pytest.mark.parametrize("field", ["iv", "auth_tag"])
def test_unsigned_iv_change_decrypt_failed(keys: Keys, tmp_path: Path, field: str) -> None:
    """With the sender check waived, GCM authentication still catches the change."""
    sealed = seal(keys, tmp_path / "out", "spec", ct_study()[:2])

    def change(manifest: dict[str, Any]) -> None:
        block = manifest["security"]["encryption"]
        block[field] = other_base64(block[field])

    rewrite_manifest(sealed.path, change)
    work = tmp_path / "work"
    policy = keys.policy(require_sender_identity=False)
    rejected = open_rejected(sealed.path, policy, work)

    assert rejected.code == "decrypt_failed"
    assert rejected.checks[-1].name == "decrypt"
    assert list(work.rglob("*")) == []


def test_wrong_recipient_decrypt_failed(keys: Keys, tmp_path: Path) -> None:
    someone_else = X25519PrivateKey.generate()
    sealed = seal(keys, tmp_path / "out", "spec", ct_study()[:2], someone_else.public_key())

    work = tmp_path / "work"
    rejected = open_rejected(sealed.path, keys.policy(), work)

    assert rejected.code == "decrypt_failed"
    assert rejected.checks[-1].name == "decrypt"
    assert [check.name for check in rejected.checks if check.ok] == [
        "layout",
        "manifest",
        "sender",
        "receiver",
        "requester",
        "receiver_assertions",
        "jws",
        "payload_file",
    ]
    assert list(work.rglob("*")) == []


def test_previous_key_opens(keys: Keys, tmp_path: Path) -> None:
    previous = X25519PrivateKey.generate()
    sealed = seal(keys, tmp_path / "out", "spec", ct_study()[:2], previous.public_key())
    work = tmp_path / "work"
    work.mkdir()

    policy = keys.policy(recipient_keys=(keys.recipient, previous))
    opened = open_envelope(sealed.path, policy, work)

    assert opened.hkdf_dialect == "spec/jmix-php"
