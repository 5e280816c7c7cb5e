"""Payload encryption: ephemeral X25519, HKDF-SHA256, streaming AES-256-GCM.

The 16-byte GCM tag is stored only in the manifest; the encrypted file contains the bare
ciphertext, as every JMIX library writes it. Both directions stream in chunks so memory
stays bounded whatever the payload size. Decryption writes plaintext only to a private
file chosen by the caller and reports success only after the tag verified, so callers
must not read that file unless :meth:`StreamDecryptor.finish` returned.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.jmix.errors import IntegrityError
from agent.jmix.keys import raw_public

KEY_LENGTH = 32
IV_LENGTH = 12
TAG_LENGTH = 16
CHUNK = 1024 * 1024


def derive_key(shared_secret: bytes, info: bytes) -> bytes:
    """Derive the AES key: HKDF-SHA256, empty salt, 32-byte output."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LENGTH, salt=None, info=info).derive(
        shared_secret
    )


@dataclass(frozen=True)
class EncryptionParams:
    """The values the manifest's encryption block records, as raw bytes."""

    ephemeral_public_key: bytes
    iv: bytes
    auth_tag: bytes


class StreamEncryptor:
    """A write-only file object that encrypts into ``sink`` and hashes both sides.

    ``tarfile`` writes the plaintext tar into it in stream mode; nothing but ciphertext
    reaches ``sink``.
    """

    def __init__(self, sink: BinaryIO, recipient: X25519PublicKey, info: bytes) -> None:
        ephemeral = X25519PrivateKey.generate()
        self._ephemeral_public = raw_public(ephemeral.public_key())
        key = derive_key(ephemeral.exchange(recipient), info)
        self._iv = os.urandom(IV_LENGTH)
        self._context: CipherContext = Cipher(algorithms.AES(key), modes.GCM(self._iv)).encryptor()
        self._sink = sink
        self.plaintext_sha256 = hashlib.sha256()
        self.ciphertext_sha256 = hashlib.sha256()
        self.plaintext_bytes = 0
        self._tag: bytes | None = None

    def write(self, data: bytes) -> int:
        """Encrypt ``data`` and write the ciphertext; return ``len(data)``."""
        self.plaintext_sha256.update(data)
        self.plaintext_bytes += len(data)
        encrypted = self._context.update(data)
        self.ciphertext_sha256.update(encrypted)
        self._sink.write(encrypted)
        return len(data)

    def finish(self) -> EncryptionParams:
        """Finalise GCM and return the parameters for the manifest."""
        tail = self._context.finalize()
        self.ciphertext_sha256.update(tail)
        self._sink.write(tail)
        tag = self._context.tag  # type: ignore[attr-defined]
        return EncryptionParams(self._ephemeral_public, self._iv, bytes(tag))


@dataclass(frozen=True)
class DecryptResult:
    """The verified outcome of one decryption."""

    info: bytes
    plaintext_sha256: str
    plaintext_bytes: int
    ciphertext_sha256: str


def decrypt_stream(
    source: BinaryIO,
    sink: BinaryIO,
    recipient: X25519PrivateKey,
    params: EncryptionParams,
    info: bytes,
    max_plaintext_bytes: int | None = None,
) -> DecryptResult:
    """Decrypt ``source`` into ``sink``; raise IntegrityError unless the tag verifies.

    On failure the caller must discard everything written to ``sink``.
    """
    peer = X25519PublicKey.from_public_bytes(params.ephemeral_public_key)
    key = derive_key(recipient.exchange(peer), info)
    context = Cipher(algorithms.AES(key), modes.GCM(params.iv, params.auth_tag)).decryptor()
    digest = hashlib.sha256()
    ciphertext_digest = hashlib.sha256()
    total = 0
    while chunk := source.read(CHUNK):
        ciphertext_digest.update(chunk)
        plain = context.update(chunk)
        total += len(plain)
        if max_plaintext_bytes is not None and total > max_plaintext_bytes:
            raise IntegrityError(
                f"decrypted payload exceeds the limit of {max_plaintext_bytes} bytes",
                code="payload_too_large",
            )
        digest.update(plain)
        sink.write(plain)
    try:
        tail = context.finalize()
    except InvalidTag as exc:
        raise IntegrityError(
            "payload authentication failed (AES-GCM tag mismatch): the envelope was "
            "altered, or it was not sealed to this key",
            code="decrypt_failed",
        ) from exc
    digest.update(tail)
    sink.write(tail)
    return DecryptResult(info, digest.hexdigest(), total + len(tail), ciphertext_digest.hexdigest())
