"""Every hostile envelope from ``hostile.CASES`` through one live receiving agent.

One ``jmix-agent run`` process (site B) is started for the whole module. All cases are
copied into its inbox under hidden names and renamed in together. Each case is then
checked on its own: the rejection code in reason.json, the input kept unchanged in
quarantine and one ``envelope_rejected`` audit record. Nothing may reach the import
folder, the agent must keep running, and genuine envelopes must still be imported after.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hostile import (
    CASES,
    HostileCase,
    Receiver,
    audit_events,
    build_receiver,
    container,
    deliver,
    envelope_entries,
    payload_edit,
    quarantine_reasons,
    tree_digest,
    wait_until,
    zip_bytes,
)
from pydicom import dcmread

from agent.audit import AuditLog, verify_log
from agent.config import load_config
from agent.demo import imported_envelopes, sample_paths, start_agent, stop_agent
from agent.pipeline.inbound import InboundPipeline
from agent.pipeline.spool import Spool

TIMEOUT = 120.0


@dataclass
class HostileRun:
    """The agent after it processed every case, and what it left behind."""

    receiver: Receiver
    process: subprocess.Popen[bytes]
    entries: dict[str, Path]
    digests: dict[str, dict[str, str]]
    reasons: dict[str, tuple[Path, dict[str, Any]]]
    rejections: list[dict[str, Any]]
    import_after_cases: list[str]
    ledger_after_cases: list[str]
    work_after_cases: list[str]
    running_after_cases: bool
    inbox_after_cases: list[str]
    log_after_cases: str


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileRun]:
    root = tmp_path_factory.mktemp("hostile")
    receiver = build_receiver(root)
    site = receiver.site
    process = start_agent(site)
    try:
        entries = {}
        for case in CASES:
            folder = root / "cases" / case.name
            folder.mkdir(parents=True)
            entries[case.name] = case.build(receiver.forge, folder)
        digests = {name: tree_digest(entry) for name, entry in entries.items()}

        deliver(list(entries.values()), site.inbox)
        wait_until(lambda: len(quarantine_reasons(site.quarantine)) >= len(CASES), TIMEOUT)
        wait_until(lambda: len(audit_events(site, "envelope_rejected")) >= len(CASES), 10)

        yield HostileRun(
            receiver=receiver,
            process=process,
            entries=entries,
            digests=digests,
            reasons=quarantine_reasons(site.quarantine),
            rejections=audit_events(site, "envelope_rejected"),
            import_after_cases=os.listdir(site.import_dir),
            ledger_after_cases=os.listdir(site.state / "ledger"),
            work_after_cases=os.listdir(site.state / "work"),
            running_after_cases=process.poll() is None,
            inbox_after_cases=os.listdir(site.inbox),
            log_after_cases=site.log_path.read_text(),
        )
    finally:
        stop_agent(process)
        if site.log_path.exists():
            print(f"--- {site.name} log (tail)\n{site.log_path.read_text()[-6000:]}")


def test_catalogue_size() -> None:
    names = [case.name for case in CASES]
    assert len(names) >= 50
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_case_rejected(run: HostileRun, case: HostileCase) -> None:
    entry = run.entries[case.name]
    assert entry.name in run.reasons, f"{case.name}: no quarantine folder for {entry.name}"
    folder, reason = run.reasons[entry.name]

    assert reason["code"] == case.code, reason["reason"]
    assert reason["reason"]
    assert sorted(os.listdir(folder)) == sorted([entry.name, "reason.json"])
    assert tree_digest(folder / entry.name) == run.digests[case.name], "input was changed"

    records = [record for record in run.rejections if record.get("path") == folder.name]
    assert len(records) == 1, f"expected one envelope_rejected record for {folder.name}"
    assert records[0]["reason"].startswith(f"{case.code}: ")
    assert records[0]["outcome"] == "quarantined"


def test_nothing_imported(run: HostileRun) -> None:
    assert run.import_after_cases == []
    assert run.ledger_after_cases == []


def test_nothing_left_behind(run: HostileRun) -> None:
    assert run.inbox_after_cases == []
    assert run.work_after_cases == []
    assert len(run.reasons) == len(CASES)


def test_daemon_survives(run: HostileRun) -> None:
    assert run.running_after_cases
    assert len(run.rejections) == len(CASES)


def test_no_unexpected_errors_logged(run: HostileRun) -> None:
    """Every case is an ordinary rejection: no traceback and no stray library warning."""
    assert "Traceback" not in run.log_after_cases
    assert "internal_error" not in run.log_after_cases
    assert "Warning:" not in run.log_after_cases
    assert run.log_after_cases.count("WARNING agent.pipeline.inbound: rejected ") == len(CASES)


def test_symlink_target_untouched(run: HostileRun) -> None:
    link = run.entries["symlinked-envelope"]
    target = Path(os.readlink(link))
    assert target.is_dir()
    assert tree_digest(target)["manifest.json"].startswith("sha256:")
    assert not (run.receiver.site.import_dir / target.name.removesuffix(".JMIX")).exists()


def test_good_envelopes_imported_after(run: HostileRun, tmp_path: Path) -> None:
    """Genuine envelopes still import after every case; then the agent stops cleanly."""
    forge = run.receiver.forge
    site = run.receiver.site
    sealed = forge.seal(tmp_path / "sealed")
    repacked = payload_edit(lambda members: members)(forge, tmp_path / "repacked")
    zipped = container(lambda envelope: zip_bytes(envelope_entries(envelope)))(
        forge, tmp_path / "zipped"
    )

    deliver([sealed, repacked, zipped], site.inbox)

    expected = {
        sealed.name.removesuffix(".JMIX"),
        repacked.name.removesuffix(".JMIX"),
        zipped.name.removesuffix(".zip"),
    }
    assert wait_until(lambda: {p.name for p in imported_envelopes(site)} == expected, TIMEOUT)
    original = hashlib.sha256(sample_paths(["CT_small.dcm"])[0].read_bytes()).hexdigest()
    for envelope in imported_envelopes(site):
        dicom = list((envelope / "dicom").iterdir())
        assert len(dicom) == 1
        assert hashlib.sha256(dicom[0].read_bytes()).hexdigest() == original
    imported = audit_events(site, "envelope_imported")
    assert len(imported) == 3
    study_uid = dcmread(sample_paths(["CT_small.dcm"])[0], stop_before_pixels=True).StudyInstanceUID
    assert [record.get("study_uid") for record in imported] == [study_uid] * 3
    assert len(quarantine_reasons(site.quarantine)) == len(CASES)

    assert run.process.poll() is None
    assert stop_agent(run.process) == 0
    assert verify_log(site.audit_log).ok


def test_verifier_error_quarantined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception that is not a rejection still quarantines the input, in-process."""
    receiver = build_receiver(tmp_path)
    config = load_config(receiver.site.config_path)
    pipeline = InboundPipeline(
        config, Spool(config.state_dir), receiver.site.identity(), AuditLog(config.audit_path)
    )
    envelope = receiver.forge.seal(tmp_path / "sealed")
    deliver([envelope], receiver.site.inbox)
    digest = tree_digest(envelope)

    def failing_open(*_args: object) -> None:
        raise RuntimeError("a verifier bug")

    monkeypatch.setattr("agent.pipeline.inbound.open_envelope", failing_open)
    result = pipeline.process(receiver.site.inbox / envelope.name)

    assert result.outcome == "rejected"
    assert result.reason == "internal_error"
    folder, reason = quarantine_reasons(receiver.site.quarantine)[envelope.name]
    assert reason["code"] == "internal_error"
    assert "RuntimeError" in reason["reason"]
    assert tree_digest(folder / envelope.name) == digest
    assert [r["path"] for r in audit_events(receiver.site, "envelope_rejected")] == [folder.name]
    assert os.listdir(receiver.site.import_dir) == []
