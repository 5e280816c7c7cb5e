"""Sealing: build an encrypted, signed JMIX envelope (a folder or a zip) from payload files.

The payload tar is generated in stream mode straight into the AES-GCM encryptor, so no
plaintext copy of the study is written and memory stays bounded. The envelope folder is
built under a hidden temporary name beside its destination. Once every file is on disk it
is renamed into place, or, for the zip format, packed into a zip that is itself written
under a hidden name and then renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent import fsutil
from agent.jmix.assertion import sign_assertion
from agent.jmix.container import write_zip
from agent.jmix.crypto import StreamEncryptor
from agent.jmix.jws import DEFAULT_JWS_FILE, sign_compact
from agent.jmix.keys import b64encode
from agent.jmix.profiles import SPEC, HashRule, Profile
from agent.jmix.schema import require_valid
from agent.jmix.timeutil import format_timestamp, utc_now

JMIX_VERSION = "1.0"
CHUNK = 1024 * 1024
DEFAULT_ASSERTION_LIFETIME = timedelta(days=30)

# Sender assertion fields: everything that identifies this envelope and its content.
SENDER_SIGNED_FIELDS = (
    "version",
    "id",
    "timestamp",
    "sender.id",
    "sender.name",
    "security.classification",
    "security.payload_hash",
)


@dataclass(frozen=True)
class Party:
    """A sender, receiver or requester as named in the manifest."""

    id: str
    name: str
    contact: str = ""

    def entity(self) -> dict[str, Any]:
        """Return the manifest entity object (``contact`` is always written: jmix-rs needs it)."""
        return {"id": self.id, "name": self.name, "contact": self.contact}


@dataclass(frozen=True)
class Requester:
    """The party on whose behalf an envelope is sent, and the key that signs its assertion."""

    party: Party
    signing_key: Ed25519PrivateKey


@dataclass(frozen=True)
class PayloadFile:
    """One file of the payload: its name inside ``payload/`` and where to read it."""

    arcname: str
    path: Path


@dataclass(frozen=True)
class SealResult:
    """The sealed envelope: its path, id, payload hash, file count and payload size."""

    path: Path
    envelope_id: str
    payload_hash: str
    files: int
    payload_bytes: int


class _HashingReader:
    """Reads a source file for tarfile while hashing it (files.json and the path walk)."""

    def __init__(self, handle: BinaryIO, walk: Any) -> None:
        self._handle = handle
        self._walk = walk
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.digest.update(data)
        self._walk.update(data)
        return data


def _tar_info(name: str, size: int, mtime: int, directory: bool = False) -> tarfile.TarInfo:
    """Return a header with no local user, group or permission details."""
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.mtime = mtime
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _check_arcnames(files: Sequence[PayloadFile]) -> list[PayloadFile]:
    ordered = sorted(files, key=lambda item: item.arcname)
    names = [item.arcname for item in ordered]
    if len(set(names)) != len(names):
        raise ValueError("two payload files have the same name")
    for name in names:
        parts = PurePosixPath(name).parts
        # Payload files sort before files.json and metadata.json, which lets the path
        # walk hash be computed in the same single pass that writes the tar.
        if len(parts) < 2 or parts[0] != "dicom" or ".." in parts or name.startswith("/"):
            raise ValueError(f"payload file name {name!r} must be dicom/<name>")
    return ordered


@dataclass(frozen=True)
class _PayloadDigests:
    """The hex digests each payload_hash rule needs, and the plaintext size."""

    plaintext_tar: str
    encrypted_file: str
    path_walk: str
    size: int


def _write_payload(
    sink: BinaryIO,
    files: Sequence[PayloadFile],
    metadata_bytes: bytes,
    recipient: X25519PublicKey,
    profile: Profile,
    mtime: int,
) -> tuple[_PayloadDigests, dict[str, Any]]:
    """Stream the payload tar into an encryptor; return its digests and encryption block."""
    encryptor = StreamEncryptor(sink, recipient, profile.hkdf_info)
    walk = hashlib.sha256()
    listing: list[dict[str, Any]] = []
    prefix = profile.tar_prefix
    with tarfile.open(fileobj=encryptor, mode="w|", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
        if prefix:
            tar.addfile(_tar_info(prefix.rstrip("/"), 0, mtime, directory=True))
            tar.addfile(_tar_info(prefix + "dicom", 0, mtime, directory=True))
        for item in files:
            with item.path.open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                walk.update(item.arcname.encode("utf-8") + b"\n")
                reader = _HashingReader(handle, walk)
                tar.addfile(_tar_info(prefix + item.arcname, size, mtime), reader)
            listing.append(
                {
                    "file": item.arcname,
                    "hash": "sha256:" + reader.digest.hexdigest(),
                    "size_bytes": size,
                }
            )
        listing.append(
            {
                "file": "metadata.json",
                "hash": "sha256:" + hashlib.sha256(metadata_bytes).hexdigest(),
                "size_bytes": len(metadata_bytes),
            }
        )
        require_valid("files.json", listing)
        files_bytes = _json_bytes(listing)
        for name, data in (("files.json", files_bytes), ("metadata.json", metadata_bytes)):
            walk.update(name.encode("utf-8") + b"\n" + data)
            tar.addfile(_tar_info(prefix + name, len(data), mtime), io.BytesIO(data))
    params = encryptor.finish()
    encryption = {
        "algorithm": "AES-256-GCM",
        "ephemeral_public_key": b64encode(params.ephemeral_public_key),
        "iv": b64encode(params.iv),
        "auth_tag": b64encode(params.auth_tag),
    }
    digests = _PayloadDigests(
        encryptor.plaintext_sha256.hexdigest(),
        encryptor.ciphertext_sha256.hexdigest(),
        walk.hexdigest(),
        encryptor.plaintext_bytes,
    )
    return digests, encryption


def _json_bytes(document: object) -> bytes:
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _payload_hash(profile: Profile, digests: _PayloadDigests) -> str:
    """Return ``sha256:<hex>`` under the profile's hash rule."""
    if profile.hash_rule is HashRule.ENCRYPTED_FILE:
        return "sha256:" + digests.encrypted_file
    if profile.hash_rule is HashRule.PLAINTEXT_TAR:
        return "sha256:" + digests.plaintext_tar
    if profile.hash_rule is HashRule.PATH_WALK:
        return "sha256:" + digests.path_walk
    raise ValueError(f"profile {profile.name} uses a plain-envelope hash rule")


