"""Wire dialects: what each JMIX library writes, and what our writer produces per peer.

The public libraries disagree on the folder suffix, the encrypted file's name, the tar
prefix, the HKDF info string and the payload-hash rule. The reader accepts all of them;
the writer uses :data:`SPEC` unless a peer's config names another profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class HashRule(StrEnum):
    """The four payload_hash rules in use."""

    ENCRYPTED_FILE = "sha256-of-encrypted-file"  # spec and jmix-php, encrypted
    PLAINTEXT_TAR = "sha256-of-plaintext-tar"  # jmix-rs, encrypted
    PATH_WALK = "path-newline-bytes-walk"  # jmix-rs plain, jmix-js plain and encrypted
    LINE_LIST = "dir-file-line-list"  # spec and jmix-php, plain


HKDF_INFO_SPEC = b"JMIX-payload-encryption"  # spec profile and jmix-php
HKDF_INFO_JS = b"JMIX-Payload-Encryption"
HKDF_INFO_RS = b"JMIX-AES256-GCM"


@dataclass(frozen=True)
class Profile:
    """How one dialect lays out an encrypted envelope."""

    name: str
    folder_suffix: str
    encrypted_file: str
    tar_prefix: str
    hkdf_info: bytes
    hash_rule: HashRule


SPEC = Profile("spec", ".JMIX", "payload.encrypted", "", HKDF_INFO_SPEC, HashRule.ENCRYPTED_FILE)
JMIX_RS = Profile("jmix-rs", ".jmix", "payload.enc", "", HKDF_INFO_RS, HashRule.PLAINTEXT_TAR)
JMIX_JS = Profile(
    "jmix-js", ".JMIX", "payload.encrypted", "payload/", HKDF_INFO_JS, HashRule.PATH_WALK
)

PROFILES = {profile.name: profile for profile in (SPEC, JMIX_RS, JMIX_JS)}

# Order in which the reader tries HKDF info strings; GCM authentication picks the right one.
HKDF_INFOS = {
    HKDF_INFO_SPEC: "spec/jmix-php",
    HKDF_INFO_JS: "jmix-js",
    HKDF_INFO_RS: "jmix-rs",
}


def get_profile(name: str) -> Profile:
    """Return the profile called ``name`` or raise ValueError listing the valid names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown envelope profile {name!r}; use one of: {', '.join(PROFILES)}"
        ) from None
