"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.devtools.sshd import SshdServer


@pytest.fixture
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdServer]:
    """Return a running throwaway sshd on 127.0.0.1; it and its sessions stop afterwards."""
    server = SshdServer.create(tmp_path_factory.mktemp("sshd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