ENVELOPE_FORMATS = ("folder", "zip")


def seal_envelope(
    files: Sequence[PayloadFile],
    metadata: Mapping[str, Any],
    destination: Path,
    sender: Party,
    signing_key: Ed25519PrivateKey,
    receiver: Party,
    recipient_key: X25519PublicKey,
    *,
    profile: Profile = SPEC,
    envelope_id: uuid.UUID | None = None,
    classification: str = "confidential",
    assertion_lifetime: timedelta | None = DEFAULT_ASSERTION_LIFETIME,
    now: datetime | None = None,
    envelope_format: str = "folder",
    jws: bool = False,
    requester: Requester | None = None,
    attestation: Mapping[str, Any] | None = None,
) -> SealResult:
    """Seal ``files`` for one receiver into ``destination/<id><suffix>`` or ``<id>.zip``.

    ``metadata`` contains the metadata.json content besides version, id and timestamp
    (``patient`` is required by the schema, ``studies`` describes the DICOM).
    ``envelope_format`` is ``folder`` or ``zip`` (one file, see :mod:`agent.jmix.container`).
    With ``jws`` the envelope also carries ``manifest.jws``, signed by ``signing_key`` over
    the exact manifest bytes. With ``requester`` the manifest names that party and
    carries its assertion. ``attestation`` is a directory's ``directory_attestation``
    for our signing key, copied into the sender's assertion for receivers in directory
    mode.

    Every JSON document is checked against the spec's rules before anything is
    published. Raises FileExistsError if an envelope with that id is already there,
    ValueError for bad arguments, EnvelopeFormatError (``schema_invalid``) for a
    document that breaks the spec's rules, and OSError for I/O failures; nothing is left
    behind on failure.
    """
    if envelope_format not in ENVELOPE_FORMATS:
        raise ValueError(
            f"unknown envelope format {envelope_format!r}; use one of: "
            f"{', '.join(ENVELOPE_FORMATS)}"
        )
    identifier = str(envelope_id or uuid.uuid4())
    moment = now or utc_now()
    timestamp = format_timestamp(moment)
    ordered = _check_arcnames(files)

    folder_name = f"{identifier}{profile.folder_suffix}"
    final = destination / (f"{identifier}.zip" if envelope_format == "zip" else folder_name)
    if final.exists():
        raise FileExistsError(f"envelope {final} already exists")
    work = destination / f"{fsutil.TEMP_PREFIX}{folder_name}"
    fsutil.remove_tree(work)
    work.mkdir(mode=0o700, parents=True)
    try:
        # 1. The encrypted payload: metadata, file list and DICOM in one streamed tar.
        metadata_document = {"version": JMIX_VERSION, "id": identifier, "timestamp": timestamp}
        metadata_document.update(metadata)
        require_valid("metadata.json", metadata_document)
        with fsutil.atomic_writer(work / profile.encrypted_file) as sink:
            digests, encryption = _write_payload(
                sink,
                ordered,
                _json_bytes(metadata_document),
                recipient_key,
                profile,
                int(moment.timestamp()),
            )

        # 2. The manifest, signed by the sender (and the requester) over what identifies it.
        manifest: dict[str, Any] = {
            "version": JMIX_VERSION,
            "id": identifier,
            "timestamp": timestamp,
            "sender": sender.entity(),
            "receiver": [receiver.entity()],
            "security": {
                "classification": classification,
                "payload_hash": _payload_hash(profile, digests),
                "encryption": encryption,
            },
        }
        if requester is not None:
            manifest["requester"] = requester.party.entity()
        if jws:
            # The reference goes in before the manifest is serialised, because the JWS
            # signs the final manifest bytes, reference included.
            manifest["security"]["jws"] = {"jws_file": DEFAULT_JWS_FILE}
        expires = format_timestamp(moment + assertion_lifetime) if assertion_lifetime else None
        _sign_parties(manifest, signing_key, requester, expires)
        if attestation is not None:
            manifest["sender"]["assertion"]["directory_attestation"] = dict(attestation)
        manifest_bytes = _json_bytes(manifest)
        require_valid("manifest.json", manifest)
        fsutil.write_bytes_durably(work / "manifest.json", manifest_bytes)
        if jws:
            token = sign_compact(manifest_bytes, signing_key)
            fsutil.write_bytes_durably(work / DEFAULT_JWS_FILE, token.encode("ascii"))

        # 3. The transit audit trail starts with its creation.
        audit = {
            "audit": [
                {
                    "event": "created",
                    "by": {"id": sender.id, "name": sender.name},
                    "timestamp": timestamp,
                }
            ]
        }
        require_valid("audit.json", audit)
        fsutil.write_bytes_durably(work / "audit.json", _json_bytes(audit))

        # 4. Publish: one rename of the folder, or one zip written beside it.
        fsutil.fsync_dir(work)
        if envelope_format == "zip":
            write_zip(work, final, moment)
            fsutil.remove_tree(work)
        else:
            fsutil.rename_durably(work, final)
    except BaseException:
        fsutil.remove_tree(work)
        raise
    return SealResult(
        final, identifier, manifest["security"]["payload_hash"], len(ordered), digests.size
    )


def _sign_parties(
    manifest: dict[str, Any],
    signing_key: Ed25519PrivateKey,
    requester: Requester | None,
    expires: str | None,
) -> None:
    """Add the sender's assertion, and the requester's when there is one."""
    bound = ["receiver.0.id", "receiver.0.name", "security.encryption"]
    if requester is not None:
        requester_fields = [
            "version",
            "id",
            "timestamp",
            "sender.id",
            "requester.id",
            "requester.name",
            "security.payload_hash",
            *bound,
        ]
        manifest["requester"]["assertion"] = sign_assertion(
            manifest, requester.signing_key, requester_fields, expires
        )
        bound.append("requester.id")
    signed = [*SENDER_SIGNED_FIELDS, *bound]
    manifest["sender"]["assertion"] = sign_assertion(manifest, signing_key, signed, expires)
