"""The hash-chained audit log: chaining, and detection of edited logs by line number."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from agent.audit import GENESIS, AuditLog, head_path, verify_log
from agent.cli import main

RECORDS = 4


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    """Return a log of four ``envelope_sealed`` records whose ``count`` is 0 to 3."""
    path = tmp_path / "audit" / "audit.jsonl"
    log = AuditLog(path)
    for index in range(RECORDS):
        log.record("envelope_sealed", envelope_id=f"envelope-{index}", peer="site-b", count=index)
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


# -- chaining --------------------------------------------------------------------------------------


def test_intact_log_verifies(log_path: Path) -> None:
    report = verify_log(log_path)
    assert report.ok
    assert report.records == RECORDS
    assert report.first_bad_line is None


def test_records_chain_hashes(log_path: Path) -> None:
    previous = GENESIS
    for number, line in enumerate(lines_of(log_path), start=1):
        record = json.loads(line)
        assert record["prev"] == previous, number
        assert record["seq"] == number
        previous = hashlib.sha256(line).hexdigest()


def test_first_record_genesis(log_path: Path) -> None:
    first = json.loads(lines_of(log_path)[0])
    assert first["prev"] == "0" * 64


def test_record_fields_kept(log_path: Path) -> None:
    second = json.loads(lines_of(log_path)[1])
    assert second["event"] == "envelope_sealed"
    assert second["envelope_id"] == "envelope-1"
    assert second["count"] == 1


def test_reopened_log_continues(log_path: Path) -> None:
    AuditLog(log_path).record("agent_stopped")
    report = verify_log(log_path)
    assert report.ok
    assert report.records == RECORDS + 1


def test_concurrent_records_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")

    def write(worker: int) -> None:
        for index in range(25):
            log.record("instances_received", batch_id=f"{worker}-{index}", count=1)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    report = verify_log(tmp_path / "audit.jsonl")
    assert report.ok
    assert report.records == 100


def test_unknown_event_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown audit event"):
        AuditLog(tmp_path / "audit.jsonl").record("patient_viewed")


def test_patient_field_rejected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with pytest.raises(ValueError, match="not allowed"):
        AuditLog(path).record("envelope_sealed", patient_name="DOE^JANE")
    assert not path.exists() or path.read_bytes() == b""


# -- edited logs -----------------------------------------------------------------------------------


def test_changed_record_detected(log_path: Path) -> None:
    lines = lines_of(log_path)
    lines[1] = lines[1].replace(b'"count":1', b'"count":9')
    write_lines(log_path, lines)

    report = verify_log(log_path)

    assert not report.ok
    assert report.first_bad_line == 3
    assert report.records == 2


def test_changed_first_record_detected(log_path: Path) -> None:
    lines = lines_of(log_path)
    lines[0] = lines[0].replace(b'"peer":"site-b"', b'"peer":"site-x"')
    write_lines(log_path, lines)

    assert verify_log(log_path).first_bad_line == 2


def test_removed_record_detected(log_path: Path) -> None:
    lines = lines_of(log_path)
    del lines[1]
    write_lines(log_path, lines)

    report = verify_log(log_path)

    assert not report.ok
    assert report.first_bad_line == 2


def test_reordered_records_detected(log_path: Path) -> None:
    lines = lines_of(log_path)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(log_path, lines)

    report = verify_log(log_path)

    assert not report.ok
    assert report.first_bad_line == 2


def test_truncated_last_line_detected(log_path: Path) -> None:
    lines = lines_of(log_path)
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    write_lines(log_path, lines)

    report = verify_log(log_path)

    assert not report.ok
    assert report.first_bad_line == RECORDS
    assert report.problem is not None
    assert "truncated" in report.problem


def test_garbage_line_detected(log_path: Path) -> None:
    lines = lines_of(log_path)
    lines.insert(2, b"not json\n")
    write_lines(log_path, lines)

    report = verify_log(log_path)

    assert report.first_bad_line == 3
    assert report.problem == "record is not valid JSON"


def test_rechained_sequence_detected(log_path: Path) -> None:
    """A removed record whose successor got a forged ``prev`` still fails on ``seq``."""
    lines = lines_of(log_path)
    first_hash = hashlib.sha256(lines[0]).hexdigest()
    third = json.loads(lines[2])
    third["prev"] = first_hash
    forged = (json.dumps(third, sort_keys=True, separators=(",", ":")) + "\n").encode()
    write_lines(log_path, [lines[0], forged])

    report = verify_log(log_path)

    assert report.first_bad_line == 2
    assert report.problem == "sequence number is not 2"


def test_changed_last_record_detected(log_path: Path) -> None:
    lines = lines_of(log_path)
    lines[-1] = lines[-1].replace(b'"count":3', b'"count":9')
    write_lines(log_path, lines)

    report = verify_log(log_path)

    assert not report.ok
    assert report.first_bad_line == RECORDS


def test_removed_last_record_detected(log_path: Path) -> None:
    write_lines(log_path, lines_of(log_path)[:-1])

    report = verify_log(log_path)

    assert not report.ok
    assert report.first_bad_line == RECORDS
    assert report.records == RECORDS - 1


def test_torn_tail_repaired_on_append(log_path: Path) -> None:
    lines = lines_of(log_path)
    lines[-1] = lines[-1][:10]
    write_lines(log_path, lines)

    AuditLog(log_path).record("agent_started")

    report = verify_log(log_path)
    assert report.ok
    assert report.records == RECORDS


# -- the audit verify command -------------------------------------------------------------


def test_cli_intact_exits_0(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(log_path)]) == 0
    assert f"{RECORDS} records, chain intact" in capsys.readouterr().out


def test_cli_changed_exits_1(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = lines_of(log_path)
    lines[1] = lines[1].replace(b'"count":1', b'"count":9')
    write_lines(log_path, lines)

    assert main(["audit", "verify", str(log_path)]) == 1
    assert "line 3" in capsys.readouterr().err


def test_cli_truncated_exits_1(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-5])

    assert main(["audit", "verify", str(log_path)]) == 1
    assert f"line {RECORDS}" in capsys.readouterr().err


def test_cli_missing_log_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "absent.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


# -- more kinds of tampering ---------------------------------------------------------------


def test_removed_first_record_detected(log_path: Path) -> None:
    write_lines(log_path, lines_of(log_path)[1:])

    report = verify_log(log_path)

    assert not report.ok
    assert report.first_bad_line == 1
    assert report.records == 0


def test_duplicated_record_detected(log_path: Path) -> None:
    lines = lines_of(log_path)
    lines.insert(2, lines[1])
    write_lines(log_path, lines)

    report = verify_log(log_path)

    assert not report.ok
    assert report.first_bad_line == 3


def test_emptied_log_detected(log_path: Path) -> None:
    log_path.write_bytes(b"")

    report = verify_log(log_path)

    assert not report.ok
    assert report.first_bad_line == 1
    assert report.problem == f"records 1 to {RECORDS} are missing: the log was truncated"


def test_unreadable_head_detected(log_path: Path) -> None:
    head_path(log_path).write_text("not json")

    report = verify_log(log_path)

    assert not report.ok
    assert report.problem is not None
    assert "audit.jsonl.head is unreadable" in report.problem


def test_cli_removed_exits_1(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = lines_of(log_path)
    del lines[1]
    write_lines(log_path, lines)

    assert main(["audit", "verify", str(log_path)]) == 1
    assert "line 2" in capsys.readouterr().err


def test_cli_reordered_exits_1(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = lines_of(log_path)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(log_path, lines)

    assert main(["audit", "verify", str(log_path)]) == 1
    assert "line 2" in capsys.readouterr().err


def test_cli_cut_records_exits_1(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Whole records cut from the end leave a valid chain; the head sidecar catches it."""
    write_lines(log_path, lines_of(log_path)[:2])

    assert main(["audit", "verify", str(log_path)]) == 1
    assert f"line 3: records 3 to {RECORDS} are missing" in capsys.readouterr().err
