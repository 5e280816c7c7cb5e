"""manifest.jws: compact EdDSA JWS over the exact manifest.json bytes.

The sealed JWS is checked here with an independent verifier built from ``cryptography``
and ``base64``, then every way the reader must reject one is tried.
"""

from __future__ import annotations

import base64
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from jmixkit import bundled_ct_study

from agent.dicom.inspect import build_metadata
from agent.jmix.assertion import TrustedKeys
from agent.jmix.jws import JwsError, b64url_encode, sign_compact, verify_compact
from agent.jmix.reader import EnvelopeRejected, OpenedEnvelope, OpenPolicy, open_envelope
from agent.jmix.seal import Party, PayloadFile, SealResult, seal_envelope

SENDER = Party("org:test.site-a", "Site A", "pacs@site-a.test")
RECEIVER = Party("org:test.site-b", "Site B", "pacs@site-b.test")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def ct_study() -> list[Path]:
    return bundled_ct_study(2)


@dataclass
class Sealed:
    result: SealResult
    signing: Ed25519PrivateKey
    recipient: X25519PrivateKey
    root: Path

    @property
    def path(self) -> Path:
        return self.result.path

    def policy(self, **overrides: Any) -> OpenPolicy:
        raw = self.signing.public_key().public_bytes_raw()
        settings: dict[str, Any] = {
            "recipient_keys": (self.recipient,),
            "trusted": TrustedKeys({SENDER.id: [raw]}),
            "our_id": RECEIVER.id,
        }
        settings.update(overrides)
        return OpenPolicy(**settings)

    def open(self, **overrides: Any) -> OpenedEnvelope:
        work = self.root / f"work-{len(list(self.root.glob('work-*')))}"
        work.mkdir()
        return open_envelope(self.path, self.policy(**overrides), work)

    def reject(self, **overrides: Any) -> EnvelopeRejected:
        with pytest.raises(EnvelopeRejected) as caught:
            self.open(**overrides)
        return caught.value

    def jws_check(self, opened: OpenedEnvelope) -> str:
        (check,) = [check for check in opened.checks if check.name == "jws"]
        assert check.ok
        return check.detail


def seal(tmp_path: Path, **options: Any) -> Sealed:
    signing, recipient = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    sources = ct_study()
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    result = seal_envelope(
        [PayloadFile(f"dicom/{path.name}.dcm", path) for path in sources],
        build_metadata(sources),
        out,
        SENDER,
        signing,
        RECEIVER,
        recipient.public_key(),
        **options,
    )
    return Sealed(result, signing, recipient, tmp_path)


@pytest.fixture
def sealed(tmp_path: Path) -> Sealed:
    return seal(tmp_path, jws=True)


# -- what the sealer writes -------------------------------------------------------------------


def test_manifest_names_jws_file(sealed: Sealed) -> None:
    manifest = json.loads((sealed.path / "manifest.json").read_bytes())
    assert manifest["security"]["jws"] == {"jws_file": "manifest.jws"}
    assert (sealed.path / "manifest.jws").is_file()


def test_jws_signs_exact_manifest_bytes(sealed: Sealed) -> None:
    token = (sealed.path / "manifest.jws").read_text()
    header, payload, signature = token.split(".")
    manifest_bytes = (sealed.path / "manifest.json").read_bytes()

    assert b64url_decode(payload) == manifest_bytes
    public = sealed.signing.public_key()
    public.verify(b64url_decode(signature), f"{header}.{payload}".encode())


def test_jws_header_fields(sealed: Sealed) -> None:
    token = (sealed.path / "manifest.jws").read_text()
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert header["alg"] == "EdDSA"
    assert header["typ"] == "JWS"
    assert header["crv"] == "Ed25519"
    assert header["kid"].startswith("SHA256:")


def test_jws_parts_unpadded(sealed: Sealed) -> None:
    token = (sealed.path / "manifest.jws").read_text()
    assert "=" not in token
    assert not token.endswith("\n")
    assert len(token.split(".")) == 3


def test_no_jws_by_default(tmp_path: Path) -> None:
    plain = seal(tmp_path)
    manifest = json.loads((plain.path / "manifest.json").read_bytes())
    assert "jws" not in manifest["security"]
    assert not (plain.path / "manifest.jws").exists()
    opened = plain.open()
    assert plain.jws_check(opened) == "no manifest.jws (optional)"
    assert opened.jws_key is None


