"""Key generation, encoding, loading and fingerprints for JMIX identities.

Two long-term keys make an identity: an Ed25519 signing key (assertions, JWS) and an
X25519 encryption key (the recipient side of the ephemeral key agreement). Private keys
are stored as PKCS#8 PEM; public keys travel as base64 of the raw 32 bytes, as every
JMIX library writes them. Loaders also take raw 32-byte files and base64 text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.jmix.errors import KeyFormatError

RAW_KEY_LENGTH = 32
MAX_KEY_FILE_BYTES = 16 * 1024

PrivateKey = Ed25519PrivateKey | X25519PrivateKey
PublicKey = Ed25519PublicKey | X25519PublicKey
_Key = TypeVar("_Key", Ed25519PrivateKey, X25519PrivateKey, Ed25519PublicKey, X25519PublicKey)


def b64encode(data: bytes) -> str:
    """Return standard base64 with padding, the form JMIX manifests use."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    """Decode standard (or URL-safe) base64, raising KeyFormatError naming ``what``."""
    cleaned = "".join(text.split())
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError(f"{what} is not valid base64") from exc


def raw_public(key: PublicKey) -> bytes:
    """Return the raw 32 bytes of a public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_b64(key: PublicKey) -> str:
    """Return a public key as base64 of its raw bytes."""
    return b64encode(raw_public(key))


def fingerprint(key: PublicKey | bytes) -> str:
    """Return ``SHA256:<lower-case hex>`` of the raw public key bytes."""
    raw = key if isinstance(key, bytes) else raw_public(key)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()


def normalise_fingerprint(value: str) -> str:
    """Return a fingerprint in canonical form (upper-case prefix, lower-case hex)."""
    prefix, _, digest = value.strip().partition(":")
    if prefix.upper() != "SHA256" or not digest:
        raise KeyFormatError(f"fingerprint {value!r} is not of the form SHA256:<hex>")
    try:
        bytes.fromhex(digest)
    except ValueError as exc:
        raise KeyFormatError(f"fingerprint {value!r} is not of the form SHA256:<hex>") from exc
    return "SHA256:" + digest.lower()


def private_pem(key: PrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _from_raw(raw: bytes, kind: type[_Key], what: str) -> _Key:
    if len(raw) != RAW_KEY_LENGTH:
        raise KeyFormatError(f"{what} has {len(raw)} bytes; a raw key has {RAW_KEY_LENGTH}")
    loader = {
        Ed25519PrivateKey: Ed25519PrivateKey.from_private_bytes,
        X25519PrivateKey: X25519PrivateKey.from_private_bytes,
        Ed25519PublicKey: Ed25519PublicKey.from_public_bytes,
        X25519PublicKey: X25519PublicKey.from_public_bytes,
    }[kind]
    key = loader(raw)
    if not isinstance(key, kind):
        raise KeyFormatError(f"{what} is not a {kind.__name__}")
    return key


def _from_pem(data: bytes, kind: type[_Key], what: str) -> _Key:
    try:
        if kind in (Ed25519PrivateKey, X25519PrivateKey):
            key: object = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(f"{what} is not a readable PEM key: {exc}") from exc
    if not isinstance(key, kind):
        raise KeyFormatError(
            f"{what} contains a {type(key).__name__.removeprefix('_')}, expected {kind.__name__}"
        )
    return key


def parse_key(data: bytes | str, kind: type[_Key], what: str) -> _Key:
    """Parse a key given as PEM, raw 32 bytes or base64 text of the raw bytes."""
    blob = data.encode() if isinstance(data, str) else data
    if b"-----BEGIN" in blob:
        return _from_pem(blob, kind, what)
    if len(blob) == RAW_KEY_LENGTH:
        return _from_raw(blob, kind, what)
    try:
        text = blob.decode("ascii")
    except UnicodeDecodeError as exc:
        raise KeyFormatError(f"{what} is neither PEM, raw 32 bytes nor base64") from exc
    return _from_raw(b64decode(text, what), kind, what)


def load_key(source: str | Path, kind: type[_Key], what: str) -> _Key:
    """Load a key from a file path, or from base64 text when ``source`` is not a file."""
    path = Path(source)
    try:
        is_file = path.is_file()
    except OSError:
        is_file = False
    if is_file:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise KeyFormatError(f"{what} file {path} is too large to be a key")
        return parse_key(path.read_bytes(), kind, f"{what} file {path}")
    if isinstance(source, Path):
        raise KeyFormatError(f"{what} file {source} not found")
    try:
        return parse_key(source, kind, what)
    except KeyFormatError:
        # The value is not echoed: it may be a private key with a typo in it.
        raise KeyFormatError(
            f"{what} is neither an existing key file nor a base64-encoded raw key"
        ) from None


def load_signing_private(source: str | Path, what: str = "signing key") -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM, raw or base64; file path or text)."""
    return load_key(source, _ED25519_PRIVATE, what)


def load_encryption_private(source: str | Path, what: str = "encryption key") -> X25519PrivateKey:
    """Load an X25519 private key (PEM, raw or base64; file path or text)."""
    return load_key(source, _X25519_PRIVATE, what)


def load_signing_public(source: str | Path, what: str = "signing public key") -> Ed25519PublicKey:
    """Load an Ed25519 public key (PEM, raw or base64; file path or text)."""
    return load_key(source, _ED25519_PUBLIC, what)


def load_encryption_public(
    source: str | Path, what: str = "encryption public key"
) -> X25519PublicKey:
    """Load an X25519 public key (PEM, raw or base64; file path or text)."""
    return load_key(source, _X25519_PUBLIC, what)


# The key classes are abstract, which mypy refuses as type[...] arguments at call sites;
# binding them once here keeps the generic loaders typed.
_ED25519_PRIVATE: type[Ed25519PrivateKey] = Ed25519PrivateKey  # type: ignore[type-abstract]
_X25519_PRIVATE: type[X25519PrivateKey] = X25519PrivateKey  # type: ignore[type-abstract]
_ED25519_PUBLIC: type[Ed25519PublicKey] = Ed25519PublicKey  # type: ignore[type-abstract]
_X25519_PUBLIC: type[X25519PublicKey] = X25519PublicKey  # type: ignore[type-abstract]


def generate_signing_key() -> Ed25519PrivateKey:
    """Return a new Ed25519 signing key."""
    return Ed25519PrivateKey.generate()


def generate_encryption_key() -> X25519PrivateKey:
    """Return a new X25519 encryption key."""
    return X25519PrivateKey.generate()
