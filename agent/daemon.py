"""The daemon: wires ingest, outbound, inbound and transports; handles signals and systemd.

Threads: pynetdicom's server threads (SCP), one watchdog observer per drop folder, one
sender per peer, and the main loop, which promotes quiet studies, seals ready batches and
processes the inbox. SIGTERM and SIGINT stop intake first, then let in-flight work finish
and join every thread. The systemd notify protocol (READY, STOPPING, WATCHDOG) is spoken
when ``NOTIFY_SOCKET`` is set.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

from agent import fsutil
from agent.audit import AuditLog
from agent.config import Config, PeerConfig, SftpTransportConfig
from agent.identity import load_identity
from agent.pipeline.inbound import InboundPipeline
from agent.pipeline.outbound import OutboundPipeline, PeerSender
from agent.pipeline.spool import Spool
from agent.transport.base import Transport
from agent.transport.directory import DirectoryTransport

LOGGER = logging.getLogger(__name__)


def notify(message: str) -> None:
    """Send one sd_notify datagram if systemd asked for them (NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        LOGGER.debug("sd_notify failed: %s", exc)


def build_transport(peer: PeerConfig) -> Transport | None:
    """Return the transport configured for a peer, or None if it has none."""
    config = peer.transport
    if config is None:
        return None
    if isinstance(config, SftpTransportConfig):
        from agent.transport.sftp import SftpTransport

        return SftpTransport(
            host=config.host,
            port=config.port,
            username=config.username,
            private_key_path=config.private_key,
            host_key=list(config.host_keys),
            remote_dir=config.remote_dir,
            connect_timeout=config.connect_timeout,
        )
    return DirectoryTransport(config.path)


class Agent:
    """One running agent."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.identity = load_identity(config.identity)
        self.spool = Spool(config.state_dir, config.min_free_mb * 1024 * 1024)
        self.audit = AuditLog(config.audit_path)
        self.outbound = OutboundPipeline(config, self.spool, self.identity, self.audit)
        self.inbound = (
            InboundPipeline(config, self.spool, self.identity, self.audit)
            if config.inbound.enabled
            else None
        )
        self.senders: list[PeerSender] = []
        self._scp: object | None = None
        self._watchers: list[object] = []

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start intake and senders; return once the agent accepts work."""
        self._clean_work()
        for peer in self.config.peers:
            transport = build_transport(peer)
            if transport is None:
                continue
            sender = PeerSender(
                peer, transport, self.spool, self.audit, self.stop_event, self.config.poll_interval
            )
            sender.start()
            self.senders.append(sender)
        self._start_intake()
        self.audit.record("agent_started", outcome="ok")
        LOGGER.info(
            "jmix-agent %s started: state %s, %d peers, DICOM %s, %d drop folders",
            self.identity.id,
            self.config.state_dir,
            len(self.config.peers),
            f"{self.config.dicom.ae_title} on port {self.config.dicom.port}"
            if self.config.dicom.enabled
            else "off",
            len(self.config.watch),
        )

    def _start_intake(self) -> None:
        if self.config.dicom.enabled:
            from agent.dicom.scp import StorageSCP

            scp = StorageSCP(
                ae_title=self.config.dicom.ae_title,
                bind=self.config.dicom.bind,
                port=self.config.dicom.port,
                spool=self.spool,
                audit=self.audit,
                allowed_callers=[
                    (rule.ae_title, str(rule.network) if rule.network else None)
                    for rule in self.config.dicom.allowed_callers
                ],
                max_associations=self.config.dicom.max_associations,
            )
            scp.start()
            self._scp = scp
        if self.config.watch:
            from agent.ingest.watch import DropFolderWatcher

            for watch in self.config.watch:
                fsutil.make_private_dir(watch.path)
                watcher = DropFolderWatcher(
                    path=watch.path,
                    spool=self.spool,
                    audit=self.audit,
                    name=watch.name,
                    stable_seconds=watch.stable_seconds,
                    polling=watch.polling,
                    quarantine_dir=self.config.inbound.quarantine_dir / "watch",
                )
                watcher.start()
                self._watchers.append(watcher)

    def _clean_work(self) -> None:
        """Remove staging left by a crash; its inputs are still in their earlier state."""
        for entry in self.spool.path("work").iterdir():
            fsutil.remove_tree(entry)
        for state in ("outbox",):
            for leftover in self.spool.path(state).rglob(f"{fsutil.TEMP_PREFIX}*"):
                fsutil.remove_tree(leftover)

    def tick(self) -> None:
        """Run one round of the main loop's work."""
        self.outbound.promote_quiet_studies()
        self.outbound.seal_ready()
        if self.inbound is not None:
            self.inbound.process_all()

    def run(self) -> None:
        """Run until SIGTERM or SIGINT."""
        self.start()
        notify("READY=1\nSTATUS=running")
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        last_ping = 0.0
        while not self.stop_event.is_set():
            try:
                self.tick()
            except Exception:
                LOGGER.exception("main loop round failed; continuing")
            if watchdog_usec and time.monotonic() - last_ping > watchdog_usec / 2e6:
                notify("WATCHDOG=1")
                last_ping = time.monotonic()
            self.stop_event.wait(self.config.poll_interval)
        self.shutdown()

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        """Signal handler: ask the main loop to stop."""
        LOGGER.info("received signal %d; stopping", signum)
        notify("STOPPING=1")
        self.stop_event.set()

    def shutdown(self) -> None:
        """Stop intake, then senders, and record the stop."""
        self.stop_event.set()
        if self._scp is not None:
            self._scp.stop()  # type: ignore[attr-defined]
        for watcher in self._watchers:
            watcher.stop()  # type: ignore[attr-defined]
        for sender in self.senders:
            sender.join(timeout=30)
        self.audit.record("agent_stopped", outcome="ok")
        LOGGER.info("jmix-agent stopped")


def run_daemon(config: Config) -> int:
    """Entry point of ``jmix-agent run``."""
    agent = Agent(config)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    signal.signal(
        signal.SIGHUP,
        lambda *_: LOGGER.warning(
            "SIGHUP received; reloading is not supported yet, restart the service to apply changes"
        ),
    )
    agent.run()
    return 0


def state_path(config: Config, *parts: str) -> Path:
    """Return a path under the state directory."""
    return config.state_dir.joinpath(*parts)
