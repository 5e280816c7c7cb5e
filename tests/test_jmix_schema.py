"""The built-in schema checker agrees with a JSON Schema validator on the spec's schemas.

Our own outputs must pass both, and for each deliberately broken document both must
find a violation. The published schemas are read from the shared spec folder; the
product itself carries only :mod:`agent.jmix.schema`.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from jmixkit import format_checker
from jsonschema import Draft202012Validator
from pydicom.data import get_testdata_files

from agent.dicom.inspect import build_metadata
from agent.jmix.errors import EnvelopeFormatError
from agent.jmix.profiles import get_profile
from agent.jmix.reader import OpenPolicy, open_envelope
from agent.jmix.schema import check_document
from agent.jmix.seal import Party, PayloadFile, Requester, seal_envelope

SHARED = Path(__file__).resolve().parents[2] / "shared"
SCHEMAS = SHARED / "jmix-spec" / "schemas"
FIXTURES = SHARED / "interop" / "fixtures"
SCHEMA_FILES = {
    "manifest.json": "manifest.schema.json",
    "audit.json": "audit.schema.json",
    "metadata.json": "metadata.schema.json",
    "files.json": "files.schema.json",
}
SENDER = Party("org:test.site-a", "Site A", "pacs@site-a.test")
RECEIVER = Party("org:test.site-b", "Site B", "pacs@site-b.test")


@pytest.fixture(scope="module")
def reference() -> Callable[[str, object], list[str]]:
    """Return a function validating a document with jsonschema against the real schema."""
    if not SCHEMAS.is_dir():
        pytest.skip(f"spec schemas not found at {SCHEMAS} (the shared folder is absent)")
    checker = format_checker()
    validators = {}
    for name, schema_file in SCHEMA_FILES.items():
        schema = json.loads((SCHEMAS / schema_file).read_bytes())
        Draft202012Validator.check_schema(schema)
        validators[name] = Draft202012Validator(schema, format_checker=checker)

    def validate(name: str, document: object) -> list[str]:
        return [error.message for error in validators[name].iter_errors(document)]

    return validate


def ct_study() -> list[Path]:
    files = sorted(
        Path(name)
        for name in get_testdata_files()
        if "98892001" in Path(name).parts and Path(name).is_file()
    )
    if len(files) < 2:
        pytest.skip("pydicom's bundled study dicomdirtests/98892001 is not installed")
    return files[:2]


def sealed_documents(root: Path, profile: str, extras: bool) -> dict[str, Any]:
    """Seal one envelope and return its four JSON documents, decrypted where needed."""
    signing, recipient = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    sources = ct_study()
    out = root / "out"
    out.mkdir()
    options: dict[str, Any] = {}
    if extras:
        options = {
            "jws": True,
            "requester": Requester(Party("org:test.referrer", "Referrer"), signing),
        }
    sealed = seal_envelope(
        [PayloadFile(f"dicom/{path.name}.dcm", path) for path in sources],
        build_metadata(sources),
        out,
        SENDER,
        signing,
        RECEIVER,
        recipient.public_key(),
        profile=get_profile(profile),
        **options,
    )
    work = root / "work"
    work.mkdir()
    opened = open_envelope(
        sealed.path,
        OpenPolicy(recipient_keys=(recipient,), require_sender_identity=False),
        work,
    )
    return {
        "manifest.json": json.loads((sealed.path / "manifest.json").read_bytes()),
        "audit.json": json.loads((sealed.path / "audit.json").read_bytes()),
        "metadata.json": json.loads((opened.payload_dir / "metadata.json").read_bytes()),
        "files.json": json.loads((opened.payload_dir / "files.json").read_bytes()),
    }


# -- our outputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("extras", [False, True], ids=["plain-options", "jws-and-requester"])
@pytest.mark.parametrize("profile", ["spec", "jmix-rs", "jmix-js"])
@pytest.mark.parametrize("name", list(SCHEMA_FILES))
def test_outputs_valid(
    tmp_path: Path, reference: Any, profile: str, extras: bool, name: str
) -> None:
    document = sealed_documents(tmp_path, profile, extras)[name]
    assert check_document(name, document) == []
    assert reference(name, document) == []


# -- documents both validators must judge alike ----------------------------------------------------

VALID_MANIFEST: dict[str, Any] = {
    "version": "1.0",
    "id": "6f57f5fa-1cd1-45be-a5c3-fb209be1e0ec",
    "timestamp": "2025-05-24T06:14:00Z",
    "sender": {
        "name": "Clinic A",
        "id": "org:a",
        "contact": "imaging@a.test",
        "assertion": {
            "signing_key": {"alg": "Ed25519", "public_key": "AAAA", "fingerprint": "SHA256:ab"},
            "signed_fields": ["id"],
            "signature": "AAAA",
            "expires_at": "2025-07-07T00:00:00Z",
        },
    },
    "receiver": [{"id": "org:b", "contact": {"system": "phone", "value": "+61"}}],
    "security": {
        "classification": "confidential",
        "payload_hash": "sha256:ABCdef01",
        "jws": {"jws_file": "manifest.jws"},
        "encryption": {
            "algorithm": "AES-256-GCM",
            "ephemeral_public_key": "AAAA",
            "iv": "AAAA",
            "auth_tag": "AAAA",
        },
    },
    "extensions": {"custom_tags": ["x"], "anything": {"goes": 1}},
}
VALID_AUDIT: dict[str, Any] = {
    "audit": [
        {
            "event": "created",
            "by": {"id": "org:a", "name": "A"},
            "timestamp": "2025-05-24T06:14:00+10:00",
        }
    ]
}
VALID_METADATA: dict[str, Any] = {
    "version": "1.0",
    "id": "6f57f5fa-1cd1-45be-a5c3-fb209be1e0ec",
    "timestamp": "2025-05-24T06:14:00Z",
    "patient": {
        "id": "P1",
        "name": {"family": "Doe", "given": ["J"]},
        "dob": "1985-03-15",
        "sex": "F",
        "identifiers": [{"system": "s", "value": "v"}],
        "verification": {"verified_by": "x", "verified_on": "2025-01-01"},
    },
    "studies": {
        "study_uid": "1.2.3",
        "series": [{"series_uid": "1.2.3.4", "modality": "CT", "instance_count": 2, "extra": True}],
    },
    "extensions": {"consent": {"status": "granted", "scope": ["research"]}},
}
VALID_FILES: list[Any] = [{"file": "dicom/a.dcm", "hash": "sha256:00", "size_bytes": 0}]
VALID = {
    "manifest.json": VALID_MANIFEST,
    "audit.json": VALID_AUDIT,
    "metadata.json": VALID_METADATA,
    "files.json": VALID_FILES,
}


def changed(name: str, path: str, value: Any) -> tuple[str, Any]:
    """Return a copy of the valid document with ``path`` set to ``value`` (``...`` deletes)."""
    document = copy.deepcopy(VALID[name])
    *parents, last = path.split(".")
    target = document
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if value is ...:
        del target[int(last) if isinstance(target, list) else last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return name, document


INVALID_CASES = {
    "manifest without id": changed("manifest.json", "id", ...),
    "manifest id not uuid": changed("manifest.json", "id", "envelope-1"),
    "manifest extra property": changed("manifest.json", "patient", {"id": "P1"}),
    "manifest timestamp without zone": changed("manifest.json", "timestamp", "2025-05-24T06:14:00"),
    "manifest timestamp impossible": changed("manifest.json", "timestamp", "2025-13-24T06:14:00Z"),
    "manifest no receivers": changed("manifest.json", "receiver", []),
    "manifest receiver not list": changed("manifest.json", "receiver", {"id": "org:b"}),
    "receiver without id": changed("manifest.json", "receiver.0.id", ...),
    "contact half object": changed("manifest.json", "receiver.0.contact", {"system": "phone"}),
    "contact number": changed("manifest.json", "sender.contact", 5),
    "entity extra property": changed("manifest.json", "sender.role", "x"),
    "classification unknown": changed("manifest.json", "security.classification", "secret"),
    "payload hash md5": changed("manifest.json", "security.payload_hash", "md5:abcd"),
    "payload hash empty": changed("manifest.json", "security.payload_hash", "sha256:"),
    "algorithm other": changed("manifest.json", "security.encryption.algorithm", "AES-128-GCM"),
    "encryption without iv": changed("manifest.json", "security.encryption.iv", ...),
    "jws without file": changed("manifest.json", "security.jws", {}),
    "key alg rsa": changed("manifest.json", "sender.assertion.signing_key.alg", "RSA"),
    "fingerprint md5": changed(
        "manifest.json", "sender.assertion.signing_key.fingerprint", "MD5:ab"
    ),
    "signed fields empty": changed("manifest.json", "sender.assertion.signed_fields", []),
    "signed field number": changed("manifest.json", "sender.assertion.signed_fields", [1]),
    "expires not date": changed("manifest.json", "sender.assertion.expires_at", "next week"),
    "attestation partial": changed(
        "manifest.json", "sender.assertion.directory_attestation", {"provider": "x"}
    ),
    "audit not list": changed("audit.json", "audit", {}),
    "audit without by": changed("audit.json", "audit.0.by", ...),
    "audit by extra": changed("audit.json", "audit.0.by.email", "a@b"),
    "audit event number": changed("audit.json", "audit.0.event", 1),
    "audit entry extra": changed("audit.json", "audit.0.note", "x"),
    "metadata without patient": changed("metadata.json", "patient", ...),
    "metadata dob format": changed("metadata.json", "patient.dob", "15/03/1985"),
    "metadata sex unknown": changed("metadata.json", "patient.sex", "X"),
    "metadata given string": changed("metadata.json", "patient.name.given", "J"),
    "metadata verified_on bad": changed(
        "metadata.json", "patient.verification.verified_on", "2025-02-30"
    ),
    "series without modality": changed("metadata.json", "studies.series.0.modality", ...),
    "instance count negative": changed("metadata.json", "studies.series.0.instance_count", -1),
    "instance count fraction": changed("metadata.json", "studies.series.0.instance_count", 1.5),
    "instance count boolean": changed("metadata.json", "studies.series.0.instance_count", True),
    "consent status unknown": changed("metadata.json", "extensions.consent.status", "maybe"),
    "studies extra": changed("metadata.json", "studies.modality", "CT"),
    "files not list": ("files.json", {"files": []}),
    "files entry without file": changed("files.json", "0.file", ...),
    "files size string": changed("files.json", "0.size_bytes", "12"),
    "files size negative": changed("files.json", "0.size_bytes", -1),
    "files entry extra": changed("files.json", "0.path", "x"),
}

VALID_CASES = {
    "manifest as given": ("manifest.json", VALID_MANIFEST),
    "manifest minimal": (
        "manifest.json",
        {
            "version": "1",
            "id": str(uuid.uuid4()),
            "timestamp": "2025-05-24T06:14:00.123+02:00",
            "sender": {"id": "a"},
            "receiver": [{"id": "b"}],
        },
    ),
    "manifest uppercase uuid": changed(
        "manifest.json", "id", "6F57F5FA-1CD1-45BE-A5C3-FB209BE1E0EC"
    ),
    "audit as given": ("audit.json", VALID_AUDIT),
    "audit empty": ("audit.json", {"audit": []}),
    "metadata as given": ("metadata.json", VALID_METADATA),
    "instance count whole float": changed("metadata.json", "studies.series.0.instance_count", 2.0),
    "files as given": ("files.json", VALID_FILES),
    "files empty": ("files.json", []),
}


@pytest.mark.parametrize("case", list(INVALID_CASES))
def test_invalid_document_both_reject(reference: Any, case: str) -> None:
    name, document = INVALID_CASES[case]
    assert reference(name, document) != [], "jsonschema accepted the broken document"
    assert check_document(name, document) != [], "the built-in checker accepted it"


@pytest.mark.parametrize("case", list(VALID_CASES))
def test_valid_document_both_accept(reference: Any, case: str) -> None:
    name, document = VALID_CASES[case]
    assert reference(name, document) == []
    assert check_document(name, document) == []


def fixture_documents() -> list[tuple[str, str, Path]]:
    if not FIXTURES.is_dir():
        return []
    cases = []
    for path in sorted(FIXTURES.glob("*/*.JMIX/*.json")):
        if path.name in SCHEMA_FILES:
            cases.append((f"{path.parent.parent.name}/{path.name}", path.name, path))
    return cases


@pytest.mark.parametrize(
    ("label", "name", "path"), fixture_documents(), ids=[case[0] for case in fixture_documents()]
)
def test_fixture_verdicts_agree(reference: Any, label: str, name: str, path: Path) -> None:
    """The other libraries' documents: jmix-js breaks the schema, jmix-php does not."""
    document = json.loads(path.read_bytes())
    assert (check_document(name, document) == []) == (reference(name, document) == []), label


