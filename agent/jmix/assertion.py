"""Ed25519 identity assertions over manifest fields.

Canonical form: RFC 8785 (JCS) of a flat JSON object that maps each signed field path to
its value in the manifest. A path joins object keys with dots and uses array positions
as numbers (``receiver.0.id``); a path that names an object signs its whole value
(``security.encryption``). A listed field that does not exist is an error, both when
signing and when verifying, so a signature can never be "over nothing".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.jmix.errors import IdentityError, KeyFormatError
from agent.jmix.keys import (
    b64decode,
    b64encode,
    fingerprint,
    normalise_fingerprint,
    public_b64,
    raw_public,
)
from agent.jmix.timeutil import parse_timestamp

ALGORITHM = "Ed25519"
_MISSING = object()


def required_fields(manifest: Mapping[str, Any], role: str = "sender") -> list[str]:
    """Return the paths an assertion by ``role`` must cover for this manifest.

    A sender assertion covers the envelope id, timestamp, sender id and every receiver id
    always, and the payload hash and the encryption block whenever the manifest has them.
    A requester assertion (``role="requester"``) or the assertion of one receiver
    (``role="receiver.<index>"``) covers the envelope id, the timestamp and that party's
    own id, which ties it to this envelope so it cannot be copied into another one.
    """
    if role != "sender":
        return ["id", "timestamp", f"{role}.id"]
    paths = ["id", "timestamp", "sender.id"]
    receivers = manifest.get("receiver")
    if isinstance(receivers, list):
        paths += [f"receiver.{index}.id" for index in range(len(receivers))]
    security = manifest.get("security")
    if isinstance(security, dict):
        if "payload_hash" in security:
            paths.append("security.payload_hash")
        if "encryption" in security:
            paths.append("security.encryption")
    return paths


def resolve_path(document: Any, path: str) -> Any:
    """Return the value at a dotted path, or raise KeyError naming the missing part."""
    value = document
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def canonical_bytes(manifest: Mapping[str, Any], signed_fields: Sequence[str]) -> bytes:
    """Return the JCS bytes of ``{path: value}`` for the signed fields."""
    flat: dict[str, Any] = {}
    for path in signed_fields:
        try:
            flat[path] = resolve_path(manifest, path)
        except KeyError:
            raise IdentityError(
                f"signed field {path!r} does not exist in the manifest", code="signed_field_missing"
            ) from None
    try:
        result: bytes = rfc8785.dumps(flat)
    except rfc8785.CanonicalizationError as exc:
        # JCS has no form for NaN, integers beyond 2**53 or unpaired surrogates.
        raise IdentityError(
            f"a signed field has no canonical JSON form: {exc}", code="assertion_malformed"
        ) from exc
    return result


def is_covered(path: str, signed_fields: Iterable[str]) -> bool:
    """Return True if ``path`` or an object that contains it is signed."""
    return any(path == signed or path.startswith(signed + ".") for signed in signed_fields)


def sign_assertion(
    manifest: Mapping[str, Any],
    key: Ed25519PrivateKey,
    signed_fields: Sequence[str],
    expires_at: str | None = None,
) -> dict[str, Any]:
    """Return an assertion object signing ``signed_fields`` of ``manifest``."""
    signature = key.sign(canonical_bytes(manifest, signed_fields))
    public = key.public_key()
    assertion: dict[str, Any] = {
        "signing_key": {
            "alg": ALGORITHM,
            "public_key": public_b64(public),
            "fingerprint": fingerprint(public),
        },
        "signed_fields": list(signed_fields),
        "signature": b64encode(signature),
    }
    if expires_at is not None:
        assertion["expires_at"] = expires_at
    return assertion


@dataclass(frozen=True)
class TrustedKeys:
    """Signing keys pinned per entity id, plus revoked fingerprints."""

    by_entity: Mapping[str, Sequence[bytes]] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()


@dataclass(frozen=True)
class AssertionResult:
    """A verified assertion: who signed, with which key, over which fields."""

    role: str
    entity_id: str
    fingerprint: str
    signed_fields: tuple[str, ...]
    expires_at: str | None
    trusted_by: str
    public_key: bytes = b""
    """The raw Ed25519 key that made the signature."""


def _fail(role: str, code: str, message: str) -> IdentityError:
    return IdentityError(f"{role} assertion: {message}", code=code)


def read_public_key(role: str, assertion: Mapping[str, Any]) -> tuple[bytes, str]:
    """Return the assertion's raw public key and its fingerprint, checking the stated one.

    Raises IdentityError (``assertion_malformed`` or ``fingerprint_mismatch``).
    """
    signing_key = assertion.get("signing_key")
    if not isinstance(signing_key, dict):
        raise _fail(role, "assertion_malformed", "signing_key is missing")
    if signing_key.get("alg") != ALGORITHM:
        raise _fail(
            role, "assertion_malformed", f"unsupported key algorithm {signing_key.get('alg')!r}"
        )
    public_text = signing_key.get("public_key")
    stated = signing_key.get("fingerprint")
    if not isinstance(public_text, str) or not isinstance(stated, str):
        raise _fail(role, "assertion_malformed", "public_key or fingerprint is missing")
    try:
        raw = b64decode(public_text, "public_key")
        Ed25519PublicKey.from_public_bytes(raw)
        stated_normal = normalise_fingerprint(stated)
    except (KeyFormatError, ValueError) as exc:
        raise _fail(role, "assertion_malformed", str(exc)) from exc
    actual = fingerprint(raw)
    if stated_normal != actual:
        raise _fail(
            role,
            "fingerprint_mismatch",
            f"fingerprint {stated} does not match the public key ({actual})",
        )
    return raw, actual


def verify_assertion(
    manifest: Mapping[str, Any],
    role: str,
    entity: Mapping[str, Any],
    trusted: TrustedKeys,
    required: Sequence[str],
    now: datetime | None = None,
    extra_trust: Mapping[bytes, str] | None = None,
) -> AssertionResult:
    """Verify the assertion of ``entity`` (the manifest's ``role`` entry).

    Steps, each stopping a named attack:
    1. the fingerprint matches the embedded key (a mislabelled key);
    2. the key is pinned for this entity id, or vouched for by ``extra_trust`` such as a
       directory attestation (an attacker's own key), and is not revoked;
    3. the signed fields cover ``required`` (a signature over fields an attacker can
       swap, or over nothing);
    4. the assertion has not expired (replay of an old identity);
    5. the Ed25519 signature verifies over the canonical bytes (tampering).
    """
    assertion = entity.get("assertion")
    if not isinstance(assertion, dict):
        raise _fail(role, "assertion_missing", "the manifest has no assertion for this party")
    entity_id = entity.get("id")
    if not isinstance(entity_id, str):
        raise _fail(role, "assertion_malformed", "the party has no id")

    # Steps 1 and 2: the key is well-formed, labelled honestly and pinned.
    raw, actual = read_public_key(role, assertion)
    if actual in trusted.revoked:
        raise _fail(role, "key_revoked", f"signing key {actual} is revoked")
    pinned = trusted.by_entity.get(entity_id, ())
    if raw in pinned:
        trusted_by = "pinned"
    elif extra_trust and raw in extra_trust:
        trusted_by = extra_trust[raw]
    else:
        raise _fail(
            role,
            "key_not_pinned",
            f"signing key {actual} is not pinned for {entity_id!r}; "
            "add it to that peer's signing_keys if the peer really rotated its key",
        )

    # Step 3: the signature covers what identifies this envelope.
    signed_fields = assertion.get("signed_fields")
    if (
        not isinstance(signed_fields, list)
        or not signed_fields
        or not all(isinstance(item, str) for item in signed_fields)
    ):
        raise _fail(role, "assertion_malformed", "signed_fields must be a non-empty list of paths")
    uncovered = [path for path in required if not is_covered(path, signed_fields)]
    if uncovered:
        raise _fail(
            role, "assertion_incomplete", f"signed fields do not cover: {', '.join(uncovered)}"
        )

    # Step 4: expiry.
    expires_at = assertion.get("expires_at")
    if expires_at is not None:
        if not isinstance(expires_at, str):
            raise _fail(role, "assertion_malformed", "expires_at is not a string")
        try:
            expiry = parse_timestamp(expires_at)
        except ValueError as exc:
            raise _fail(role, "assertion_malformed", f"expires_at: {exc}") from exc
        if expiry <= (now or datetime.now(UTC)):
            raise _fail(role, "assertion_expired", f"assertion expired at {expires_at}")

    # Step 5: the signature itself.
    signature_text = assertion.get("signature")
    if not isinstance(signature_text, str):
        raise _fail(role, "assertion_malformed", "signature is missing")
    try:
        signature = b64decode(signature_text, "signature")
    except KeyFormatError as exc:
        raise _fail(role, "assertion_malformed", str(exc)) from exc
    payload = canonical_bytes(manifest, signed_fields)
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, payload)
    except InvalidSignature:
        raise _fail(
            role, "signature_invalid", "signature does not verify over the signed fields"
        ) from None

    return AssertionResult(
        role,
        entity_id,
        actual,
        tuple(signed_fields),
        expires_at if isinstance(expires_at, str) else None,
        trusted_by,
        raw,
    )


def public_key_of(key: Ed25519PrivateKey) -> bytes:
    """Return the raw public bytes of a signing key."""
    return raw_public(key.public_key())
