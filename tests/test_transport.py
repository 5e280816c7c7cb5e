"""Transports against a real OpenSSH server and a real directory.

Each SFTP test gets its own sshd on 127.0.0.1 (see tests/sshd.py). The server runs on
this machine, so the test reads the remote directory straight from disk.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from agent import fsutil
from agent.devtools.sshd import SSH_KEYGEN, SshdServer, fingerprint, generate_key
from agent.transport import sftp as sftp_module
from agent.transport.base import (
    AuthenticationError,
    HostKeyError,
    SourceError,
    TransportError,
    validate_name,
)
from agent.transport.directory import DirectoryTransport
from agent.transport.sftp import SftpTransport, parse_host_key

MIB = 1024 * 1024
RUNNING_AS_ROOT = os.geteuid() == 0


# -- helpers -----------------------------------------------------------------------------


def make_envelope(parent: Path, payload_size: int = 2 * MIB + 123) -> Path:
    """Create an envelope-like tree: two small files, a payload, a subdirectory, an empty file.

    The payload is larger than one local read chunk and not a multiple of the SFTP
    request size, so uploads take the pipelined path and the unpipelined tail.
    """
    envelope = parent / f"{uuid.uuid4()}.JMIX"
    envelope.mkdir()
    (envelope / "manifest.json").write_text('{"id": "test"}\n')
    (envelope / "metadata.json").write_text("{}\n")
    (envelope / "payload.encrypted").write_bytes(os.urandom(payload_size))
    (envelope / "extra").mkdir()
    (envelope / "extra" / "empty").write_bytes(b"")
    return envelope


def make_zip(parent: Path, size: int = MIB + 5) -> Path:
    archive = parent / f"{uuid.uuid4()}.zip"
    archive.write_bytes(os.urandom(size))
    return archive


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Map each path below ``root`` to its bytes, or to None for a directory."""
    if root.is_file():
        return {"": root.read_bytes()}
    contents: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        contents[relative] = None if path.is_dir() else path.read_bytes()
    return contents


def sftp_transport(server: SshdServer, **overrides: object) -> SftpTransport:
    settings: dict[str, object] = {
        "host": server.host,
        "port": server.port,
        "username": server.user,
        "private_key_path": server.client_key_path,
        "host_key": server.host_public_key,
        "remote_dir": str(server.inbox),
        "connect_timeout": 5.0,
        "op_timeout": 10.0,
    }
    settings.update(overrides)
    return SftpTransport(**settings)  # type: ignore[arg-type]


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    path = tmp_path / "outbox"
    path.mkdir()
    return path


# -- SFTP: delivery ----------------------------------------------------------------------


def test_sftp_delivers_envelope_directory(sshd: SshdServer, source_dir: Path) -> None:
    envelope = make_envelope(source_dir)
    transport = sftp_transport(sshd)

    result = transport.deliver(envelope, envelope.name)
    transport.close()

    assert not result.already_present
    assert result.files == 4
    assert result.total_bytes == sum(p.stat().st_size for p in envelope.rglob("*") if p.is_file())
    assert result.location.endswith(f"{sshd.inbox}/{envelope.name}")
    assert [p.name for p in sshd.inbox.iterdir()] == [envelope.name]
    assert snapshot(sshd.inbox / envelope.name) == snapshot(envelope)


def test_sftp_sets_private_modes(sshd: SshdServer, source_dir: Path) -> None:
    envelope = make_envelope(source_dir, payload_size=10)
    transport = sftp_transport(sshd)

    transport.deliver(envelope, envelope.name)
    transport.close()

    delivered = sshd.inbox / envelope.name
    assert stat.S_IMODE(delivered.stat().st_mode) == 0o700
    assert stat.S_IMODE((delivered / "extra").stat().st_mode) == 0o700
    assert stat.S_IMODE((delivered / "manifest.json").stat().st_mode) == 0o600


