"""Helpers for the fault, pipeline and load tests: generated studies, agent pairs, checks.

The tests run real ``jmix-agent run`` processes, a throwaway sshd and DCMTK's storescu,
as tests/test_end_to_end.py does, and build on the same pieces from :mod:`agent.demo`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from agent.demo import STORESCU, Site, build_pair, sample_paths, start_agent, stop_agent
from agent.devtools.sshd import SshdServer

TIMEOUT = 90.0

# Marks of every fault test module: real agents, sshd and storescu, minutes in all.
# pydicom warns about odd sample values while the tests read files, which is expected.
FAULT_TEST_MARKS = [
    pytest.mark.skipif(not STORESCU.exists(), reason="DCMTK storescu is not installed"),
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
STARTED = re.compile(r"jmix-agent \S+ started:")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


# -- generated studies ---------------------------------------------------------------------


@dataclass
class Study:
    """Generated instances of one study, by SOP Instance UID."""

    study_uid: str
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def names(self) -> set[str]:
        """The file names the agent stores them under (``<sop uid>.dcm``)."""
        return {f"{uid}.dcm" for uid in self.files}


def make_study(
    directory: Path,
    count: int,
    *,
    pad_bytes: int = 0,
    source: str = "CT_small.dcm",
    study_uid: str | None = None,
) -> Study:
    """Write ``count`` copies of a bundled file with new UIDs into ``directory``.

    ``pad_bytes`` of random data go into a private element, which makes sealing,
    uploading and importing take long enough to be interrupted.
    """
    directory.mkdir(parents=True, exist_ok=True)
    dataset = dcmread(sample_paths([source])[0])
    study = Study(study_uid or generate_uid())
    series_uid = generate_uid()
    for number in range(1, count + 1):
        sop_uid = generate_uid()
        dataset.StudyInstanceUID = study.study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = sop_uid
        dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
        dataset.InstanceNumber = number
        if pad_bytes:
            dataset.add_new(0x00110010, "LO", "JMIX TEST")
            dataset.add_new(0x00111010, "OB", os.urandom(pad_bytes))
        path = directory / f"{number:05d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        study.files[sop_uid] = path
    return study


def drop_atomically(source: Path, drop: Path, name: str | None = None) -> Path:
    """Copy a file into a drop folder under a hidden name, then rename it into view."""
    drop.mkdir(parents=True, exist_ok=True)
    target = drop / (name or source.name)
    hidden = drop / f".{target.name}.part"
    hidden.write_bytes(source.read_bytes())
    hidden.rename(target)
    return target


# -- config files ------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value))
    return json.dumps(value)


def set_options(site: Site, table: str, **values: Any) -> None:
    """Set keys in one table of ``site``'s agent.toml, adding the table if it is missing."""
    lines = site.config_path.read_text().splitlines()
    header = f"[{table}]"
    if header not in lines:
        lines += [header, *(f"{key} = {_toml(value)}" for key, value in values.items())]
    else:
        start = lines.index(header) + 1
        end = next(
            (i for i in range(start, len(lines)) if lines[i].lstrip().startswith("[")),
            len(lines),
        )
        section = lines[start:end]
        for key, value in values.items():
            entry = f"{key} = {_toml(value)}"
            matches = [i for i, line in enumerate(section) if line.split("=")[0].strip() == key]
            if matches:
                section[matches[0]] = entry
            else:
                section.insert(0, entry)
        lines[start:end] = section
    site.config_path.write_text("\n".join(lines) + "\n")


# -- agent processes -----------------------------------------------------------------------


def started_count(site: Site) -> int:
    if not site.log_path.exists():
        return 0
    return len(STARTED.findall(site.log_path.read_text(errors="replace")))


def log_text(site: Site) -> str:
    return site.log_path.read_text(errors="replace") if site.log_path.exists() else ""


