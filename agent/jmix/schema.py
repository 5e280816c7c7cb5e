"""Structural checks for the JSON files an envelope carries, mirroring the JMIX spec schemas.

The spec publishes JSON Schemas (draft 2020-12) for ``manifest.json``, ``audit.json``,
``metadata.json`` and ``files.json``. The agent does not ship those files. It carries the
same constraints here as small typed rules, and the sealer runs them on every document
before it publishes an envelope. The tests compare these verdicts with a real JSON Schema
validator run on the published schemas.

Rules are stricter than the schemas in two places, both so that our output stays
unambiguous: a ``pattern`` must match the whole string (JSON Schema searches, so ``$``
also accepts a trailing newline), and ``format`` is always enforced.

Error messages name the JSON path and the broken rule but never repeat the value,
because ``metadata.json`` holds patient attributes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from agent.jmix.errors import EnvelopeFormatError

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


def _is_uuid(text: str) -> bool:
    if not _UUID.fullmatch(text):
        return False
    uuid.UUID(text)
    return True


def _is_date(text: str) -> bool:
    if not _DATE.fullmatch(text):
        return False
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _is_date_time(text: str) -> bool:
    """Check RFC 3339 ``date-time``: full date, time with seconds, and a zone."""
    if not _DATE_TIME.fullmatch(text):
        return False
    try:
        datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


FORMATS: dict[str, Callable[[str], bool]] = {
    "uuid": _is_uuid,
    "date": _is_date,
    "date-time": _is_date_time,
}


# -- rule types --------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A JSON string, optionally restricted by a pattern, a list of values or a format."""

    pattern: str | None = None
    enum: tuple[str, ...] = ()
    format: str | None = None


@dataclass(frozen=True)
class Integer:
    """A JSON integer (a number with no fractional part, as JSON Schema counts it)."""

    minimum: int | None = None


@dataclass(frozen=True)
class Array:
    """A JSON array whose items all follow one rule."""

    items: Rule
    min_items: int = 0


@dataclass(frozen=True)
class Object:
    """A JSON object with known properties; others are an error unless ``open``."""

    properties: Mapping[str, Rule] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    open: bool = False


@dataclass(frozen=True)
class OneOf:
    """Exactly one of the alternatives must hold."""

    alternatives: tuple[Rule, ...]


Rule = Text | Integer | Array | Object | OneOf


# -- the checker ---------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def check(rule: Rule, value: Any, path: str = "") -> list[str]:
    """Return one message per violation of ``rule`` by ``value``; empty when it conforms."""
    where = path or "(document)"
    if isinstance(rule, Text):
        return _check_text(rule, value, where)
    if isinstance(rule, Integer):
        if not _is_integer(value):
            return [f"{where}: must be an integer, not {_type_name(value)}"]
        if rule.minimum is not None and value < rule.minimum:
            return [f"{where}: must be at least {rule.minimum}"]
        return []
    if isinstance(rule, Array):
        if not isinstance(value, list):
            return [f"{where}: must be an array, not {_type_name(value)}"]
        errors = []
        if len(value) < rule.min_items:
            errors.append(f"{where}: must have at least {rule.min_items} item(s)")
        for index, item in enumerate(value):
            errors += check(rule.items, item, f"{path}.{index}" if path else str(index))
        return errors
    if isinstance(rule, Object):
        return _check_object(rule, value, path)
    matching = [alt for alt in rule.alternatives if not check(alt, value, path)]
    if len(matching) != 1:
        return [f"{where}: must match exactly one of {len(rule.alternatives)} forms"]
    return []


def _check_text(rule: Text, value: Any, where: str) -> list[str]:
    if not isinstance(value, str):
        return [f"{where}: must be a string, not {_type_name(value)}"]
    if rule.pattern is not None and not re.fullmatch(rule.pattern, value):
        return [f"{where}: does not match the pattern {rule.pattern}"]
    if rule.enum and value not in rule.enum:
        return [f"{where}: must be one of {', '.join(rule.enum)}"]
    if rule.format is not None and not FORMATS[rule.format](value):
        return [f"{where}: is not a valid {rule.format}"]
    return []


def _check_object(rule: Object, value: Any, path: str) -> list[str]:
    where = path or "(document)"
    if not isinstance(value, dict):
        return [f"{where}: must be an object, not {_type_name(value)}"]
    errors = [f"{where}: {name!r} is required" for name in rule.required if name not in value]
    for name, item in value.items():
        child = f"{path}.{name}" if path else name
        if name in rule.properties:
            errors += check(rule.properties[name], item, child)
        elif not rule.open:
            errors.append(f"{where}: property {name!r} is not allowed")
    return errors


# -- the four documents --------------------------------------------------------------------

_DATE_TIME_TEXT = Text(format="date-time")
_FINGERPRINT = Text(pattern=r"SHA256:[A-Fa-f0-9]+")

_CONSENT = Object(
    {
        "status": Text(enum=("granted", "denied", "unknown")),
        "scope": Array(Text(enum=("treatment", "research", "emergency", "operations", "patient"))),
        "method": Text(),
        "signed_on": Text(format="date"),
    },
    required=("status",),
)
_DEID = Object({"keys": Array(Text())})
_EXTENSIONS = Object({"custom_tags": Array(Text()), "consent": _CONSENT, "deid": _DEID}, open=True)

