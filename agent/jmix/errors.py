"""Errors raised by the JMIX format layer.

Every error has a stable ``code`` (snake_case, safe to put in audit records, reason files
and ``--json`` output) and a human message that names what failed and, where there is
one, the next step. Messages never contain key material or patient attributes.
"""

from __future__ import annotations


class JmixError(Exception):
    """Base class of every error this package raises."""

    code = "jmix_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0]) if self.args else self.code


class KeyFormatError(JmixError):
    """A key file or key string is not a usable key of the expected type."""

    code = "key_invalid"


class EnvelopeFormatError(JmixError):
    """The envelope's layout or JSON does not follow any known JMIX dialect."""

    code = "envelope_invalid"


class IdentityError(JmixError):
    """The sender (or another party) could not be verified as a trusted identity."""

    code = "identity_unverified"


class IntegrityError(JmixError):
    """Decryption, the payload hash or a file hash failed: the content was altered."""

    code = "integrity_failed"


class UnsafeArchiveError(JmixError):
    """The payload archive holds a member that must not be extracted, or breaks a limit."""

    code = "unsafe_archive"