@dataclass
class Pair:
    """Agents A (SCP, drop folder, sends over SFTP) and B (receives), as processes."""

    sshd: SshdServer
    a: Site
    b: Site
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def site(self, which: str) -> Site:
        return self.a if which == "a" else self.b

    def start(self, which: str, timeout: float = 30.0) -> subprocess.Popen[bytes]:
        """Start one agent and wait for its "started" log line."""
        site = self.site(which)
        before = started_count(site)
        process = start_agent(site)
        self.processes[which] = process
        deadline = time.monotonic() + timeout
        while started_count(site) <= before:
            if process.poll() is not None:
                raise RuntimeError(f"agent {which} exited: {log_text(site)[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent {which} did not start: {log_text(site)[-3000:]}")
            time.sleep(0.02)
        return process

    def kill(self, which: str) -> None:
        process = self.processes.pop(which, None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def stop(self, which: str, timeout: float = 60.0) -> int | None:
        process = self.processes.pop(which, None)
        return stop_agent(process, timeout) if process is not None else None

    def running(self, which: str) -> bool:
        process = self.processes.get(which)
        return process is not None and process.poll() is None

    def stop_all(self) -> None:
        for which in list(self.processes):
            self.stop(which)

    def cli(self, which: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``jmix-agent --config <site config> ARGS`` and return the finished process."""
        command = [sys.executable, "-m", "agent.cli", "--config", str(self.site(which).config_path)]
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=60, check=False
        )

    def status(self, which: str) -> dict[str, Any]:
        result = self.cli(which, "status", "--json")
        assert result.returncode == 0, result.stderr
        document: dict[str, Any] = json.loads(result.stdout)
        return document

    def print_logs(self) -> None:
        for site in (self.a, self.b):
            print(f"--- {site.name} log\n{log_text(site)[-6000:]}")


def make_pair(root: Path, sshd: SshdServer) -> Pair:
    """Create (not start) the two sites of :func:`agent.demo.build_pair`."""
    site_a, site_b = build_pair(root, sshd)
    return Pair(sshd, site_a, site_b)


# -- what arrived --------------------------------------------------------------------------


def envelopes(site: Site) -> list[Path]:
    if not site.import_dir.is_dir():
        return []
    return sorted(p for p in site.import_dir.iterdir() if not p.name.startswith("."))


def imported_copies(site: Site) -> dict[str, list[Path]]:
    """Map each imported instance file name to every copy in the import folder."""
    copies: dict[str, list[Path]] = {}
    for envelope in envelopes(site):
        for path in (envelope / "dicom").glob("*.dcm"):
            copies.setdefault(path.name, []).append(path)
    return copies


def stored_copies(site: Site) -> dict[str, list[Path]]:
    """Map each instance file name to its copies in the sender's spool (all batches)."""
    copies: dict[str, list[Path]] = {}
    for state in ("incoming", "ready", "sealed"):
        for path in (site.state / state).glob("*/*.dcm"):
            if not path.name.startswith("."):
                copies.setdefault(path.name, []).append(path)
    return copies


def incomplete_imports(site: Site) -> list[str]:
    """Return a problem for each import folder that is not exactly what files.json lists."""
    problems = []
    for envelope in envelopes(site):
        listing_path = envelope / "files.json"
        if not listing_path.is_file():
            problems.append(f"{envelope.name}: no files.json")
            continue
        listed = {entry["file"]: entry for entry in json.loads(listing_path.read_text())}
        present = {
            str(path.relative_to(envelope))
            for path in envelope.rglob("*")
            if path.is_file() and path.name != "files.json"
        }
        if present != set(listed):
            problems.append(f"{envelope.name}: files differ from files.json")
            continue
        for name, entry in listed.items():
            path = envelope / name
            if (
                "sha256:" + sha256(path) != entry["hash"]
                or path.stat().st_size != entry["size_bytes"]
            ):
                problems.append(f"{envelope.name}: {name} does not match files.json")
    return problems


def leftovers(*roots: Path) -> list[Path]:
    """Return temporary and partial names below ``roots``."""
    found: list[Path] = []
    for root in roots:
        if root.exists():
            found += [
                path
                for path in root.rglob("*")
                if path.name.startswith(".tmp-") or ".partial" in path.name
            ]
    return found


def audit_events(site: Site, event: str) -> list[dict[str, Any]]:
    from agent.audit import read_records

    if not site.audit_log.exists():
        return []
    return [record for record in read_records(site.audit_log) if record["event"] == event]


def names_of(studies: Iterable[Study]) -> set[str]:
    return {name for study in studies for name in study.names}


# -- peers in config files -----------------------------------------------------------------


def sftp_transport(sshd: SshdServer, receiver: Site, **overrides: Any) -> dict[str, Any]:
    """Return the ``[peers.transport]`` table that delivers to ``receiver`` over ``sshd``."""
    transport: dict[str, Any] = {
        "kind": "sftp",
        "host": sshd.host,
        "port": sshd.port,
        "username": sshd.user,
        "private_key": sshd.client_key_path,
        "host_key": sshd.host_public_key,
        "remote_dir": receiver.inbox,
    }
    transport.update(overrides)
    return transport


def rewrite_peers(site: Site, peers: list[tuple[Site, dict[str, Any] | None]]) -> None:
    """Rewrite ``site``'s config with these (peer site, transport) pairs, keeping other tables.

    Tables added with :func:`set_options` are kept; [[peers]] and [[routes]] are replaced,
    with one route to every peer that has a transport.
    """
    from agent.demo import write_config

    kept = _extra_tables(site)
    entries = [{"card": peer.identity().card(), "transport": t} for peer, t in peers]
    write_config(site, entries, watch=(site.drop.exists() or site.dicom_port is not None))
    for table, values in kept.items():
        set_options(site, table, **values)


def _extra_tables(site: Site) -> dict[str, dict[str, Any]]:
    """Return the values of the tables and keys that write_config does not write."""
    import tomllib

    document = tomllib.loads(site.config_path.read_text())
    extra: dict[str, dict[str, Any]] = {}
    for table in ("agent", "delivery", "inbound"):
        values = document.get(table, {})
        if table == "agent":
            values = {k: v for k, v in values.items() if k in ("study_quiet_seconds",)}
        if table == "inbound":
            values = {
                k: v
                for k, v in values.items()
                if k not in ("inbox", "import_dir", "quarantine_dir")
            }
        if values:
            extra[table] = values
    return extra
