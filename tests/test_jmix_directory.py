"""Directory mode: a pinned directory key vouches for senders that are not configured peers.

Every test makes a throwaway directory key. The sender is never pinned, so the directory
attestation is the only way its envelope can be accepted.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from jmixkit import bundled_ct_study

from agent.dicom.inspect import build_metadata
from agent.jmix.assertion import TrustedKeys
from agent.jmix.directory import ATTESTATION_TYPE, issue_attestation, verify_attestation
from agent.jmix.errors import IdentityError
from agent.jmix.jws import b64url_encode, sign_compact
from agent.jmix.reader import EnvelopeRejected, OpenedEnvelope, OpenPolicy, open_envelope
from agent.jmix.seal import Party, PayloadFile, Requester, seal_envelope

SENDER = Party("org:test.unlisted-clinic", "Unlisted Clinic", "pacs@unlisted.test")
RECEIVER = Party("org:test.site-b", "Site B", "pacs@site-b.test")
PROVIDER = "test-directory"
NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def ct_study() -> list[Path]:
    return bundled_ct_study(2)


@dataclass
class World:
    root: Path
    directory: Ed25519PrivateKey
    signing: Ed25519PrivateKey
    recipient: X25519PrivateKey

    def attestation(self, **changes: Any) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "directory_key": self.directory,
            "provider": PROVIDER,
            "entity_id": SENDER.id,
            "subject_key": raw(self.signing),
            "issued_at": NOW - timedelta(days=1),
            "expires_at": NOW + timedelta(days=30),
        }
        settings.update(changes)
        return issue_attestation(**settings)

    def seal(self, attestation: dict[str, Any] | None, **options: Any) -> Path:
        sources = ct_study()
        out = self.root / "out"
        out.mkdir(exist_ok=True)
        result = seal_envelope(
            [PayloadFile(f"dicom/{path.name}.dcm", path) for path in sources],
            build_metadata(sources),
            out,
            SENDER,
            self.signing,
            RECEIVER,
            self.recipient.public_key(),
            now=NOW,
            attestation=attestation,
            **options,
        )
        return result.path

    def policy(self, **overrides: Any) -> OpenPolicy:
        settings: dict[str, Any] = {
            "recipient_keys": (self.recipient,),
            "trusted": TrustedKeys(
                {"org:test.configured-peer": [raw(Ed25519PrivateKey.generate())]}
            ),
            "our_id": RECEIVER.id,
            "directory_keys": (raw(self.directory),),
            "now": NOW,
        }
        settings.update(overrides)
        return OpenPolicy(**settings)

    def open(self, envelope: Path, **overrides: Any) -> OpenedEnvelope:
        work = self.root / f"work-{len(list(self.root.glob('work-*')))}"
        work.mkdir()
        return open_envelope(envelope, self.policy(**overrides), work)

    def reject(self, envelope: Path, **overrides: Any) -> EnvelopeRejected:
        with pytest.raises(EnvelopeRejected) as caught:
            self.open(envelope, **overrides)
        return caught.value


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(
        tmp_path,
        Ed25519PrivateKey.generate(),
        Ed25519PrivateKey.generate(),
        X25519PrivateKey.generate(),
    )


def set_attestation(envelope: Path, attestation: Any) -> None:
    """Replace the sender's attestation; it is not among the sender's signed fields."""
    path = envelope / "manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest["sender"]["assertion"]["directory_attestation"] = attestation
    path.write_text(json.dumps(manifest, indent=2))


def token_with_claims(
    key: Ed25519PrivateKey, claims: dict[str, Any], typ: str = ATTESTATION_TYPE
) -> str:
    return sign_compact(json.dumps(claims).encode(), key, {"typ": typ})


def base_claims(world: World) -> dict[str, Any]:
    return {
        "iss": PROVIDER,
        "sub": SENDER.id,
        "fingerprint": "SHA256:" + hashlib.sha256(raw(world.signing)).hexdigest(),
        "iat": int((NOW - timedelta(days=1)).timestamp()),
        "exp": int((NOW + timedelta(days=1)).timestamp()),
    }


# -- accepted ---------------------------------------------------------------------------------


def test_attested_sender_accepted(world: World) -> None:
    opened = world.open(world.seal(world.attestation()))
    assert opened.sender is not None
    assert opened.sender.entity_id == SENDER.id
    assert opened.sender.trusted_by == f"directory {PROVIDER}"


def test_attestation_without_expiry_accepted(world: World) -> None:
    opened = world.open(world.seal(world.attestation(expires_at=None)))
    assert opened.sender is not None


def test_uppercase_fingerprint_accepted(world: World) -> None:
    claims = base_claims(world)
    claims["fingerprint"] = claims["fingerprint"].upper().replace("SHA256:", "sha256:")
    envelope = world.seal(None)
    attestation = world.attestation()
    attestation["attestation_signature"] = token_with_claims(world.directory, claims)
    set_attestation(envelope, attestation)
    assert world.open(envelope).sender is not None


def test_attestation_is_schema_valid(world: World) -> None:
    from agent.jmix.schema import check_document

    envelope = world.seal(world.attestation())
    manifest = json.loads((envelope / "manifest.json").read_bytes())
    assert check_document("manifest.json", manifest) == []


def test_pinned_sender_ignores_attestation(world: World) -> None:
    """For a configured peer the attestation is not needed, so a broken one is not read."""
    envelope = world.seal(world.attestation())
    set_attestation(envelope, {"provider": PROVIDER, "attestation_signature": "garbage"})
    trusted = TrustedKeys({SENDER.id: [raw(world.signing)]})
    opened = world.open(envelope, trusted=trusted)
    assert opened.sender is not None
    assert opened.sender.trusted_by == "pinned"


# -- rejected ---------------------------------------------------------------------------------


def test_no_directory_configured(world: World) -> None:
    rejected = world.reject(world.seal(world.attestation()), directory_keys=())
    assert rejected.code == "key_not_pinned"


def test_unknown_sender_without_attestation(world: World) -> None:
    rejected = world.reject(world.seal(None))
    assert rejected.code == "key_not_pinned"
    assert rejected.checks[-1].name == "sender"


def test_other_directory_rejected(world: World) -> None:
    stranger = Ed25519PrivateKey.generate()
    rejected = world.reject(world.seal(world.attestation(directory_key=stranger)))
    assert rejected.code == "attestation_untrusted"


def test_embedded_key_swapped_rejected(world: World) -> None:
    """The stranger's signature with the pinned key claimed as its maker still fails."""
    stranger = Ed25519PrivateKey.generate()
    attestation = world.attestation(directory_key=stranger)
    attestation["attestation_public_key"] = base64.b64encode(raw(world.directory)).decode()
    rejected = world.reject(world.seal(attestation))
    assert rejected.code == "attestation_invalid"