# -- messages and the sealer ---------------------------------------------------------------------


def test_messages_omit_values() -> None:
    """metadata.json contains patient attributes, so a message names the path, not the value."""
    _name, document = changed("metadata.json", "patient.dob", "15/03/1985")
    errors = check_document("metadata.json", document)
    assert errors == [r"patient.dob: does not match the pattern \d{4}-\d{2}-\d{2}"]
    assert "15/03/1985" not in " ".join(errors)


def test_unknown_document_name() -> None:
    with pytest.raises(ValueError, match="no schema rules"):
        check_document("report.json", {})


def test_seal_rejects_invalid_metadata(tmp_path: Path) -> None:
    sources = ct_study()
    metadata = build_metadata(sources)
    metadata["patient"] = {**metadata.get("patient", {}), "sex": "unknown-value"}
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(EnvelopeFormatError) as caught:
        seal_envelope(
            [PayloadFile(f"dicom/{path.name}.dcm", path) for path in sources],
            metadata,
            out,
            SENDER,
            Ed25519PrivateKey.generate(),
            RECEIVER,
            X25519PrivateKey.generate().public_key(),
        )

    assert caught.value.code == "schema_invalid"
    assert "patient.sex" in caught.value.message
    assert "unknown-value" not in caught.value.message
    assert list(out.iterdir()) == []


def test_seal_rejects_invalid_party(tmp_path: Path) -> None:
    """An entity id must be a string; a bad one is caught before anything is published."""
    sources = ct_study()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EnvelopeFormatError) as caught:
        seal_envelope(
            [PayloadFile(f"dicom/{path.name}.dcm", path) for path in sources],
            build_metadata(sources),
            out,
            Party(7, "Numeric id"),  # type: ignore[arg-type]
            Ed25519PrivateKey.generate(),
            RECEIVER,
            X25519PrivateKey.generate().public_key(),
        )
    assert caught.value.code == "schema_invalid"
    assert "sender.id" in caught.value.message
    assert list(out.iterdir()) == []
