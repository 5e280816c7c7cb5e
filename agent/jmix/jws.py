"""Compact JWS (RFC 7515) with EdDSA over Ed25519 (RFC 8037), for ``manifest.jws``.

An envelope may carry ``manifest.jws``: a compact, attached JWS whose payload is the exact
bytes of ``manifest.json``, named by ``security.jws.jws_file``. jmix-rs writes the same form
(header ``{"alg":"EdDSA","typ":"JWS","crv":"Ed25519"}``), so either side can check the
other's signature. The verifier also accepts the detached form (empty payload part, RFC
7515 appendix F) and then checks the signature over the manifest bytes it was given.

Only ``alg: EdDSA`` is accepted, so a token cannot downgrade to ``none`` or to an HMAC
keyed with a public key. A ``crit`` header is rejected because no extension is supported.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.jmix.errors import IntegrityError, UnsafeArchiveError
from agent.jmix.keys import fingerprint, raw_public
from agent.jmix.tarsafe import safe_member_name

ALGORITHM = "EdDSA"
MAX_HEADER_BYTES = 8 * 1024
_URLSAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class JwsError(IntegrityError):
    """A JWS is malformed, unsupported, or its signature or payload does not verify."""

    code = "jws_invalid"


def b64url_encode(data: bytes) -> str:
    """Return base64url without padding, as JWS requires."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str) -> bytes:
    """Decode unpadded base64url; raise JwsError (``jws_malformed``) naming ``what``."""
    if not set(text) <= _URLSAFE or len(text) % 4 == 1:
        raise JwsError(f"{what} is not unpadded base64url", code="jws_malformed")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JwsError(f"{what} is not unpadded base64url", code="jws_malformed") from exc


def sign_compact(
    payload: bytes, key: Ed25519PrivateKey, header: Mapping[str, Any] | None = None
) -> str:
    """Return ``header.payload.signature`` signing ``payload`` with EdDSA.

    The protected header is ``{"alg":"EdDSA","crv":"Ed25519","kid":<fingerprint>,
    "typ":"JWS"}`` plus ``header``; ``kid`` is the signing key's ``SHA256:<hex>``
    fingerprint, which lets a verifier name the key it expected.
    """
    protected = {
        "alg": ALGORITHM,
        "crv": "Ed25519",
        "kid": fingerprint(raw_public(key.public_key())),
        "typ": "JWS",
        **(header or {}),
    }
    if protected["alg"] != ALGORITHM:
        raise ValueError("only alg EdDSA can be signed")
    encoded_header = b64url_encode(json.dumps(protected, separators=(",", ":")).encode())
    signing_input = f"{encoded_header}.{b64url_encode(payload)}".encode("ascii")
    return f"{signing_input.decode('ascii')}.{b64url_encode(key.sign(signing_input))}"


@dataclass(frozen=True)
class VerifiedJws:
    """A JWS whose signature verified: its header, payload and the key that signed it."""

    header: dict[str, Any]
    payload: bytes
    detached: bool
    public_key: bytes

    @property
    def key_fingerprint(self) -> str:
        """The ``SHA256:<hex>`` fingerprint of the signing key."""
        return fingerprint(self.public_key)


