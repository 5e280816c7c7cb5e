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
6. decryption: AES-GCM tag verified before any plaintext is unpacked (tampering), with
   the encrypted file's hash taken in the same pass;
7. safe extraction into private staging with limits (path traversal, links, bombs);
8. payload hash under whichever rule matches, and files.json (substitution).

Manifest parsing lives in :mod:`agent.jmix.manifest` and the payload checks in
:mod:`agent.jmix.payload`.

Nothing is written outside ``work``; publishing the result is the caller's single rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.jmix.assertion import AssertionResult, TrustedKeys
from agent.jmix.container import container_stem, unpack_container
from agent.jmix.crypto import (
    DecryptResult,
    EncryptionParams,
    decrypt_stream,
)
from agent.jmix.errors import (
    EnvelopeFormatError,
    IdentityError,
    IntegrityError,
    JmixError,
)
from agent.jmix.hashing import line_list_hash, path_walk_hash
from agent.jmix.jws import DEFAULT_JWS_FILE, JwsError, jws_reference, verify_manifest_jws
from agent.jmix.keys import fingerprint, raw_public
from agent.jmix.manifest import (
    asserted_hash,
    encryption_params,
    normalise_manifest,
    parse_json,
    read_limited,
    validate_manifest,
)
from agent.jmix.parties import has_assertion, verify_party
from agent.jmix.payload import check_files_json, copy_plain_payload, strip_payload_prefix
from agent.jmix.profiles import HKDF_INFO_RS, HKDF_INFOS, HashRule
from agent.jmix.schema import check_document
from agent.jmix.tarsafe import ArchiveLimits, extract_tar
from agent.jmix.timeutil import parse_timestamp

MAX_MANIFEST_BYTES = 1024 * 1024
ENCRYPTED_NAMES = ("payload.encrypted", "payload.enc")
ENVELOPE_SUFFIXES = (".jmix",)


@dataclass(frozen=True)
class OpenPolicy:
    """The opener's trust anchors and requirements.

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
        raw = read_limited(package.root / "manifest.json", MAX_MANIFEST_BYTES, "manifest.json")
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
    asserted = asserted_hash(state["manifest"].get("security", {}).get("payload_hash", ""))
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
            params = encryption_params(state["manifest"].get("security", {}).get("encryption"))
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
            root_dir = strip_payload_prefix(raw_dir, [item.name for item in extracted])
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
            outcome["files"] = copy_plain_payload(plain, staging, policy.limits)
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
        return check_files_json(staging, outcome["files"], outcome.get("digests", {}))

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
