"""Sender assertions: canonical bytes, and every way open_envelope rejects an identity.

Each test seals a fresh envelope, changes its manifest the way a forger or a broken
sender would, and checks the rejection code and the step that failed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from jmixkit import bundled_ct_study

from agent.dicom.inspect import build_metadata
from agent.jmix.assertion import TrustedKeys, canonical_bytes, required_fields, sign_assertion
from agent.jmix.errors import IdentityError
from agent.jmix.reader import EnvelopeRejected, OpenedEnvelope, OpenPolicy, open_envelope
from agent.jmix.seal import Party, PayloadFile, seal_envelope
from agent.jmix.timeutil import parse_timestamp

SENDER = Party("org:test.site-a", "Site A", "pacs@site-a.test")
RECEIVER = Party("org:test.site-b", "Site B", "pacs@site-b.test")

# What our sealer signs, in order. The first test pins this list, so the
# parametrized tamper cases below cannot silently miss a field.
SIGNED_FIELDS = [
    "version",
    "id",
    "timestamp",
    "sender.id",
    "sender.name",
    "security.classification",
    "security.payload_hash",
    "receiver.0.id",
    "receiver.0.name",
    "security.encryption",
]
REQUIRED_FIELDS = [
    "id",
    "timestamp",
    "sender.id",
    "receiver.0.id",
    "security.payload_hash",
    "security.encryption",
]


def resolve(document: Any, path: str) -> Any:
    value = document
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def assign(document: Any, path: str, new_value: Any) -> None:
    *parents, last = path.split(".")
    target = resolve(document, ".".join(parents)) if parents else document
    if isinstance(target, list):
        target[int(last)] = new_value
    else:
        target[last] = new_value


def sign_independently(manifest: dict[str, Any], key: Ed25519PrivateKey, fields: list[str]) -> None:
    """Replace the sender assertion with one signed here over ``fields`` (RFC 8785 form)."""
    flat = {path: resolve(manifest, path) for path in fields}
    signature = key.sign(rfc8785.dumps(flat))
    public = key.public_key().public_bytes_raw()
    assertion = manifest["sender"]["assertion"]
    assertion["signing_key"]["public_key"] = base64.b64encode(public).decode()
    assertion["signing_key"]["fingerprint"] = "SHA256:" + hashlib.sha256(public).hexdigest()
    assertion["signed_fields"] = fields
    assertion["signature"] = base64.b64encode(signature).decode()


@dataclass
class Sealed:
    path: Path
    signing: Ed25519PrivateKey
    recipient: X25519PrivateKey
    work: Path

    def manifest(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads((self.path / "manifest.json").read_bytes())
        return document

    def rewrite(self, change: Callable[[dict[str, Any]], None]) -> None:
        manifest = self.manifest()
        change(manifest)
        (self.path / "manifest.json").write_text(json.dumps(manifest, indent=2))

    def policy(self, **overrides: Any) -> OpenPolicy:
        raw = self.signing.public_key().public_bytes_raw()
        settings: dict[str, Any] = {
            "recipient_keys": (self.recipient,),
            "trusted": TrustedKeys({SENDER.id: [raw]}),
            "our_id": RECEIVER.id,
        }
        settings.update(overrides)
        return OpenPolicy(**settings)

    def open(self, policy: OpenPolicy | None = None) -> OpenedEnvelope:
        return open_envelope(self.path, policy or self.policy(), self.work)

    def reject(self, policy: OpenPolicy | None = None) -> EnvelopeRejected:
        with pytest.raises(EnvelopeRejected) as caught:
            self.open(policy)
        return caught.value


@pytest.fixture
def sealed(tmp_path: Path) -> Sealed:
    sources = bundled_ct_study(2)
    signing, recipient = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    result = seal_envelope(
        [PayloadFile(f"dicom/{path.name}.dcm", path) for path in sources],
        build_metadata(sources),
        tmp_path,
        SENDER,
        signing,
        RECEIVER,
        recipient.public_key(),
    )
    work = tmp_path / "work"
    work.mkdir()
    return Sealed(result.path, signing, recipient, work)


# -- the untouched envelope ------------------------------------------------------------------


def test_sealer_signs_expected_fields(sealed: Sealed) -> None:
    assert sealed.manifest()["sender"]["assertion"]["signed_fields"] == SIGNED_FIELDS


def test_untouched_envelope_opens(sealed: Sealed) -> None:
    opened = sealed.open()
    assert opened.sender is not None
    assert opened.sender.entity_id == SENDER.id


def test_independent_signature_accepted(sealed: Sealed) -> None:
    sealed.rewrite(lambda manifest: sign_independently(manifest, sealed.signing, SIGNED_FIELDS))
    opened = sealed.open()
    assert opened.sender is not None
    assert opened.sender.signed_fields == tuple(SIGNED_FIELDS)


# -- a signed field changed after signing -------------------------------------------------------


def changed_value(path: str, value: Any) -> Any:
    """Return a plausible, well-formed replacement, so only the signature can catch it."""
    if path == "id":
        return str(uuid.uuid4())
    if path == "timestamp":
        moment = parse_timestamp(value) + timedelta(seconds=1)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if path == "security.classification":
        return "sensitive" if value != "sensitive" else "confidential"
    if path == "security.payload_hash":
        return "sha256:" + "0" * 64
    if path == "security.encryption":
        iv = bytearray(base64.b64decode(value["iv"]))
        iv[0] ^= 0x01
        return {**value, "iv": base64.b64encode(bytes(iv)).decode()}
    return f"{value}-changed"


@pytest.mark.parametrize("path", SIGNED_FIELDS)
def test_signed_field_change_rejected(sealed: Sealed, path: str) -> None:
    manifest = sealed.manifest()
    original = resolve(manifest, path)
    replacement = changed_value(path, original)
    sealed.rewrite(lambda document: assign(document, path, replacement))

    # The key is pinned for the changed sender id too, and the folder name is not
    # compared, so that the signature is the only check that can notice the change.
    raw = sealed.signing.public_key().public_bytes_raw()
    ids = {SENDER.id, f"{SENDER.id}-changed"}
    policy = sealed.policy(
        trusted=TrustedKeys({entity: [raw] for entity in ids}), require_name_match=False
    )
    rejected = sealed.reject(policy)

    assert replacement != original
    assert rejected.code == "signature_invalid"
    assert rejected.checks[-1].name == "sender"
    assert list(sealed.work.iterdir()) == []


# -- keys, fingerprints, revocation ------------------------------------------------------------


def test_unpinned_key_rejected(sealed: Sealed) -> None:
    stranger = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    rejected = sealed.reject(sealed.policy(trusted=TrustedKeys({SENDER.id: [stranger]})))
    assert rejected.code == "key_not_pinned"
    assert rejected.checks[-1].name == "sender"


def test_key_pinned_for_other_sender_rejected(sealed: Sealed) -> None:
    raw = sealed.signing.public_key().public_bytes_raw()
    rejected = sealed.reject(sealed.policy(trusted=TrustedKeys({"org:test.other": [raw]})))
    assert rejected.code == "key_not_pinned"


def test_replaced_key_rejected(sealed: Sealed) -> None:
    """An attacker re-signs everything with an own key: the key is valid but not pinned."""
    attacker = Ed25519PrivateKey.generate()
    sealed.rewrite(lambda manifest: sign_independently(manifest, attacker, SIGNED_FIELDS))
    rejected = sealed.reject()
    assert rejected.code == "key_not_pinned"


def test_fingerprint_mismatch_rejected(sealed: Sealed) -> None:
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()

    def change(manifest: dict[str, Any]) -> None:
        signing_key = manifest["sender"]["assertion"]["signing_key"]
        signing_key["fingerprint"] = "SHA256:" + hashlib.sha256(other).hexdigest()

    sealed.rewrite(change)
    rejected = sealed.reject()
    assert rejected.code == "fingerprint_mismatch"
    assert rejected.checks[-1].name == "sender"


def test_uppercase_fingerprint_accepted(sealed: Sealed) -> None:
    def change(manifest: dict[str, Any]) -> None:
        signing_key = manifest["sender"]["assertion"]["signing_key"]
        prefix, digest = signing_key["fingerprint"].split(":")
        signing_key["fingerprint"] = f"{prefix}:{digest.upper()}"

    sealed.rewrite(change)
    opened = sealed.open()
    public = sealed.signing.public_key().public_bytes_raw()
    assert opened.sender is not None
    assert opened.sender.fingerprint == "SHA256:" + hashlib.sha256(public).hexdigest()


def test_revoked_key_rejected(sealed: Sealed) -> None:
    public = sealed.signing.public_key().public_bytes_raw()
    revoked = frozenset({"SHA256:" + hashlib.sha256(public).hexdigest()})
    raw_pins = TrustedKeys({SENDER.id: [public]}, revoked)
    rejected = sealed.reject(sealed.policy(trusted=raw_pins))
    assert rejected.code == "key_revoked"
    assert rejected.checks[-1].name == "sender"


def test_missing_assertion_rejected(sealed: Sealed) -> None:
    sealed.rewrite(lambda manifest: manifest["sender"].pop("assertion"))
    rejected = sealed.reject()
    assert rejected.code == "assertion_missing"


def test_unverified_sender_allowed_by_policy(sealed: Sealed) -> None:
    policy = sealed.policy(trusted=TrustedKeys(), require_sender_identity=False)
    opened = sealed.open(policy)
    assert opened.sender is None
    assert opened.checks[2].name == "sender"
    assert "NOT verified" in opened.checks[2].detail


# -- expiry and coverage ------------------------------------------------------------------------


def test_expired_assertion_rejected(sealed: Sealed) -> None:
    expires_at = parse_timestamp(sealed.manifest()["sender"]["assertion"]["expires_at"])
    rejected = sealed.reject(sealed.policy(now=expires_at + timedelta(seconds=1)))
    assert rejected.code == "assertion_expired"
    assert rejected.checks[-1].name == "sender"


def test_assertion_before_expiry_accepted(sealed: Sealed) -> None:
    expires_at = parse_timestamp(sealed.manifest()["sender"]["assertion"]["expires_at"])
    opened = sealed.open(sealed.policy(now=expires_at - timedelta(seconds=1)))
    assert opened.sender is not None


@pytest.mark.parametrize("dropped", REQUIRED_FIELDS)
def test_incomplete_signed_fields_rejected(sealed: Sealed, dropped: str) -> None:
    fields = [path for path in SIGNED_FIELDS if path != dropped]
    sealed.rewrite(lambda manifest: sign_independently(manifest, sealed.signing, fields))
    rejected = sealed.reject()
    assert rejected.code == "assertion_incomplete"
    assert dropped in rejected.message


def test_parent_object_covers_field(sealed: Sealed) -> None:
    """Signing ``security`` as a whole covers payload_hash and the encryption block."""
    fields = [path for path in SIGNED_FIELDS if not path.startswith("security.")]
    fields.append("security")
    sealed.rewrite(lambda manifest: sign_independently(manifest, sealed.signing, fields))
    opened = sealed.open()
    assert opened.sender is not None


def test_missing_signed_field_rejected(sealed: Sealed) -> None:
    def sign_then_remove(manifest: dict[str, Any]) -> None:
        manifest["extensions"] = {"note": "signed, then removed"}
        sign_independently(manifest, sealed.signing, [*SIGNED_FIELDS, "extensions.note"])
        del manifest["extensions"]

    sealed.rewrite(sign_then_remove)
    rejected = sealed.reject()
    assert rejected.code == "signed_field_missing"
    assert rejected.checks[-1].name == "sender"


# -- receiver -----------------------------------------------------------------------------------


def test_other_receiver_rejected(sealed: Sealed) -> None:
    rejected = sealed.reject(sealed.policy(our_id="org:test.site-c"))
    assert rejected.code == "not_for_us"
    assert rejected.checks[-1].name == "receiver"
    assert list(sealed.work.iterdir()) == []


# -- canonical form ----------------------------------------------------------------------------

CANONICAL_CASE: dict[str, Any] = {
    "id": "a-1",
    "n": 1.0,
    "big": 1e21,
    "s": 'tab\tq"\u0001/',
    "receiver": [{"id": "r\u00e9", "name": "x"}],
    "security": {"encryption": {"iv": "AA==", "algorithm": "AES-256-GCM"}},
    "keys": {"\ue000": 1, "\U0001f600": 2, "a": 3},
    "flags": [True, None, False, -0.0, 0.5, 100],
    "unsigned": "not in the signed fields",
}
CANONICAL_FIELDS = [
    "security.encryption",
    "id",
    "receiver.0.id",
    "n",
    "big",
    "s",
    "keys",
    "flags",
]
# RFC 8785 by hand: keys sorted by UTF-16 code units (U+1F600 is D83D DE00, so it sorts
# before U+E000), ECMAScript number form (1.0 -> 1, 1e21 -> 1e+21, -0.0 -> 0), UTF-8
# output, and only '"', '\\' and control characters escaped.
CANONICAL_BYTES = (
    b'{"big":1e+21,"flags":[true,null,false,0,0.5,100],"id":"a-1",'
    b'"keys":{"a":3,"\xf0\x9f\x98\x80":2,"\xee\x80\x80":1},"n":1,'
    b'"receiver.0.id":"r\xc3\xa9","s":"tab\\tq\\"\\u0001/",'
    b'"security.encryption":{"algorithm":"AES-256-GCM","iv":"AA=="}}'
)


def test_canonical_bytes_known_case() -> None:
    assert canonical_bytes(CANONICAL_CASE, CANONICAL_FIELDS) == CANONICAL_BYTES


def test_canonical_bytes_ignore_field_order() -> None:
    reordered = list(reversed(CANONICAL_FIELDS))
    assert canonical_bytes(CANONICAL_CASE, reordered) == CANONICAL_BYTES


def test_canonical_bytes_missing_path() -> None:
    with pytest.raises(IdentityError) as caught:
        canonical_bytes(CANONICAL_CASE, ["receiver.1.id"])
    assert caught.value.code == "signed_field_missing"


# -- requester and receiver assertions ------------------------------------------------------------


def add_assertion(
    sealed: Sealed, role: str, key: Ed25519PrivateKey, fields: list[str], **extra: Any
) -> None:
    """Sign ``fields`` with ``key`` and put the assertion on the party at ``role``."""

    def change(manifest: dict[str, Any]) -> None:
        if role == "requester":
            manifest["requester"] = {"id": "org:test.referrer", "name": "Referrer"}
        party = resolve(manifest, role)
        party["assertion"] = {**sign_assertion(manifest, key, fields), **extra}

    sealed.rewrite(change)


def party_check(opened_or_rejected: OpenedEnvelope | EnvelopeRejected, name: str) -> Any:
    (check,) = [check for check in opened_or_rejected.checks if check.name == name]
    return check


RECEIVER_FIELDS = ["id", "timestamp", "receiver.0.id", "receiver.0.name"]
REQUESTER_FIELDS = ["id", "timestamp", "requester.id", "requester.name"]


def test_receiver_assertion_verified(sealed: Sealed) -> None:
    receiver_key = Ed25519PrivateKey.generate()
    add_assertion(sealed, "receiver.0", receiver_key, RECEIVER_FIELDS)
    pins = {
        SENDER.id: [sealed.signing.public_key().public_bytes_raw()],
        RECEIVER.id: [receiver_key.public_key().public_bytes_raw()],
    }
    opened = sealed.open(sealed.policy(trusted=TrustedKeys(pins)))
    assert [(party.role, party.entity_id) for party in opened.parties] == [
        ("receiver.0", RECEIVER.id)
    ]
    assert party_check(opened, "receiver_assertions").detail.startswith("receiver.0 ")


def test_receiver_assertion_unpinned_rejected(sealed: Sealed) -> None:
    add_assertion(sealed, "receiver.0", Ed25519PrivateKey.generate(), RECEIVER_FIELDS)
    rejected = sealed.reject()
    assert rejected.code == "key_not_pinned"
    assert rejected.checks[-1].name == "receiver_assertions"
    assert list(sealed.work.iterdir()) == []


def test_receiver_assertion_not_bound_rejected(sealed: Sealed) -> None:
    """An assertion that leaves out the envelope id could be copied from another envelope."""
    receiver_key = Ed25519PrivateKey.generate()
    add_assertion(sealed, "receiver.0", receiver_key, ["receiver.0.id", "receiver.0.name"])
    pins = {
        SENDER.id: [sealed.signing.public_key().public_bytes_raw()],
        RECEIVER.id: [receiver_key.public_key().public_bytes_raw()],
    }
    rejected = sealed.reject(sealed.policy(trusted=TrustedKeys(pins)))
    assert rejected.code == "assertion_incomplete"
    assert "id, timestamp" in rejected.message


def test_requester_signed_by_sender_accepted(sealed: Sealed) -> None:
    add_assertion(sealed, "requester", sealed.signing, REQUESTER_FIELDS)
    opened = sealed.open()
    assert [(party.role, party.trusted_by) for party in opened.parties] == [
        ("requester", "signed with the sender's key")
    ]


def test_requester_unknown_key_rejected(sealed: Sealed) -> None:
    add_assertion(sealed, "requester", Ed25519PrivateKey.generate(), REQUESTER_FIELDS)
    rejected = sealed.reject()
    assert rejected.code == "key_not_pinned"
    assert rejected.checks[-1].name == "requester"


def test_requester_changed_after_signing(sealed: Sealed) -> None:
    add_assertion(sealed, "requester", sealed.signing, REQUESTER_FIELDS)
    sealed.rewrite(lambda manifest: assign(manifest, "requester.name", "Someone Else"))
    rejected = sealed.reject()
    assert rejected.code == "signature_invalid"
    assert rejected.checks[-1].name == "requester"


def test_requester_expired_rejected(sealed: Sealed) -> None:
    add_assertion(
        sealed, "requester", sealed.signing, REQUESTER_FIELDS, expires_at="2020-01-01T00:00:00Z"
    )
    assert sealed.reject().code == "assertion_expired"


def test_requester_missing_field_rejected(sealed: Sealed) -> None:
    add_assertion(sealed, "requester", sealed.signing, REQUESTER_FIELDS)
    sealed.rewrite(lambda manifest: manifest["requester"].pop("name"))
    assert sealed.reject().code == "signed_field_missing"


def test_requester_failure_waived_with_sender(sealed: Sealed) -> None:
    add_assertion(sealed, "requester", Ed25519PrivateKey.generate(), REQUESTER_FIELDS)
    opened = sealed.open(sealed.policy(trusted=TrustedKeys(), require_sender_identity=False))
    assert opened.parties == []
    assert "NOT verified" in party_check(opened, "requester").detail


def test_no_party_assertions_reported(sealed: Sealed) -> None:
    opened = sealed.open()
    assert party_check(opened, "requester").detail == "no requester assertion (optional)"
    assert party_check(opened, "receiver_assertions").detail == (
        "no receiver assertions (optional)"
    )


def test_required_fields_per_role() -> None:
    manifest = {"receiver": [{"id": "a"}, {"id": "b"}], "security": {"payload_hash": "x"}}
    assert required_fields(manifest, "requester") == ["id", "timestamp", "requester.id"]
    assert required_fields(manifest, "receiver.1") == ["id", "timestamp", "receiver.1.id"]
    assert required_fields(manifest) == [
        "id",
        "timestamp",
        "sender.id",
        "receiver.0.id",
        "receiver.1.id",
        "security.payload_hash",
    ]