def test_other_entity_rejected(world: World) -> None:
    attestation = world.attestation(entity_id="org:test.someone-else")
    rejected = world.reject(world.seal(attestation))
    assert rejected.code == "attestation_mismatch"


def test_other_key_rejected(world: World) -> None:
    attestation = world.attestation(subject_key=raw(Ed25519PrivateKey.generate()))
    assert world.reject(world.seal(attestation)).code == "attestation_mismatch"


def test_key_swapped_after_attestation(world: World) -> None:
    """An attacker copies a real attestation into an envelope signed with its own key."""
    genuine = world.attestation()
    attacker = World(
        world.root / "attacker", world.directory, Ed25519PrivateKey.generate(), world.recipient
    )
    attacker.root.mkdir()
    rejected = world.reject(attacker.seal(genuine))
    assert rejected.code == "attestation_mismatch"


def test_expired_attestation_rejected(world: World) -> None:
    attestation = world.attestation(expires_at=NOW - timedelta(seconds=1))
    assert world.reject(world.seal(attestation)).code == "attestation_expired"


def test_future_attestation_rejected(world: World) -> None:
    attestation = world.attestation(issued_at=NOW + timedelta(hours=1))
    assert world.reject(world.seal(attestation)).code == "attestation_invalid"


def test_revoked_key_rejected(world: World) -> None:
    envelope = world.seal(world.attestation())
    revoked = frozenset({"SHA256:" + hashlib.sha256(raw(world.signing)).hexdigest()})
    rejected = world.reject(envelope, trusted=TrustedKeys({}, revoked))
    assert rejected.code == "key_revoked"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"sub": None}, "attestation_mismatch"),
        ({"fingerprint": "SHA256:zz"}, "attestation_mismatch"),
        ({"iss": "another-directory"}, "attestation_mismatch"),
        ({"iat": None}, "attestation_invalid"),
        ({"iat": "yesterday"}, "attestation_invalid"),
        ({"exp": True}, "attestation_invalid"),
    ],
)
def test_bad_claims_rejected(world: World, change: dict[str, Any], code: str) -> None:
    claims = {
        key: value for key, value in {**base_claims(world), **change}.items() if value is not None
    }
    attestation = world.attestation()
    attestation["attestation_signature"] = token_with_claims(world.directory, claims)
    assert world.reject(world.seal(attestation)).code == code


