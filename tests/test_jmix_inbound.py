"""The daemon's inbound policy for the envelope features: plain envelopes, zip, JWS, directory.

Each test builds a real config with ``parse_config``, a spool and an audit log in a
temporary folder, puts an envelope into the inbox and runs ``InboundPipeline.process``.
The outbound side is exercised through ``OutboundPipeline._seal_for_peer`` so that a
peer's ``envelope_format``, ``jws`` and our ``requester_id`` reach the sealer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from jmixkit import bundled_ct_study

from agent.audit import AuditLog
from agent.config import Config, ConfigError, parse_config
from agent.dicom.inspect import build_metadata
from agent.identity import LocalIdentity
from agent.jmix.assertion import sign_assertion
from agent.jmix.directory import issue_attestation
from agent.jmix.hashing import line_list_hash
from agent.jmix.reader import open_envelope
from agent.jmix.seal import SENDER_SIGNED_FIELDS, Party, PayloadFile, seal_envelope
from agent.jmix.timeutil import format_timestamp, utc_now
from agent.pipeline.inbound import InboundPipeline, InboundResult
from agent.pipeline.outbound import Batch, OutboundPipeline
from agent.pipeline.spool import Spool

SITE_A = Party("org:test.site-a", "Site A", "pacs@site-a.test")
SITE_B = Party("org:test.site-b", "Site B", "pacs@site-b.test")
SITE_C = Party("org:test.site-c", "Site C", "pacs@site-c.test")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def ct_study() -> list[Path]:
    return bundled_ct_study(2)


@dataclass
class Keys:
    signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    encryption: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)

    @property
    def signing_public(self) -> str:
        return b64(self.signing.public_key().public_bytes_raw())

    @property
    def encryption_public(self) -> str:
        return b64(self.encryption.public_key().public_bytes_raw())


@dataclass
class Receiver:
    """Site B's inbound pipeline, configured with peers A and C."""

    root: Path
    config: Config
    pipeline: InboundPipeline

    def deliver(self, envelope: Path) -> Path:
        target = self.config.inbound.inbox / envelope.name
        if envelope.is_dir():
            shutil.copytree(envelope, target)
        else:
            shutil.copyfile(envelope, target)
        return target

    def process(self, envelope: Path) -> InboundResult:
        return self.pipeline.process(self.deliver(envelope))

    def imported(self, envelope_id: str) -> list[str]:
        folder = self.config.inbound.import_dir / envelope_id / "dicom"
        if not folder.is_dir():
            return []
        return sorted(hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir())

    def quarantined(self) -> list[dict[str, Any]]:
        return [
            json.loads(path.read_bytes())
            for path in sorted(self.config.inbound.quarantine_dir.glob("*/reason.json"))
        ]


def config_text(root: Path, a: Keys, c: Keys, directory: str | None, **peer_a: Any) -> str:
    settings = "".join(f"{key} = {json.dumps(value)}\n" for key, value in peer_a.items())
    directory_line = f'directory_public_key = "{directory}"\n' if directory else ""
    return f"""\
[agent]
state_dir = "{root / "state"}"

[identity]
id = "{SITE_B.id}"
name = "{SITE_B.name}"

[[peers]]
id = "{SITE_A.id}"
name = "{SITE_A.name}"
encryption_key = "{a.encryption_public}"
signing_key = "{a.signing_public}"
{settings}
[[peers]]
id = "{SITE_C.id}"
name = "{SITE_C.name}"
encryption_key = "{c.encryption_public}"
signing_key = "{c.signing_public}"

[inbound]
inbox = "{root / "inbox"}"
import_dir = "{root / "import"}"
quarantine_dir = "{root / "quarantine"}"
settle_seconds = 0
{directory_line}"""


def make_receiver(
    root: Path, b: Keys, a: Keys, c: Keys, directory: str | None = None, **peer_a: Any
) -> Receiver:
    root.mkdir(parents=True, exist_ok=True)
    text = config_text(root, a, c, directory, **peer_a)
    config = parse_config(text, root / "agent.toml")
    identity = LocalIdentity(SITE_B.id, SITE_B.name, "", b.signing, (b.encryption,))
    spool = Spool(config.state_dir)
    pipeline = InboundPipeline(config, spool, identity, AuditLog(root / "audit.jsonl"))
    return Receiver(root, config, pipeline)


