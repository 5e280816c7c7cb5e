"""Packaging: the systemd unit, install.sh, and the agent under the unit's sandbox.

Debian packages these tests use: systemd (systemd-analyze), shellcheck, and for the
install.sh run python3-venv, python3-dev, gcc, pkg-config and libsystemd-dev (systemd-python
is built from source). A test whose tool is missing is skipped and names the package.

No systemd runs as PID 1 in CI, so the unit is never started for real. Instead
``test_agent_runs_under_unit_sandbox`` applies the unit's seccomp-based settings and
ProcSubset= to two ``jmix-agent run`` processes itself (see :class:`UnitSandbox`) and sends
two studies between them. ``test_installed_agent_runs_under_unit_sandbox`` repeats that with
the agent that install.sh installed on Debian's Python.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.config import load_config
from agent.daemon import notify
from agent.identity import generate_keys, load_identity

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "jmix-agent.service"
INSTALL_SCRIPT = REPO / "install.sh"
EXAMPLE_CONFIG = REPO / "etc" / "jmix-agent" / "agent.toml"
UNIT_EXEC_PATH = "/opt/jmix-agent/venv/bin/jmix-agent"
DEBIAN_PYTHON = Path("/usr/bin/python3")

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SHELLCHECK = shutil.which("shellcheck")
RUNNING_AS_ROOT = os.geteuid() == 0

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not found (Debian package: systemd)"
)

# `systemd-analyze security --offline=true` rated the unit 1.1 with systemd 252.39 (Debian 12).
# Removing one setting raised the rating by 0.1 for most settings, to 2.6 without
# SystemCallFilter= and to 2.8 without CapabilityBoundingSet=. So ACCEPTED_EXPOSURES catches a
# single dropped setting that the rating covers, and MAX_EXPOSURE catches several, with room
# for rating changes between systemd versions.
MAX_EXPOSURE = 1.5
# Settings that the rating still marks as exposed, each for a reason the unit cannot avoid.
# The agent needs the host's root directory, the network, AF_UNIX for sd_notify and the
# journal, and peers at addresses that only the config lists. ProtectClock= itself adds the
# read-only rtc device to DeviceAllow=.
ACCEPTED_EXPOSURES = {
    "RootDirectory=/RootImage=",
    "PrivateNetwork=",
    "RestrictAddressFamilies=~AF_UNIX",
    "RestrictAddressFamilies=~AF_(INET|INET6)",
    "IPAddressDeny=",
    "DeviceAllow=",
}

READY_TIMEOUT = 30.0
DELIVERY_TIMEOUT = 60.0


# -- unit file helpers -------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """Parse a unit file into key -> values in file order, because keys may repeat."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def write_unit_with_executable(directory: Path) -> Path:
    """Copy the unit into ``directory`` with ExecStart pointing at an existing script.

    ``systemd-analyze verify`` rejects an ExecStart binary that does not exist. The copy
    avoids that one complaint and keeps every other line of the unit.
    """
    executable = directory / "bin" / "jmix-agent"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(UNIT_EXEC_PATH) == 1, "the unit names the agent binary more than once"
    unit = directory / UNIT.name
    unit.write_text(text.replace(UNIT_EXEC_PATH, str(executable)))
    return unit