def test_wrong_typ_rejected(world: World) -> None:
    attestation = world.attestation()
    attestation["attestation_signature"] = token_with_claims(
        world.directory, base_claims(world), typ="JWS"
    )
    assert world.reject(world.seal(attestation)).code == "attestation_invalid"


def test_claims_not_object_rejected(world: World) -> None:
    attestation = world.attestation()
    attestation["attestation_signature"] = sign_compact(b"[1, 2]", world.directory)
    assert world.reject(world.seal(attestation)).code == "attestation_invalid"


@pytest.mark.parametrize(
    "attestation",
    [
        "not an object",
        {"provider": PROVIDER},
        {"provider": PROVIDER, "attestation_signature": "a.b"},
        {"provider": PROVIDER, "attestation_signature": "x.y.z", "attestation_public_key": "!!"},
    ],
)
def test_malformed_attestation_rejected(world: World, attestation: Any) -> None:
    envelope = world.seal(None)
    set_attestation(envelope, attestation)
    assert world.reject(envelope).code == "attestation_invalid"


def test_forged_signature_rejected(world: World) -> None:
    attestation = world.attestation()
    header, payload, signature = attestation["attestation_signature"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "org:test.impostor"
    forged_payload = b64url_encode(json.dumps(claims).encode())
    attestation["attestation_signature"] = f"{header}.{forged_payload}.{signature}"
    assert world.reject(world.seal(attestation)).code == "attestation_invalid"


# -- other parties ----------------------------------------------------------------------------


def test_requester_attested_by_directory(world: World) -> None:
    """A requester signing with its own key is trusted through its attestation."""
    requester_key = Ed25519PrivateKey.generate()
    requester = Requester(Party("org:test.referrer", "Referrer"), requester_key)
    envelope = world.seal(world.attestation(), requester=requester)
    path = envelope / "manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest["requester"]["assertion"]["directory_attestation"] = issue_attestation(
        world.directory, PROVIDER, "org:test.referrer", raw(requester_key), NOW - timedelta(days=1)
    )
    path.write_text(json.dumps(manifest, indent=2))

    opened = world.open(envelope)

    assert [party.role for party in opened.parties] == ["requester"]
    assert opened.parties[0].trusted_by == f"directory {PROVIDER}"


def test_requester_unattested_rejected(world: World) -> None:
    requester = Requester(Party("org:test.referrer", "Referrer"), Ed25519PrivateKey.generate())
    rejected = world.reject(world.seal(world.attestation(), requester=requester))
    assert rejected.code == "key_not_pinned"
    assert rejected.checks[-1].name == "requester"


# -- the verifier on its own ------------------------------------------------------------------


def test_verify_attestation_label(world: World) -> None:
    label = verify_attestation(
        world.attestation(), "sender", SENDER.id, raw(world.signing), [raw(world.directory)], NOW
    )
    assert label == f"directory {PROVIDER}"


def test_verify_attestation_error_names_role(world: World) -> None:
    with pytest.raises(IdentityError, match=r"^requester directory attestation: "):
        verify_attestation(
            world.attestation(),
            "requester",
            "org:test.x",
            raw(world.signing),
            [raw(world.directory)],
            NOW,
        )
