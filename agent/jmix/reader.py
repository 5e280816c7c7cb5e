"""Opening: verify an envelope from any JMIX dialect and unpack its payload to staging.

The checks run in a fixed order and each one names the attack it stops:

1. layout: a readable manifest.json of bounded size (resource exhaustion);
2. manifest: aliases normalised, id a UUID, timestamp with a zone, receivers listed,
   the folder name agrees with the id (a renamed or substituted envelope);
3. identity: the sender's assertion verifies with a pinned key and covers the envelope
   id, timestamp, parties, payload hash and encryption block (spoofing, field swaps);
4. receiver: we are one of the receivers (an envelope meant for someone else);
5. payload hash over the encrypted file, when that is the rule (tampered ciphertext);
6. decryption: AES-GCM tag verified before any plaintext is unpacked (tampering);
7. safe extraction into private staging with limits (path traversal, links, bombs);
8. payload hash over the plaintext when that is the rule, and files.json (substitution).

Nothing is written outside ``work``; publishing the result is the caller's single rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import fsutil
from agent.jmix.assertion import AssertionResult, TrustedKeys, required_fields, verify_assertion
from agent.jmix.crypto import IV_LENGTH, TAG_LENGTH, EncryptionParams, decrypt_stream
from agent.jmix.errors import (
    EnvelopeFormatError,
    IdentityError,
    IntegrityError,
    JmixError,
    KeyFormatError,
)
from agent.jmix.hashing import line_list_hash, path_walk_hash, sha256_file
from agent.jmix.keys import b64decode, fingerprint, raw_public
from agent.jmix.profiles import HKDF_INFO_RS, HKDF_INFOS, HashRule
from agent.jmix.tarsafe import ArchiveLimits, extract_tar
from agent.jmix.timeutil import parse_timestamp

MAX_MANIFEST_BYTES = 1024 * 1024
MAX_FILES_JSON_BYTES = 64 * 1024 * 1024
ENCRYPTED_NAMES = ("payload.encrypted", "payload.enc")
SKIPPED_HASHES = ("", "sha256:skipped")
ENVELOPE_SUFFIXES = (".jmix",)


@dataclass(frozen=True)
class OpenPolicy:
    """What the opener trusts and requires.

    ``trusted`` pins signing keys per sender id. With ``require_sender_identity`` false
    (the CLI's ``--allow-untrusted-sender``) an unverifiable sender is reported, not fatal.
    """

    recipient_keys: Sequence[X25519PrivateKey] = ()
    trusted: TrustedKeys = field(default_factory=TrustedKeys)
    our_id: str | None = None
    require_sender_identity: bool = True
    allow_plain: bool = False
    require_name_match: bool = True
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    now: datetime | None = None


@dataclass
class Check:
    """One verification step and its outcome."""

    name: str
    ok: bool
    detail: str


@dataclass
class OpenedEnvelope:
    """A verified envelope whose payload sits unpacked in private staging."""

    envelope_id: str
    manifest: dict[str, Any]
    sender_id: str
    payload_dir: Path
    encrypted: bool
    hkdf_dialect: str | None
    hash_rule: str | None
    sender: AssertionResult | None
    checks: list[Check]
    files: list[str]

    @property
    def study_uid(self) -> str | None:
        """The StudyInstanceUID recorded in metadata.json, if any (not validated)."""
        try:
            document = json.loads((self.payload_dir / "metadata.json").read_bytes())
            value = document["studies"]["study_uid"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return value if isinstance(value, str) else None


class EnvelopeRejected(JmixError):
    """Verification failed; ``checks`` lists every step run, the failed one last."""

    def __init__(self, error: JmixError, checks: list[Check]) -> None:
        super().__init__(error.message, code=error.code)
        self.checks = checks
        self.__cause__ = error


# -- layout and manifest -----------------------------------------------------------------


def find_package_root(path: Path) -> Path:
    """Return the folder holding manifest.json (the envelope folder itself)."""
    if path.is_symlink():
        raise EnvelopeFormatError(
            f"{path} is a symbolic link; refusing to follow it", code="symlink"
        )
    if not path.is_dir():
        raise EnvelopeFormatError(
            f"{path} is not an envelope folder (zip and tar containers are not supported yet)",
            code="container_unsupported",
        )
    return path


def _read_json(path: Path, limit: int, what: str) -> Any:
    try:
        if path.is_symlink() or not path.is_file():
            raise EnvelopeFormatError(f"{what} is missing", code="manifest_missing")
        if path.stat().st_size > limit:
            raise EnvelopeFormatError(f"{what} is larger than {limit} bytes", code="json_too_large")
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeFormatError(f"{what} is not valid JSON: {exc}", code="json_invalid") from exc


_ALIASES = (
    ("id", "envelope_id"),
    ("version", "jmix_version"),
    ("timestamp", "created_at"),
    ("receiver", "receivers"),
)


def normalise_manifest(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Map jmix-js field names onto the spec's; the spec name wins where both exist."""
    manifest = dict(raw)
    for spec_name, alias in _ALIASES:
        if spec_name not in manifest and alias in manifest:
            manifest[spec_name] = manifest[alias]
    security = manifest.get("security")
    if (
        isinstance(security, dict)
        and "encryption" not in security
        and isinstance(manifest.get("encryption"), dict)
    ):
        manifest["security"] = {**security, "encryption": manifest["encryption"]}
    return manifest


def _require_str(document: Mapping[str, Any], key: str, what: str) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value:
        raise EnvelopeFormatError(f"{what} is missing or not a string", code="manifest_invalid")
    return value


def validate_manifest(manifest: Mapping[str, Any]) -> str:
    """Check the fields every later step relies on; return the envelope id."""
    identifier = _require_str(manifest, "id", "manifest id")
    try:
        if str(uuid.UUID(identifier)) != identifier.lower():
            raise ValueError(identifier)
    except ValueError:
        raise EnvelopeFormatError(
            f"manifest id {identifier!r} is not a UUID", code="manifest_invalid"
        ) from None
    timestamp = _require_str(manifest, "timestamp", "manifest timestamp")
    try:
        parse_timestamp(timestamp)
    except ValueError as exc:
        raise EnvelopeFormatError(f"manifest timestamp: {exc}", code="manifest_invalid") from exc
    sender = manifest.get("sender")
    if not isinstance(sender, dict):
        raise EnvelopeFormatError("manifest sender is missing", code="manifest_invalid")
    _require_str(sender, "id", "sender id")
    receivers = manifest.get("receiver")
    if not isinstance(receivers, list) or not receivers:
        raise EnvelopeFormatError("manifest lists no receiver", code="manifest_invalid")
    for receiver in receivers:
        if not isinstance(receiver, dict):
            raise EnvelopeFormatError(
                "a manifest receiver is not an object", code="manifest_invalid"
            )
        _require_str(receiver, "id", "receiver id")
    security = manifest.get("security", {})
    if not isinstance(security, dict):
        raise EnvelopeFormatError("manifest security is not an object", code="manifest_invalid")
    payload_hash = security.get("payload_hash", "")
    if not isinstance(payload_hash, str):
        raise EnvelopeFormatError("security.payload_hash is not a string", code="manifest_invalid")
    return identifier.lower()


def _encryption_params(block: object) -> EncryptionParams:
    if not isinstance(block, dict):
        raise EnvelopeFormatError("security.encryption is not an object", code="manifest_invalid")
    algorithm = block.get("algorithm")
    if algorithm != "AES-256-GCM":
        raise EnvelopeFormatError(
            f"unsupported encryption algorithm {algorithm!r} (only AES-256-GCM)",
            code="algorithm_unsupported",
        )
    values: dict[str, bytes] = {}
    for name, length in (("ephemeral_public_key", 32), ("iv", IV_LENGTH), ("auth_tag", TAG_LENGTH)):
        text = block.get(name)
        if not isinstance(text, str):
            raise EnvelopeFormatError(
                f"security.encryption.{name} is missing", code="manifest_invalid"
            )
        try:
            values[name] = b64decode(text, f"security.encryption.{name}")
        except KeyFormatError as exc:
            raise EnvelopeFormatError(exc.message, code="manifest_invalid") from exc
        if len(values[name]) != length:
            raise EnvelopeFormatError(
                f"security.encryption.{name} has {len(values[name])} bytes; expected {length}",
                code="manifest_invalid",
            )
    return EncryptionParams(values["ephemeral_public_key"], values["iv"], values["auth_tag"])


def _name_matches(package: Path, identifier: str) -> bool:
    stem = package.name
    for suffix in ENVELOPE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem.lower() == identifier


def _hash_value(text: str) -> str | None:
    """Return the hex of an asserted payload hash, or None when it is not asserted."""
    if text.strip().lower() in SKIPPED_HASHES:
        return None
    prefix, sep, digest = text.partition(":")
    hex_part = digest if sep and prefix.lower() == "sha256" else text
    return hex_part.strip().lower()


# -- the opener ----------------------------------------------------------------------------


class _Steps:
    """Collects the outcome of each step; a failure is recorded, then raised."""

    def __init__(self) -> None:
        self.checks: list[Check] = []

    def run(self, name: str, step: Callable[[], str]) -> None:
        try:
            detail = step()
        except JmixError as exc:
            self.checks.append(Check(name, False, exc.message))
            raise EnvelopeRejected(exc, self.checks) from exc
        self.checks.append(Check(name, True, detail))


def open_envelope(path: Path, policy: OpenPolicy, work: Path) -> OpenedEnvelope:
    """Verify the envelope at ``path`` and unpack its payload into ``work/payload``.

    ``work`` must be a new private folder owned by the caller, who deletes it whatever
    happens. Raises EnvelopeRejected carrying every check run so far.
    """
    steps = _Steps()
    state: dict[str, Any] = {}

    def layout() -> str:
        state["root"] = find_package_root(path)
        state["manifest"] = normalise_manifest(
            _checked_object(
                _read_json(state["root"] / "manifest.json", MAX_MANIFEST_BYTES, "manifest.json")
            )
        )
        return f"manifest.json read from {state['root'].name}"

    def manifest() -> str:
        state["id"] = validate_manifest(state["manifest"])
        if policy.require_name_match and not _name_matches(state["root"], state["id"]):
            raise EnvelopeFormatError(
                f"folder name {state['root'].name!r} does not match manifest id {state['id']}",
                code="name_mismatch",
            )
        return f"envelope {state['id']}"

    def identity() -> str:
        state["sender"] = _verify_sender(state["manifest"], policy)
        result: AssertionResult | None = state["sender"]
        if result is None:
            return "sender NOT verified (allowed by option)"
        return f"sender {result.entity_id} verified with {result.fingerprint} ({result.trusted_by})"

    def receiver() -> str:
        if policy.our_id is None:
            return "not checked (no local identity)"
        ids = [entry.get("id") for entry in state["manifest"]["receiver"]]
        if policy.our_id not in ids:
            raise IdentityError(
                f"envelope is addressed to {ids!r}, not to {policy.our_id!r}", code="not_for_us"
            )
        return f"addressed to {policy.our_id}"

    steps.run("layout", layout)
    steps.run("manifest", manifest)
    steps.run("sender", identity)
    steps.run("receiver", receiver)

    root: Path = state["root"]
    encrypted_file = next(
        (root / name for name in ENCRYPTED_NAMES if (root / name).is_file()), None
    )
    asserted = _hash_value(state["manifest"].get("security", {}).get("payload_hash", ""))
    staging = work / "payload"
    outcome: dict[str, Any] = {"rule": None, "hkdf": None, "files": []}

    if encrypted_file is not None:
        encrypted_path: Path = encrypted_file

        def hash_before() -> str:
            if encrypted_path.is_symlink():
                raise EnvelopeFormatError(
                    f"{encrypted_path.name} is a symbolic link", code="symlink"
                )
            if asserted is not None and sha256_file(encrypted_path) == asserted:
                outcome["rule"] = HashRule.ENCRYPTED_FILE
                return f"matches rule {HashRule.ENCRYPTED_FILE}"
            return "checked after decryption"

        def decrypt() -> str:
            params = _encryption_params(state["manifest"].get("security", {}).get("encryption"))
            tar_path = work / "payload.tar"
            result = _decrypt_any(encrypted_path, tar_path, params, policy)
            outcome["hkdf"] = HKDF_INFOS[result[0]]
            outcome["tar_sha256"] = result[1]
            outcome["tar"] = tar_path
            return f"AES-256-GCM tag verified (HKDF info of {outcome['hkdf']})"

        def extract() -> str:
            raw_dir = work / "raw"
            raw_dir.mkdir(mode=0o700)
            extracted = extract_tar(outcome["tar"], raw_dir, policy.limits)
            outcome["tar"].unlink()
            root_dir = _strip_prefix(raw_dir, [item.name for item in extracted])
            os.rename(root_dir, staging)
            outcome["files"] = sorted(item.name.removeprefix("payload/") for item in extracted)
            return f"{len(extracted)} files unpacked"

        steps.run("ciphertext_hash", hash_before)
        steps.run("decrypt", decrypt)
        steps.run("extract", extract)
    else:
        plain = root / "payload"

        def plain_payload() -> str:
            if not plain.is_dir() or plain.is_symlink():
                raise EnvelopeFormatError(
                    "envelope has neither payload.encrypted, payload.enc nor payload/",
                    code="payload_missing",
                )
            if not policy.allow_plain:
                raise IntegrityError(
                    "envelope is not encrypted and plain envelopes are not allowed from this "
                    "sender (set allow_plain = true on the peer to accept them)",
                    code="plain_not_allowed",
                )
            outcome["files"] = _copy_plain(plain, staging, policy.limits)
            return f"plain payload with {len(outcome['files'])} files (not encrypted)"

        steps.run("payload", plain_payload)

    def hash_after() -> str:
        if asserted is None:
            return "payload_hash not asserted by the sender"
        if outcome["rule"] is not None:
            return f"matched rule {outcome['rule']}"
        candidates: list[tuple[HashRule, Callable[[], str]]] = []
        if "tar_sha256" in outcome:
            candidates.append((HashRule.PLAINTEXT_TAR, lambda: str(outcome["tar_sha256"])))
        candidates.append((HashRule.PATH_WALK, lambda: path_walk_hash(staging)))
        if encrypted_file is None:
            candidates.append((HashRule.LINE_LIST, lambda: line_list_hash(staging)))
        for rule, compute in candidates:
            if compute() == asserted:
                outcome["rule"] = rule
                return f"matched rule {rule}"
        raise IntegrityError(
            "payload_hash matches none of the known rules: the payload was altered",
            code="payload_hash_mismatch",
        )

    def files_json() -> str:
        return _check_files_json(staging, outcome["files"])

    steps.run("payload_hash", hash_after)
    steps.run("files_json", files_json)

    sender_result: AssertionResult | None = state["sender"]
    return OpenedEnvelope(
        envelope_id=state["id"],
        manifest=state["manifest"],
        sender_id=state["manifest"]["sender"]["id"],
        payload_dir=staging,
        encrypted=encrypted_file is not None,
        hkdf_dialect=outcome["hkdf"],
        hash_rule=str(outcome["rule"]) if outcome["rule"] else None,
        sender=sender_result,
        checks=steps.checks,
        files=outcome["files"],
    )


def _checked_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EnvelopeFormatError("manifest.json is not a JSON object", code="manifest_invalid")
    return value


def _verify_sender(manifest: dict[str, Any], policy: OpenPolicy) -> AssertionResult | None:
    try:
        return verify_assertion(
            manifest,
            "sender",
            manifest["sender"],
            policy.trusted,
            required_fields(manifest),
            now=policy.now or datetime.now(UTC),
        )
    except IdentityError:
        if policy.require_sender_identity:
            raise
        return None


def _decrypt_any(
    encrypted: Path, tar_path: Path, params: EncryptionParams, policy: OpenPolicy
) -> tuple[bytes, str]:
    """Try every recipient key and HKDF info; return the (info, tar sha256) that verified."""
    if not policy.recipient_keys:
        raise IntegrityError("no decryption key was given", code="no_key")
    infos = list(HKDF_INFOS)
    if encrypted.name == "payload.enc":
        infos.remove(HKDF_INFO_RS)
        infos.insert(0, HKDF_INFO_RS)
    limit = policy.limits.max_total_bytes
    for key in policy.recipient_keys:
        for info in infos:
            with (
                encrypted.open("rb") as source,
                open(
                    os.open(tar_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600),
                    "wb",
                ) as sink,
            ):
                try:
                    result = decrypt_stream(source, sink, key, params, info, limit)
                except IntegrityError as exc:
                    if exc.code == "payload_too_large":
                        raise
                    continue
            return info, result.plaintext_sha256
    with contextlib.suppress(FileNotFoundError):
        tar_path.unlink()
    tried = ", ".join(fingerprint(raw_public(key.public_key())) for key in policy.recipient_keys)
    raise IntegrityError(
        "payload authentication failed (AES-GCM tag mismatch) with every key and KDF "
        f"variant: the envelope was altered, or it was sealed to a different key (tried {tried})",
        code="decrypt_failed",
    )


def _strip_prefix(raw_dir: Path, names: list[str]) -> Path:
    """Return the payload root: ``raw/payload`` when every member sits under ``payload/``."""
    if names and all(name.startswith("payload/") for name in names):
        return raw_dir / "payload"
    return raw_dir


def _copy_plain(source: Path, staging: Path, limits: ArchiveLimits) -> list[str]:
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
        entries.append((item[key], _hash_value(digest) if digest else None, size))
    return entries


def _check_files_json(staging: Path, present: list[str]) -> str:
    """Check files.json's entries; files under a top folder it covers must all be listed."""
    listing = staging / "files.json"
    if not listing.is_file():
        return "no files.json (optional)"
    entries = _file_entries(_read_json(listing, MAX_FILES_JSON_BYTES, "files.json"))
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
        if digest is not None and sha256_file(target) != digest:
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
            f"payload holds files not listed in files.json: {', '.join(map(repr, extras[:5]))}",
            code="file_unlisted",
        )
    return f"{len(listed)} files match files.json"
