"""A throwaway OpenSSH server on 127.0.0.1 for tests that need a real SFTP peer.

The server runs ``/usr/sbin/sshd -D`` with a private config, host key, client key and
``authorized_keys`` inside one temporary directory, so it needs no system configuration
apart from the privilege separation directory ``/run/sshd``. Key login works for the
current user, including root, because ``PermitRootLogin`` keeps its OpenSSH default
``prohibit-password``.

The same server can be stopped and started again on the same port with the same keys,
which lets fault tests cut connections the way a server reboot does.
"""

from __future__ import annotations

import os
import pwd
import resource
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = Path("/usr/bin/ssh-keygen")
PRIVSEP_DIR = Path("/run/sshd")
HOST = "127.0.0.1"

STARTUP_TIMEOUT = 10.0
"""Seconds to wait for a new sshd to accept connections before giving up."""

STOP_TIMEOUT = 5.0
"""Seconds to wait after SIGTERM before a process is sent SIGKILL."""


def generate_key(path: Path, comment: str = "jmix-agent-test", key_type: str = "ed25519") -> str:
    """Create an unencrypted key pair at ``path`` and ``path.pub``; return the public key line."""
    subprocess.run(
        [str(SSH_KEYGEN), "-q", "-t", key_type, "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def fingerprint(public_key_path: Path) -> str:
    """Return the ``SHA256:...`` fingerprint that ``ssh-keygen -l`` prints for a key."""
    output = subprocess.run(
        [str(SSH_KEYGEN), "-l", "-E", "sha256", "-f", str(public_key_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return output.split()[1]


def _free_port() -> int:
    # The port is free when this returns but could be taken before sshd binds it, so
    # start() retries with a new port when sshd reports that the address is in use.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _parent_pids() -> dict[int, int]:
    """Map every visible process id to its parent process id, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process exited while we were listing
        # The command name in brackets may contain spaces, so split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def _descendants(pid: int) -> list[int]:
    parents = _parent_pids()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found.extend(children)
        frontier.extend(children)
    return found


def _is_running(pid: int) -> bool:
    """Return False once ``pid`` has exited, including as an unreaped zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat[stat.rindex(")") + 2 :].split()[0]
    return state not in ("Z", "X")


def _terminate(pids: list[int]) -> None:
    """Send SIGTERM to each pid, then SIGKILL to any still running after STOP_TIMEOUT."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            # A process stopped by freeze_sessions() handles SIGTERM only once continued.
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and any(_is_running(pid) for pid in pids):
        time.sleep(0.02)
    for pid in pids:
        if _is_running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class SshdServer:
    """One sshd listening on ``host:port``, with everything it needs under ``root``.

    Create it with :meth:`create`, then :meth:`start` it. ``inbox`` is an empty
    directory that a test can use as the remote directory. The server and client run
    on the same machine, so the remote path and the local path are the same.
    """

    root: Path
    port: int
    user: str
    host_key_path: Path
    host_public_key: str
    client_key_path: Path
    client_public_key: str
    inbox: Path
    host: str = HOST
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, root: Path) -> SshdServer:
        """Generate host and client keys under ``root`` and pick a free port."""
        if not SSHD.exists() or not SSH_KEYGEN.exists():
            raise RuntimeError(
                f"{SSHD} or {SSH_KEYGEN} is missing: install the Debian packages "
                "openssh-server and openssh-client to run the SFTP tests"
            )
        host_key_path = root / "ssh_host_ed25519_key"
        client_key_path = root / "client_ed25519_key"
        host_public_key = generate_key(host_key_path, comment="test-sshd-host")
        client_public_key = generate_key(client_key_path, comment="test-client")
        (root / "authorized_keys").write_text(client_public_key + "\n")
        inbox = root / "inbox"
        inbox.mkdir()
        return cls(
            root=root,
            port=_free_port(),
            user=pwd.getpwuid(os.geteuid()).pw_name,
            host_key_path=host_key_path,
            host_public_key=host_public_key,
            client_key_path=client_key_path,
            client_public_key=client_public_key,
            inbox=inbox,
        )

    @property
    def config_path(self) -> Path:
        """The sshd_config written by :meth:`start`."""
        return self.root / "sshd_config"

    @property
    def log_path(self) -> Path:
        """The log file given to ``sshd -E``; restarts append to it."""
        return self.root / "sshd.log"

    @property
    def running(self) -> bool:
        """True while the listening sshd process is alive."""
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        """Return everything sshd has logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def accepted_logins(self) -> int:
        """Count the successful key logins in the log, which is one per SSH connection."""
        return self.log_text().count("Accepted publickey for ")

    def start(self, *, read_only: bool = False, file_size_limit: int | None = None) -> None:
        """Start sshd and return once it accepts connections.

        ``read_only`` runs ``internal-sftp -R``, so every write request fails with
        permission denied, even for root. ``file_size_limit`` (bytes) sets
        RLIMIT_FSIZE for the server with SIGXFSZ ignored, so a write past that size
        fails with EFBIG, which OpenSSH reports as a generic SFTP failure, like a
        full disk. Restarting keeps the port and keys unless the port was taken.
        """
        if self.running:
            raise RuntimeError(f"sshd is already running on {self.host}:{self.port}")
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

        for _attempt in range(3):
            self._write_config(read_only)
            log_offset = len(self.log_text())
            self.process = self._spawn(file_size_limit)
            if self._wait_until_ready():
                return
            startup_log = self.log_text()[log_offset:]
            self.process = None
            if "Address already in use" not in startup_log:
                raise RuntimeError(f"sshd failed to start. Its log:\n{startup_log}")
            self.port = _free_port()
        raise RuntimeError("sshd could not bind a free port after 3 attempts")

    def stop(self) -> None:
        """Stop the listener and every session it started, like a server reboot.

        Stopping only the listener would leave open connections working, because
        each sshd session process outlives the listener.
        """
        if self.process is None:
            return
        sessions = _descendants(self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _terminate(sessions)
        self.process = None

    def kill_sessions(self) -> None:
        """Cut every open SSH connection but keep the listener running."""
        if self.process is not None:
            _terminate(_descendants(self.process.pid))

    def freeze_sessions(self) -> None:
        """Stop (SIGSTOP) every session process, so open connections hang without closing.

        New connections still work, because the listener keeps running.
        """
        if self.process is not None:
            for pid in _descendants(self.process.pid):
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass

    def restart(self, *, read_only: bool = False, file_size_limit: int | None = None) -> None:
        """Stop and start again on the same port with the same keys."""
        self.stop()
        self.start(read_only=read_only, file_size_limit=file_size_limit)

    def _write_config(self, read_only: bool) -> None:
        sftp_flags = " -R" if read_only else ""
        self.config_path.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {self.host}\n"
            f"HostKey {self.host_key_path}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            # pytest's temporary directories are private, but a CI runner's may not be.
            "StrictModes no\n"
            "LogLevel INFO\n"
            f"Subsystem sftp internal-sftp{sftp_flags}\n"
        )

    def _spawn(self, file_size_limit: int | None) -> subprocess.Popen[bytes]:
        def limit_file_size() -> None:
            if file_size_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
                # Ignored signals stay ignored across fork and exec, so the sftp
                # session gets EFBIG from write(2) instead of being killed.
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

        with (self.root / "sshd.stderr").open("ab") as stderr:
            return subprocess.Popen(
                [str(SSHD), "-D", "-f", str(self.config_path), "-E", str(self.log_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=limit_file_size if file_size_limit is not None else None,
                # Keep the terminal's Ctrl-C away from sshd; stop() ends it by pid.
                start_new_session=True,
            )

    def _wait_until_ready(self) -> bool:
        """Return True once the server sends its SSH banner, False if sshd exited."""
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as probe:
                    if probe.recv(64).startswith(b"SSH-"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"sshd on {self.host}:{self.port} sent no banner within {STARTUP_TIMEOUT} s. "
            f"Its log:\n{self.log_text()}"
        )
