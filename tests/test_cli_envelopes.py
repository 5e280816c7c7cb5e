"""The envelope subcommands of ``jmix-agent`` without a config file, run in-process.

Exit status contract: 0 when everything passed, 1 when verification or the operation
failed, 2 for usage errors (argparse exits with 2 through SystemExit).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydicom.data import get_testdata_files

from agent.cli import main


def run_cli(argv: Sequence[str]) -> int:
    """Run ``jmix-agent`` in-process and return its exit status, argparse exits included."""
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)


def bundled_files(*parts: str) -> list[Path]:
    """Return pydicom's bundled files whose path contains ``parts`` as components."""
    return sorted(
        Path(name)
        for name in get_testdata_files()
        if Path(name).is_file() and set(parts) <= set(Path(name).parts)
    )


def sha256_path(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def public_b64(private_pem: Path) -> str:
    key = serialization.load_pem_private_key(private_pem.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey | X25519PrivateKey)
    raw = key.public_key().public_bytes_raw()
    return base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Setup:
    """Keys made by ``keygen``, a folder of real DICOM, and one sealed envelope."""

    root: Path
    signing_key: Path
    encryption_key: Path
    dicom: Path
    envelope: Path

    @property
    def signing_public(self) -> str:
        return public_b64(self.signing_key)

    @property
    def sealing_keys(self) -> list[str]:
        """Return the seal options that replace a config: recipient and signing key."""
        recipient = public_b64(self.encryption_key)
        return ["--recipient", recipient, "--signing-key", str(self.signing_key)]

    @property
    def sources(self) -> list[Path]:
        return sorted(self.dicom.iterdir())


@pytest.fixture
def setup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Setup:
    sources = bundled_files("dicomdirtests", "98892001")
    if len(sources) < 3:
        pytest.skip("pydicom's bundled study dicomdirtests/98892001 is not installed")
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    for source in sources:
        shutil.copyfile(source, dicom / source.name)

    signing, encryption = tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "encryption.pem"
    keygen = ["keygen", "--signing-key", str(signing), "--encryption-key", str(encryption)]
    assert run_cli(keygen) == 0

    out = tmp_path / "out"
    status = run_cli(
        [
            "seal",
            str(dicom),
            "-o",
            str(out),
            "--recipient",
            public_b64(encryption),
            "--signing-key",
            str(signing),
            "--sender-id",
            "org:test.site-a",
            "--receiver-id",
            "org:test.site-b",
        ]
    )
    assert status == 0
    (envelope,) = out.iterdir()
    capsys.readouterr()
    return Setup(tmp_path, signing, encryption, dicom, envelope)


def flip_ciphertext_byte(envelope: Path) -> None:
    encrypted = envelope / "payload.encrypted"
    data = bytearray(encrypted.read_bytes())
    data[len(data) // 2] ^= 0x01
    encrypted.write_bytes(bytes(data))


# -- keygen -------------------------------------------------------------------------------------


def test_keygen_files_private(setup: Setup) -> None:
    for path in (setup.signing_key, setup.encryption_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_keygen_key_types(setup: Setup) -> None:
    signing = serialization.load_pem_private_key(setup.signing_key.read_bytes(), password=None)
    encryption = serialization.load_pem_private_key(
        setup.encryption_key.read_bytes(), password=None
    )
    assert isinstance(signing, Ed25519PrivateKey)
    assert isinstance(encryption, X25519PrivateKey)


def test_keygen_keeps_existing_keys(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    before = setup.signing_key.read_bytes()
    argv = ["keygen", "--signing-key", str(setup.signing_key)]
    argv += ["--encryption-key", str(setup.encryption_key)]

    assert run_cli(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert setup.signing_key.read_bytes() == before


def test_keygen_force_replaces(setup: Setup) -> None:
    before = setup.signing_key.read_bytes()
    argv = ["keygen", "--signing-key", str(setup.signing_key)]
    argv += ["--encryption-key", str(setup.encryption_key), "--force"]

    assert run_cli(argv) == 0
    assert setup.signing_key.read_bytes() != before


# -- seal -----------------------------------------------------------------------------------------


def test_seal_envelope_layout(setup: Setup) -> None:
    assert setup.envelope.name.endswith(".JMIX")
    listing = sorted(path.name for path in setup.envelope.iterdir())
    assert listing == ["audit.json", "manifest.json", "payload.encrypted"]


def test_seal_names_parties(setup: Setup) -> None:
    manifest = json.loads((setup.envelope / "manifest.json").read_bytes())
    assert manifest["sender"]["id"] == "org:test.site-a"
    assert [entry["id"] for entry in manifest["receiver"]] == ["org:test.site-b"]


def test_seal_json_output(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    out = setup.root / "out-json"
    argv = ["seal", str(setup.dicom), "-o", str(out), "--json"]
    argv += setup.sealing_keys

    assert run_cli(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert Path(document["envelope"]).parent == out
    assert document["files"] == len(setup.sources)
    assert Path(document["envelope"]).name == document["id"] + ".JMIX"


def test_seal_jmix_rs_profile(setup: Setup) -> None:
    out = setup.root / "out-rs"
    argv = ["seal", str(setup.dicom), "-o", str(out), "--profile", "jmix-rs"]
    argv += setup.sealing_keys

    assert run_cli(argv) == 0
    (envelope,) = out.iterdir()
    assert envelope.name.endswith(".jmix")
    assert (envelope / "payload.enc").is_file()


def test_seal_skips_non_dicom(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    (setup.dicom / "notes.txt").write_text("not DICOM\n")
    out = setup.root / "out-mixed"
    argv = ["seal", str(setup.dicom), "-o", str(out), "--json"]
    argv += setup.sealing_keys

    assert run_cli(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["files"] == len(setup.sources) - 1
    assert "skipping" in captured.err


def test_seal_two_studies_fails_cleanly(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder spanning two studies is bad input: an error message, not a traceback."""
    mixed = setup.root / "two-studies"
    mixed.mkdir()
    for source in bundled_files("CT_small.dcm") + bundled_files("MR_small.dcm"):
        shutil.copyfile(source, mixed / source.name)
    out = setup.root / "out-two"
    argv = ["seal", str(mixed), "-o", str(out)]
    argv += setup.sealing_keys

    assert run_cli(argv) in (1, 2)
    assert "jmix-agent: error:" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


# -- verify ------------------------------------------------------------------------------------


def test_verify_trusted_passes(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["verify", str(setup.envelope), "--key", str(setup.encryption_key)]
    argv += ["--trust", setup.signing_public]

    assert run_cli(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines
    assert all(line.startswith(("PASS ", "SKIP ")) for line in lines), lines
    # Without a config there is no local identity, so the receiver check is skipped.
    assert [line.split(":")[0] for line in lines if line.startswith("SKIP ")] == ["SKIP receiver"]
    assert any(line.startswith("PASS sender: ") for line in lines)
    assert any(line.startswith("PASS decrypt: ") for line in lines)


def test_verify_untrusted_fails(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["verify", str(setup.envelope), "--key", str(setup.encryption_key)]

    assert run_cli(argv) == 1
    captured = capsys.readouterr()
    assert "FAIL sender: " in captured.out
    assert "key_not_pinned" in captured.err


def test_verify_wrong_trust_fails(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    stranger = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    argv = ["verify", str(setup.envelope), "--key", str(setup.encryption_key)]
    argv += ["--trust", base64.b64encode(stranger).decode()]

    assert run_cli(argv) == 1
    assert "key_not_pinned" in capsys.readouterr().err


def test_verify_tampered_fails(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    flip_ciphertext_byte(setup.envelope)
    argv = ["verify", str(setup.envelope), "--key", str(setup.encryption_key)]
    argv += ["--trust", setup.signing_public]

    assert run_cli(argv) == 1
    assert "FAIL decrypt: " in capsys.readouterr().out


# -- open ------------------------------------------------------------------------------------------


def output_hashes(folder: Path) -> list[str]:
    return sorted(sha256_path(path) for path in (folder / "dicom").iterdir())


def test_open_trusted_writes_files(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    output = setup.root / "received"
    argv = ["open", str(setup.envelope), "-o", str(output), "--key", str(setup.encryption_key)]
    argv += ["--trust", setup.signing_public]

    assert run_cli(argv) == 0
    assert output_hashes(output) == sorted(sha256_path(path) for path in setup.sources)
    assert (output / "metadata.json").is_file()
    assert f"payload written to {output}" in capsys.readouterr().out


def test_open_untrusted_sender_writes_files(setup: Setup) -> None:
    output = setup.root / "received"
    argv = ["open", str(setup.envelope), "-o", str(output), "--key", str(setup.encryption_key)]
    argv += ["--allow-untrusted-sender"]

    assert run_cli(argv) == 0
    assert output.is_dir()
    assert output_hashes(output) == sorted(sha256_path(path) for path in setup.sources)


def test_open_json_report(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    output = setup.root / "received"
    argv = ["open", str(setup.envelope), "-o", str(output), "--key", str(setup.encryption_key)]
    argv += ["--trust", setup.signing_public, "--json"]

    assert run_cli(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True
    assert document["error"] is None
    assert document["hkdf_dialect"] == "spec/jmix-php"
    assert document["hash_rule"] == "sha256-of-encrypted-file"
    assert document["output"] == str(output)


@pytest.mark.parametrize("trust", ["pinned", "untrusted"])
def test_open_tampered_writes_nothing(setup: Setup, trust: str) -> None:
    flip_ciphertext_byte(setup.envelope)
    output = setup.root / "received"
    argv = ["open", str(setup.envelope), "-o", str(output), "--key", str(setup.encryption_key)]
    argv += ["--trust", setup.signing_public] if trust == "pinned" else ["--allow-untrusted-sender"]

    assert run_cli(argv) == 1
    assert not output.exists() or list(output.iterdir()) == []


def test_open_wrong_key_fails(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    other = setup.root / "other.pem"
    other.write_bytes(
        X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    output = setup.root / "received"
    argv = ["open", str(setup.envelope), "-o", str(output), "--key", str(other)]
    argv += ["--trust", setup.signing_public]

    assert run_cli(argv) == 1
    assert "decrypt_failed" in capsys.readouterr().err
    assert not output.exists()


def test_open_nonempty_output_rejected(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    output = setup.root / "received"
    output.mkdir()
    (output / "existing.txt").write_text("keep me\n")
    argv = ["open", str(setup.envelope), "-o", str(output), "--key", str(setup.encryption_key)]
    argv += ["--trust", setup.signing_public]

    assert run_cli(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(path.name for path in output.iterdir()) == ["existing.txt"]


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_json_without_key(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["inspect", str(setup.envelope), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert setup.envelope.name == summary["id"] + ".JMIX"
    assert summary["sender"] == "org:test.site-a"
    assert summary["receivers"] == ["org:test.site-b"]
    assert summary["encrypted"] is True
    assert summary["sender_assertion"] is True
    assert summary["files"] == ["audit.json", "manifest.json", "payload.encrypted"]


def test_inspect_missing_envelope(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["inspect", str(tmp_path / "absent.JMIX")]) == 1
    assert "jmix-agent: error:" in capsys.readouterr().err


# -- usage errors ----------------------------------------------------------------------------


def bad_argument_cases(setup: Setup) -> dict[str, list[str]]:
    envelope, dicom, out = str(setup.envelope), str(setup.dicom), str(setup.root / "bad-out")
    recipient = public_b64(setup.encryption_key)
    return {
        "no command": [],
        "unknown command": ["frobnicate"],
        "seal without output": ["seal", dicom],
        "seal without keys": ["seal", dicom, "-o", out],
        "seal without signing key": ["seal", dicom, "-o", out, "--recipient", recipient],
        "seal unknown profile": ["seal", dicom, "-o", out, "--profile", "jmix-go"],
        "seal missing folder": [
            "seal",
            str(setup.root / "absent"),
            "-o",
            out,
            "--recipient",
            recipient,
            "--signing-key",
            str(setup.signing_key),
        ],
        "seal bad recipient": [
            "seal",
            dicom,
            "-o",
            out,
            "--recipient",
            "not-a-key",
            "--signing-key",
            str(setup.signing_key),
        ],
        "open without output": ["open", envelope, "--key", str(setup.encryption_key)],
        "verify bad key": ["verify", envelope, "--key", "not-a-key"],
        "verify bad trust": [
            "verify",
            envelope,
            "--key",
            str(setup.encryption_key),
            "--trust",
            "AAAA",
        ],
    }


BAD_ARGUMENT_NAMES = [
    "no command",
    "unknown command",
    "seal without output",
    "seal without keys",
    "seal without signing key",
    "seal unknown profile",
    "seal missing folder",
    "seal bad recipient",
    "open without output",
    "verify bad key",
    "verify bad trust",
]


@pytest.mark.parametrize("case", BAD_ARGUMENT_NAMES)
def test_bad_arguments_exit_2(setup: Setup, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = bad_argument_cases(setup)[case]
    assert run_cli(argv) == 2
    assert capsys.readouterr().err != ""
    assert not (setup.root / "bad-out").exists() or list((setup.root / "bad-out").iterdir()) == []
