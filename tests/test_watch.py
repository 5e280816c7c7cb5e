"""Tests for agent.ingest.watch with real files, watchdog observers and the spool."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files

from agent.audit import AuditLog, read_records
from agent.dicom.inspect import PART10_PREFIX, read_instance_info
from agent.dicom.uids import InstanceInfo
from agent.ingest.watch import DropFolderWatcher
from agent.pipeline.spool import Spool

STABLE_SECONDS = 0.3
WAIT_SECONDS = 15.0

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def bundled_file(name: str) -> Path:
    """Return a file bundled with pydicom (never downloaded: there is no network)."""
    matches = [Path(item) for item in get_testdata_files() if Path(item).name == name]
    assert matches, f"{name} is not among pydicom's bundled test files"
    return matches[0]


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@dataclass
class Harness:
    drop: Path
    quarantine: Path
    spool: Spool
    audit_path: Path
    watcher: DropFolderWatcher
    stored: list[tuple[InstanceInfo, str]] = field(default_factory=list)

    def stored_path(self, info: InstanceInfo) -> Path:
        return self.spool.path("incoming") / info.study_uid / f"{info.sop_instance_uid}.dcm"

    def stored_files(self) -> list[Path]:
        return sorted(self.spool.path("incoming").glob("*/*.dcm"))

    def quarantined(self) -> list[Path]:
        if not self.quarantine.exists():
            return []
        return sorted(p for p in self.quarantine.iterdir() if not p.name.endswith(".json"))

    def records(self, event: str) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [record for record in read_records(self.audit_path) if record["event"] == event]


@pytest.fixture
def make_watcher(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Return a function that creates (and optionally starts) a watcher on a fresh folder."""
    harnesses: list[Harness] = []

    def make(start: bool = True, **options: Any) -> Harness:
        root = tmp_path / f"agent{len(harnesses)}"
        drop = root / "drop"
        drop.mkdir(parents=True)
        quarantine = (
            drop / "rejected" if options.pop("quarantine_inside", False) else (root / "quarantine")
        )
        spool = Spool(root / "spool")
        audit_path = root / "audit.jsonl"
        stored: list[tuple[InstanceInfo, str]] = []
        watcher = DropFolderWatcher(
            drop,
            spool,
            AuditLog(audit_path),
            "modality",
            options.pop("stable", STABLE_SECONDS),
            quarantine_dir=quarantine,
            on_stored=lambda info, source: stored.append((info, source)),
            **options,
        )
        harness = Harness(drop, quarantine, spool, audit_path, watcher, stored)
        harnesses.append(harness)
        if start:
            watcher.start()
        return harness

    yield make
    for harness in harnesses:
        harness.watcher.stop()


@pytest.fixture
def agent(make_watcher: Callable[..., Harness]) -> Harness:
    return make_watcher()


def copy_into(source: Path, target: Path) -> bytes:
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return data


# -- taking files ----------------------------------------------------------------------


def test_new_file_stored_and_deleted(agent: Harness) -> None:
    original = bundled_file("CT_small.dcm")
    info = read_instance_info(original)
    dropped = agent.drop / "CT_small.dcm"

    data = copy_into(original, dropped)

    assert wait_until(lambda: not dropped.exists())
    assert agent.stored_path(info).read_bytes() == data
    assert agent.stored == [(info, "watch-modality")]
    assert (agent.stored_path(info).parent / ".sources" / "watch-modality").exists()


def test_existing_files_taken_at_start(make_watcher: Callable[..., Harness]) -> None:
    agent = make_watcher(start=False)
    names = ["CT_small.dcm", "MR_small_bigendian.dcm", "SC_rgb_jpeg_dcmtk.dcm", "image_dfl.dcm"]
    for name in names:
        copy_into(bundled_file(name), agent.drop / name)

    agent.watcher.start()

    assert agent.watcher.wait_idle(WAIT_SECONDS)
    assert list(agent.drop.iterdir()) == []
    for name in names:
        original = bundled_file(name)
        assert agent.stored_path(read_instance_info(original)).read_bytes() == (
            original.read_bytes()
        )


def test_subfolders_scanned(agent: Harness) -> None:
    original = bundled_file("MR_small.dcm")
    dropped = agent.drop / "2024" / "study one" / "image.dcm"

    copy_into(original, dropped)

    assert wait_until(lambda: not dropped.exists())
    assert agent.stored_path(read_instance_info(original)).exists()


def test_received_audited_per_study(make_watcher: Callable[..., Harness]) -> None:
    agent = make_watcher(start=False)
    series = sorted((bundled_file("CT_small.dcm").parent / "dicomdirtests" / "98892001").rglob("*"))
    files = [path for path in series if path.is_file()][:3]
    for index, path in enumerate(files):
        copy_into(path, agent.drop / f"image{index}.dcm")

    agent.watcher.start()

    assert agent.watcher.wait_idle(WAIT_SECONDS)
    records = agent.records("instances_received")
    assert sum(record["count"] for record in records) == 3
    assert {record["study_uid"] for record in records} == {read_instance_info(files[0]).study_uid}
    assert {record["source"] for record in records} == {"watch-modality"}