def _parse_header(encoded: str) -> dict[str, Any]:
    if len(encoded) > MAX_HEADER_BYTES:
        raise JwsError("JWS header is too large", code="jws_malformed")
    try:
        header = json.loads(b64url_decode(encoded, "JWS header"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: a deeply nested header, which json.loads cannot parse.
        raise JwsError("JWS header is not JSON", code="jws_malformed") from exc
    if not isinstance(header, dict):
        raise JwsError("JWS header is not a JSON object", code="jws_malformed")
    if header.get("alg") != ALGORITHM:
        raise JwsError(
            f"JWS algorithm {header.get('alg')!r} is not supported; only EdDSA is accepted",
            code="jws_unsupported",
        )
    if "crit" in header or header.get("b64") is False:
        raise JwsError(
            "JWS header names critical extensions, which are not supported",
            code="jws_unsupported",
        )
    return header


def verify_compact(
    token: str, public_keys: Sequence[bytes], detached_payload: bytes | None = None
) -> VerifiedJws:
    """Verify a compact JWS with any of ``public_keys`` (raw Ed25519) and return it.

    With ``detached_payload``, a token whose payload part is empty is checked over those
    bytes. An attached payload is returned as it is, and the caller compares it. Raises
    JwsError with code ``jws_malformed``, ``jws_unsupported`` or
    ``jws_signature_invalid``.
    """
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwsError(
            f"a compact JWS has 3 dot-separated parts; this one has {len(parts)}",
            code="jws_malformed",
        )
    encoded_header, encoded_payload, encoded_signature = parts
    header = _parse_header(encoded_header)
    detached = False
    if encoded_payload == "" and detached_payload is not None:
        detached = True
        payload = detached_payload
        encoded_payload = b64url_encode(detached_payload)
    else:
        payload = b64url_decode(encoded_payload, "JWS payload")
    signature = b64url_decode(encoded_signature, "JWS signature")
    signing_input = f"{encoded_header}.{encoded_payload}".encode("ascii")

    for raw in public_keys:
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, signing_input)
        except InvalidSignature:
            continue
        return VerifiedJws(header, payload, detached, raw)
    tried = ", ".join(fingerprint(raw) for raw in public_keys) or "none"
    raise JwsError(
        f"JWS signature does not verify with the expected key(s) ({tried})",
        code="jws_signature_invalid",
    )


# -- manifest.jws in an envelope -------------------------------------------------------------

DEFAULT_JWS_FILE = "manifest.jws"
MAX_JWS_BYTES = 4 * 1024 * 1024
"""Largest manifest.jws read: base64url of a manifest at its 1 MiB limit, with room to spare."""


def jws_reference(manifest: Mapping[str, Any]) -> str | None:
    """Return ``security.jws.jws_file``, None when absent; raise JwsError if malformed."""
    security = manifest.get("security")
    reference = security.get("jws") if isinstance(security, dict) else None
    if reference is None:
        return None
    name = reference.get("jws_file") if isinstance(reference, dict) else None
    if not isinstance(name, str) or not name:
        raise JwsError("security.jws.jws_file is missing or not a string", code="jws_malformed")
    return name


def _envelope_file(root: Path, name: str) -> Path:
    """Return ``root/name`` for a relative name, passing through no symbolic link."""
    try:
        relative = safe_member_name(name)
    except UnsafeArchiveError as exc:
        raise JwsError(f"security.jws.jws_file: {exc.message}", code="jws_malformed") from exc
    current = root
    for part in relative.split("/"):
        current = current / part
        if current.is_symlink():
            raise JwsError(f"{name} is a symbolic link", code="symlink")
    if not relative or not current.is_file():
        raise JwsError(f"the envelope has no {name!r}, which it names", code="jws_missing")
    return current


def verify_manifest_jws(
    root: Path, name: str, manifest_bytes: bytes, public_keys: Sequence[bytes]
) -> VerifiedJws:
    """Verify the envelope's JWS file ``name`` over the exact ``manifest_bytes``.

    Raises JwsError: ``jws_missing`` when the file is absent, ``jws_malformed`` or
    ``jws_unsupported`` for a bad token, ``jws_signature_invalid`` when no key verifies
    it, and ``jws_payload_mismatch`` when it signs other bytes than manifest.json holds.
    """
    path = _envelope_file(root, name)
    if path.stat().st_size > MAX_JWS_BYTES:
        raise JwsError(f"{name} is larger than {MAX_JWS_BYTES} bytes", code="jws_malformed")
    try:
        token = path.read_bytes().decode("ascii")
    except UnicodeDecodeError as exc:
        raise JwsError(
            f"{name} is not a compact JWS (non-ASCII bytes)", code="jws_malformed"
        ) from exc
    verified = verify_compact(token, public_keys, detached_payload=manifest_bytes)
    if verified.payload != manifest_bytes:
        raise JwsError(
            f"{name} signs different bytes than manifest.json contains: the manifest was "
            "changed after it was signed, or the sender signed another copy of it",
            code="jws_payload_mismatch",
        )
    return verified
