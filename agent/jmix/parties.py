"""Verifying the assertions of every party named in a manifest.

The sender's assertion is always required. A requester's assertion and each receiver's
assertion are optional, but one that is present must verify with the same rules as the
sender's. These rules are an honest fingerprint, a trusted key that is not revoked,
signed fields that exist and bind the assertion to this envelope, no expiry, and a valid
signature.

A key is trusted for a party when it is pinned for that party's id (``[[peers]]``), or,
in directory mode, when the party's ``directory_attestation`` verifies with the pinned
directory key and names that id and key. A requester's assertion is also accepted when
it is signed with the sender's own verified key, because then it is the verified sender
who names the requester.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from agent.jmix.assertion import (
    AssertionResult,
    TrustedKeys,
    read_public_key,
    required_fields,
    verify_assertion,
)
from agent.jmix.directory import verify_attestation


def verify_party(
    manifest: Mapping[str, Any],
    role: str,
    entity: Mapping[str, Any],
    trusted: TrustedKeys,
    directory_keys: Sequence[bytes],
    now: datetime,
    also_trusted: Mapping[bytes, str] | None = None,
) -> AssertionResult:
    """Verify the assertion of the party at ``role`` (``sender``, ``requester``, ``receiver.<i>``).

    ``also_trusted`` maps raw keys to a label for keys trusted besides the pinned ones.
    Raises IdentityError with the code of the first failed rule.
    """
    extra = dict(also_trusted or {})
    assertion = entity.get("assertion")
    entity_id = entity.get("id")

    # A directory attestation matters only for a key that is not pinned and not revoked.
    # Without a directory key configured it is never read.
    if (
        directory_keys
        and isinstance(assertion, dict)
        and isinstance(entity_id, str)
        and "directory_attestation" in assertion
    ):
        raw, actual = read_public_key(role, assertion)
        pinned = trusted.by_entity.get(entity_id, ())
        if raw not in pinned and actual not in trusted.revoked:
            extra[raw] = verify_attestation(
                assertion["directory_attestation"], role, entity_id, raw, directory_keys, now
            )

    return verify_assertion(
        manifest,
        role,
        entity,
        trusted,
        required_fields(manifest, role),
        now=now,
        extra_trust=extra,
    )


def has_assertion(entity: object) -> bool:
    """Return True if ``entity`` is a party object that carries an ``assertion``."""
    return isinstance(entity, dict) and "assertion" in entity
