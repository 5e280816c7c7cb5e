"""Opening: verify an envelope from any JMIX dialect and unpack its payload to staging.

The checks run in a fixed order and each one names the attack it stops:

1. layout: a zip or tar container is first unpacked into ``work`` with limits (path
   traversal, links, bombs), then manifest.json is read with a size bound (resource
   exhaustion);
2. manifest: aliases normalised, id a UUID, timestamp with a zone, receivers listed,
   the folder name agrees with the id (a renamed or substituted envelope);
3. identity: the sender's assertion verifies with a pinned key and covers the envelope
   id, timestamp, parties, payload hash and encryption block (spoofing, field swaps),
   then the signed timestamp lies inside the policy's window (stale or post-dated copies);
4. receiver: we are one of the receivers (an envelope meant for someone else), and a
   requester or receiver assertion that is present verifies like the sender's (a forged
   party);
5. jws: manifest.jws, when present or required, is the sender's signature over the exact
   manifest.json bytes (a manifest changed outside the assertion's signed fields);
6. payload hash over the encrypted file, when that is the rule (tampered ciphertext);
7. decryption: AES-GCM tag verified before any plaintext is unpacked (tampering);
8. safe extraction into private staging with limits (path traversal, links, bombs);
9. payload hash over the plaintext when that is the rule, and files.json (substitution).

Nothing is written outside ``work``; publishing the result is the caller's single rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import fsutil
from agent.jmix.assertion import AssertionResult, TrustedKeys
from agent.jmix.container import container_stem, unpack_container
from agent.jmix.crypto import (
    IV_LENGTH,
    TAG_LENGTH,
    DecryptResult,
    EncryptionParams,
    decrypt_stream,
)
from agent.jmix.errors import (
    EnvelopeFormatError,
    IdentityError,
    IntegrityError,
    JmixError,
    KeyFormatError,
)
from agent.jmix.hashing import line_list_hash, path_walk_hash, sha256_file
from agent.jmix.jws import DEFAULT_JWS_FILE, JwsError, jws_reference, verify_manifest_jws
from agent.jmix.keys import b64decode, fingerprint, raw_public
from agent.jmix.parties import has_assertion, verify_party
from agent.jmix.profiles import HKDF_INFO_RS, HKDF_INFOS, HashRule
from agent.jmix.schema import check_document
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

    A plain (unencrypted) envelope is accepted when ``allow_plain`` is set, or when its
    verified sender id is in ``allow_plain_senders``. ``manifest.jws`` is required when
    ``require_jws`` is set or the verified sender id is in ``require_jws_senders``.
    ``directory_keys`` enables directory mode: a party whose key is not pinned is
    trusted if a directory attestation signed by one of these raw Ed25519 keys vouches
    for it.
    """

    recipient_keys: Sequence[X25519PrivateKey] = ()
    trusted: TrustedKeys = field(default_factory=TrustedKeys)
    our_id: str | None = None
    require_sender_identity: bool = True
    allow_plain: bool = False
    require_name_match: bool = True
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    now: datetime | None = None
    max_age: timedelta | None = None
    """Oldest accepted envelope timestamp, counted back from ``now`` (None: no limit)."""
    max_clock_skew: timedelta | None = None
    """How far an envelope timestamp may lie ahead of ``now`` (None: no limit)."""
    allow_plain_senders: frozenset[str] = frozenset()
    require_jws: bool = False
    require_jws_senders: frozenset[str] = frozenset()
    directory_keys: tuple[bytes, ...] = ()


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
    manifest_sha256: str = ""
    """SHA-256 hex of the exact manifest.json bytes that were verified."""
    container: str | None = None
    """``zip`` or ``tar`` when the envelope arrived as one file, None for a folder."""
    parties: list[AssertionResult] = field(default_factory=list)
    """Verified requester and receiver assertions, besides the sender's."""
    jws_key: str | None = None
    """Fingerprint of the key whose manifest.jws verified, when there was one."""

    @property
    def study_uid(self) -> str | None:
        """The StudyInstanceUID recorded in metadata.json, if any (not validated)."""
        try:
            document = json.loads((self.payload_dir / "metadata.json").read_bytes())
            value = document["studies"]["study_uid"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None
        return value if isinstance(value, str) else None


class EnvelopeRejected(JmixError):
    """Verification failed; ``checks`` lists every step run, the failed one last."""

    def __init__(
        self, error: JmixError, checks: list[Check], envelope_id: str | None = None
    ) -> None:
        super().__init__(error.message, code=error.code)
        self.checks = checks
        self.envelope_id = envelope_id
        """The manifest's id once the manifest step passed, else None."""
        self.__cause__ = error


# -- layout and manifest -----------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """The folder of an envelope's files, and the names that must agree with its id."""

    root: Path
    names: tuple[str, ...]
    container: str | None


def locate_package(
    path: Path, work: Path | None = None, limits: ArchiveLimits | None = None
) -> Package:
    """Return the folder holding manifest.json: the envelope folder, or inside a container.

    A zip or tar container is extracted safely into ``work/envelope``, a new folder that
    the caller owns and deletes. Without ``work`` a container is rejected.
    """
    if path.is_symlink():
        raise EnvelopeFormatError(
            f"{path} is a symbolic link; refusing to follow it", code="symlink"
        )
    if path.is_dir():
        return Package(path, (path.name,), None)
    if not path.exists():
        raise EnvelopeFormatError(f"{path} does not exist", code="envelope_missing")
    if not path.is_file():
        raise EnvelopeFormatError(
            f"{path} is neither a folder nor a regular file", code="container_unsupported"
        )
    if work is None:
        raise EnvelopeFormatError(
            f"{path} is a file; opening a zip or tar container needs a work folder",
            code="container_unsupported",
        )
    unpacked = unpack_container(path, work / "envelope", limits or ArchiveLimits())
    names = [container_stem(path.name)]
    if unpacked.top_folder:
        names.append(unpacked.top_folder)
    return Package(unpacked.root, tuple(names), unpacked.kind)


def find_package_root(path: Path, work: Path | None = None) -> Path:
    """Return the folder holding manifest.json; see :func:`locate_package`."""
    return locate_package(path, work).root


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    if path.is_symlink() or not path.is_file():
        raise EnvelopeFormatError(f"{what} is missing", code="manifest_missing")
    if path.stat().st_size > limit:
        raise EnvelopeFormatError(f"{what} is larger than {limit} bytes", code="json_too_large")
    return path.read_bytes()


def _read_json(path: Path, limit: int, what: str) -> Any:
    return parse_json(_read_limited(path, limit, what), what)


def parse_json(data: bytes, what: str) -> Any:
    """Parse untrusted JSON strictly, raising EnvelopeFormatError (``json_invalid``)."""
    try:
        return json.loads(data, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: deeply nested arrays fit in a small file and exhaust the parser.
        raise EnvelopeFormatError(f"{what} is not valid JSON: {exc}", code="json_invalid") from exc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, rejecting a repeated key.

    Parsers disagree on which copy of a repeated key wins, so a manifest with two ``id``
    values could be verified under one and acted on under the other.
    """
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"key {key!r} appears twice in one object")
        document[key] = value
    return document


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


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


def _name_matches(names: Sequence[str], identifier: str) -> bool:
    """Return True if every name (folder, container file, folder inside it) is the id's."""
    for name in names:
        stem = name
        for suffix in ENVELOPE_SUFFIXES:
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        if stem.lower() != identifier:
            return False
    return True


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
        self.envelope_id: str | None = None

    def run(self, name: str, step: Callable[[], str]) -> None:
        try:
            detail = step()
        except JmixError as exc:
            self.checks.append(Check(name, False, exc.message))
            raise EnvelopeRejected(exc, self.checks, self.envelope_id) from exc
        self.checks.append(Check(name, True, detail))


def open_envelope(path: Path, policy: OpenPolicy, work: Path) -> OpenedEnvelope:
    """Verify the envelope at ``path`` and unpack its payload into ``work/payload``.

    ``work`` must be a new private folder owned by the caller, who deletes it whatever
    happens. Raises EnvelopeRejected carrying every check run so far.
    """
    steps = _Steps()
    state: dict[str, Any] = {"parties": []}

    def layout() -> str:
        package = locate_package(path, work, policy.limits)
        state["package"] = package
        state["root"] = package.root
        raw = _read_limited(package.root / "manifest.json", MAX_MANIFEST_BYTES, "manifest.json")
        state["manifest_bytes"] = raw
        document = _checked_object(parse_json(raw, "manifest.json"))
        state["schema_notes"] = check_document("manifest.json", document)
        state["manifest"] = normalise_manifest(document)
        if package.container is None:
            return f"manifest.json read from {package.root.name}"
        return f"manifest.json read from {package.container} container {path.name}"

    def manifest() -> str:
        state["id"] = validate_manifest(state["manifest"])
        steps.envelope_id = state["id"]
        names = state["package"].names
        if policy.require_name_match and not _name_matches(names, state["id"]):
            raise EnvelopeFormatError(
                f"name {' / '.join(names)!r} does not match manifest id {state['id']}",
                code="name_mismatch",
            )
        notes: list[str] = state["schema_notes"]
        if notes:
            return (
                f"envelope {state['id']}; {len(notes)} deviation(s) from the spec schema, "
                f"accepted: {notes[0]}"
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
    if policy.max_age is not None or policy.max_clock_skew is not None:
        steps.run("timestamp", lambda: _check_timestamp(state["manifest"]["timestamp"], policy))
    steps.run("receiver", receiver)
    steps.run("requester", lambda: _check_requester(state, policy))
    steps.run("receiver_assertions", lambda: _check_receiver_assertions(state, policy))
    steps.run("jws", lambda: _check_jws(state, policy))

    root: Path = state["root"]
    encrypted_file = next(
        (root / name for name in ENCRYPTED_NAMES if (root / name).is_file()), None
    )
    asserted = _hash_value(state["manifest"].get("security", {}).get("payload_hash", ""))
    staging = work / "payload"
    outcome: dict[str, Any] = {"rule": None, "hkdf": None, "files": []}

    if encrypted_file is not None:
        encrypted_path: Path = encrypted_file

        def check_link() -> str:
            if encrypted_path.is_symlink():
                raise EnvelopeFormatError(
                    f"{encrypted_path.name} is a symbolic link", code="symlink"
                )
            return f"{encrypted_path.name} is a regular file"

        def decrypt() -> str:
            params = _encryption_params(state["manifest"].get("security", {}).get("encryption"))
            tar_path = work / "payload.tar"
            result = _decrypt_any(encrypted_path, tar_path, params, policy)
            outcome["hkdf"] = HKDF_INFOS[result.info]
            outcome["tar_sha256"] = result.plaintext_sha256
            outcome["tar"] = tar_path
            # The encrypted file's hash comes from the same pass, before anything is unpacked.
            if asserted is not None and result.ciphertext_sha256 == asserted:
                outcome["rule"] = HashRule.ENCRYPTED_FILE
            return f"AES-256-GCM tag verified (HKDF info of {outcome['hkdf']})"

        def extract() -> str:
            raw_dir = work / "raw"
            raw_dir.mkdir(mode=0o700)
            extracted = extract_tar(outcome["tar"], raw_dir, policy.limits)
            outcome["tar"].unlink()
            root_dir = _strip_prefix(raw_dir, [item.name for item in extracted])
            os.rename(root_dir, staging)
            outcome["files"] = sorted(item.name.removeprefix("payload/") for item in extracted)
            outcome["digests"] = {
                item.name.removeprefix("payload/"): item.sha256 for item in extracted
            }
            return f"{len(extracted)} files unpacked"

        steps.run("payload_file", check_link)
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
            _check_plain_allowed(state["sender"], asserted, policy)
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
        return _check_files_json(staging, outcome["files"], outcome.get("digests", {}))

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
        manifest_sha256=hashlib.sha256(state["manifest_bytes"]).hexdigest(),
        container=state["package"].container,
        parties=state["parties"],
        jws_key=state.get("jws_key"),
    )


def _checked_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EnvelopeFormatError("manifest.json is not a JSON object", code="manifest_invalid")
    return value


def _check_timestamp(text: str, policy: OpenPolicy) -> str:
    """Reject a signed timestamp older than ``max_age`` or ahead by more than the skew."""
    now = policy.now or datetime.now(UTC)
    created = parse_timestamp(text)
    if policy.max_clock_skew is not None and created - now > policy.max_clock_skew:
        ahead = (created - now).total_seconds()
        raise JmixError(
            f"envelope timestamp {text} is {ahead:.0f} s ahead of this machine's clock, more "
            f"than the allowed skew of {policy.max_clock_skew.total_seconds():g} s; check that "
            "both machines keep time with NTP",
            code="timestamp_in_future",
        )
    if policy.max_age is not None and now - created > policy.max_age:
        age_hours = (now - created).total_seconds() / 3600
        raise JmixError(
            f"envelope timestamp {text} is {age_hours:.1f} hours old, more than the allowed "
            f"{policy.max_age.total_seconds() / 3600:g} hours; the sender must seal the "
            "study again",
            code="timestamp_too_old",
        )
    return f"timestamp {text} is inside the accepted window"


def _verify_sender(manifest: dict[str, Any], policy: OpenPolicy) -> AssertionResult | None:
    try:
        return verify_party(
            manifest,
            "sender",
            manifest["sender"],
            policy.trusted,
            policy.directory_keys,
            policy.now or datetime.now(UTC),
        )
    except IdentityError:
        if policy.require_sender_identity:
            raise
        return None


def _check_requester(state: dict[str, Any], policy: OpenPolicy) -> str:
    """Verify a requester assertion if there is one, also trusting the sender's own key."""
    entity = state["manifest"].get("requester")
    if not has_assertion(entity):
        return "no requester assertion (optional)"
    sender: AssertionResult | None = state["sender"]
    also = {sender.public_key: "signed with the sender's key"} if sender is not None else {}
    return _verify_other_party(state, policy, "requester", entity, also)


def _check_receiver_assertions(state: dict[str, Any], policy: OpenPolicy) -> str:
    """Verify every receiver assertion that is present."""
    details = [
        _verify_other_party(state, policy, f"receiver.{index}", entity, {})
        for index, entity in enumerate(state["manifest"]["receiver"])
        if has_assertion(entity)
    ]
    return "; ".join(details) or "no receiver assertions (optional)"


def _verify_other_party(
    state: dict[str, Any],
    policy: OpenPolicy,
    role: str,
    entity: Mapping[str, Any],
    also_trusted: Mapping[bytes, str],
) -> str:
    try:
        result = verify_party(
            state["manifest"],
            role,
            entity,
            policy.trusted,
            policy.directory_keys,
            policy.now or datetime.now(UTC),
            also_trusted,
        )
    except IdentityError as exc:
        # The same waiver as for the sender: reported, not fatal.
        if policy.require_sender_identity:
            raise
        return f"{role} NOT verified (allowed by option): {exc.message}"
    state["parties"].append(result)
    return f"{role} {result.entity_id} verified with {result.fingerprint} ({result.trusted_by})"


def _check_jws(state: dict[str, Any], policy: OpenPolicy) -> str:
    """Verify manifest.jws when present, and require it when the policy does for this sender."""
    manifest = state["manifest"]
    root: Path = state["root"]
    sender: AssertionResult | None = state["sender"]
    required = policy.require_jws or (
        sender is not None and sender.entity_id in policy.require_jws_senders
    )
    name = jws_reference(manifest)
    if name is None and os.path.lexists(root / DEFAULT_JWS_FILE):
        name = DEFAULT_JWS_FILE  # jmix-rs writes the file without naming it in the manifest
    if name is None:
        if required:
            raise JwsError(
                "the envelope has no manifest.jws, but the config requires one from this "
                "sender (require_jws = true); ask the sender to enable jws",
                code="jws_missing",
            )
        return "no manifest.jws (optional)"

    # The JWS must come from the sender, so only its verified key and its pinned keys count.
    pinned = list(policy.trusted.by_entity.get(manifest["sender"]["id"], ()))
    keys = [sender.public_key, *pinned] if sender is not None else pinned
    if not keys:
        if required:
            raise JwsError(
                f"{name} cannot be verified: no trusted key for the sender", code="jws_missing"
            )
        return f"{name} present but NOT verified (no trusted key for the sender)"
    verified = verify_manifest_jws(root, name, state["manifest_bytes"], keys)
    state["jws_key"] = verified.key_fingerprint
    form = "detached" if verified.detached else "attached"
    return f"{name} ({form}) verified over manifest.json with {verified.key_fingerprint}"


def _check_plain_allowed(
    sender: AssertionResult | None, asserted_hash: str | None, policy: OpenPolicy
) -> None:
    """Reject a plain envelope unless the policy allows one from this verified sender."""
    if policy.allow_plain:
        return
    if sender is None or sender.entity_id not in policy.allow_plain_senders:
        raise IntegrityError(
            "envelope is not encrypted and plain envelopes are not allowed from this "
            "sender (set allow_plain = true on the peer to accept them)",
            code="plain_not_allowed",
        )
    if asserted_hash is None:
        # Without a payload hash nothing ties a plain payload to the signed manifest.
        raise IntegrityError(
            "plain envelope asserts no payload_hash, so its payload is not bound to the "
            "sender's signature; ask the sender to include security.payload_hash",
            code="payload_hash_missing",
        )


def _decrypt_any(
    encrypted: Path, tar_path: Path, params: EncryptionParams, policy: OpenPolicy
) -> DecryptResult:
    """Try every recipient key and HKDF info; return the result of the one that verified."""
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
                except ValueError as exc:
                    # X25519 raises for a low-order ephemeral key (an all-zero shared secret).
                    raise IntegrityError(
                        "security.encryption.ephemeral_public_key is not a usable X25519 key",
                        code="ephemeral_key_invalid",
                    ) from exc
            return result
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


def _check_files_json(staging: Path, present: list[str], digests: Mapping[str, str]) -> str:
    """Check files.json's entries; files under a top folder it covers must all be listed.

    ``digests`` holds the SHA-256 of files hashed while they were unpacked; other files
    are read again.
    """
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
            f"payload holds files not listed in files.json: {', '.join(map(repr, extras[:5]))}",
            code="file_unlisted",
        )
    return f"{len(listed)} files match files.json"