def test_zip_with_jws(tmp_path: Path) -> None:
    zipped = seal(tmp_path, jws=True, envelope_format="zip")
    with zipfile.ZipFile(zipped.path) as bundle:
        assert bundle.namelist() == [
            "manifest.json",
            "audit.json",
            "manifest.jws",
            "payload.encrypted",
        ]
    opened = zipped.open()
    assert "verified over manifest.json" in zipped.jws_check(opened)


# -- verification -----------------------------------------------------------------------------


def test_jws_verified_on_open(sealed: Sealed) -> None:
    opened = sealed.open()
    detail = sealed.jws_check(opened)
    assert "manifest.jws (attached) verified" in detail
    assert opened.sender is not None
    assert opened.jws_key == opened.sender.fingerprint


def test_unsigned_manifest_change_caught(sealed: Sealed) -> None:
    """A field outside the sender's signed fields changes: only the JWS notices."""
    path = sealed.path / "manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest["extensions"] = {"custom_tags": ["added-later"]}
    path.write_text(json.dumps(manifest, indent=2) + "\n")

    rejected = sealed.reject()

    assert rejected.code == "jws_payload_mismatch"
    assert rejected.checks[-1].name == "jws"
    assert [check.name for check in rejected.checks if check.ok][:3] == [
        "layout",
        "manifest",
        "sender",
    ]


def test_whitespace_change_caught(sealed: Sealed) -> None:
    path = sealed.path / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert sealed.reject().code == "jws_payload_mismatch"


def test_jws_by_other_key_rejected(sealed: Sealed) -> None:
    manifest_bytes = (sealed.path / "manifest.json").read_bytes()
    forged = sign_compact(manifest_bytes, Ed25519PrivateKey.generate())
    (sealed.path / "manifest.jws").write_text(forged)
    assert sealed.reject().code == "jws_signature_invalid"


def test_jws_by_rotated_pinned_key_accepted(sealed: Sealed) -> None:
    """Any signing key pinned for the sender may sign the JWS (key rotation)."""
    rotated = Ed25519PrivateKey.generate()
    manifest_bytes = (sealed.path / "manifest.json").read_bytes()
    (sealed.path / "manifest.jws").write_text(sign_compact(manifest_bytes, rotated))
    pinned = [
        sealed.signing.public_key().public_bytes_raw(),
        rotated.public_key().public_bytes_raw(),
    ]
    opened = sealed.open(trusted=TrustedKeys({SENDER.id: pinned}))
    assert "verified" in sealed.jws_check(opened)


def test_flipped_signature_rejected(sealed: Sealed) -> None:
    path = sealed.path / "manifest.jws"
    header, payload, signature = path.read_text().split(".")
    raw = bytearray(b64url_decode(signature))
    raw[0] ^= 0x01
    path.write_text(f"{header}.{payload}.{b64url_encode(bytes(raw))}")
    assert sealed.reject().code == "jws_signature_invalid"


def rewrite_header(token: str, header: dict[str, Any]) -> str:
    _header, payload, signature = token.split(".")
    return f"{b64url_encode(json.dumps(header).encode())}.{payload}.{signature}"


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "none"},
        {"alg": "HS256", "typ": "JWS"},
        {"alg": "RS256"},
        {"typ": "JWS"},
        {"alg": "EdDSA", "crit": ["exp"], "exp": 1},
        {"alg": "EdDSA", "b64": False, "crit": ["b64"]},
    ],
)
def test_unsupported_header_rejected(sealed: Sealed, header: dict[str, Any]) -> None:
    path = sealed.path / "manifest.jws"
    path.write_text(rewrite_header(path.read_text(), header))
    assert sealed.reject().code == "jws_unsupported"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "only.two",
        "a.b.c.d",
        "eyJhbGciOiJFZERTQSJ9.@@@.AAAA",
        "bm90IGpzb24.e30.AAAA",
        "W10.e30.AAAA",
        "eyJhbGciOiJFZERTQSJ9.e30=.AAAA",
    ],
)
def test_malformed_token_rejected(sealed: Sealed, token: str) -> None:
    (sealed.path / "manifest.jws").write_text(token)
    assert sealed.reject().code == "jws_malformed"


def test_non_ascii_jws_rejected(sealed: Sealed) -> None:
    (sealed.path / "manifest.jws").write_bytes("é.é.é".encode())
    assert sealed.reject().code == "jws_malformed"


def test_referenced_jws_missing(sealed: Sealed) -> None:
    (sealed.path / "manifest.jws").unlink()
    rejected = sealed.reject()
    assert rejected.code == "jws_missing"
    assert rejected.checks[-1].name == "jws"