@pytest.fixture
def keys() -> dict[str, Keys]:
    return {"a": Keys(), "b": Keys(), "c": Keys()}


def source_hashes() -> list[str]:
    return sorted(hashlib.sha256(path.read_bytes()).hexdigest() for path in ct_study())


# -- plain envelopes -----------------------------------------------------------------------------


def plain_envelope(
    destination: Path,
    signer: Ed25519PrivateKey,
    sender: Party = SITE_A,
    with_hash: bool = True,
) -> tuple[Path, str]:
    """Write an unencrypted, signed envelope the way jmix-php lays one out."""
    identifier = str(uuid.uuid4())
    folder = destination / f"{identifier}.JMIX"
    payload = folder / "payload"
    (payload / "dicom").mkdir(parents=True)
    sources = ct_study()
    for source in sources:
        shutil.copyfile(source, payload / "dicom" / f"{source.name}.dcm")
    timestamp = format_timestamp(utc_now())
    metadata = {"version": "1.0", "id": identifier, "timestamp": timestamp}
    metadata.update(build_metadata(sources))
    (payload / "metadata.json").write_text(json.dumps(metadata))

    security: dict[str, Any] = {"classification": "confidential"}
    if with_hash:
        security["payload_hash"] = "sha256:" + line_list_hash(payload)
    manifest: dict[str, Any] = {
        "version": "1.0",
        "id": identifier,
        "timestamp": timestamp,
        "sender": sender.entity(),
        "receiver": [SITE_B.entity()],
        "security": security,
    }
    fields = [name for name in SENDER_SIGNED_FIELDS if with_hash or "payload_hash" not in name]
    expires = format_timestamp(utc_now() + timedelta(days=1))
    manifest["sender"]["assertion"] = sign_assertion(
        manifest, signer, [*fields, "receiver.0.id"], expires
    )
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder, identifier


def test_plain_rejected_by_default(tmp_path: Path, keys: dict[str, Keys]) -> None:
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"])
    envelope, identifier = plain_envelope(tmp_path / "a", keys["a"].signing)

    result = receiver.process(envelope)

    assert result.outcome == "rejected"
    assert result.reason == "plain_not_allowed"
    assert receiver.imported(identifier) == []
    assert [reason["code"] for reason in receiver.quarantined()] == ["plain_not_allowed"]


def test_plain_accepted_when_allowed(tmp_path: Path, keys: dict[str, Keys]) -> None:
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"], allow_plain=True)
    envelope, identifier = plain_envelope(tmp_path / "a", keys["a"].signing)

    result = receiver.process(envelope)

    assert result.outcome == "imported", receiver.quarantined()
    assert receiver.imported(identifier) == source_hashes()


def test_plain_from_other_peer_rejected(tmp_path: Path, keys: dict[str, Keys]) -> None:
    """Site A allows plain envelopes; a verified envelope from site C still may not be plain."""
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"], allow_plain=True)
    envelope, _identifier = plain_envelope(tmp_path / "c", keys["c"].signing, SITE_C)

    result = receiver.process(envelope)

    assert result.outcome == "rejected"
    assert result.reason == "plain_not_allowed"


def test_plain_claiming_allowed_peer_rejected(tmp_path: Path, keys: dict[str, Keys]) -> None:
    """Naming site A is not enough: the sender id must be verified with A's pinned key."""
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"], allow_plain=True)
    envelope, _identifier = plain_envelope(tmp_path / "c", keys["c"].signing, SITE_A)

    result = receiver.process(envelope)

    assert result.outcome == "rejected"
    assert result.reason == "key_not_pinned"


def test_plain_without_hash_rejected(tmp_path: Path, keys: dict[str, Keys]) -> None:
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"], allow_plain=True)
    envelope, _identifier = plain_envelope(tmp_path / "a", keys["a"].signing, with_hash=False)

    result = receiver.process(envelope)

    assert result.outcome == "rejected"
    assert result.reason == "payload_hash_missing"


