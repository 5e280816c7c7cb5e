"""The systemd watchdog thread pings while the main loop is alive, and stops when it stalls."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from agent import daemon
from agent.daemon import Agent


def _bare_agent() -> Agent:
    # Only what _start_watchdog reads; no config, keys or spool are needed.
    agent = Agent.__new__(Agent)
    agent.stop_event = threading.Event()
    agent._heartbeat = time.monotonic()
    return agent


def _pings(sock: socket.socket, seconds: float) -> int:
    count = 0
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            if sock.recv(64) == b"WATCHDOG=1":
                count += 1
        except TimeoutError:
            break
    return count


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    return sock


def test_watchdog_pings_during_long_round(notify_socket: socket.socket) -> None:
    agent = _bare_agent()
    thread = agent._start_watchdog()
    assert thread is not None
    try:
        # The main loop is "inside" one round for the whole time: no heartbeat updates.
        assert _pings(notify_socket, 1.0) >= 3
    finally:
        agent.stop_event.set()
        thread.join(timeout=2)
    assert not thread.is_alive()


def test_watchdog_stops_when_loop_stalls(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon, "STALL_SECONDS", 0.3)
    agent = _bare_agent()
    agent._heartbeat = time.monotonic() - 10
    thread = agent._start_watchdog()
    assert thread is not None
    try:
        assert _pings(notify_socket, 0.8) == 0
    finally:
        agent.stop_event.set()
        thread.join(timeout=2)


def test_watchdog_off_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert _bare_agent()._start_watchdog() is None