_SIGNING_KEY = Object(
    {"alg": Text(enum=("Ed25519",)), "public_key": Text(), "fingerprint": _FINGERPRINT},
    required=("alg", "public_key", "fingerprint"),
)
_DIRECTORY_ATTESTATION = Object(
    {
        "provider": Text(),
        "attestation_signature": Text(),
        "attestation_timestamp": _DATE_TIME_TEXT,
        "attestation_public_key": Text(),
    },
    required=(
        "provider",
        "attestation_signature",
        "attestation_timestamp",
        "attestation_public_key",
    ),
)
_MANIFEST_ASSERTION = Object(
    {
        "signing_key": _SIGNING_KEY,
        "key_reference": Text(),
        "signed_fields": Array(Text(), min_items=1),
        "signature": Text(),
        "expires_at": _DATE_TIME_TEXT,
        "directory_attestation": _DIRECTORY_ATTESTATION,
    },
    required=("signing_key", "signed_fields", "signature"),
)
_ENTITY = Object(
    {
        "name": Text(),
        "id": Text(),
        "contact": OneOf(
            (Text(), Object({"system": Text(), "value": Text()}, required=("system", "value")))
        ),
        "assertion": _MANIFEST_ASSERTION,
    },
    required=("id",),
)
_SECURITY = Object(
    {
        "classification": Text(enum=("confidential", "sensitive", "de-identified")),
        "payload_hash": Text(pattern=r"sha256:[A-Fa-f0-9]+"),
        "jws": Object({"jws_file": Text()}, required=("jws_file",)),
        "signature": Object(
            {"alg": Text(), "sig": Text(), "hash": Text()}, required=("alg", "sig")
        ),
        "encryption": Object(
            {
                "algorithm": Text(enum=("AES-256-GCM",)),
                "ephemeral_public_key": Text(),
                "iv": Text(),
                "auth_tag": Text(),
            },
            required=("algorithm", "ephemeral_public_key", "iv", "auth_tag"),
        ),
    }
)

MANIFEST = Object(
    {
        "version": Text(),
        "id": Text(format="uuid"),
        "timestamp": _DATE_TIME_TEXT,
        "sender": _ENTITY,
        "requester": _ENTITY,
        "receiver": Array(_ENTITY, min_items=1),
        "security": _SECURITY,
        "extensions": _EXTENSIONS,
    },
    required=("version", "id", "timestamp", "sender", "receiver"),
)

_ENTITY_REFERENCE = Object({"id": Text(), "name": Text()}, required=("id",))
# The audit schema's assertion has no key_reference, expires_at or directory_attestation.
_AUDIT_ASSERTION = Object(
    {
        "signing_key": _SIGNING_KEY,
        "signed_fields": Array(Text(), min_items=1),
        "signature": Text(),
    },
    required=("signing_key", "signed_fields", "signature"),
)
AUDIT = Object(
    {
        "audit": Array(
            Object(
                {
                    "event": Text(),
                    "by": _ENTITY_REFERENCE,
                    "to": _ENTITY_REFERENCE,
                    "timestamp": _DATE_TIME_TEXT,
                    "assertion": _AUDIT_ASSERTION,
                },
                required=("event", "by", "timestamp"),
            )
        )
    },
    required=("audit",),
)

_PATIENT = Object(
    {
        "id": Text(),
        "name": Object(
            {
                "family": Text(),
                "given": Array(Text()),
                "prefix": Text(),
                "suffix": Text(),
                "text": Text(),
            }
        ),
        "dob": Text(pattern=r"\d{4}-\d{2}-\d{2}"),
        "sex": Text(enum=("M", "F", "O")),
        "identifiers": Array(Object({"system": Text(), "value": Text()}, ("system", "value"))),
        "verification": Object({"verified_by": Text(), "verified_on": Text(format="date")}),
    },
    required=("id",),
)
_SERIES = Object(
    {
        "series_uid": Text(),
        "modality": Text(),
        "body_part": Text(),
        "instance_count": Integer(minimum=0),
    },
    required=("series_uid", "modality"),
    open=True,
)
METADATA = Object(
    {
        "version": Text(),
        "id": Text(format="uuid"),
        "timestamp": _DATE_TIME_TEXT,
        "patient": _PATIENT,
        "report": Object({"file": Text()}),
        "studies": Object(
            {"study_description": Text(), "study_uid": Text(), "series": Array(_SERIES)}
        ),
        "extensions": _EXTENSIONS,
    },
    required=("version", "id", "timestamp", "patient"),
)

FILES = Array(
    Object(
        {"file": Text(), "hash": Text(), "size_bytes": Integer(minimum=0)},
        required=("file",),
    )
)

DOCUMENTS: dict[str, Rule] = {
    "manifest.json": MANIFEST,
    "audit.json": AUDIT,
    "metadata.json": METADATA,
    "files.json": FILES,
}


def check_document(name: str, document: Any) -> list[str]:
    """Return the violations of the spec's rules for the file ``name`` (e.g. ``audit.json``)."""
    try:
        rule = DOCUMENTS[name]
    except KeyError:
        raise ValueError(f"no schema rules for {name!r}; known: {', '.join(DOCUMENTS)}") from None
    return check(rule, document)


def require_valid(name: str, document: Any) -> None:
    """Raise EnvelopeFormatError (code ``schema_invalid``) listing the first violations."""
    errors = check_document(name, document)
    if errors:
        shown = "; ".join(errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise EnvelopeFormatError(
            f"{name} does not conform to the JMIX schema: {shown}{more}", code="schema_invalid"
        )
