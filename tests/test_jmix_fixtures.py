"""Open the envelopes that jmix-js and jmix-php wrote, and compare with their expected.json.

None of these envelopes carries a sender assertion our policy accepts, so they are
opened the way ``--allow-untrusted-sender`` opens them. The recipient key is loaded
from each of its three file forms (PEM, base64 text, raw 32 bytes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.jmix.keys import load_encryption_private, public_b64
from agent.jmix.reader import EnvelopeRejected, OpenedEnvelope, OpenPolicy, open_envelope

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "interop" / "fixtures"
KEYS = FIXTURES / "recipient-x25519" / "keys"
RECIPIENT_PUBLIC_B64 = "2NsBeigFj/gGPP2EdS1mV7dGvrHsRXVcI2ITHo/uI1s="

if not FIXTURES.is_dir():
    pytest.skip(
        f"interop fixtures not found at {FIXTURES} (the shared folder is absent)",
        allow_module_level=True,
    )


@dataclass(frozen=True)
class Fixture:
    """One fixture folder, and the dialect and hash rule the reader must report for it."""

    name: str
    encrypted: bool
    dialect: str | None
    hash_rule: str


FIXTURE_CASES = [
    Fixture("jmix-js-encrypted", True, "jmix-js", "path-newline-bytes-walk"),
    Fixture("jmix-php-encrypted", True, "spec/jmix-php", "sha256-of-encrypted-file"),
    Fixture("jmix-php-plain", False, None, "dir-file-line-list"),
]
KEY_FORMS = ["pem", "b64", "bin"]


def key_path(fixture: str, form: str) -> Path:
    """Return the fixture's own key file, or the shared copy for the plain fixture."""
    own = FIXTURES / fixture / "keys" / f"recipient_x25519_private.{form}"
    return own if own.is_file() else KEYS / f"recipient_x25519_private.{form}"


def expected_files(fixture: str) -> dict[str, tuple[int, str]]:
    """Return {path inside the payload: (size, sha256)} from the fixture's expected.json."""
    document: dict[str, Any] = json.loads((FIXTURES / fixture / "expected.json").read_bytes())
    if "payload_files" in document:
        return {
            name: (entry["size"], entry["sha256"])
            for name, entry in document["payload_files"].items()
        }
    return {
        member["name"].removeprefix("payload/"): (member["size"], member["sha256"])
        for member in document["tar_members_in_archive_order"]
        if member["type"] == "file"
    }


def envelope_of(fixture: str) -> Path:
    document = json.loads((FIXTURES / fixture / "expected.json").read_bytes())
    return FIXTURES / fixture / str(document["envelope_dir"])


def untrusted_policy(form: str, fixture: str) -> OpenPolicy:
    key = load_encryption_private(key_path(fixture, form))
    return OpenPolicy(recipient_keys=(key,), require_sender_identity=False, allow_plain=True)


def open_fixture(fixture: str, form: str, tmp_path: Path) -> OpenedEnvelope:
    work = tmp_path / "work"
    work.mkdir()
    return open_envelope(envelope_of(fixture), untrusted_policy(form, fixture), work)


def unpacked_files(root: Path) -> dict[str, tuple[int, str]]:
    return {
        path.relative_to(root).as_posix(): (
            path.stat().st_size,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("form", KEY_FORMS)
def test_key_form_loads(form: str) -> None:
    key = load_encryption_private(KEYS / f"recipient_x25519_private.{form}")
    assert public_b64(key.public_key()) == RECIPIENT_PUBLIC_B64


@pytest.mark.parametrize("form", KEY_FORMS)
@pytest.mark.parametrize("fixture", FIXTURE_CASES, ids=lambda case: case.name)
def test_fixture_files_match(fixture: Fixture, form: str, tmp_path: Path) -> None:
    opened = open_fixture(fixture.name, form, tmp_path)
    assert unpacked_files(opened.payload_dir) == expected_files(fixture.name)
    assert opened.files == sorted(expected_files(fixture.name))


@pytest.mark.parametrize("fixture", FIXTURE_CASES, ids=lambda case: case.name)
def test_fixture_reports_dialect(fixture: Fixture, tmp_path: Path) -> None:
    opened = open_fixture(fixture.name, "b64", tmp_path)
    assert opened.encrypted is fixture.encrypted
    assert opened.hkdf_dialect == fixture.dialect


@pytest.mark.parametrize("fixture", FIXTURE_CASES, ids=lambda case: case.name)
def test_fixture_reports_hash_rule(fixture: Fixture, tmp_path: Path) -> None:
    opened = open_fixture(fixture.name, "b64", tmp_path)
    assert opened.hash_rule == fixture.hash_rule


@pytest.mark.parametrize("fixture", FIXTURE_CASES, ids=lambda case: case.name)
def test_fixture_sender_unverified(fixture: Fixture, tmp_path: Path) -> None:
    opened = open_fixture(fixture.name, "b64", tmp_path)
    assert opened.sender is None
    assert all(check.ok for check in opened.checks)


@pytest.mark.parametrize("fixture", FIXTURE_CASES, ids=lambda case: case.name)
def test_fixture_needs_untrusted_option(fixture: Fixture, tmp_path: Path) -> None:
    key = load_encryption_private(key_path(fixture.name, "bin"))
    policy = OpenPolicy(recipient_keys=(key,), allow_plain=True)
    work = tmp_path / "work"
    work.mkdir()

    with pytest.raises(EnvelopeRejected) as caught:
        open_envelope(envelope_of(fixture.name), policy, work)

    assert caught.value.code == "assertion_missing"
    assert caught.value.checks[-1].name == "sender"
    assert list(work.iterdir()) == []


def test_plain_fixture_needs_allow_plain(tmp_path: Path) -> None:
    policy = OpenPolicy(require_sender_identity=False)
    work = tmp_path / "work"
    work.mkdir()

    with pytest.raises(EnvelopeRejected) as caught:
        open_envelope(envelope_of("jmix-php-plain"), policy, work)

    assert caught.value.code == "plain_not_allowed"
    assert list(work.rglob("*")) == []


@pytest.mark.parametrize(
    "fixture", [case for case in FIXTURE_CASES if case.encrypted], ids=lambda case: case.name
)
def test_fixture_wrong_key_rejected(fixture: Fixture, tmp_path: Path) -> None:
    policy = OpenPolicy(
        recipient_keys=(X25519PrivateKey.generate(),), require_sender_identity=False
    )
    work = tmp_path / "work"
    work.mkdir()

    with pytest.raises(EnvelopeRejected) as caught:
        open_envelope(envelope_of(fixture.name), policy, work)

    assert caught.value.code == "decrypt_failed"
    assert list(work.rglob("*")) == []
