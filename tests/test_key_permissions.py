"""The agent refuses to start when a private key file is not private to its user.

Each test makes one key file of a generated identity unsafe (group or other access,
another owner, a link) and runs the real ``jmix-agent run`` command. It expects exit
status 2, a message that names the file and the command that fixes it, and no audit
record of a start. The tests run as root, as CI does, so that ``os.chown`` can give a key
to another owner.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import audit_events, wait_until

from agent.demo import Site, start_agent, stop_agent, write_config

NOBODY = 65534
START_TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = Site("Site B Radiology", tmp_path / "site-b", "org:demo.site-b")
    site.root.mkdir()
    site.create_keys()
    write_config(site, [])
    return site


def signing_key(site: Site) -> Path:
    return site.root / "keys" / "signing.key"


def encryption_key(site: Site) -> Path:
    return site.root / "keys" / "encryption.key"


def run_agent(site: Site) -> subprocess.CompletedProcess[str]:
    """Run ``jmix-agent run``, which exits at once when it rejects a key and else times out."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(site.config_path), "run"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


def assert_start_rejected(
    site: Site, result: subprocess.CompletedProcess[str], *hints: str
) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("jmix-agent: error: "), result.stderr
    assert "private key" in result.stderr
    for hint in hints:
        assert hint in result.stderr
    assert audit_events(site, "agent_started") == []


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o620], ids=oct)
def test_signing_key_too_open(site: Site, mode: int) -> None:
    signing_key(site).chmod(mode)

    result = run_agent(site)

    assert_start_rejected(
        site,
        result,
        f"permissions {mode:04o} for private key {signing_key(site)} are too open",
        f"Fix it with: chmod 600 {signing_key(site)}",
    )


def test_encryption_key_too_open(site: Site) -> None:
    encryption_key(site).chmod(0o640)

    result = run_agent(site)

    assert_start_rejected(site, result, f"chmod 600 {encryption_key(site)}")


def test_previous_encryption_key_too_open(site: Site) -> None:
    previous = site.root / "keys" / "encryption-2024.key"
    previous.write_bytes(encryption_key(site).read_bytes())
    previous.chmod(0o644)
    text = site.config_path.read_text()
    setting = f"previous_encryption_keys = [{str(previous)!r}]\n".replace("'", '"')
    site.config_path.write_text(text.replace("[dicom]\n", setting + "[dicom]\n", 1))

    result = run_agent(site)

    assert_start_rejected(site, result, f"chmod 600 {previous}")


@pytest.mark.parametrize("key", [signing_key, encryption_key], ids=["signing", "encryption"])
def test_key_owned_by_other_user(site: Site, key: object) -> None:
    assert callable(key)
    path: Path = key(site)
    os.chown(path, NOBODY, NOBODY)

    result = run_agent(site)

    assert_start_rejected(
        site,
        result,
        f"private key {path} is owned by uid {NOBODY}",
        f"fix it with: chown {os.geteuid()} {path}",
    )


def test_key_symlink_rejected(site: Site) -> None:
    real = site.root / "elsewhere.key"
    signing_key(site).rename(real)
    signing_key(site).symlink_to(real)

    result = run_agent(site)

    assert_start_rejected(
        site,
        result,
        f"private key {signing_key(site)} is not a regular file",
        "set the config to the key file itself",
    )


def test_private_keys_start(site: Site) -> None:
    """The control: with mode 0600 keys owned by this user the agent starts and stops."""
    assert signing_key(site).stat().st_mode & 0o777 == 0o600
    process = start_agent(site)
    try:
        assert wait_until(lambda: audit_events(site, "agent_started"), START_TIMEOUT)
    finally:
        assert stop_agent(process) == 0
