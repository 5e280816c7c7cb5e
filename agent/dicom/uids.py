"""Validation of DICOM UIDs before they are used in file names or envelopes.

A UID arrives from the network or a dropped file, so it is untrusted: it is used as a
path component only after it matches the PS3.5 section 9.1 grammar (digits and dots,
no leading zero in a component, at most 64 characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_UID_LENGTH = 64
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
# Many real archives carry UIDs with a leading zero in a component; they are still safe
# file names, so the lenient pattern accepts them while keeping the character set strict.
_LENIENT_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


class InvalidUIDError(ValueError):
    """A UID is missing, too long, or contains characters other than digits and dots."""


def is_strict_uid(value: str) -> bool:
    """Return True if ``value`` follows the PS3.5 UID grammar exactly."""
    return len(value) <= MAX_UID_LENGTH and _UID_PATTERN.fullmatch(value) is not None


def validate_uid(value: object, what: str) -> str:
    """Return ``value`` as a UID safe to use as a file name, or raise InvalidUIDError.

    Trailing NUL and space padding (allowed by the UI value representation) is stripped.
    """
    if not isinstance(value, str):
        raise InvalidUIDError(f"{what} is missing")
    uid = value.rstrip("\x00 ")
    if not uid:
        raise InvalidUIDError(f"{what} is empty")
    if len(uid) > MAX_UID_LENGTH:
        raise InvalidUIDError(f"{what} is {len(uid)} characters long (maximum {MAX_UID_LENGTH})")
    if _LENIENT_PATTERN.fullmatch(uid) is None:
        raise InvalidUIDError(f"{what} contains characters other than digits and dots")
    return uid


@dataclass(frozen=True)
class InstanceInfo:
    """The identifying attributes of one stored instance (no patient attributes)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
