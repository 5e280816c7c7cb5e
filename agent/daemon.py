"""The daemon: wires ingest, outbound, inbound and transports; handles signals and systemd.

Threads: pynetdicom's server threads (SCP), one watchdog observer and worker per drop
folder, one sender per peer, and the main loop, which promotes quiet studies, seals
ready batches, processes the inbox and runs housekeeping (retention, stale uploads).

Signals:

- SIGTERM and SIGINT stop intake at once (the SCP aborts open associations, drop folders
  stop) and tell the senders to stop after their current delivery. The main loop
  finishes its round, and the senders are waited for until SHUTDOWN_SECONDS after the
  signal. Work not finished stays in its state folder and resumes at the next start.
- SIGHUP reloads peers, routes, transports and the delivery settings from the config
  file. An invalid file is rejected with an error in the log and the running
  configuration stays. Senders of unchanged peers keep running and retry at once.

The systemd notify protocol (READY, RELOADING, STOPPING, WATCHDOG) is spoken when
``NOTIFY_SOCKET`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from agent.audit import AuditLog
from agent.config import Config, ConfigError, PeerConfig, SftpTransportConfig, load_config
from agent.identity import load_identity
from agent.pipeline import reconcile
from agent.pipeline.inbound import InboundPipeline
from agent.pipeline.outbound import OutboundPipeline
from agent.pipeline.retention import RetentionSweeper
from agent.pipeline.sender import PeerSender
from agent.pipeline.spool import Spool
from agent.transport.base import Transport
from agent.transport.directory import DirectoryTransport

LOGGER = logging.getLogger(__name__)

STALL_SECONDS = 1800.0
"""A main loop round running longer than this is taken as stuck (see Agent._start_watchdog)."""

_Replacement = tuple[PeerConfig, Transport]
"""The peer config and transport of a sender that waits for its predecessor to exit."""

SHUTDOWN_SECONDS = 60.0
"""Time allowed from SIGTERM to exit; the systemd unit's TimeoutStopSec is 90 s."""

SCP_STOP_SECONDS = 5.0
"""Wait for each open association after the SCP aborted it."""

HOUSEKEEPING_SECONDS = 60.0
"""Maximum interval between housekeeping rounds (it also runs every 10 poll intervals)."""


