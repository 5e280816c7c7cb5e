"""Config validation: every error names the file, the line and the TOML key path.

Each case edits one line of a small valid config and checks the whole location prefix
``<file>:<line>: <key>:`` plus a fragment of the problem text.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "etc" / "jmix-agent" / "agent.toml"
SOURCE = Path("/etc/jmix-agent/test.toml")

ENCRYPTION_KEY = base64.b64encode(
    X25519PrivateKey.generate().public_key().public_bytes_raw()
).decode()
SIGNING_KEY = base64.b64encode(
    Ed25519PrivateKey.generate().public_key().public_bytes_raw()
).decode()

VALID = f"""\
[agent]
state_dir = "/var/lib/jmix-test"

[identity]
id = "org:test.site-a"
name = "Site A"

[dicom]
ae_title = "TEST_AGENT"
port = 11112

[[peers]]
id = "org:test.site-b"
name = "Site B"
encryption_key = "{ENCRYPTION_KEY}"
signing_key = "{SIGNING_KEY}"

[peers.transport]
kind = "directory"
path = "/srv/jmix-test/site-b"

[[routes]]
to = ["org:test.site-b"]

[inbound]
revoked_fingerprints = []
"""

SECOND_PEER = f"""
[[peers]]
id = "org:test.site-b"
name = "Site B again"
encryption_key = "{ENCRYPTION_KEY}"
signing_key = "{SIGNING_KEY}"
"""


def line_number(text: str, marker: str, occurrence: int = 1) -> int:
    """Return the 1-based number of the line that starts with ``marker``."""
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith(marker):
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"{marker!r} not found in the test config")


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, SOURCE)
    return str(caught.value)


@dataclass(frozen=True)
class BadConfig:
    """One broken config, the key and line its error must name, and a problem fragment."""

    text: str
    key: str
    marker: str
    problem: str
    occurrence: int = 1


BAD_CONFIGS = {
    "missing identity id": BadConfig(
        VALID.replace('id = "org:test.site-a"\n', ""),
        "identity.id",
        "[identity]",
        "is required but missing",
    ),
    "wrong type": BadConfig(
        VALID.replace('name = "Site A"', "name = 5"),
        "identity.name",
        "name = 5",
        "must be a string, got int",
    ),
    "unknown key": BadConfig(
        VALID.replace('name = "Site A"', 'name = "Site A"\ncolour = "blue"'),
        "identity.colour",
        "colour =",
        "is not a known setting",
    ),
    "bad port": BadConfig(
        VALID.replace("port = 11112", "port = 70000"),
        "dicom.port",
        "port = 70000",
        "must be between 1 and 65535, got 70000",
    ),
    "port as boolean": BadConfig(
        VALID.replace("port = 11112", "port = true"),
        "dicom.port",
        "port = true",
        "not a boolean",
    ),
    "bad peer key base64": BadConfig(
        VALID.replace(f'encryption_key = "{ENCRYPTION_KEY}"', 'encryption_key = "not*base64"'),
        "peers[1].encryption_key",
        "encryption_key =",
        "is not a valid X25519 public key",
    ),
    "peer key too short": BadConfig(
        VALID.replace(f'signing_key = "{SIGNING_KEY}"', 'signing_key = "AAAA"'),
        "peers[1].signing_key",
        "signing_key =",
        "is not a valid Ed25519 public key",
    ),
    "peer keys swapped": BadConfig(
        VALID.replace(f'encryption_key = "{ENCRYPTION_KEY}"', f'encryption_key = "{SIGNING_KEY}"'),
        "peers[1].encryption_key",
        "encryption_key =",
        "is the same key as signing_key",
    ),
    "our own id as a peer": BadConfig(
        VALID.replace('id = "org:test.site-b"', 'id = "org:test.site-a"').replace(
            'to = ["org:test.site-b"]', 'to = ["org:test.site-a"]'
        ),
        "peers[1].id",
        'id = "org:test.site-a"',
        "is our own identity id",
        occurrence=2,
    ),
    "host key blob invalid": BadConfig(
        VALID.replace(
            'kind = "directory"\npath = "/srv/jmix-test/site-b"',
            'kind = "sftp"\nhost = "127.0.0.1"\nusername = "jmix"\n'
            'private_key = "/k"\nremote_dir = "/in"\n'
            'host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBROKEN site-b"',
        ),
        "peers[1].transport.host_key",
        "host_key =",
        "is not a usable OpenSSH public key",
    ),
    "route to unknown peer": BadConfig(
        VALID.replace('to = ["org:test.site-b"]', 'to = ["org:test.nobody"]'),
        "routes[1].to",
        "to = ",
        "'org:test.nobody', which is not a configured peer id",
    ),
    "duplicate peer id": BadConfig(
        VALID.replace("\n[[routes]]", SECOND_PEER + "\n[[routes]]"),
        "peers[2].id",
        'id = "org:test.site-b"',
        "duplicates peer id 'org:test.site-b'",
        occurrence=2,
    ),
    "unknown profile": BadConfig(
        VALID.replace('name = "Site B"', 'name = "Site B"\nprofile = "jmix-go"'),
        "peers[1].profile",
        "profile =",
        "must be one of spec, jmix-rs, jmix-js",
    ),
    "transport kind": BadConfig(
        VALID.replace('kind = "directory"', 'kind = "ftp"'),
        "peers[1].transport.kind",
        "kind =",
        'must be "sftp" or "directory", got \'ftp\'',
    ),
    "revoked fingerprint": BadConfig(
        VALID.replace("revoked_fingerprints = []", 'revoked_fingerprints = ["MD5:abc"]'),
        "inbound.revoked_fingerprints",
        "revoked_fingerprints =",
        "SHA256:<hex>",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS.values(), ids=list(BAD_CONFIGS))
def test_config_error_location(case: BadConfig) -> None:
    message = config_error(case.text)
    line = line_number(case.text, case.marker, case.occurrence)
    assert message.startswith(f"{SOURCE}:{line}: {case.key}: "), message


@pytest.mark.parametrize("case", BAD_CONFIGS.values(), ids=list(BAD_CONFIGS))
def test_config_error_problem(case: BadConfig) -> None:
    assert case.problem in config_error(case.text)


def test_missing_key_first_line_table() -> None:
    """A table whose header is line 1 still gets a line number in the error."""
    text = '[identity]\nid = "org:test.site-a"\n'
    assert config_error(text).startswith(f"{SOURCE}:1: identity.name: ")


def test_invalid_toml_names_line() -> None:
    text = VALID.replace('name = "Site A"', 'name = "Site A')
    message = config_error(text)
    assert message.startswith(f"{SOURCE}: not valid TOML")
    assert f"line {line_number(text, 'name = ' + chr(34) + 'Site A')}" in message


def test_valid_config_parses() -> None:
    config = parse_config(VALID, SOURCE)
    assert config.identity.id == "org:test.site-a"
    assert [peer.id for peer in config.peers] == ["org:test.site-b"]
    assert config.peers[0].encryption_key == base64.b64decode(ENCRYPTION_KEY)
    assert config.routes[0].to == ("org:test.site-b",)
    assert config.dicom.port == 11112


def test_valid_config_defaults() -> None:
    config = parse_config(VALID, SOURCE)
    assert config.peers[0].profile == "spec"
    assert config.peers[0].allow_plain is False
    assert config.inbound.inbox == Path("/var/lib/jmix-test/inbox")


def test_example_config_parses() -> None:
    config = parse_config(EXAMPLE.read_text(encoding="utf-8"), EXAMPLE)
    assert config.identity.id == "org:example.site-a"
    assert config.identity.contact != ""
    assert [peer.id for peer in config.peers] == ["org:example.site-b"]
    assert config.peers[0].transport is not None
    assert config.peers[0].transport.kind == "sftp"
    assert len(config.routes) == 1
    assert config.dicom.port == 11112


def test_missing_file_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.toml")
    assert "config file not found" in str(caught.value)


def test_relative_path_resolved(tmp_path: Path) -> None:
    text = VALID.replace('state_dir = "/var/lib/jmix-test"', 'state_dir = "state"')
    config = parse_config(text, tmp_path / "agent.toml")
    assert config.state_dir == tmp_path / "state"