def test_jws_symlink_rejected(sealed: Sealed, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.jws"
    os.replace(sealed.path / "manifest.jws", target)
    (sealed.path / "manifest.jws").symlink_to(target)
    assert sealed.reject().code == "symlink"


def test_detached_jws_accepted(sealed: Sealed) -> None:
    path = sealed.path / "manifest.jws"
    header, _payload, signature = path.read_text().split(".")
    path.write_text(f"{header}..{signature}")
    opened = sealed.open()
    assert "manifest.jws (detached) verified" in sealed.jws_check(opened)


def test_unreferenced_jws_verified(tmp_path: Path) -> None:
    """jmix-rs writes manifest.jws without naming it in the manifest; it is still checked."""
    plain = seal(tmp_path)
    manifest_bytes = (plain.path / "manifest.json").read_bytes()
    (plain.path / "manifest.jws").write_text(sign_compact(manifest_bytes, plain.signing))
    assert "verified" in plain.jws_check(plain.open())

    (plain.path / "manifest.jws").write_text(sign_compact(b"{}", plain.signing))
    assert plain.reject().code == "jws_payload_mismatch"


@pytest.mark.parametrize("name", ["../manifest.jws", "/etc/manifest.jws", "a\\b.jws", ""])
def test_unsafe_jws_reference_rejected(tmp_path: Path, name: str) -> None:
    sealed = seal(tmp_path)
    path = sealed.path / "manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest["security"]["jws"] = {"jws_file": name}
    path.write_text(json.dumps(manifest))
    assert sealed.reject().code == "jws_malformed"


# -- requiring a JWS --------------------------------------------------------------------------


def test_required_jws_missing(tmp_path: Path) -> None:
    plain = seal(tmp_path)
    rejected = plain.reject(require_jws=True)
    assert rejected.code == "jws_missing"
    assert "require_jws" in rejected.message


def test_required_per_sender(tmp_path: Path) -> None:
    plain = seal(tmp_path)
    assert plain.reject(require_jws_senders=frozenset({SENDER.id})).code == "jws_missing"
    opened = plain.open(require_jws_senders=frozenset({"org:test.someone-else"}))
    assert plain.jws_check(opened) == "no manifest.jws (optional)"


def test_required_jws_present(sealed: Sealed) -> None:
    opened = sealed.open(require_jws=True)
    assert "verified" in sealed.jws_check(opened)


def test_unverified_sender_jws_reported(sealed: Sealed) -> None:
    opened = sealed.open(trusted=TrustedKeys(), require_sender_identity=False)
    assert "NOT verified" in sealed.jws_check(opened)


# -- the JWS functions themselves -------------------------------------------------------------


def test_sign_verify_roundtrip() -> None:
    key = Ed25519PrivateKey.generate()
    token = sign_compact(b'{"a":1}', key, {"cty": "json"})
    verified = verify_compact(token, [key.public_key().public_bytes_raw()])
    assert verified.payload == b'{"a":1}'
    assert verified.header["cty"] == "json"
    assert verified.detached is False


def test_verify_tries_every_key() -> None:
    key = Ed25519PrivateKey.generate()
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    token = sign_compact(b"x", key)
    verified = verify_compact(token, [other, key.public_key().public_bytes_raw()])
    assert verified.public_key == key.public_key().public_bytes_raw()


def test_verify_without_keys_fails() -> None:
    token = sign_compact(b"x", Ed25519PrivateKey.generate())
    with pytest.raises(JwsError) as caught:
        verify_compact(token, [])
    assert caught.value.code == "jws_signature_invalid"


def test_sign_refuses_other_alg() -> None:
    with pytest.raises(ValueError, match="EdDSA"):
        sign_compact(b"x", Ed25519PrivateKey.generate(), {"alg": "none"})


def test_rfc8037_example_verifies() -> None:
    """RFC 8037 appendix A.4: the Ed25519 signature of "Example of Ed25519 signing"."""
    public = b64url_decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
    token = (
        "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
    )
    verified = verify_compact(token, [public])
    assert verified.payload == b"Example of Ed25519 signing"
    Ed25519PublicKey.from_public_bytes(public)


def test_deeply_nested_header_is_malformed() -> None:
    # Deep enough for json.loads to hit the recursion limit, small enough for the size cap.
    nested = b"[" * 2500 + b"]" * 2500
    token = f"{b64url_encode(nested)}.{b64url_encode(b'{}')}.{b64url_encode(bytes(64))}"
    with pytest.raises(JwsError) as caught:
        verify_compact(token, [])
    assert caught.value.code == "jws_malformed"