# -- sealed by our own outbound pipeline ----------------------------------------------------------


def sender_pipeline(
    root: Path, a: Keys, b: Keys, requester: bool = False, **peer_b: Any
) -> OutboundPipeline:
    """Return site A's outbound pipeline with site B as its only peer."""
    settings = "".join(f"{key} = {json.dumps(value)}\n" for key, value in peer_b.items())
    requester_lines = 'requester_id = "org:test.site-a.radiology"\n' if requester else ""
    text = f"""\
[agent]
state_dir = "{root / "state"}"

[identity]
id = "{SITE_A.id}"
name = "{SITE_A.name}"
{requester_lines}
[[peers]]
id = "{SITE_B.id}"
name = "{SITE_B.name}"
encryption_key = "{b.encryption_public}"
signing_key = "{b.signing_public}"
{settings}"""
    root.mkdir(parents=True, exist_ok=True)
    config = parse_config(text, root / "agent.toml")
    identity = LocalIdentity(SITE_A.id, SITE_A.name, "", a.signing, (a.encryption,))
    return OutboundPipeline(
        config, Spool(config.state_dir), identity, AuditLog(root / "audit.jsonl")
    )


def seal_via_outbound(outbound: OutboundPipeline) -> Path:
    sources = ct_study()
    batch_dir = outbound.spool.path("ready") / "batch-1"
    batch_dir.mkdir(parents=True)
    batch = Batch(batch_dir, str(uuid.uuid4()), "1.2.3", ())
    files = [PayloadFile(f"dicom/{path.name}.dcm", path) for path in sources]
    peer = outbound.config.peers[0]
    assert outbound._seal_for_peer(batch, peer, files, build_metadata(sources))
    (envelope,) = (outbound.spool.path("outbox") / "org_test.site-b").iterdir()
    return envelope


def test_outbound_zip_imported(tmp_path: Path, keys: dict[str, Keys]) -> None:
    outbound = sender_pipeline(tmp_path / "a", keys["a"], keys["b"], envelope_format="zip")
    envelope = seal_via_outbound(outbound)
    assert envelope.suffix == ".zip"
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"])

    result = receiver.process(envelope)

    assert result.outcome == "imported", receiver.quarantined()
    assert result.envelope_id is not None
    assert receiver.imported(result.envelope_id) == source_hashes()


def test_zip_second_delivery_duplicate(tmp_path: Path, keys: dict[str, Keys]) -> None:
    outbound = sender_pipeline(tmp_path / "a", keys["a"], keys["b"], envelope_format="zip")
    envelope = seal_via_outbound(outbound)
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"])

    assert receiver.process(envelope).outcome == "imported"
    assert receiver.process(envelope).outcome == "duplicate"


def test_zip_reused_id_replay(tmp_path: Path, keys: dict[str, Keys]) -> None:
    """A second, different zip with an imported envelope id is a replay, not a duplicate."""
    sources = ct_study()
    identifier = uuid.uuid4()
    zips = []
    for index in range(2):
        out = tmp_path / f"out-{index}"
        out.mkdir()
        sealed = seal_envelope(
            [PayloadFile(f"dicom/{path.name}.dcm", path) for path in sources],
            build_metadata(sources),
            out,
            SITE_A,
            keys["a"].signing,
            SITE_B,
            keys["b"].encryption.public_key(),
            envelope_id=identifier,
            envelope_format="zip",
        )
        zips.append(sealed.path)
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"])

    assert receiver.process(zips[0]).outcome == "imported"
    second = receiver.process(zips[1])
    assert second.outcome == "rejected"
    assert second.reason == "replay"


def test_hostile_zip_quarantined(tmp_path: Path, keys: dict[str, Keys]) -> None:
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"])
    container = tmp_path / f"{uuid.uuid4()}.zip"
    with zipfile.ZipFile(container, "w") as bundle:
        bundle.writestr("../../escaped.txt", b"x")

    result = receiver.process(container)

    assert result.outcome == "rejected"
    assert result.reason == "unsafe_path"
    assert not (tmp_path / "escaped.txt").exists()
    assert not (receiver.root / "escaped.txt").exists()


