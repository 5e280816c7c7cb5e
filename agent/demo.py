"""``jmix-agent demo``: two agents on this machine exchange a real study over real SFTP.

Site A runs the C-STORE SCP; DCMTK's ``storescu`` sends it pydicom's bundled sample
images in several transfer syntaxes. A seals each study for site B and delivers it over
SFTP to a throwaway OpenSSH server on 127.0.0.1, whose folder is B's inbox; B verifies,
decrypts and imports. Both agents are separate ``jmix-agent run`` processes with
generated identities. Nothing leaves the loopback interface.

The end-to-end tests use the same building blocks (:class:`Site`, :func:`start_agent`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.devtools.sshd import SshdServer
from agent.identity import LocalIdentity, generate_keys, load_identity

STORESCU = Path("/usr/bin/storescu")

# Valid images bundled with pydicom, one per transfer syntax a modality may send: explicit
# and implicit little endian, big endian, deflated, RLE, JPEG baseline and extended,
# JPEG-LS lossless and JPEG 2000 (lossless and lossy). pydicom ships several encodings
# of the same image with the same SOP Instance UID; this set has no such repeats.
SAMPLE_FILES = (
    "CT_small.dcm",
    "rtdose_1frame.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
    "image_dfl.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG-lossy.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "examples_jpeg2k.dcm",
    "JPEG2000.dcm",
)

# storescu proposes a compressed transfer syntax only with its option, and converts an
# uncompressed file to the first uncompressed syntax the SCP accepts, so each syntax has
# the option that proposes it first. One option per association: files go in groups.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}


def sample_paths(names: Iterable[str] = SAMPLE_FILES) -> list[Path]:
    """Return the paths of bundled pydicom files by name (never downloads)."""
    from pydicom.data import get_testdata_files

    found = {Path(path).name: Path(path) for path in get_testdata_files()}
    return [found[name] for name in names if name in found]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Site:
    """One agent's folders, keys and config on this machine."""

    name: str
    root: Path
    entity_id: str
    dicom_port: int | None = None

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def inbox(self) -> Path:
        return self.state / "inbox"

    @property
    def import_dir(self) -> Path:
        return self.root / "import"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def drop(self) -> Path:
        return self.root / "drop"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def config_path(self) -> Path:
        return self.root / "agent.toml"

    @property
    def log_path(self) -> Path:
        return self.root / "agent.log"

    def create_keys(self) -> LocalIdentity:
        """Generate this site's identity keys and return them loaded."""
        keys = self.root / "keys"
        generate_keys(keys / "signing.key", keys / "encryption.key")
        return self.identity()

    def identity(self) -> LocalIdentity:
        from agent.config import IdentityConfig

        keys = self.root / "keys"
        return load_identity(
            IdentityConfig(
                self.entity_id, self.name, "", keys / "signing.key", keys / "encryption.key"
            )
        )


def _toml(value: Any) -> str:
    return json.dumps(str(value) if isinstance(value, Path) else value)


def write_config(
    site: Site,
    peers: Sequence[dict[str, Any]],
    *,
    quiet_seconds: float = 2.0,
    watch: bool = False,
    extra_agent: str = "",
) -> None:
    """Write ``site``'s agent.toml; each peer dict has id, name, card and optional transport."""
    lines = [
        "[agent]",
        f"state_dir = {_toml(site.state)}",
        f"study_quiet_seconds = {quiet_seconds}",
        "min_free_mb = 0",
        "poll_interval = 0.2",
        extra_agent,
        "[identity]",
        f"id = {_toml(site.entity_id)}",
        f"name = {_toml(site.name)}",
        f"signing_key = {_toml(site.root / 'keys' / 'signing.key')}",
        f"encryption_key = {_toml(site.root / 'keys' / 'encryption.key')}",
        "[dicom]",
        f"enabled = {'true' if site.dicom_port else 'false'}",
        'ae_title = "JMIX_AGENT"',
        'bind = "127.0.0.1"',
        f"port = {site.dicom_port or 11112}",
    ]
    if watch:
        lines += ["[[watch]]", 'name = "drop"', f"path = {_toml(site.drop)}", "stable_seconds = 1"]
    for peer in peers:
        card = peer["card"]
        lines += [
            "[[peers]]",
            f"id = {_toml(card['id'])}",
            f"name = {_toml(card['name'])}",
            f"encryption_key = {_toml(card['encryption_key'])}",
            f"signing_key = {_toml(card['signing_key'])}",
            f"profile = {_toml(peer.get('profile', 'spec'))}",
        ]
        transport = peer.get("transport")
        if transport:
            lines.append("[peers.transport]")
            lines += [f"{key} = {_toml(value)}" for key, value in transport.items()]
    routed = [peer["card"]["id"] for peer in peers if peer.get("transport")]
    if routed:
        lines += ["[[routes]]", f"to = {json.dumps(routed)}"]
    lines += [
        "[inbound]",
        f"inbox = {_toml(site.inbox)}",
        f"import_dir = {_toml(site.import_dir)}",
        f"quarantine_dir = {_toml(site.quarantine)}",
        "settle_seconds = 0.5",
        "[audit]",
        f"path = {_toml(site.audit_log)}",
    ]
    site.config_path.write_text("\n".join(lines) + "\n")


