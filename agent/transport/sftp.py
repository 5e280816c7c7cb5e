"""Delivery into a peer's inbox over SFTP, with a pinned server host key.

The client trusts only the host keys given in the configuration: the paramiko host key
table contains nothing else, and an unknown key is rejected, so nothing is trusted on
first use. It authenticates with one private key file and never with an SSH agent or
the keys in ``~/.ssh``.

An upload goes to a hidden temporary name in the remote directory. A file counts as
written only after the server has acknowledged every write request. Each file is then
flushed with the ``fsync@openssh.com`` extension when the server offers it. Finally the
temporary name is renamed onto the final name with ``posix-rename@openssh.com``, or with
plain SFTP rename where that extension is missing.

NOTE: SFTP cannot flush a directory, because OpenSSH (checked with 9.2) rejects
``fsync@openssh.com`` on a directory handle. After a server crash the final rename may
therefore be lost even though the files were flushed, and the retry uploads the item
again.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from paramiko import (
    AuthenticationException,
    BadHostKeyException,
    PKey,
    RejectPolicy,
    SFTPClient,
    SFTPFile,
    SSHClient,
    SSHException,
)
from paramiko.channel import Channel
from paramiko.message import Message
from paramiko.pkey import UnknownKeyType
from paramiko.sftp import CMD_EXTENDED, CMD_INIT, CMD_VERSION, SFTPError
from paramiko.ssh_exception import IncompatiblePeer, NoValidConnectionsError

from agent.transport.base import (
    AuthenticationError,
    DeliveryResult,
    HostKeyError,
    SourceError,
    SourceTree,
    TransportError,
    scan_source,
    temp_name,
    validate_name,
)

LOGGER = logging.getLogger(__name__)

HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
"""Public key types accepted as pinned host keys (certificates are not)."""

READ_CHUNK = 1024 * 1024
"""Bytes read from a local file at a time; at most two chunks are held in memory."""

KEEPALIVE_SECONDS = 30
"""Interval of SSH keepalive messages on an idle connection, so that NAT devices and
firewalls keep it open between deliveries."""

SFTP_PROTOCOL_VERSION = 3
FSYNC_EXTENSION = "fsync@openssh.com"
POSIX_RENAME_EXTENSION = "posix-rename@openssh.com"


@dataclass(frozen=True)
class ServerInfo:
    """Server properties returned by :meth:`SftpTransport.check`."""

    host_key_type: str
    host_key_fingerprint: str
    fsync_supported: bool
    posix_rename_supported: bool


def parse_host_key(line: str) -> PKey:
    """Parse one OpenSSH public key line (``type base64 [comment]``) into a key.

    Raises ValueError naming the problem when the line is malformed, the type is not in
    HOST_KEY_TYPES, or the key data does not match its declared type.
    """
    fields = line.split(None, 2)
    if len(fields) < 2:
        raise ValueError(f"host key {line!r} is not an OpenSSH public key line (type base64)")
    key_type, encoded = fields[0], fields[1]
    if key_type not in HOST_KEY_TYPES:
        raise ValueError(
            f"host key type {key_type!r} is not supported; use one of {', '.join(HOST_KEY_TYPES)}"
        )
    try:
        blob = base64.b64decode(encoded, validate=True)
        key = PKey.from_type_string(key_type, blob)
    except (binascii.Error, SSHException, UnknownKeyType, ValueError, struct.error) as exc:
        raise ValueError(f"host key of type {key_type!r} has invalid key data: {exc}") from exc

    # Re-encoding must give the same bytes, so a blob of another type or with trailing
    # data is rejected instead of being half-read.
    if key.get_name() != key_type or key.asbytes() != blob:
        raise ValueError(f"host key data does not match its declared type {key_type!r}")
    return key


def load_private_key(path: Path) -> PKey:
    """Load an unencrypted ed25519, ECDSA or RSA private key (OpenSSH or PEM format).

    Raises AuthenticationError, with the fix in the message, when the file is missing,
    unreadable, readable by group or others, encrypted, or not a supported key. The
    message never contains key material.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise AuthenticationError(f"client key file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise AuthenticationError(
            f"cannot read client key file {str(path)!r}: {exc.strerror}"
        ) from exc

    # OpenSSH rejects such keys too: anyone who can read the file can log in as us.
    if mode & 0o077:
        raise AuthenticationError(
            f"client key file {str(path)!r} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}). Run: chmod 600 {path}"
        )

    try:
        return PKey.from_path(path)
    except PermissionError as exc:
        raise AuthenticationError(
            f"cannot read client key file {str(path)!r}: {exc.strerror}. "
            "It must be readable by the agent's user."
        ) from exc
    except (TypeError, SSHException) as exc:
        # cryptography raises TypeError for a missing passphrase, paramiko raises
        # PasswordRequiredException (an SSHException) for encrypted PEM files.
        raise AuthenticationError(
            f"client key file {str(path)!r} is encrypted or unreadable ({exc}). The agent "
            "runs unattended, so it needs an unencrypted key that only its user can read."
        ) from exc
    except (ValueError, UnknownKeyType, OSError) as exc:
        raise AuthenticationError(
            f"client key file {str(path)!r} is not a supported private key "
            "(ed25519, ECDSA or RSA, in OpenSSH or PEM format)"
        ) from exc