def run_verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--recursive-errors=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- sd_notify ---------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    """Return a bound AF_UNIX datagram socket, as systemd provides for Type=notify."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, path


def test_notify_sends_ready_datagram(
    notify_socket: tuple[socket.socket, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))

    notify("READY=1")

    assert sock.recv(4096) == b"READY=1"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"jmix-agent-test-{uuid.uuid4()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)

        notify("STOPPING=1")

        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify("READY=1")


def test_notify_unreachable_socket_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    notify("WATCHDOG=1")


# -- the unit file -----------------------------------------------------------------------------


def test_unit_core_settings() -> None:
    settings = unit_settings(UNIT.read_text())

    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == [f"{UNIT_EXEC_PATH} --config /etc/jmix-agent/agent.toml run"]
    assert settings["User"] == ["jmix-agent"]
    assert settings["Group"] == ["jmix-agent"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartPreventExitStatus"] == ["2"]
    assert settings["UMask"] == ["0077"]
    assert settings["StateDirectory"] == ["jmix-agent"]
    assert settings["StateDirectoryMode"] == ["0700"]
    assert settings["LogsDirectory"] == ["jmix-agent"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["EnvironmentFile"] == ["-/etc/default/jmix-agent"]
    assert "WatchdogSec" in settings
    assert "TimeoutStopSec" in settings


def test_config_error_exits_with_status_two(tmp_path: Path) -> None:
    """RestartPreventExitStatus=2 relies on `jmix-agent run` exiting 2 for a bad config."""
    config = tmp_path / "agent.toml"
    config.write_text('[identity]\nid = "org:test"\nname = "test"\nunknown_key = 1\n')

    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    assert "unknown_key" in result.stderr


def test_unit_writable_paths_cover_example_config() -> None:
    """Every path the example config lets the agent write is writable under the unit."""
    settings = unit_settings(UNIT.read_text())
    writable = [
        Path(value.lstrip("-")) for entry in settings["ReadWritePaths"] for value in entry.split()
    ]
    config = load_config(EXAMPLE_CONFIG)
    written = {
        "state_dir": config.state_dir,
        "inbound.inbox": config.inbound.inbox,
        "inbound.import_dir": config.inbound.import_dir,
        "inbound.quarantine_dir": config.inbound.quarantine_dir,
        "audit.path": config.audit_path.parent,
        **{f"watch {watch.name}": watch.path for watch in config.watch},
    }

    for key, path in written.items():
        assert any(path.is_relative_to(root) for root in writable), (
            f"{key} = {path} is outside ReadWritePaths {[str(p) for p in writable]}"
        )


@needs_systemd_analyze
def test_unit_verify_clean(tmp_path: Path) -> None:
    unit = write_unit_with_executable(tmp_path)

    result = run_verify(unit)

    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_systemd_analyze
def test_unit_verify_only_missing_binary() -> None:
    """The shipped unit draws no complaint but the one about the not yet installed binary."""
    result = run_verify(UNIT)

    expected = f"{UNIT.name}: Command {UNIT_EXEC_PATH} is not executable: No such file or directory"
    other_lines = [
        line for line in (result.stdout + result.stderr).splitlines() if line.strip() != expected
    ]
    assert other_lines == []


@needs_systemd_analyze
def test_unit_security_exposure() -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no overall exposure level in:\n{result.stdout}"
    exposure = float(match.group(1))
    exposed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("✗")}

    assert sorted(exposed - ACCEPTED_EXPOSURES) == []
    assert exposure <= MAX_EXPOSURE


# -- install.sh --------------------------------------------------------------------------------


def test_install_script_syntax() -> None:
    result = subprocess.run(
        ["bash", "-n", str(INSTALL_SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not found (Debian package: shellcheck)")
def test_install_script_shellcheck() -> None:
    assert SHELLCHECK is not None
    result = subprocess.run(
        [SHELLCHECK, str(INSTALL_SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_install_script_rejects_purge_alone() -> None:
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), "--purge"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "--purge only works together with --uninstall" in result.stderr


def run_install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run install.sh with ``--root``, which writes only below ``root``."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "NOTIFY_SOCKET"}
    }
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=environment,
        check=False,
    )
    assert result.returncode == 0, f"install.sh failed:\n{result.stdout}\n{result.stderr}"
    return result


def _install_prerequisites_missing() -> str | None:
    if not DEBIAN_PYTHON.exists():
        return f"{DEBIAN_PYTHON} not found (Debian package: python3)"
    probe = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", "import ensurepip, venv"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return "python3 -m venv does not work (Debian package: python3-venv)"
    for tool, package in (("gcc", "gcc"), ("pkg-config", "pkg-config")):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian package: {package}), needed to build systemd-python"
    libsystemd = subprocess.run(["pkg-config", "--exists", "libsystemd"], check=False)
    if libsystemd.returncode != 0:
        return "libsystemd.pc not found (Debian package: libsystemd-dev)"
    return None


@pytest.fixture(scope="module")
def installed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a scratch root that install.sh --root has installed the agent into."""
    missing = _install_prerequisites_missing()
    if missing:
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("install-root")
    run_install(root)
    return root


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.slow
def test_install_creates_layout(installed_root: Path) -> None:
    root = installed_root
    keys = root / "var/lib/jmix-agent/keys"

    assert (root / "opt/jmix-agent/venv/bin/jmix-agent").is_file()
    assert os.readlink(root / "usr/local/bin/jmix-agent") == UNIT_EXEC_PATH
    assert (root / "etc/systemd/system/jmix-agent.service").read_text() == UNIT.read_text()
    assert (root / "etc/jmix-agent/agent.toml").read_text() == EXAMPLE_CONFIG.read_text()
    assert mode_of(root / "etc/jmix-agent") == 0o750
    assert mode_of(root / "etc/jmix-agent/agent.toml") == 0o640
    assert mode_of(root / "var/lib/jmix-agent") == 0o700
    assert mode_of(keys) == 0o700
    for name in ("signing.key", "encryption.key", "sftp_ed25519"):
        assert mode_of(keys / name) == 0o600, name
    assert (keys / "sftp_ed25519.pub").read_text().startswith("ssh-ed25519 ")
    assert mode_of(root / "var/log/jmix-agent") == 0o750
    assert mode_of(root / "srv/jmix-agent/drop") == 0o2770
    assert mode_of(root / "srv/jmix-agent/import") == 0o750