def start_agent(site: Site) -> subprocess.Popen[bytes]:
    """Start ``jmix-agent run`` for ``site`` as a child process logging to its log file."""
    log = site.log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(site.config_path), "run"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop_agent(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM an agent and wait for it; SIGKILL only if it overstays ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def storescu(
    port: int, files: Sequence[Path], calling_ae: str = "DEMO_SCU"
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with DCMTK storescu, each in its own transfer syntax.

    Files are grouped by the storescu option that proposes their syntax, one association
    per group, with ``-R`` so that only the files' own SOP classes are proposed (all of
    them would exceed the 128 presentation contexts an association may carry). Returns
    the first failed run, or the last run when all succeeded.
    """
    from pydicom import dcmread

    groups: dict[str, list[Path]] = {}
    for path in files:
        syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_PROPOSE.get(syntax, ""), []).append(path)
    env = dict(os.environ, TCP_NODELAY="1")
    result: subprocess.CompletedProcess[str] | None = None
    for option, paths in groups.items():
        command = [str(STORESCU), "-R", "-aet", calling_ae, "-aec", "JMIX_AGENT"]
        command += [option] if option else []
        command += ["127.0.0.1", str(port), *map(str, paths)]
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            return result
    if result is None:
        raise ValueError("no files to send")
    return result


def imported_envelopes(site: Site) -> list[Path]:
    """Return the envelope folders in a site's import folder."""
    if not site.import_dir.is_dir():
        return []
    return sorted(p for p in site.import_dir.iterdir() if not p.name.startswith("."))


def build_pair(root: Path, sshd: SshdServer) -> tuple[Site, Site]:
    """Create sites A (SCP, sends over SFTP) and B (receives) with keys and configs."""
    site_a = Site("Site A Imaging", root / "site-a", "org:demo.site-a", dicom_port=free_port())
    site_b = Site("Site B Radiology", root / "site-b", "org:demo.site-b")
    for site in (site_a, site_b):
        site.root.mkdir(parents=True)
    card_a = site_a.create_keys().card()
    card_b = site_b.create_keys().card()
    site_b.inbox.mkdir(parents=True)
    transport = {
        "kind": "sftp",
        "host": sshd.host,
        "port": sshd.port,
        "username": sshd.user,
        "private_key": sshd.client_key_path,
        "host_key": sshd.host_public_key,
        "remote_dir": site_b.inbox,
    }
    write_config(site_a, [{"card": card_b, "transport": transport}], watch=True)
    write_config(site_b, [{"card": card_a}])
    return site_a, site_b


def _print_audit(site: Site) -> None:
    print(f"\n== audit trail of {site.name} ({site.audit_log})")
    for line in site.audit_log.read_text().splitlines():
        record = json.loads(line)
        details = ", ".join(
            f"{key}={record[key]}"
            for key in ("envelope_id", "peer", "count", "outcome", "reason")
            if key in record
        )
        print(f"  {record['seq']:>3} {record['time']} {record['event']:<20} {details}")


def run_demo(workdir: Path | None = None, keep: bool = False) -> int:
    """Run the two-site demo; return 0 once every sent instance was imported by B."""
    if not STORESCU.exists():
        print("demo needs DCMTK's storescu: apt-get install dcmtk", file=sys.stderr)
        return 2
    root = workdir or Path(tempfile.mkdtemp(prefix="jmix-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    files = sample_paths()
    print(f"demo folder: {root}")
    (root / "sshd").mkdir(mode=0o700)
    sshd = SshdServer.create(root / "sshd")
    sshd.start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        site_a, site_b = build_pair(root, sshd)
        processes = [start_agent(site_a), start_agent(site_b)]
        assert site_a.dicom_port is not None
        port = site_a.dicom_port
        wait_for_port(port)
        print(f"sending {len(files)} instances with storescu to site A (127.0.0.1:{port})")
        result = storescu(port, files)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
        expected = _study_count(files)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(imported_envelopes(site_b)) < expected:
            time.sleep(0.5)
        imported = imported_envelopes(site_b)
        _print_audit(site_a)
        _print_audit(site_b)
        print(f"\n== imported by {site_b.name} into {site_b.import_dir}")
        total = 0
        for envelope in imported:
            dicom = sorted((envelope / "dicom").glob("*.dcm"))
            total += len(dicom)
            noun = "instance" if len(dicom) == 1 else "instances"
            print(f"  {envelope.name}/  {len(dicom)} {noun}, metadata.json, files.json")
        ok = len(imported) == expected and total == len(files)
        print(
            f"\n{'OK' if ok else 'INCOMPLETE'}: {total} of {len(files)} instances in "
            f"{len(imported)} of {expected} studies arrived, verified and decrypted"
        )
        return 0 if ok else 1
    finally:
        for process in processes:
            stop_agent(process)
        sshd.stop()
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
            print(f"removed the demo folder {root}; run with --keep to look around in it")
        elif keep:
            print(
                f"kept {root}: agent logs in site-a/agent.log and site-b/agent.log, "
                f"configs in site-*/agent.toml; the command is {Path(sys.executable).parent}"
                "/jmix-agent"
            )


def _study_count(files: Sequence[Path]) -> int:
    from pydicom import dcmread

    return len({dcmread(path, stop_before_pixels=True).StudyInstanceUID for path in files})