class _ExtendedSFTPClient(SFTPClient):
    """An SFTPClient that records the server's extensions and can send fsync.

    NOTE: paramiko 5.1 reads the server's VERSION packet in the private
    ``_send_version`` and drops the extension list, and SFTPFile has no fsync method.
    This class replaces ``_send_version`` and calls the private ``_send_packet``,
    ``_read_packet`` and ``_request``, so a paramiko upgrade can break it. The SFTP
    tests check that fsync is detected against OpenSSH.
    """

    def __init__(self, sock: Channel) -> None:
        self.extensions: dict[str, bytes] = {}
        super().__init__(sock)

    def _send_version(self) -> int:
        # Same exchange as paramiko's own method, but the extension pairs that follow
        # the version number are kept.
        request = Message()
        request.add_int(SFTP_PROTOCOL_VERSION)
        self._send_packet(CMD_INIT, request)  # type: ignore[attr-defined]
        packet_type, data = self._read_packet()  # type: ignore[attr-defined]
        if packet_type != CMD_VERSION:
            raise SFTPError("Incompatible sftp protocol")
        version: int = struct.unpack(">I", data[:4])[0]
        self.extensions = _parse_extensions(data[4:])
        return version

    def fsync(self, remote_file: SFTPFile) -> None:
        """Ask the server to fsync an open file; only call this if FSYNC_EXTENSION is offered."""
        self._request(CMD_EXTENDED, FSYNC_EXTENSION, remote_file.handle)  # type: ignore[attr-defined]


def _parse_extensions(data: bytes) -> dict[str, bytes]:
    """Decode the (name, data) string pairs of an SFTP VERSION packet, ignoring a bad tail."""
    extensions: dict[str, bytes] = {}
    offset = 0
    fields: list[bytes] = []
    while offset + 4 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        offset += 4
        if offset + length > len(data):
            break
        fields.append(data[offset : offset + length])
        offset += length
        if len(fields) == 2:
            extensions[fields[0].decode("utf-8", "replace")] = fields[1]
            fields = []
    return extensions


class _ConnectionLostError(TransportError):
    """The connection broke or stalled in the middle of an operation."""


@dataclass
class _Session:
    """One authenticated SSH connection and its SFTP channel."""

    client: SSHClient
    sftp: _ExtendedSFTPClient
    host_key: PKey

    def is_alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        self.sftp.close()
        self.client.close()