def test_sftp_delivers_single_zip(sshd: SshdServer, source_dir: Path) -> None:
    archive = make_zip(source_dir)
    transport = sftp_transport(sshd)

    result = transport.deliver(archive, archive.name)
    transport.close()

    assert not result.already_present
    assert result.files == 1
    assert result.total_bytes == archive.stat().st_size
    assert [p.name for p in sshd.inbox.iterdir()] == [archive.name]
    assert (sshd.inbox / archive.name).read_bytes() == archive.read_bytes()


def test_sftp_delivers_empty_file(sshd: SshdServer, source_dir: Path) -> None:
    empty = source_dir / "empty.zip"
    empty.write_bytes(b"")
    transport = sftp_transport(sshd)

    transport.deliver(empty, empty.name)
    transport.close()

    assert (sshd.inbox / empty.name).read_bytes() == b""


def test_sftp_second_delivery_is_idempotent(sshd: SshdServer, source_dir: Path) -> None:
    envelope = make_envelope(source_dir)
    transport = sftp_transport(sshd)
    transport.deliver(envelope, envelope.name)
    first_copy = snapshot(sshd.inbox / envelope.name)

    # A changed local copy proves that the retry does not overwrite the delivered one.
    (envelope / "manifest.json").write_text("changed\n")
    result = transport.deliver(envelope, envelope.name)
    transport.close()

    assert result.already_present
    assert result.files == 0
    assert snapshot(sshd.inbox / envelope.name) == first_copy
    assert [p.name for p in sshd.inbox.iterdir()] == [envelope.name]


def test_sftp_reuses_connection(sshd: SshdServer, source_dir: Path) -> None:
    transport = sftp_transport(sshd)

    transport.deliver(make_zip(source_dir, 100), "a.zip")
    transport.deliver(make_zip(source_dir, 100), "b.zip")
    transport.check()
    transport.close()

    assert sshd.accepted_logins() == 1


