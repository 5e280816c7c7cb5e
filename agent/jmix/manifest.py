"""The manifest: strict JSON parsing, jmix-js aliases and the fields every check relies on.

Everything here reads untrusted input and raises EnvelopeFormatError with a stable code;
nothing is decrypted or unpacked.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.jmix.crypto import IV_LENGTH, TAG_LENGTH, EncryptionParams
from agent.jmix.errors import EnvelopeFormatError, KeyFormatError
from agent.jmix.keys import b64decode
from agent.jmix.timeutil import parse_timestamp

SKIPPED_HASHES = ("", "sha256:skipped")


def read_limited(path: Path, limit: int, what: str) -> bytes:
    """Read a regular file of at most ``limit`` bytes; links and special files count as missing."""
    if path.is_symlink() or not path.is_file():
        raise EnvelopeFormatError(f"{what} is missing", code="manifest_missing")
    if path.stat().st_size > limit:
        raise EnvelopeFormatError(f"{what} is larger than {limit} bytes", code="json_too_large")
    return path.read_bytes()


def read_json(path: Path, limit: int, what: str) -> Any:
    """Read and strictly parse a JSON file of at most ``limit`` bytes."""
    return parse_json(read_limited(path, limit, what), what)


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


def encryption_params(block: object) -> EncryptionParams:
    """Decode the manifest's encryption block, checking the algorithm and each length."""
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


def asserted_hash(text: str) -> str | None:
    """Return the hex of an asserted payload hash, or None when it is not asserted."""
    if text.strip().lower() in SKIPPED_HASHES:
        return None
    prefix, sep, digest = text.partition(":")
    hex_part = digest if sep and prefix.lower() == "sha256" else text
    return hex_part.strip().lower()


# -- the opener ----------------------------------------------------------------------------