class SftpTransport:
    """Delivers items into ``remote_dir`` on an SFTP server whose host key is pinned.

    ``host_key`` is one OpenSSH public key line or a list of them, at most one per key
    type, because paramiko keeps one key per host and type. Timeouts are in seconds:
    ``connect_timeout`` covers TCP connect, SSH handshake and authentication, and
    ``op_timeout`` each SFTP request after that. One connection is reused across
    deliveries and reopened when it drops. Calls are serialized, so one instance may
    be shared by threads. Uploaded files get ``file_mode`` and directories
    ``dir_mode``.

    Raises ValueError from the constructor when ``host_key`` cannot be parsed.

    NOTE: the check for an existing final name and the rename are two requests.
    posix-rename replaces a file, so a second writer that creates the same file name
    in between loses its copy. One agent never delivers the same name twice at once.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        private_key_path: Path,
        host_key: str | Sequence[str],
        remote_dir: str,
        connect_timeout: float = 15.0,
        op_timeout: float = 60.0,
        *,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
    ) -> None:
        lines = [host_key] if isinstance(host_key, str) else list(host_key)
        if not lines:
            raise ValueError("at least one pinned host key is required")
        self.pinned_keys = [parse_host_key(line) for line in lines]
        key_types = [key.get_name() for key in self.pinned_keys]
        if len(set(key_types)) != len(key_types):
            raise ValueError("pin at most one host key per key type")

        self.host = host
        self.port = port
        self.username = username
        self.private_key_path = private_key_path
        self.remote_dir = PurePosixPath(remote_dir)
        self.connect_timeout = connect_timeout
        self.op_timeout = op_timeout
        self.file_mode = file_mode
        self.dir_mode = dir_mode

        self._peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._lock = threading.Lock()
        self._session: _Session | None = None
        # Temporary names left behind when a connection dropped mid-upload; they are
        # removed the next time a connection opens.
        self._orphans: list[PurePosixPath] = []

    # -- public API --------------------------------------------------------------------

    def deliver(self, local: Path, name: str) -> DeliveryResult:
        """Upload ``local`` to ``<remote_dir>/<name>`` atomically; see :class:`Transport`.

        If a reused connection turns out to be broken, the delivery is repeated once on
        a new connection. That is safe because an item that was already renamed into
        place is then reported as already present.
        """
        validate_name(name)
        source = scan_source(local)
        with self._lock:
            session, reused = self._open_session()
            try:
                return self._deliver_once(session, source, name)
            except _ConnectionLostError as exc:
                if not reused:
                    raise
                LOGGER.info("retrying %s on a new connection after: %s", name, exc.message)
            session, _reused = self._open_session()
            return self._deliver_once(session, source, name)

    def check(self) -> ServerInfo:
        """Connect (or reuse the connection) and check that ``remote_dir`` is a directory.

        This proves host key, client key and path, but not write permission. Raises the
        same errors as :meth:`deliver`.
        """
        with self._lock:
            session, reused = self._open_session()
            if reused:
                # A new session has just checked the directory while opening.
                self._check_remote_dir(session)
            return ServerInfo(
                host_key_type=session.host_key.get_name(),
                host_key_fingerprint=session.host_key.fingerprint,
                fsync_supported=FSYNC_EXTENSION in session.sftp.extensions,
                posix_rename_supported=POSIX_RENAME_EXTENSION in session.sftp.extensions,
            )

    def close(self) -> None:
        """Close the connection, if one is open; a later call reconnects."""
        with self._lock:
            self._discard_session()

    # -- connection --------------------------------------------------------------------

    def _open_session(self) -> tuple[_Session, bool]:
        """Return a live session and whether it was reused."""
        if self._session is not None:
            if self._session.is_alive():
                return self._session, True
            LOGGER.info("connection to %s was closed; reconnecting", self._peer)
            self._discard_session()

        session = self._connect()
        self._session = session
        self._check_remote_dir(session)
        self._remove_orphans(session)
        return session, False

    def _discard_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _connect(self) -> _Session:
        """Open and authenticate a connection, mapping each failure to its error type."""
        client_key = load_private_key(self.private_key_path)

        client = SSHClient()
        host_keys = client.get_host_keys()
        for key in self.pinned_keys:
            # paramiko looks keys up as "[host]:port" on ports other than 22, as
            # OpenSSH's known_hosts does; both names hold only the pinned keys.
            host_keys.add(self.host, key.get_name(), key)
            host_keys.add(f"[{self.host}]:{self.port}", key.get_name(), key)
        client.set_missing_host_key_policy(RejectPolicy())

        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.username,
                pkey=client_key,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
                allow_agent=False,
                look_for_keys=False,
            )
            transport = client.get_transport()
            if transport is None:
                raise SSHException("no transport after connect")
            transport.set_keepalive(KEEPALIVE_SECONDS)
            sftp = _ExtendedSFTPClient.from_transport(transport)
            if sftp is None:
                raise SSHException("the server did not open an SFTP channel")
        except (SSHException, OSError, EOFError) as exc:
            # paramiko keeps the handshake's own error (such as a banner timeout) on
            # the transport and may raise a vaguer one from connect().
            failed_transport = client.get_transport()
            cause = failed_transport.get_exception() if failed_transport is not None else None
            client.close()
            raise self._connect_error(exc, cause, client_key) from exc
        except BaseException:
            client.close()
            raise

        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(self.op_timeout)
        host_key = transport.get_remote_server_key()
        LOGGER.info(
            "connected to %s as %s (host key %s %s)",
            self._peer,
            self.username,
            host_key.get_name(),
            host_key.fingerprint,
        )
        if FSYNC_EXTENSION not in sftp.extensions:
            LOGGER.warning(
                "SFTP server %s does not offer %s; uploaded files are not flushed to its disk "
                "before the rename",
                self._peer,
                FSYNC_EXTENSION,
            )
        return _Session(client=client, sftp=sftp, host_key=host_key)

    def _connect_error(
        self,
        exc: SSHException | OSError | EOFError,
        cause: BaseException | None,
        client_key: PKey,
    ) -> TransportError:
        where = f"SFTP server {self._peer}"
        if isinstance(exc, BadHostKeyException):
            return HostKeyError(
                f"{where} offered host key {exc.key.get_name()} {exc.key.fingerprint}, but "
                f"the pinned key is {exc.expected_key.get_name()} "
                f"{exc.expected_key.fingerprint}. Nothing was sent. If the server's key "
                "was changed on purpose, confirm the new fingerprint with its "
                "administrator and update host_key in this peer's transport config."
            )
        if isinstance(exc, AuthenticationException):
            return AuthenticationError(
                f"{where} rejected client key {client_key.get_name()} "
                f"{client_key.fingerprint} ({str(self.private_key_path)!r}) for user "
                f"{self.username!r}: {exc}. Add the public key to that user's "
                "authorized_keys on the server, or fix username or the key file in this "
                "peer's transport config."
            )
        if isinstance(exc, IncompatiblePeer):
            return TransportError(
                f"{where} supports no key exchange, cipher or host key algorithm in common "
                f"with this agent: {exc}. Check the server's sshd configuration.",
                permanent=True,
            )
        if isinstance(exc, NoValidConnectionsError):
            return TransportError(
                f"cannot connect to {where}: connection refused. Check that the server is "
                "running and that host and port in this peer's transport config are "
                "right. The agent retries."
            )
        if isinstance(exc, TimeoutError):
            return TransportError(
                f"connecting to {where} timed out after {self.connect_timeout} s. Check "
                "the network path and any firewall. The agent retries."
            )
        if isinstance(exc, OSError):
            return TransportError(
                f"cannot connect to {where}: {exc.strerror or exc}. The agent retries."
            )
        return TransportError(
            f"SSH handshake with {where} failed or did not finish within "
            f"{self.connect_timeout} s ({cause or exc}). Check that host and port point at "
            "an SSH server. The agent retries."
        )

    def _check_remote_dir(self, session: _Session) -> None:
        step = f"checking remote directory {str(self.remote_dir)!r}"
        try:
            attributes = session.sftp.stat(str(self.remote_dir))
        except FileNotFoundError:
            raise TransportError(
                f"remote directory {str(self.remote_dir)!r} does not exist on SFTP server "
                f"{self._peer}. Create it on the server or fix remote_dir in this peer's "
                "transport config. The agent retries."
            ) from None
        except (OSError, SSHException, EOFError) as exc:
            raise self._operation_error(session, step, exc) from exc
        if attributes.st_mode is None or not stat.S_ISDIR(attributes.st_mode):
            raise TransportError(
                f"remote path {str(self.remote_dir)!r} on SFTP server {self._peer} is not "
                "a directory. Fix remote_dir in this peer's transport config. The agent "
                "retries."
            )

    # -- upload ------------------------------------------------------------------------

    def _deliver_once(self, session: _Session, source: SourceTree, name: str) -> DeliveryResult:
        sftp = session.sftp
        final = self.remote_dir / name
        location = self._location(final)

        step = f"checking for {str(final)!r}"
        try:
            if self._exists(sftp, final):
                LOGGER.debug("%s already exists; nothing delivered", location)
                return DeliveryResult(location=location, already_present=True)
        except (OSError, SSHException, EOFError) as exc:
            raise self._operation_error(session, step, exc) from exc

        temp = self.remote_dir / temp_name(name)
        try:
            if source.is_directory:
                step = f"creating {str(temp)!r}"
                self._mkdir(sftp, temp)
                for directory in source.directories:
                    step = f"creating {str(temp / directory)!r}"
                    self._mkdir(sftp, temp / directory)
                for relative, _size in source.files:
                    step = f"writing {str(temp / relative)!r}"
                    self._upload_file(sftp, source.root / relative, temp / relative)
            else:
                step = f"writing {str(temp)!r}"
                self._upload_file(sftp, source.root, temp)

            step = f"renaming {str(temp)!r} to {str(final)!r}"
            if POSIX_RENAME_EXTENSION in sftp.extensions:
                sftp.posix_rename(str(temp), str(final))
            else:
                sftp.rename(str(temp), str(final))
        except (OSError, SSHException, EOFError) as exc:
            error = self._operation_error(session, step, exc)
            self._remove_temp(session, temp)
            if not isinstance(error, _ConnectionLostError) and self._exists_quietly(sftp, final):
                # Someone else put the final name in place after our check, and the
                # rename did not replace it.
                return DeliveryResult(location=location, already_present=True)
            raise error from exc
        except BaseException:
            self._remove_temp(session, temp)
            raise

        LOGGER.debug("delivered %s (%d bytes)", location, source.total_bytes)
        return DeliveryResult(
            location=location,
            already_present=False,
            files=source.file_count,
            total_bytes=source.total_bytes,
        )

    def _mkdir(self, sftp: _ExtendedSFTPClient, path: PurePosixPath) -> None:
        sftp.mkdir(str(path), self.dir_mode)
        # The server applies its umask to the mode given to mkdir.
        sftp.chmod(str(path), self.dir_mode)

    def _upload_file(self, sftp: _ExtendedSFTPClient, local: Path, remote: PurePosixPath) -> None:
        """Upload one file with pipelined writes, check every write, then fsync it.

        Pipelined writes do not wait for each acknowledgement, and paramiko 5.1 drops
        the ones still pending when the file is closed, so a failed write near the end
        (a full disk) would go unnoticed. Writing the last piece unpipelined makes
        paramiko read and check the status of every earlier write first.
        """
        try:
            local_fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot read {str(local)!r}: {exc.strerror}") from exc

        with os.fdopen(local_fd, "rb") as reader, sftp.open(str(remote), "wbx") as remote_file:
            remote_file.chmod(self.file_mode)
            remote_file.set_pipelined(True)
            chunk = _read_local(reader, local)
            while chunk:
                next_chunk = _read_local(reader, local)
                if next_chunk:
                    remote_file.write(chunk)
                else:
                    split = max(0, len(chunk) - SFTPFile.MAX_REQUEST_SIZE)
                    remote_file.write(chunk[:split])
                    remote_file.set_pipelined(False)
                    remote_file.write(chunk[split:])
                chunk = next_chunk
            if FSYNC_EXTENSION in sftp.extensions:
                sftp.fsync(remote_file)

    @staticmethod
    def _exists(sftp: _ExtendedSFTPClient, path: PurePosixPath) -> bool:
        try:
            sftp.lstat(str(path))
        except FileNotFoundError:
            return False
        return True

    def _exists_quietly(self, sftp: _ExtendedSFTPClient, path: PurePosixPath) -> bool:
        try:
            return self._exists(sftp, path)
        except (OSError, SSHException, EOFError):
            return False

    # -- cleanup -----------------------------------------------------------------------

    def _remove_temp(self, session: _Session, temp: PurePosixPath) -> None:
        """Remove a temporary upload, or remember it for the next connection."""
        if session.is_alive() and self._remove_tree(session.sftp, temp):
            return
        self._orphans.append(temp)
        LOGGER.warning(
            "could not remove temporary upload %s on %s; will retry on the next connection",
            temp,
            self._peer,
        )

    def _remove_orphans(self, session: _Session) -> None:
        remaining = [temp for temp in self._orphans if not self._remove_tree(session.sftp, temp)]
        removed = len(self._orphans) - len(remaining)
        if removed:
            LOGGER.info("removed %d temporary uploads left on %s", removed, self._peer)
        self._orphans = remaining

    @staticmethod
    def _remove_tree(sftp: _ExtendedSFTPClient, path: PurePosixPath) -> bool:
        """Delete a remote file or directory tree; return False if any of it remains."""
        try:
            attributes = sftp.lstat(str(path))
            if attributes.st_mode is not None and stat.S_ISDIR(attributes.st_mode):
                for entry in sftp.listdir_attr(str(path)):
                    if not SftpTransport._remove_tree(sftp, path / entry.filename):
                        return False
                sftp.rmdir(str(path))
            else:
                sftp.remove(str(path))
        except FileNotFoundError:
            return True
        except (OSError, SSHException, EOFError):
            return False
        return True

    # -- errors ------------------------------------------------------------------------

    def _operation_error(
        self, session: _Session, step: str, exc: SSHException | OSError | EOFError
    ) -> TransportError:
        """Turn a failed SFTP request into a TransportError that names step and fix.

        A timeout or broken connection closes the session, because the SFTP stream is
        no longer in a known state.
        """
        where = f"SFTP server {self._peer}"
        if isinstance(exc, TimeoutError):
            self._discard_session_if(session)
            return _ConnectionLostError(
                f"{where} timed out after {self.op_timeout} s while {step}. The "
                "connection was closed and the agent retries."
            )
        if isinstance(exc, (SSHException, EOFError)) or not session.is_alive():
            self._discard_session_if(session)
            return _ConnectionLostError(
                f"connection to {where} was lost while {step} ({exc}). The agent retries."
            )

        if isinstance(exc, PermissionError):
            return TransportError(
                f"{where} denied permission while {step}. Check that user "
                f"{self.username!r} may create files in {str(self.remote_dir)!r} on the "
                "server. The agent retries."
            )
        if isinstance(exc, FileNotFoundError):
            return TransportError(
                f"{where} reported no such file while {step}. Check that "
                f"{str(self.remote_dir)!r} still exists on the server. The agent retries."
            )
        # SFTP version 3 has no status codes for a full disk, a quota or an I/O error:
        # OpenSSH reports all of them as the generic "Failure".
        return TransportError(
            f"{where} reported {exc.strerror or str(exc)!r} while {step}. On OpenSSH this "
            "usually means the disk is full, a quota is used up or the file system is "
            "read-only. Check free space on the server. The agent retries."
        )

    def _discard_session_if(self, session: _Session) -> None:
        if self._session is session:
            self._discard_session()
        else:
            session.close()

    def _location(self, path: PurePosixPath) -> str:
        display_path = str(path) if path.is_absolute() else f"~/{path}"
        return f"sftp://{self.username}@{self._peer}/{display_path.lstrip('/')}"


def _read_local(reader: BinaryIO, path: Path) -> bytes:
    """Read the next chunk of a local file, raising SourceError if the read fails."""
    try:
        return reader.read(READ_CHUNK)
    except OSError as exc:
        raise SourceError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