def test_file_without_preamble_gets_one(agent: Harness) -> None:
    original = bundled_file("CT_small.dcm")
    data = original.read_bytes()[len(PART10_PREFIX) :]
    dropped = agent.drop / "nopreamble.dcm"

    dropped.write_bytes(data)

    assert wait_until(lambda: not dropped.exists())
    assert agent.stored_path(read_instance_info(original)).read_bytes() == PART10_PREFIX + data


def test_polling_observer_takes_file(make_watcher: Callable[..., Harness]) -> None:
    agent = make_watcher(polling=True)
    original = bundled_file("CT_small.dcm")
    dropped = agent.drop / "polled.dcm"

    copy_into(original, dropped)

    assert wait_until(lambda: not dropped.exists())
    assert agent.stored_path(read_instance_info(original)).read_bytes() == original.read_bytes()


# -- writers in progress ---------------------------------------------------------------


def write_in_two_parts(
    path: Path, data: bytes, split: int, pause: float, during_pause: Callable[[], None]
) -> None:
    """Write ``data[:split]``, pause, run a check, then write the rest (like a slow copy)."""
    with path.open("wb") as handle:
        handle.write(data[:split])
        handle.flush()
        os.fsync(handle.fileno())
        time.sleep(pause)
        during_pause()
        handle.write(data[split:])


@pytest.mark.parametrize(
    "split",
    [
        100,  # inside the preamble
        200,  # inside the file meta
        700,  # inside the dataset header, before the UIDs
        20_000,  # inside the pixel data
    ],
)
def test_paused_writer_not_taken_partially(agent: Harness, split: int) -> None:
    original = bundled_file("CT_small.dcm")
    data = original.read_bytes()
    dropped = agent.drop / "slow.dcm"
    seen_during_pause: dict[str, Any] = {}

    def look() -> None:
        seen_during_pause["stored"] = agent.stored_files()
        seen_during_pause["quarantined"] = agent.quarantined()
        seen_during_pause["exists"] = dropped.exists()

    # The pause is several quiet periods long, so the partial file looks stable.
    write_in_two_parts(dropped, data, split, STABLE_SECONDS * 4, look)

    assert seen_during_pause == {"stored": [], "quarantined": [], "exists": True}
    assert wait_until(lambda: not dropped.exists())
    assert agent.stored_path(read_instance_info(original)).read_bytes() == data
    assert agent.quarantined() == []


def test_growing_file_waits_for_quiet_period(agent: Harness) -> None:
    original = bundled_file("CT_small.dcm")
    data = original.read_bytes()
    dropped = agent.drop / "growing.dcm"
    taken_early = threading.Event()

    with dropped.open("wb") as handle:
        # Write the file in slices faster than the quiet period, checking each time.
        for start in range(0, len(data), 4096):
            handle.write(data[start : start + 4096])
            handle.flush()
            if agent.stored_files():
                taken_early.set()
            time.sleep(STABLE_SECONDS / 2)

    assert not taken_early.is_set()
    assert wait_until(lambda: not dropped.exists())
    assert agent.stored_path(read_instance_info(original)).read_bytes() == data


def test_recently_modified_file_not_taken(agent: Harness) -> None:
    # A complete file whose modification time keeps moving isolates the quiet-period rule
    # from the completeness check.
    original = bundled_file("CT_small.dcm")
    dropped = agent.drop / "touched.dcm"
    copy_into(original, dropped)

    stop_touching = time.monotonic() + STABLE_SECONDS * 4
    while time.monotonic() < stop_touching:
        os.utime(dropped, ns=(time.time_ns(), time.time_ns()))
        assert dropped.exists()
        assert agent.stored_files() == []
        time.sleep(STABLE_SECONDS / 2)

    assert wait_until(lambda: not dropped.exists())
    assert agent.stored_path(read_instance_info(original)).exists()


def test_truncated_file_quarantined_after_grace(make_watcher: Callable[..., Harness]) -> None:
    agent = make_watcher(incomplete_seconds=1.0)
    dropped = agent.drop / "cut.dcm"

    copy_into(bundled_file("MR_truncated.dcm"), dropped)

    # The audit record is the last step of quarantining.
    assert wait_until(lambda: len(agent.records("file_rejected")) == 1)
    reason = json.loads(next(agent.quarantine.glob("*.reason.json")).read_text())
    assert "more bytes than the file has" in reason["reason"]
    assert agent.stored_files() == []


# -- rejected and skipped files --------------------------------------------------------