def test_required_jws_missing_rejected(tmp_path: Path, keys: dict[str, Keys]) -> None:
    outbound = sender_pipeline(tmp_path / "a", keys["a"], keys["b"])
    envelope = seal_via_outbound(outbound)
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"], require_jws=True)

    result = receiver.process(envelope)

    assert result.outcome == "rejected"
    assert result.reason == "jws_missing"


def test_required_jws_present_imported(tmp_path: Path, keys: dict[str, Keys]) -> None:
    outbound = sender_pipeline(tmp_path / "a", keys["a"], keys["b"], jws=True)
    envelope = seal_via_outbound(outbound)
    assert (envelope / "manifest.jws").is_file()
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"], require_jws=True)

    assert receiver.process(envelope).outcome == "imported", receiver.quarantined()


def test_tampered_jws_rejected(tmp_path: Path, keys: dict[str, Keys]) -> None:
    outbound = sender_pipeline(tmp_path / "a", keys["a"], keys["b"], jws=True)
    envelope = seal_via_outbound(outbound)
    manifest_path = envelope / "manifest.json"
    manifest = json.loads(manifest_path.read_bytes())
    manifest["extensions"] = {"custom_tags": ["inserted"]}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"])

    result = receiver.process(envelope)

    assert result.outcome == "rejected"
    assert result.reason == "jws_payload_mismatch"


def test_requester_assertion_verified(tmp_path: Path, keys: dict[str, Keys]) -> None:
    outbound = sender_pipeline(tmp_path / "a", keys["a"], keys["b"], requester=True)
    envelope = seal_via_outbound(outbound)
    manifest = json.loads((envelope / "manifest.json").read_bytes())
    assert manifest["requester"]["id"] == "org:test.site-a.radiology"
    assert "requester.id" in manifest["sender"]["assertion"]["signed_fields"]
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"])
    work = tmp_path / "work"
    work.mkdir()

    opened = open_envelope(envelope, receiver.pipeline.policy(), work)

    assert [(party.role, party.trusted_by) for party in opened.parties] == [
        ("requester", "signed with the sender's key")
    ]
    assert receiver.process(envelope).outcome == "imported"


def test_requester_assertion_tampered_rejected(tmp_path: Path, keys: dict[str, Keys]) -> None:
    outbound = sender_pipeline(tmp_path / "a", keys["a"], keys["b"], requester=True)
    envelope = seal_via_outbound(outbound)
    path = envelope / "manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest["requester"]["name"] = "Someone Else"
    path.write_text(json.dumps(manifest, indent=2))
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"])

    result = receiver.process(envelope)

    assert result.outcome == "rejected"
    assert result.reason == "signature_invalid"
    (reason,) = receiver.quarantined()
    assert reason["checks"][-1]["name"] == "requester"


# -- directory mode --------------------------------------------------------------------------------


def seal_unlisted(tmp_path: Path, b: Keys, directory: Ed25519PrivateKey) -> Path:
    """Seal from a clinic that is in no [[peers]] entry, with a directory attestation."""
    stranger = Party("org:test.unlisted", "Unlisted")
    signing = Ed25519PrivateKey.generate()
    attestation = issue_attestation(
        directory,
        "test-directory",
        stranger.id,
        signing.public_key().public_bytes_raw(),
        utc_now() - timedelta(hours=1),
        utc_now() + timedelta(days=1),
    )
    sources = ct_study()
    out = tmp_path / "unlisted"
    out.mkdir()
    return seal_envelope(
        [PayloadFile(f"dicom/{path.name}.dcm", path) for path in sources],
        build_metadata(sources),
        out,
        stranger,
        signing,
        SITE_B,
        b.encryption.public_key(),
        attestation=attestation,
    ).path