def notify(message: str) -> None:
    """Send one sd_notify datagram if systemd asked for them (NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            LOGGER.debug("sd_notify failed: %s", exc)


def build_transport(peer: PeerConfig) -> Transport | None:
    """Return the transport configured for a peer, or None if it has none.

    Raises ValueError when a pinned host key cannot be parsed.
    """
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


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """Name the settings that differ but take effect only after a restart."""
    inbound_paths = ("enabled", "inbox", "import_dir", "quarantine_dir")
    checks = {
        "[agent] state_dir": old.state_dir != new.state_dir,
        "[agent] log_level and poll_interval": (old.log_level, old.poll_interval)
        != (new.log_level, new.poll_interval),
        "[identity]": old.identity != new.identity,
        "[dicom]": old.dicom != new.dicom,
        "[[watch]]": old.watch != new.watch,
        "[inbound] enabled and folders": any(
            getattr(old.inbound, name) != getattr(new.inbound, name) for name in inbound_paths
        ),
        "[audit]": old.audit_path != new.audit_path,
    }
    return [name for name, changed in checks.items() if changed]


def _reloadable(old: Config, new: Config) -> Config:
    """Return ``old`` with every setting that can change at run time taken from ``new``."""
    inbound = dataclasses.replace(
        new.inbound,
        enabled=old.inbound.enabled,
        inbox=old.inbound.inbox,
        import_dir=old.inbound.import_dir,
        quarantine_dir=old.inbound.quarantine_dir,
    )
    return dataclasses.replace(
        old,
        peers=new.peers,
        routes=new.routes,
        delivery=new.delivery,
        inbound=inbound,
        study_quiet_seconds=new.study_quiet_seconds,
        min_free_mb=new.min_free_mb,
    )


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
        self.retention = RetentionSweeper(self.spool)
        self.senders: dict[str, PeerSender] = {}
        # Senders stopped by a reload, by peer id, with what to start once they exit.
        self._retiring: dict[str, tuple[PeerSender, _Replacement | None]] = {}
        self._reload_requested = threading.Event()
        self._intake_lock = threading.Lock()
        self._scp: Any = None
        self._watchers: list[Any] = []
        self._disk_low = False
        self._heartbeat = time.monotonic()
        self._next_housekeeping = 0.0
        self._stop_requested_at: float | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Reconcile the spool, then start senders and intake; return once work is accepted."""
        self._reconcile()
        for peer in self.config.peers:
            try:
                transport = build_transport(peer)
            except ValueError as exc:
                raise ConfigError(f"{self.config.source}: peer {peer.id}: {exc}") from exc
            if transport is not None:
                self._start_sender(peer, transport)
        self._start_intake()
        self.audit.record("agent_started", outcome="ok")
        LOGGER.info(
            "jmix-agent %s started: state %s, peers: %d, DICOM %s, drop folders: %d",
            self.identity.id,
            self.config.state_dir,
            len(self.config.peers),
            f"{self.config.dicom.ae_title} on port {self.config.dicom.port}"
            if self.config.dicom.enabled
            else "off",
            len(self.config.watch),
        )

    def _reconcile(self) -> None:
        import_dir = self.config.inbound.import_dir if self.inbound is not None else None
        removed = reconcile.remove_leftovers(self.spool, import_dir)
        summary = reconcile.summarise(self.spool, removed)
        LOGGER.info(
            "spool reconciled: %d studies in incoming/, %d batches in ready/, %d envelopes "
            "in outbox/, %d inbound envelopes to resume, %d leftovers of interrupted "
            "writes removed",
            summary.incoming_studies,
            summary.ready_batches,
            summary.outbox_envelopes,
            summary.inbound_claims,
            summary.removed,
        )
        if self.inbound is not None:
            self.inbound.recover_claims()

    def _start_sender(self, peer: PeerConfig, transport: Transport) -> None:
        sender = PeerSender(
            peer,
            transport,
            self.spool,
            self.audit,
            self.config.delivery,
            self.config.poll_interval,
        )
        sender.start()
        self.senders[peer.id] = sender

    def _start_intake(self) -> None:
        with self._intake_lock:
            if self.stop_event.is_set():
                return
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
                    watch.path.mkdir(mode=0o700, parents=True, exist_ok=True)
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

    def _stop_intake(self) -> None:
        """Stop the SCP and the drop folders; safe to call more than once.

        A second call waits until the first has finished, so that shutdown does not exit
        before the SCP and the drop folders have stopped (each waits a bounded time).
        """
        with self._intake_lock:
            scp, self._scp = self._scp, None
            watchers, self._watchers = self._watchers, []
            if scp is not None:
                scp.stop(timeout=SCP_STOP_SECONDS)
            for watcher in watchers:
                watcher.stop()

    # -- the main loop -------------------------------------------------------------------

    def tick(self) -> None:
        """Run one round of the main loop's work."""
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self.reload()
        self._start_replacement_senders()
        self._check_free_space()
        self.outbound.promote_quiet_studies()
        self.outbound.seal_ready()
        if self.inbound is not None:
            self.inbound.process_all()
        if time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + min(
                HOUSEKEEPING_SECONDS, 10 * self.config.poll_interval
            )
            self.housekeeping()

    def housekeeping(self) -> None:
        """Delete data past retention and stale partial uploads; resume stuck claims."""
        self.retention.sweep(self.config.delivery.retention_hours, time.time())
        if self.inbound is not None:
            reconcile.remove_stale_uploads(
                self.inbound.inbox, self.config.inbound.stale_upload_seconds
            )
            self.inbound.recover_claims()

    def _check_free_space(self) -> None:
        """Log when the disk guard starts and stops refusing intake.

        The SCP and the drop folders check free space on every instance themselves
        (:meth:`Spool.check_space`); this only reports the change once.
        """
        threshold = self.spool.min_free_bytes
        low = bool(threshold) and self.spool.free_bytes() < threshold
        if low and not self._disk_low:
            LOGGER.error(
                "free space in %s is below min_free_mb (%d MiB): C-STORE requests are "
                "answered with out of resources and drop folders wait until space is freed",
                self.spool.root,
                threshold // 2**20,
            )
        elif self._disk_low and not low:
            LOGGER.info(
                "free space in %s is above min_free_mb again; intake resumes", self.spool.root
            )
        self._disk_low = low

    def run(self) -> None:
        """Run until SIGTERM or SIGINT."""
        self.start()
        notify("READY=1\nSTATUS=running")
        self._heartbeat = time.monotonic()
        watchdog = self._start_watchdog()
        while not self.stop_event.is_set():
            self._heartbeat = time.monotonic()
            try:
                self.tick()
            except Exception:
                LOGGER.exception("main loop round failed; continuing")
            self.stop_event.wait(self.config.poll_interval)
        self.shutdown()
        if watchdog is not None:
            watchdog.join(timeout=5)

    def _start_watchdog(self) -> threading.Thread | None:
        """Ping systemd's watchdog from a thread while the main loop keeps making rounds.

        Sealing or opening a large study can take longer than WatchdogSec, so the ping
        cannot wait for the round to end. The thread pings as long as the current round
        started less than ``STALL_SECONDS`` ago; a main loop stuck longer than that stops
        the pings, and systemd restarts the agent.
        """
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if not watchdog_usec:
            return None
        interval = watchdog_usec / 2e6

        def ping() -> None:
            while not self.stop_event.wait(interval):
                if time.monotonic() - self._heartbeat < STALL_SECONDS:
                    notify("WATCHDOG=1")
                else:
                    LOGGER.error(
                        "main loop has not started a round for %.0f s; no longer pinging "
                        "the systemd watchdog so that the service is restarted",
                        time.monotonic() - self._heartbeat,
                    )

        thread = threading.Thread(target=ping, name="systemd-watchdog", daemon=True)
        thread.start()
        return thread

    # -- reload --------------------------------------------------------------------------

    def request_reload(self, _signum: int, _frame: FrameType | None) -> None:
        """Signal handler: reload the config at the start of the next main loop round."""
        LOGGER.info("received SIGHUP; reloading %s", self.config.source)
        self._reload_requested.set()

    def reload(self) -> bool:
        """Apply peers, routes and delivery settings from the config file; keep it if invalid."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
        try:
            return self._reload()
        finally:
            notify("READY=1\nSTATUS=running")

    def _reload(self) -> bool:
        source = self.config.source
        try:
            new = load_config(source)
            transports: dict[str, Transport | None] = {
                peer.id: build_transport(peer)
                for peer in new.peers
                if self._sender_config(peer.id) != peer
            }
        except (ConfigError, ValueError) as exc:
            LOGGER.error("reloading the configuration failed, so the running one is kept: %s", exc)
            return False

        ignored = _restart_only_changes(self.config, new)
        if ignored:
            LOGGER.warning(
                "%s changed in %s; these take effect only after a restart",
                ", ".join(ignored),
                source,
            )
        applied = _reloadable(self.config, new)
        self.config = applied
        self.outbound.config = applied
        if self.inbound is not None:
            self.inbound.config = applied
        self.spool.min_free_bytes = applied.min_free_mb * 1024 * 1024

        configured = {peer.id for peer in applied.peers}
        for peer in applied.peers:
            current = self.senders.get(peer.id)
            if current is not None and current.peer == peer:
                current.settings = applied.delivery
                current.retry_now()
                continue
            transport = transports.get(peer.id)
            replacement = (peer, transport) if transport is not None else None
            if current is not None:
                self._retire(current, replacement)
            elif peer.id in self._retiring:
                self._retiring[peer.id] = (self._retiring[peer.id][0], replacement)
            elif replacement is not None:
                self._start_sender(*replacement)
        for peer_id in [*self.senders, *self._retiring]:
            if peer_id in configured:
                continue
            LOGGER.warning(
                "peer %s was removed from the config; envelopes waiting for it stay in "
                "outbox/ until it is added again",
                peer_id,
            )
            if peer_id in self.senders:
                self._retire(self.senders[peer_id], None)
            else:
                self._retiring[peer_id] = (self._retiring[peer_id][0], None)
        LOGGER.info(
            "configuration reloaded from %s: %d peers, %d routes",
            source,
            len(applied.peers),
            len(applied.routes),
        )
        return True

    def _sender_config(self, peer_id: str) -> PeerConfig | None:
        sender = self.senders.get(peer_id)
        return sender.peer if sender is not None else None

    def _retire(self, sender: PeerSender, replacement: _Replacement | None) -> None:
        """Stop a sender; its replacement starts once it has finished its delivery.

        Two senders must never deliver from the same outbox at once.
        """
        sender.stop()
        del self.senders[sender.peer.id]
        self._retiring[sender.peer.id] = (sender, replacement)

    def _start_replacement_senders(self) -> None:
        for peer_id, (old, replacement) in list(self._retiring.items()):
            if old.is_alive():
                continue
            del self._retiring[peer_id]
            if replacement is not None:
                self._start_sender(*replacement)

    # -- stop ----------------------------------------------------------------------------

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        """Signal handler: stop intake at once and ask the main loop to finish."""
        LOGGER.info("received signal %d; stopping", signum)
        notify("STOPPING=1")
        self._stop_requested_at = time.monotonic()
        self.stop_event.set()
        for sender in [*self.senders.values(), *(old for old, _next in self._retiring.values())]:
            sender.stop()
        # Intake must stop now, not after the main loop's current round.
        threading.Thread(target=self._stop_intake, name="stop-intake", daemon=True).start()

    def shutdown(self) -> None:
        """Stop intake and senders, wait for them within SHUTDOWN_SECONDS, record the stop."""
        # The time allowed counts from the signal, not from the end of the main loop's round.
        deadline = (self._stop_requested_at or time.monotonic()) + SHUTDOWN_SECONDS
        self.stop_event.set()
        self._stop_intake()
        senders = [*self.senders.values(), *(old for old, _next in self._retiring.values())]
        for sender in senders:
            sender.stop()
        for sender in senders:
            sender.join(max(0.0, deadline - time.monotonic()))
        for sender in senders:
            if sender.is_alive():
                LOGGER.error(
                    "the sender for %s did not finish its delivery within %.0f s; the "
                    "envelope stays in outbox/ and is sent again after the next start",
                    sender.peer.id,
                    SHUTDOWN_SECONDS,
                )
        lingering = [
            thread.name
            for thread in threading.enumerate()
            if thread is not threading.current_thread() and not thread.daemon
        ]
        if lingering:
            LOGGER.warning("threads still running at exit: %s", ", ".join(lingering))
        self.audit.record("agent_stopped", outcome="ok")
        LOGGER.info("jmix-agent stopped")


def run_daemon(config: Config) -> int:
    """Entry point of ``jmix-agent run``; return 0 after a clean stop, 2 for a bad config."""
    agent = Agent(config)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    signal.signal(signal.SIGHUP, agent.request_reload)
    try:
        agent.run()
    except ConfigError as exc:
        # Restarting cannot fix this, and the unit does not restart on exit status 2.
        LOGGER.error("%s", exc)
        agent.shutdown()
        return 2
    return 0


def state_path(config: Config, *parts: str) -> Path:
    """Return a path under the state directory."""
    return config.state_dir.joinpath(*parts)