def test_non_dicom_quarantined_with_reason(agent: Harness) -> None:
    dropped = agent.drop / "notes" / "read me.txt"
    dropped.parent.mkdir()
    dropped.write_text("This is a text file, not DICOM.\n" * 10)

    # The audit record is the last step of quarantining.
    assert wait_until(lambda: len(agent.records("file_rejected")) == 1)
    [quarantined] = agent.quarantined()
    # The name is a label derived from the path: the real path may carry a patient's name.
    assert "read" not in quarantined.name
    assert quarantined.name.endswith(
        "-file-" + hashlib.sha256(b"notes/read me.txt").hexdigest()[:12]
    )
    assert quarantined.read_text() == "This is a text file, not DICOM.\n" * 10
    reason = json.loads(quarantined.with_name(quarantined.name + ".reason.json").read_text())
    assert reason["reason"].startswith("not a DICOM Part 10 file")
    assert reason["path"] == "notes/read me.txt"
    assert reason["watch"] == "modality"
    assert not dropped.exists()
    assert agent.stored_files() == []
    [record] = agent.records("file_rejected")
    assert record["path"] == "file-" + hashlib.sha256(b"notes/read me.txt").hexdigest()[:12]
    assert record["reason"] == reason["reason"]


def test_invalid_uid_quarantined(agent: Harness, tmp_path: Path) -> None:
    dataset = dcmread(bundled_file("CT_small.dcm"))
    dataset.StudyInstanceUID = "1.2.840.10008/../../etc"
    source = tmp_path / "bad-uid.dcm"
    dataset.save_as(source, enforce_file_format=True)

    copy_into(source, agent.drop / "bad-uid.dcm")

    # The audit record is the last step of quarantining.
    assert wait_until(lambda: len(agent.records("file_rejected")) == 1)
    [record] = agent.records("file_rejected")
    assert record["reason"] == "StudyInstanceUID contains characters other than digits and dots"
    assert agent.stored_files() == []


def test_quarantine_inside_folder_not_scanned(make_watcher: Callable[..., Harness]) -> None:
    agent = make_watcher(quarantine_inside=True)
    assert agent.quarantine.parent == agent.drop
    (agent.drop / "junk.bin").write_bytes(b"\x01" * 500)

    # The audit record is the last step of quarantining.
    assert wait_until(lambda: len(agent.records("file_rejected")) == 1)
    time.sleep(STABLE_SECONDS * 2)
    assert agent.watcher.wait_idle(WAIT_SECONDS)
    assert len(agent.quarantined()) == 1
    assert len(agent.records("file_rejected")) == 1


def test_hidden_and_temporary_names_skipped(agent: Harness) -> None:
    data = bundled_file("CT_small.dcm").read_bytes()
    skipped = [
        agent.drop / ".hidden.dcm",
        agent.drop / "image.dcm.part",
        agent.drop / "image.dcm.tmp",
        agent.drop / "image.dcm~",
        agent.drop / ".staging" / "image.dcm",
    ]
    for path in skipped:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)

    assert agent.watcher.wait_idle(WAIT_SECONDS)
    time.sleep(STABLE_SECONDS * 2)
    assert agent.watcher.wait_idle(WAIT_SECONDS)
    assert all(path.read_bytes() == data for path in skipped)
    assert agent.stored_files() == []
    assert agent.quarantined() == []


def test_symlinks_not_followed(
    agent: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target_file = outside / "secret.dcm"
    data = copy_into(bundled_file("CT_small.dcm"), target_file)
    copy_into(bundled_file("MR_small.dcm"), outside / "nested" / "other.dcm")

    (agent.drop / "link.dcm").symlink_to(target_file)
    (agent.drop / "linked-dir").symlink_to(outside / "nested", target_is_directory=True)

    with caplog.at_level(logging.WARNING, logger="agent.ingest.watch"):
        # Each wait_idle rescans the folder, so the links are found three times.
        for _ in range(3):
            assert agent.watcher.wait_idle(WAIT_SECONDS)
            time.sleep(STABLE_SECONDS)
    assert target_file.read_bytes() == data
    assert (outside / "nested" / "other.dcm").exists()
    assert (agent.drop / "link.dcm").is_symlink()
    assert agent.stored_files() == []
    assert agent.quarantined() == []
    link_warnings = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert len(link_warnings) == 2  # one for link.dcm, one for linked-dir


# -- lifecycle -------------------------------------------------------------------------


def test_stop_joins_threads(make_watcher: Callable[..., Harness]) -> None:
    agent = make_watcher()
    before = {thread.name for thread in threading.enumerate()}
    assert "watch-modality" in before

    agent.watcher.stop()

    assert "watch-modality" not in {thread.name for thread in threading.enumerate()}
    agent.watcher.stop()


def test_missing_folder_raises(make_watcher: Callable[..., Harness]) -> None:
    agent = make_watcher(start=False)
    agent.drop.rmdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        agent.watcher.start()


def test_negative_stable_seconds_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        DropFolderWatcher(
            tmp_path,
            Spool(tmp_path / "spool"),
            AuditLog(tmp_path / "a.jsonl"),
            "x",
            -1,
            quarantine_dir=tmp_path / "q",
        )
