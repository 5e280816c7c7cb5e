"""Directory attestations: a pinned directory key vouches for a party's signing key.

In directory mode a receiver pins one directory public key instead of every sender's key.
A sender that is not a configured peer is then accepted only if its assertion carries a
``directory_attestation``. Its ``attestation_signature`` must be a compact JWS (EdDSA)
made by the pinned directory key, and it must name both the sender's id and its key.

The spec leaves the attestation payload open, so this module defines it. The JWS payload
is a JSON object with these claims (names and NumericDate times as in JWT, RFC 7519):

``iss``
    the directory, equal to the attestation's ``provider`` (optional);
``sub``
    the entity id the key belongs to, compared exactly with the manifest's party id;
``fingerprint``
    ``SHA256:<hex>`` of the raw Ed25519 public key, compared without regard to case;
``iat``
    issue time, seconds since the epoch; it may not lie in the future;
``exp``
    expiry, seconds since the epoch (optional); an expired attestation is rejected.

The protected header is ``{"alg":"EdDSA", "typ":"jmix-directory-attestation+jws", ...}``;
a ``typ`` other than that one is rejected, so no other JWS made with the directory key
can pass as an attestation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.jmix.errors import IdentityError, KeyFormatError
from agent.jmix.jws import JwsError, sign_compact, verify_compact
from agent.jmix.keys import b64decode, fingerprint, normalise_fingerprint, public_b64
from agent.jmix.timeutil import format_timestamp

ATTESTATION_TYPE = "jmix-directory-attestation+jws"
CLOCK_SKEW = timedelta(minutes=5)
"""How far in the future ``iat`` may lie, to allow for clocks that are slightly off."""


def issue_attestation(
    directory_key: Ed25519PrivateKey,
    provider: str,
    entity_id: str,
    subject_key: bytes,
    issued_at: datetime,
    expires_at: datetime | None = None,
) -> dict[str, Any]:
    """Return a ``directory_attestation`` object vouching that ``subject_key`` is ``entity_id``'s.

    This is what a directory service produces; the agent uses it in tests and for
    operators who run their own small directory.
    """
    claims: dict[str, Any] = {
        "iss": provider,
        "sub": entity_id,
        "fingerprint": fingerprint(subject_key),
        "iat": int(issued_at.timestamp()),
    }
    if expires_at is not None:
        claims["exp"] = int(expires_at.timestamp())
    token = sign_compact(
        json.dumps(claims, separators=(",", ":"), sort_keys=True).encode("utf-8"),
        directory_key,
        {"typ": ATTESTATION_TYPE},
    )
    return {
        "provider": provider,
        "attestation_signature": token,
        "attestation_timestamp": format_timestamp(issued_at),
        "attestation_public_key": public_b64(directory_key.public_key()),
    }


def _fail(role: str, code: str, message: str) -> IdentityError:
    return IdentityError(f"{role} directory attestation: {message}", code=code)


def _numeric_date(claims: Mapping[str, Any], name: str, role: str) -> datetime | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(role, "attestation_invalid", f"claim {name!r} is not a NumericDate")
    return datetime.fromtimestamp(value, UTC)


def verify_attestation(
    attestation: object,
    role: str,
    entity_id: str,
    subject_key: bytes,
    directory_keys: Sequence[bytes],
    now: datetime,
) -> str:
    """Check that a pinned directory key vouches for ``subject_key`` as ``entity_id``.

    Returns a label for the trust decision (``directory <provider>``). Raises
    IdentityError with code ``attestation_invalid`` (malformed, or the signature does not
    verify), ``attestation_untrusted`` (made by another directory), ``attestation_mismatch``
    (names another party or key) or ``attestation_expired``.
    """
    if not isinstance(attestation, dict):
        raise _fail(role, "attestation_invalid", "directory_attestation is not an object")
    token = attestation.get("attestation_signature")
    provider = attestation.get("provider")
    if not isinstance(token, str) or not isinstance(provider, str):
        raise _fail(role, "attestation_invalid", "provider or attestation_signature is missing")

    # The embedded key is only a hint, so it must equal a pinned key and never replaces one.
    embedded = attestation.get("attestation_public_key")
    if isinstance(embedded, str):
        try:
            embedded_raw = b64decode(embedded, "attestation_public_key")
        except KeyFormatError as exc:
            raise _fail(role, "attestation_invalid", exc.message) from exc
        if embedded_raw not in directory_keys:
            raise _fail(
                role,
                "attestation_untrusted",
                f"made by directory key {fingerprint(embedded_raw)}, which is not the "
                "pinned directory_public_key",
            )

    try:
        verified = verify_compact(token, directory_keys)
    except JwsError as exc:
        raise _fail(role, "attestation_invalid", exc.message) from exc
    if verified.header.get("typ", ATTESTATION_TYPE) != ATTESTATION_TYPE:
        raise _fail(
            role,
            "attestation_invalid",
            f"JWS typ {verified.header.get('typ')!r} is not {ATTESTATION_TYPE!r}",
        )
    try:
        claims = json.loads(verified.payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _fail(role, "attestation_invalid", "the JWS payload is not JSON") from exc
    if not isinstance(claims, dict):
        raise _fail(role, "attestation_invalid", "the JWS payload is not a JSON object")

    # The claims must name this party and exactly this signing key.
    if "iss" in claims and claims["iss"] != provider:
        raise _fail(role, "attestation_mismatch", "claim 'iss' differs from provider")
    if claims.get("sub") != entity_id:
        raise _fail(
            role, "attestation_mismatch", f"it vouches for {claims.get('sub')!r}, not {entity_id!r}"
        )
    stated = claims.get("fingerprint")
    try:
        stated_normal = normalise_fingerprint(stated) if isinstance(stated, str) else None
    except KeyFormatError:
        stated_normal = None
    if stated_normal != fingerprint(subject_key):
        raise _fail(
            role,
            "attestation_mismatch",
            f"it vouches for key {stated!r}, not for the signing key {fingerprint(subject_key)}",
        )

    # Times: issued in the past, not yet expired.
    issued = _numeric_date(claims, "iat", role)
    if issued is None:
        raise _fail(role, "attestation_invalid", "claim 'iat' is missing")
    if issued > now + CLOCK_SKEW:
        raise _fail(role, "attestation_invalid", "claim 'iat' lies in the future")
    expires = _numeric_date(claims, "exp", role)
    if expires is not None and expires <= now:
        raise _fail(
            role, "attestation_expired", f"attestation expired at {format_timestamp(expires)}"
        )
    return f"directory {provider}"