@pytest.mark.slow
def test_installed_keys_load(installed_root: Path) -> None:
    """The installed agent, on Debian's Python, loads the keys that install.sh generated."""
    keys = installed_root / "var/lib/jmix-agent/keys"
    python = installed_root / "opt/jmix-agent/venv/bin/python"
    code = (
        "import sys; from pathlib import Path; from agent.config import IdentityConfig;"
        "from agent.identity import load_identity;"
        "print(load_identity(IdentityConfig('org:x', 'x', '', Path(sys.argv[1]),"
        " Path(sys.argv[2]))).card()['signing_key_fingerprint'])"
    )

    result = subprocess.run(
        [str(python), "-c", code, str(keys / "signing.key"), str(keys / "encryption.key")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SHA256:")


@pytest.mark.slow
def test_install_again_keeps_config_and_keys(installed_root: Path) -> None:
    root = installed_root
    config = root / "etc/jmix-agent/agent.toml"
    keys = sorted((root / "var/lib/jmix-agent/keys").iterdir())
    config.write_text(config.read_text() + "# edited by the admin\n")
    key_bytes = {path: path.read_bytes() for path in keys}
    (root / "var/lib/jmix-agent").chmod(0o755)

    result = run_install(root)

    assert config.read_text().endswith("# edited by the admin\n")
    assert {path: path.read_bytes() for path in keys} == key_bytes
    assert mode_of(root / "var/lib/jmix-agent") == 0o700
    assert "keeping existing config" in result.stdout
    assert "keeping existing keys" in result.stdout


@pytest.mark.slow
def test_uninstall_keeps_data_until_purge(installed_root: Path, tmp_path: Path) -> None:
    # Work on a copy of the installed tree, so that the other tests keep theirs. Uninstall
    # only deletes the virtual environment, so an empty one replaces the real one.
    root = tmp_path / "root"
    shutil.copytree(installed_root, root, symlinks=True, ignore=shutil.ignore_patterns("venv"))
    (root / "opt/jmix-agent/venv/bin").mkdir(parents=True)
    imported = root / "srv/jmix-agent/import/study/instance.dcm"
    imported.parent.mkdir()
    imported.write_bytes(b"DICM")

    run_install(root, "--uninstall")

    assert not (root / "opt/jmix-agent").exists()
    assert not (root / "etc/systemd/system/jmix-agent.service").exists()
    assert not (root / "usr/local/bin/jmix-agent").is_symlink()
    assert (root / "etc/jmix-agent/agent.toml").is_file()
    assert (root / "var/lib/jmix-agent/keys/signing.key").is_file()

    result = run_install(root, "--uninstall", "--purge")

    assert not (root / "etc/jmix-agent").exists()
    assert not (root / "var/lib/jmix-agent").exists()
    assert not (root / "var/log/jmix-agent").exists()
    assert not (root / "srv/jmix-agent/drop").exists()
    assert imported.read_bytes() == b"DICM"
    assert "because it is not empty" in result.stderr


# -- the agent under the unit's sandbox ----------------------------------------------------------

# libseccomp 2.5 constants (seccomp.h).
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_LT = 2
SCMP_CMP_EQ = 4
SCMP_CMP_GT = 6
SCMP_CMP_MASKED_EQ = 7
SHM_EXEC = 0o100000
# Linux constants (sched.h, sys/mount.h).
CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 0x40000


def scmp_act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


class ScmpArgCmp(ctypes.Structure):
    """libseccomp's ``struct scmp_arg_cmp``: compare system call argument ``arg``."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """Expand a systemd system call group such as ``@system-service`` into call names."""
    assert SYSTEMD_ANALYZE is not None
    output = subprocess.run(
        [SYSTEMD_ANALYZE, "syscall-filter", name],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    names: set[str] = set()
    for line in output.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        names |= syscall_group(item) if item.startswith("@") else {item}
    return frozenset(names)


class UnitSandbox:
    """The unit's kernel-enforced restrictions, for applying to a child process.

    Emulated, as systemd 252 implements them: ``SystemCallFilter=@system-service`` minus
    ``@privileged @resources`` with ``SystemCallErrorNumber=EPERM``, ``MemoryDenyWriteExecute=``
    (the seccomp rules of systemd's ``seccomp_memory_deny_write_execute()``),
    ``RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6``, ``NoNewPrivileges=`` and
    ``ProcSubset=pid`` with ``ProtectProc=invisible``. Not emulated: ``User=`` (the dev
    virtual environment lives under /root), the file system settings, ``PrivateUsers=``,
    ``LockPersonality=``, ``RestrictNamespaces=`` and ``RestrictRealtime=``.
    """

    def __init__(self) -> None:
        self.libseccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        self.libseccomp.seccomp_init.restype = ctypes.c_void_p
        self.libseccomp.seccomp_init.argtypes = [ctypes.c_uint32]
        self.libseccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.libseccomp.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(ScmpArgCmp),
        ]
        self.libseccomp.seccomp_load.argtypes = [ctypes.c_void_p]
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        # The allow list goes last because it rejects seccomp(2), so no filter loads after it.
        self.filters = [
            self._memory_deny_write_execute(),
            self._address_families(),
            self._system_call_filter(),
        ]

    def _new_filter(self, default_action: int) -> int:
        context = self.libseccomp.seccomp_init(default_action)
        assert context, "seccomp_init failed"
        return int(context)

    def _add_rule(self, context: int, action: int, syscall: str, *comparisons: ScmpArgCmp) -> None:
        number = self.libseccomp.seccomp_syscall_resolve_name(syscall.encode())
        if number < 0:
            return  # Not a system call on this architecture. systemd skips these too.
        array = (ScmpArgCmp * max(len(comparisons), 1))(*comparisons)
        result = self.libseccomp.seccomp_rule_add_array(
            context, action, number, len(comparisons), array
        )
        assert result == 0, f"seccomp_rule_add({syscall}) failed: {result}"

    def _system_call_filter(self) -> int:
        allowed = (
            syscall_group("@system-service")
            - syscall_group("@privileged")
            - syscall_group("@resources")
        )
        context = self._new_filter(scmp_act_errno(errno.EPERM))
        for name in sorted(allowed):
            self._add_rule(context, SCMP_ACT_ALLOW, name)
        return context

    def _memory_deny_write_execute(self) -> int:
        context = self._new_filter(SCMP_ACT_ALLOW)
        deny = scmp_act_errno(errno.EPERM)
        write_exec = mmap.PROT_WRITE | mmap.PROT_EXEC
        self._add_rule(
            context, deny, "mmap", ScmpArgCmp(2, SCMP_CMP_MASKED_EQ, write_exec, write_exec)
        )
        for name in ("mprotect", "pkey_mprotect"):
            exec_only = ScmpArgCmp(2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC)
            self._add_rule(context, deny, name, exec_only)
        self._add_rule(
            context, deny, "shmat", ScmpArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)
        )
        return context

    def _address_families(self) -> int:
        context = self._new_filter(SCMP_ACT_ALLOW)
        deny = scmp_act_errno(errno.EAFNOSUPPORT)
        allowed = sorted({socket.AF_UNIX, socket.AF_INET, socket.AF_INET6})
        self._add_rule(context, deny, "socket", ScmpArgCmp(0, SCMP_CMP_LT, allowed[0], 0))
        self._add_rule(context, deny, "socket", ScmpArgCmp(0, SCMP_CMP_GT, allowed[-1], 0))
        for family in range(allowed[0] + 1, allowed[-1]):
            if family not in allowed:
                self._add_rule(context, deny, "socket", ScmpArgCmp(0, SCMP_CMP_EQ, family, 0))
        return context

    def enter(self) -> None:
        """Restrict the calling process; meant as ``preexec_fn`` of ``subprocess.Popen``."""
        libc = self.libc
        if (
            libc.unshare(CLONE_NEWNS) != 0
            or libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0
            or libc.mount(
                b"proc",
                b"/proc",
                b"proc",
                MS_NOSUID | MS_NODEV | MS_NOEXEC,
                b"subset=pid,hidepid=invisible",
            )
            != 0
        ):
            os.write(2, b"sandbox: mounting /proc with subset=pid failed\n")
            os._exit(125)
        for context in self.filters:
            if self.libseccomp.seccomp_load(context) != 0:
                os.write(2, b"sandbox: seccomp_load failed\n")
                os._exit(125)


def _sandbox_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "seccomp is Linux only"
    if not RUNNING_AS_ROOT:
        return "mounting a private /proc needs root"
    if SYSTEMD_ANALYZE is None:
        return "systemd-analyze not found (Debian package: systemd); it lists the syscall groups"
    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return "libseccomp.so.2 not found (Debian package: libseccomp2)"
    return None


def test_sandbox_enforces_rules() -> None:
    """Each emulated rule rejects what the unit forbids, and ctypes callbacks still work."""
    missing = _sandbox_unavailable()
    if missing:
        pytest.skip(missing)
    code = "\n".join(
        [
            "import errno, mmap, os, socket",
            "def denied(call):",
            "    try:",
            "        call()",
            "    except OSError as exc:",
            "        return errno.errorcode[exc.errno]",
            "    return 'allowed'",
            "print(denied(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE"
            " | mmap.PROT_EXEC)))",
            "print(denied(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)))",
            "print(denied(lambda: os.sched_setaffinity(0, {0})))",
            "print(denied(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()))",
            "print(os.path.exists('/proc/sys'))",
            "import ctypes",
            "print(ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)(41))",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=UnitSandbox().enter,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["EPERM", "EAFNOSUPPORT", "EPERM", "allowed", "False", "42"]


@dataclass
class Site:
    """One agent's folders and config for the sandbox run."""

    root: Path
    entity_id: str
    dicom_port: int | None = None
    messages: list[bytes] = field(default_factory=list)

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def inbox(self) -> Path:
        return self.root / "state" / "inbox"

    @property
    def drop(self) -> Path:
        return self.root / "drop"

    @property
    def import_dir(self) -> Path:
        return self.root / "import"

    @property
    def config(self) -> Path:
        return self.root / "agent.toml"

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    @property
    def notify_path(self) -> Path:
        return self.root / "notify"

    def card(self) -> dict[str, str]:
        from agent.config import IdentityConfig

        identity = IdentityConfig(
            self.entity_id,
            self.entity_id,
            "",
            self.keys / "signing.key",
            self.keys / "encryption.key",
        )
        return load_identity(identity).card()


def write_site_config(site: Site, peer: dict[str, str], deliver_to: Path | None) -> None:
    """Write a config: DICOM and a drop folder if ``site.dicom_port``, one peer, inbound on."""
    lines = [
        "[agent]",
        f'state_dir = "{site.root / "state"}"',
        "study_quiet_seconds = 1",
        "min_free_mb = 0",
        "poll_interval = 0.2",
        "[identity]",
        f'id = "{site.entity_id}"',
        f'name = "{site.entity_id}"',
        f'signing_key = "{site.keys / "signing.key"}"',
        f'encryption_key = "{site.keys / "encryption.key"}"',
        "[dicom]",
        f"enabled = {'true' if site.dicom_port else 'false'}",
        'bind = "127.0.0.1"',
        f"port = {site.dicom_port or 11112}",
    ]
    if site.dicom_port:
        lines += ["[[watch]]", 'name = "drop"', f'path = "{site.drop}"', "stable_seconds = 0.5"]
    lines += [
        "[[peers]]",
        f'id = "{peer["id"]}"',
        f'name = "{peer["name"]}"',
        f'encryption_key = "{peer["encryption_key"]}"',
        f'signing_key = "{peer["signing_key"]}"',
    ]
    if deliver_to is not None:
        lines += [
            "[peers.transport]",
            'kind = "directory"',
            f'path = "{deliver_to}"',
            "[[routes]]",
            f'to = ["{peer["id"]}"]',
        ]
    lines += [
        "[inbound]",
        f'inbox = "{site.inbox}"',
        f'import_dir = "{site.import_dir}"',
        f'quarantine_dir = "{site.root / "quarantine"}"',
        "settle_seconds = 0.2",
        "[audit]",
        f'path = "{site.root / "audit.jsonl"}"',
    ]
    site.config.write_text("\n".join(lines) + "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def receive_until(sock: socket.socket, site: Site, expected: bytes, timeout: float) -> bool:
    """Collect sd_notify datagrams into ``site.messages`` until one contains ``expected``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            message = sock.recv(4096)
        except TimeoutError:
            break
        site.messages.append(message)
        if expected in message.split(b"\n"):
            return True
    return False


def c_store(port: int, path: Path) -> int:
    """Send one instance with pynetdicom; return the C-STORE status."""
    from pydicom import dcmread
    from pynetdicom import AE

    dataset = dcmread(path)
    entity = AE(ae_title="PACKAGING_TEST")
    entity.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = entity.associate("127.0.0.1", port, ae_title="JMIX_AGENT")
    assert association.is_established, "association with the sandboxed SCP was rejected"
    try:
        status = association.send_c_store(dataset)
    finally:
        association.release()
    return int(status.Status)


def run_pair_in_sandbox(agent_command: list[str], workdir: Path) -> None:
    """Run sites A and B under UnitSandbox and send two studies from A to B.

    A receives one study by C-STORE and one through its drop folder, seals both for B and
    delivers them into B's inbox with the directory transport; B verifies and imports.
    """
    from pydicom.data import get_testdata_file

    site_a = Site(workdir / "site-a", "org:test.site-a", dicom_port=free_port())
    site_b = Site(workdir / "site-b", "org:test.site-b")
    for site in (site_a, site_b):
        site.root.mkdir(parents=True)
        generate_keys(site.keys / "signing.key", site.keys / "encryption.key")
    site_b.inbox.mkdir(parents=True)
    write_site_config(site_a, site_b.card(), deliver_to=site_b.inbox)
    write_site_config(site_b, site_a.card(), deliver_to=None)

    sandbox = UnitSandbox()
    processes: list[subprocess.Popen[bytes]] = []
    sockets: list[socket.socket] = []
    try:
        for site in (site_a, site_b):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(site.notify_path))
            sockets.append(sock)
            environment = dict(
                os.environ, NOTIFY_SOCKET=str(site.notify_path), WATCHDOG_USEC="1000000"
            )
            with site.log.open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [*agent_command, "--config", str(site.config), "run"],
                        env=environment,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        preexec_fn=sandbox.enter,
                    )
                )

        for site, sock in zip((site_a, site_b), sockets, strict=True):
            ready = receive_until(sock, site, b"READY=1", READY_TIMEOUT)
            assert ready, f"{site.entity_id} sent no READY=1:\n{site.log.read_text()}"
            pinged = receive_until(sock, site, b"WATCHDOG=1", READY_TIMEOUT)
            assert pinged, f"{site.entity_id} sent no WATCHDOG=1:\n{site.log.read_text()}"

        assert site_a.dicom_port is not None
        ct = Path(get_testdata_file("CT_small.dcm"))
        mr = Path(get_testdata_file("MR_small.dcm"))
        assert c_store(site_a.dicom_port, ct) == 0x0000
        shutil.copyfile(mr, site_a.drop / "mr.dcm")

        def imported() -> list[Path]:
            return sorted(site_b.import_dir.rglob("*.dcm")) if site_b.import_dir.is_dir() else []

        arrived = wait_for(lambda: len(imported()) == 2, DELIVERY_TIMEOUT)
        assert arrived, (
            f"B imported {imported()}\nA log:\n{site_a.log.read_text()}\n"
            f"B log:\n{site_b.log.read_text()}"
        )

        for process in processes:
            process.send_signal(signal.SIGTERM)
        for site, sock, process in zip((site_a, site_b), sockets, processes, strict=True):
            assert process.wait(timeout=60) == 0, site.log.read_text()
            stopping = receive_until(sock, site, b"STOPPING=1", 5)
            assert stopping, f"{site.entity_id} sent no STOPPING=1: {site.messages}"
            log = site.log.read_text()
            assert "Traceback" not in log, log
            assert " ERROR " not in log, log
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for sock in sockets:
            sock.close()


@pytest.fixture
def sandbox_workdir(tmp_path: Path) -> Path:
    # A socket path must fit into sun_path (108 bytes). Check it here, because bind() would
    # only fail with "AF_UNIX path too long".
    assert len(str(tmp_path / "site-a" / "notify")) < 100
    return tmp_path


@pytest.mark.slow
def test_agent_runs_under_unit_sandbox(sandbox_workdir: Path) -> None:
    missing = _sandbox_unavailable()
    if missing:
        pytest.skip(missing)
    run_pair_in_sandbox([sys.executable, "-m", "agent.cli"], sandbox_workdir)


@pytest.mark.slow
def test_installed_agent_runs_under_unit_sandbox(
    installed_root: Path, sandbox_workdir: Path
) -> None:
    """As above, with the agent install.sh installed on Debian's Python."""
    missing = _sandbox_unavailable()
    if missing:
        pytest.skip(missing)
    run_pair_in_sandbox(
        [str(installed_root / "opt/jmix-agent/venv/bin/jmix-agent")], sandbox_workdir
    )