def test_sftp_fsyncs_every_file(
    sshd: SshdServer, source_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsynced: list[str] = []
    real_fsync = sftp_module._ExtendedSFTPClient.fsync

    def counting_fsync(self: sftp_module._ExtendedSFTPClient, remote_file: object) -> None:
        fsynced.append("file")
        real_fsync(self, remote_file)  # type: ignore[arg-type]

    monkeypatch.setattr(sftp_module._ExtendedSFTPClient, "fsync", counting_fsync)
    envelope = make_envelope(source_dir, payload_size=10)
    transport = sftp_transport(sshd)

    transport.deliver(envelope, envelope.name)
    transport.close()

    assert len(fsynced) == 4


def test_sftp_check_reports_server(sshd: SshdServer) -> None:
    transport = sftp_transport(sshd)

    info = transport.check()
    transport.close()

    assert info.host_key_type == "ssh-ed25519"
    assert info.host_key_fingerprint == fingerprint(sshd.host_key_path.with_suffix(".pub"))
    assert info.fsync_supported
    assert info.posix_rename_supported


# -- SFTP: keys --------------------------------------------------------------------------


def test_sftp_wrong_host_key_rejected(sshd: SshdServer, tmp_path: Path, source_dir: Path) -> None:
    other_host_key = generate_key(tmp_path / "other_host_key", comment="other-host")
    transport = sftp_transport(sshd, host_key=other_host_key)

    with pytest.raises(HostKeyError) as caught:
        transport.deliver(make_zip(source_dir, 100), "a.zip")

    message = caught.value.message
    assert caught.value.permanent
    assert f"127.0.0.1:{sshd.port}" in message
    assert fingerprint(sshd.host_key_path.with_suffix(".pub")) in message
    assert fingerprint(tmp_path / "other_host_key.pub") in message
    assert list(sshd.inbox.iterdir()) == []
    assert sshd.accepted_logins() == 0


def test_sftp_host_key_list_accepts_any_pinned_type(
    sshd: SshdServer, tmp_path: Path, source_dir: Path
) -> None:
    other_ecdsa_key = generate_key(tmp_path / "other_ecdsa", key_type="ecdsa")
    transport = sftp_transport(sshd, host_key=[other_ecdsa_key, sshd.host_public_key])

    result = transport.deliver(make_zip(source_dir, 100), "a.zip")
    transport.close()

    assert not result.already_present


def test_sftp_wrong_client_key_rejected(sshd: SshdServer, tmp_path: Path, source_dir: Path) -> None:
    generate_key(tmp_path / "stranger")
    transport = sftp_transport(sshd, private_key_path=tmp_path / "stranger")

    with pytest.raises(AuthenticationError) as caught:
        transport.deliver(make_zip(source_dir, 100), "a.zip")

    message = caught.value.message
    assert caught.value.permanent
    assert f"127.0.0.1:{sshd.port}" in message
    assert repr(sshd.user) in message
    assert fingerprint(tmp_path / "stranger.pub") in message
    assert "authorized_keys" in message
    assert list(sshd.inbox.iterdir()) == []


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_sftp_client_key_types_accepted(
    sshd: SshdServer, tmp_path: Path, source_dir: Path, key_type: str
) -> None:
    public_key = generate_key(tmp_path / key_type, key_type=key_type)
    with (sshd.root / "authorized_keys").open("a") as authorized_keys:
        authorized_keys.write(public_key + "\n")
    transport = sftp_transport(sshd, private_key_path=tmp_path / key_type)

    result = transport.deliver(make_zip(source_dir, 100), "a.zip")
    transport.close()

    assert not result.already_present
    assert f"Accepted publickey for {sshd.user}" in sshd.log_text()
    assert fingerprint(tmp_path / f"{key_type}.pub") in sshd.log_text()


def test_sftp_client_key_readable_by_others_rejected(sshd: SshdServer) -> None:
    sshd.client_key_path.chmod(0o644)
    transport = sftp_transport(sshd)

    with pytest.raises(AuthenticationError) as caught:
        transport.check()

    assert "chmod 600" in caught.value.message
    assert sshd.accepted_logins() == 0


def test_sftp_encrypted_client_key_rejected(tmp_path: Path) -> None:
    key_path = tmp_path / "encrypted"
    generate_key(key_path)
    subprocess.run(
        [str(SSH_KEYGEN), "-q", "-p", "-P", "", "-N", "secret", "-f", str(key_path)],
        check=True,
        capture_output=True,
    )

    with pytest.raises(AuthenticationError) as caught:
        sftp_module.load_private_key(key_path)

    assert "encrypted" in caught.value.message
    assert "secret" not in caught.value.message


@pytest.mark.parametrize(
    "line",
    [
        "",
        "ssh-ed25519",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP==",
        "ssh-ed25519 not-base64!",
        # An RSA key blob labelled as ed25519.
        "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7",
    ],
)
def test_parse_host_key_rejects_malformed_line(line: str) -> None:
    with pytest.raises(ValueError):
        parse_host_key(line)


def test_sftp_rejects_two_pinned_keys_of_one_type(tmp_path: Path) -> None:
    first = generate_key(tmp_path / "first")
    second = generate_key(tmp_path / "second")

    with pytest.raises(ValueError, match="one host key per key type"):
        SftpTransport("127.0.0.1", 22, "user", tmp_path / "first", [first, second], "/inbox")


# -- SFTP: faults ------------------------------------------------------------------------


def test_sftp_server_down_is_transient(sshd: SshdServer, source_dir: Path) -> None:
    sshd.stop()
    transport = sftp_transport(sshd)

    with pytest.raises(TransportError) as caught:
        transport.deliver(make_zip(source_dir, 100), "a.zip")

    assert type(caught.value) is TransportError
    assert not caught.value.permanent
    assert "refused" in caught.value.message
    assert f"127.0.0.1:{sshd.port}" in caught.value.message


def test_sftp_silent_server_times_out(sshd: SshdServer, source_dir: Path) -> None:
    # A listener that accepts TCP connections but never sends an SSH banner.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        transport = sftp_transport(sshd, port=silent.getsockname()[1], connect_timeout=0.5)

        with pytest.raises(TransportError) as caught:
            transport.deliver(make_zip(source_dir, 100), "a.zip")

    assert not caught.value.permanent
    assert "did not finish within 0.5 s" in caught.value.message


def test_sftp_reconnects_after_server_restart(sshd: SshdServer, source_dir: Path) -> None:
    transport = sftp_transport(sshd)
    transport.deliver(make_zip(source_dir, 100), "a.zip")

    sshd.restart()
    result = transport.deliver(make_zip(source_dir, 100), "b.zip")
    transport.close()

    assert not result.already_present
    assert sorted(p.name for p in sshd.inbox.iterdir()) == ["a.zip", "b.zip"]
    assert sshd.accepted_logins() == 2


def test_sftp_reconnects_after_dropped_session(sshd: SshdServer, source_dir: Path) -> None:
    transport = sftp_transport(sshd)
    transport.deliver(make_zip(source_dir, 100), "a.zip")

    sshd.kill_sessions()
    transport.deliver(make_zip(source_dir, 100), "b.zip")
    transport.close()

    assert sorted(p.name for p in sshd.inbox.iterdir()) == ["a.zip", "b.zip"]
    assert sshd.accepted_logins() == 2


def test_sftp_retries_on_new_connection_after_hang(sshd: SshdServer, source_dir: Path) -> None:
    transport = sftp_transport(sshd, op_timeout=0.5)
    transport.deliver(make_zip(source_dir, 100), "a.zip")

    # The old connection still looks open, so only the timeout of its first request
    # shows that it is dead.
    sshd.freeze_sessions()
    result = transport.deliver(make_zip(source_dir, 100), "b.zip")
    transport.close()

    assert not result.already_present
    assert sorted(p.name for p in sshd.inbox.iterdir()) == ["a.zip", "b.zip"]
    assert sshd.accepted_logins() == 2


def test_sftp_delivers_once_server_is_back(sshd: SshdServer, source_dir: Path) -> None:
    archive = make_zip(source_dir, 100)
    transport = sftp_transport(sshd)
    sshd.stop()
    with pytest.raises(TransportError):
        transport.deliver(archive, archive.name)

    sshd.start()
    result = transport.deliver(archive, archive.name)
    transport.close()

    assert not result.already_present
    assert (sshd.inbox / archive.name).read_bytes() == archive.read_bytes()


def test_sftp_remote_dir_missing(sshd: SshdServer, source_dir: Path) -> None:
    transport = sftp_transport(sshd, remote_dir=str(sshd.inbox / "missing"))

    with pytest.raises(TransportError) as caught:
        transport.deliver(make_zip(source_dir, 100), "a.zip")

    assert not caught.value.permanent
    assert "does not exist" in caught.value.message
    assert f"127.0.0.1:{sshd.port}" in caught.value.message
    assert list(sshd.inbox.iterdir()) == []


def test_sftp_remote_dir_is_a_file(sshd: SshdServer, source_dir: Path) -> None:
    not_a_directory = sshd.inbox / "file"
    not_a_directory.write_text("x")
    transport = sftp_transport(sshd, remote_dir=str(not_a_directory))

    with pytest.raises(TransportError) as caught:
        transport.deliver(make_zip(source_dir, 100), "a.zip")

    assert "is not a directory" in caught.value.message
    assert [p.name for p in sshd.inbox.iterdir()] == ["file"]


def test_sftp_permission_denied_by_read_only_server(sshd: SshdServer, source_dir: Path) -> None:
    # "internal-sftp -R" denies every write, which works even when the tests run as
    # root, unlike directory permissions.
    sshd.restart(read_only=True)
    transport = sftp_transport(sshd)

    with pytest.raises(TransportError) as caught:
        transport.deliver(make_envelope(source_dir, payload_size=10), "a.JMIX")

    assert not caught.value.permanent
    assert "denied permission" in caught.value.message
    assert repr(sshd.user) in caught.value.message
    assert list(sshd.inbox.iterdir()) == []


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root ignores directory permissions")
def test_sftp_permission_denied_by_directory_mode(sshd: SshdServer, source_dir: Path) -> None:
    sshd.inbox.chmod(0o500)
    transport = sftp_transport(sshd)
    try:
        with pytest.raises(TransportError) as caught:
            transport.deliver(make_zip(source_dir, 100), "a.zip")
    finally:
        sshd.inbox.chmod(0o755)

    assert "denied permission" in caught.value.message
    assert list(sshd.inbox.iterdir()) == []


def test_sftp_failed_last_write_detected(sshd: SshdServer, source_dir: Path) -> None:
    # Only the final write request crosses the server's file size limit, which is the
    # write that paramiko would not check if the whole file were pipelined.
    sshd.restart(file_size_limit=MIB)
    archive = make_zip(source_dir, MIB + 100)
    transport = sftp_transport(sshd)

    with pytest.raises(TransportError) as caught:
        transport.deliver(archive, archive.name)
    transport.close()

    assert not caught.value.permanent
    assert "Failure" in caught.value.message
    assert "disk is full" in caught.value.message
    assert list(sshd.inbox.iterdir()) == []


def test_sftp_failed_write_in_tree_removes_temp(sshd: SshdServer, source_dir: Path) -> None:
    sshd.restart(file_size_limit=MIB)
    envelope = make_envelope(source_dir, payload_size=3 * MIB)
    transport = sftp_transport(sshd)

    with pytest.raises(TransportError):
        transport.deliver(envelope, envelope.name)
    transport.close()

    assert list(sshd.inbox.iterdir()) == []


def test_sftp_failed_rename_removes_temp(
    sshd: SshdServer, source_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_rename(self: object, old: str, new: str) -> None:
        raise OSError("Failure")

    monkeypatch.setattr(sftp_module._ExtendedSFTPClient, "posix_rename", failing_rename)
    transport = sftp_transport(sshd)

    with pytest.raises(TransportError) as caught:
        transport.deliver(make_envelope(source_dir, payload_size=10), "a.JMIX")
    transport.close()

    assert "renaming" in caught.value.message
    assert list(sshd.inbox.iterdir()) == []


def test_sftp_symlink_in_source_rejected(
    sshd: SshdServer, source_dir: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("not for the peer")
    envelope = make_envelope(source_dir, payload_size=10)
    (envelope / "link").symlink_to(secret)
    transport = sftp_transport(sshd)

    with pytest.raises(SourceError) as caught:
        transport.deliver(envelope, envelope.name)
    transport.close()

    assert caught.value.permanent
    assert "symbolic link" in caught.value.message
    assert list(sshd.inbox.iterdir()) == []


# -- directory transport -----------------------------------------------------------------


def test_directory_delivers_envelope(source_dir: Path, tmp_path: Path) -> None:
    destination = tmp_path / "share"
    destination.mkdir()
    envelope = make_envelope(source_dir)

    result = DirectoryTransport(destination).deliver(envelope, envelope.name)

    assert not result.already_present
    assert result.files == 4
    assert result.location == str(destination / envelope.name)
    assert [p.name for p in destination.iterdir()] == [envelope.name]
    assert snapshot(destination / envelope.name) == snapshot(envelope)
    assert stat.S_IMODE((destination / envelope.name).stat().st_mode) == 0o700
    assert stat.S_IMODE((destination / envelope.name / "metadata.json").stat().st_mode) == 0o600


def test_directory_delivers_single_zip(source_dir: Path, tmp_path: Path) -> None:
    destination = tmp_path / "share"
    destination.mkdir()
    archive = make_zip(source_dir)

    result = DirectoryTransport(destination, file_mode=0o640).deliver(archive, archive.name)

    assert result.total_bytes == archive.stat().st_size
    assert [p.name for p in destination.iterdir()] == [archive.name]
    assert (destination / archive.name).read_bytes() == archive.read_bytes()
    assert stat.S_IMODE((destination / archive.name).stat().st_mode) == 0o640


def test_directory_second_delivery_is_idempotent(source_dir: Path, tmp_path: Path) -> None:
    destination = tmp_path / "share"
    destination.mkdir()
    envelope = make_envelope(source_dir, payload_size=10)
    transport = DirectoryTransport(destination)
    transport.deliver(envelope, envelope.name)
    first_copy = snapshot(destination / envelope.name)

    (envelope / "manifest.json").write_text("changed\n")
    result = transport.deliver(envelope, envelope.name)

    assert result.already_present
    assert snapshot(destination / envelope.name) == first_copy
    assert [p.name for p in destination.iterdir()] == [envelope.name]


def test_directory_symlink_in_source_not_followed(source_dir: Path, tmp_path: Path) -> None:
    destination = tmp_path / "share"
    destination.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("not for the peer")
    envelope = make_envelope(source_dir, payload_size=10)
    (envelope / "extra" / "link").symlink_to(secret)

    with pytest.raises(SourceError) as caught:
        DirectoryTransport(destination).deliver(envelope, envelope.name)

    assert "symbolic link" in caught.value.message
    assert "extra/link" in caught.value.message
    assert list(destination.iterdir()) == []


def test_directory_symlink_as_source_rejected(source_dir: Path, tmp_path: Path) -> None:
    destination = tmp_path / "share"
    destination.mkdir()
    archive = make_zip(source_dir, 10)
    link = source_dir / "link.zip"
    link.symlink_to(archive)

    with pytest.raises(SourceError):
        DirectoryTransport(destination).deliver(link, link.name)

    assert list(destination.iterdir()) == []


def test_directory_fifo_in_source_rejected(source_dir: Path, tmp_path: Path) -> None:
    destination = tmp_path / "share"
    destination.mkdir()
    envelope = make_envelope(source_dir, payload_size=10)
    os.mkfifo(envelope / "pipe")

    with pytest.raises(SourceError, match="named pipe"):
        DirectoryTransport(destination).deliver(envelope, envelope.name)

    assert list(destination.iterdir()) == []


def test_directory_failed_rename_removes_temp(
    source_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    destination = tmp_path / "share"
    destination.mkdir()

    def full_disk(source: Path, target: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil, "rename_durably", full_disk)
    envelope = make_envelope(source_dir, payload_size=10)

    with pytest.raises(TransportError) as caught:
        DirectoryTransport(destination).deliver(envelope, envelope.name)

    assert not caught.value.permanent
    assert "full" in caught.value.message
    assert list(destination.iterdir()) == []


def test_directory_missing_destination(source_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TransportError) as caught:
        DirectoryTransport(tmp_path / "not-mounted").deliver(make_zip(source_dir, 10), "a.zip")

    assert not caught.value.permanent
    assert "mount" in caught.value.message


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root ignores directory permissions")
def test_directory_unwritable_destination(source_dir: Path, tmp_path: Path) -> None:
    destination = tmp_path / "share"
    destination.mkdir(mode=0o500)
    try:
        with pytest.raises(TransportError) as caught:
            DirectoryTransport(destination).deliver(make_zip(source_dir, 10), "a.zip")
    finally:
        destination.chmod(0o700)

    assert "Permission denied" in caught.value.message
    assert list(destination.iterdir()) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", ".hidden", "nul\0byte"])
def test_validate_name_rejects(name: str) -> None:
    with pytest.raises(ValueError):
        validate_name(name)