def test_directory_sender_imported(tmp_path: Path, keys: dict[str, Keys]) -> None:
    directory = Ed25519PrivateKey.generate()
    envelope = seal_unlisted(tmp_path, keys["b"], directory)
    directory_public = b64(directory.public_key().public_bytes_raw())
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"], directory_public)

    result = receiver.process(envelope)

    assert result.outcome == "imported", receiver.quarantined()


def test_directory_not_configured_rejected(tmp_path: Path, keys: dict[str, Keys]) -> None:
    envelope = seal_unlisted(tmp_path, keys["b"], Ed25519PrivateKey.generate())
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"])

    result = receiver.process(envelope)

    assert result.outcome == "rejected"
    assert result.reason == "key_not_pinned"


def test_other_directory_rejected(tmp_path: Path, keys: dict[str, Keys]) -> None:
    envelope = seal_unlisted(tmp_path, keys["b"], Ed25519PrivateKey.generate())
    pinned = b64(Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"], pinned)

    result = receiver.process(envelope)

    assert result.outcome == "rejected"
    assert result.reason == "attestation_untrusted"


# -- config keys ----------------------------------------------------------------------------------


def test_config_peer_keys_parsed(tmp_path: Path, keys: dict[str, Keys]) -> None:
    text = config_text(
        tmp_path, keys["a"], keys["c"], None, envelope_format="zip", jws=True, require_jws=True
    )
    peer = parse_config(text, tmp_path / "agent.toml").peers[0]
    assert (peer.envelope_format, peer.jws, peer.require_jws) == ("zip", True, True)
    other = parse_config(text, tmp_path / "agent.toml").peers[1]
    assert (other.envelope_format, other.jws, other.require_jws) == ("folder", False, False)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"envelope_format": "tar"}, "peers[1].envelope_format: must be one of folder, zip"),
        ({"jws": "yes"}, "peers[1].jws: must be true or false"),
        ({"require_jws": 1}, "peers[1].require_jws: must be true or false"),
    ],
)
def test_config_peer_key_errors(
    tmp_path: Path, keys: dict[str, Keys], setting: dict[str, Any], message: str
) -> None:
    text = config_text(tmp_path, keys["a"], keys["c"], None, **setting)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(text, tmp_path / "agent.toml")


def test_config_directory_key(tmp_path: Path, keys: dict[str, Keys]) -> None:
    directory = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    text = config_text(tmp_path, keys["a"], keys["c"], b64(directory))
    assert parse_config(text, tmp_path / "agent.toml").inbound.directory_public_key == directory


def test_config_directory_key_invalid(tmp_path: Path, keys: dict[str, Keys]) -> None:
    text = config_text(tmp_path, keys["a"], keys["c"], "AAAA")
    with pytest.raises(ConfigError, match=r"inbound\.directory_public_key: is not a valid Ed25519"):
        parse_config(text, tmp_path / "agent.toml")


def test_config_requester(tmp_path: Path, keys: dict[str, Keys]) -> None:
    outbound = sender_pipeline(tmp_path, keys["a"], keys["b"], requester=True)
    assert outbound.config.identity.requester_id == "org:test.site-a.radiology"
    assert outbound.config.identity.requester_name == ""


def test_patient_named_entry_only_labelled(tmp_path: Path, keys: dict[str, Keys]) -> None:
    receiver = make_receiver(tmp_path / "b", keys["b"], keys["a"], keys["c"])
    container = tmp_path / "DOE_JANE_scan.zip"
    with zipfile.ZipFile(container, "w") as bundle:
        bundle.writestr("DOE_JANE/../../escaped.txt", b"x")

    result = receiver.process(container)

    assert result.reason == "unsafe_path"
    folders = [path.name for path in receiver.config.inbound.quarantine_dir.iterdir()]
    assert len(folders) == 1
    assert "DOE_JANE" not in folders[0]
    audit_text = (receiver.root / "audit.jsonl").read_text()
    assert "envelope_rejected" in audit_text
    assert "DOE_JANE" not in audit_text
    reason = receiver.quarantined()[0]
    assert reason["inbox_name"] == "DOE_JANE_scan.zip"
    assert "DOE_JANE" in reason["reason"]
