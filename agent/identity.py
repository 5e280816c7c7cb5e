"""Our own identity: generating, loading and publishing the agent's key pair.

Private key files are checked the way OpenSSH checks its keys: a file readable or
writable by group or others, or owned by another user, is refused with the command that
fixes it, because a leaked signing key lets anyone impersonate this site.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import fsutil
from agent.config import IdentityConfig
from agent.jmix import keys


class KeyFileError(Exception):
    """A private key file is missing, unreadable or has unsafe permissions."""


def check_private_file(path: Path) -> None:
    """Raise KeyFileError unless ``path`` is a regular file private to this user."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise KeyFileError(
            f"private key {path} not found; create it with `jmix-agent keygen`"
        ) from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise KeyFileError(
            f"private key {path} is not a regular file (a symbolic link or a special file); "
            "set the config to the key file itself, owned by this user with mode 0600"
        )
    if info.st_uid != os.geteuid():
        raise KeyFileError(
            f"private key {path} is owned by uid {info.st_uid}, not by this user "
            f"(uid {os.geteuid()}); fix it with: chown {os.geteuid()} {path}"
        )
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"permissions {stat.S_IMODE(info.st_mode):04o} for private key {path} are too open; "
            f"it must not be accessible by group or others. Fix it with: chmod 600 {path}"
        )


@dataclass(frozen=True)
class LocalIdentity:
    """Our loaded keys."""

    id: str
    name: str
    contact: str
    signing_key: Ed25519PrivateKey
    encryption_keys: tuple[X25519PrivateKey, ...]
    """The current encryption key first, then previous ones kept for rotation."""

    def card(self) -> dict[str, Any]:
        """Return the public peer card another site pastes into its ``[[peers]]``."""
        signing = self.signing_key.public_key()
        encryption = self.encryption_keys[0].public_key()
        return {
            "id": self.id,
            "name": self.name,
            "signing_key": keys.public_b64(signing),
            "signing_key_fingerprint": keys.fingerprint(signing),
            "encryption_key": keys.public_b64(encryption),
            "encryption_key_fingerprint": keys.fingerprint(encryption),
        }


def load_identity(config: IdentityConfig) -> LocalIdentity:
    """Load and permission-check every private key named in the identity config."""
    check_private_file(config.signing_key)
    signing = keys.load_signing_private(config.signing_key)
    encryption = []
    for path in (config.encryption_key, *config.previous_encryption_keys):
        check_private_file(path)
        encryption.append(keys.load_encryption_private(path))
    return LocalIdentity(config.id, config.name, config.contact, signing, tuple(encryption))


def generate_keys(signing_path: Path, encryption_path: Path, overwrite: bool = False) -> None:
    """Write a new Ed25519 signing key and X25519 encryption key (PEM, mode 0600)."""
    for path in (signing_path, encryption_path):
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path} already exists; keep it, or pass --force to replace it "
                "(peers must then be given the new identity card)"
            )
    for path, key in (
        (signing_path, keys.generate_signing_key()),
        (encryption_path, keys.generate_encryption_key()),
    ):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fsutil.write_bytes_durably(path, keys.private_pem(key), mode=0o600)


def card_toml(card: dict[str, Any]) -> str:
    """Render a peer card as the ``[[peers]]`` block a remote site pastes into its config."""
    return (
        "[[peers]]\n"
        f"id = {json.dumps(card['id'])}\n"
        f"name = {json.dumps(card['name'])}\n"
        f"# {card['encryption_key_fingerprint']}\n"
        f"encryption_key = {json.dumps(card['encryption_key'])}\n"
        f"# {card['signing_key_fingerprint']}\n"
        f"signing_key = {json.dumps(card['signing_key'])}\n"
    )
