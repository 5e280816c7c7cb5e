"""Tests for batch plans, follow-ups, reconciliation, inbound claim recovery and retention.

The pipelines run in the test's thread against a real spool, real keys and real
envelopes. Delivery between the two sites is a copy into B's inbox.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faultkit import Study, make_study

from agent.config import Config, load_config
from agent.demo import Site, write_config
from agent.dicom.inspect import read_instance_info
from agent.identity import load_identity
from agent.pipeline import reconcile
from agent.pipeline.inbound import InboundPipeline
from agent.pipeline.outbound import PLAN_FILE, OutboundPipeline, Plan, envelope_id_for
from agent.pipeline.retention import RetentionSweeper
from agent.pipeline.spool import Spool, source_marker

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclass
class Recorder:
    records: list[dict[str, Any]] = field(default_factory=list)

    def record(self, event: str, **fields: Any) -> None:
        self.records.append({"event": event, **fields})

    def events(self, event: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record["event"] == event]


@dataclass
class Sites:
    a: Site
    b: Site
    config_a: Config
    config_b: Config
    spool_a: Spool
    spool_b: Spool
    outbound: OutboundPipeline
    inbound: InboundPipeline
    audit_a: Recorder
    audit_b: Recorder

    @property
    def peer_dir(self) -> str:
        return "org_demo.site-b"

    def store(self, study: Study, only: list[str] | None = None) -> None:
        """Store a study's instances in A's spool as the SCP would."""
        for uid, path in study.files.items():
            if only is not None and uid not in only:
                continue
            info = read_instance_info(path)
            data = path.read_bytes()
            self.spool_a.store_instance(
                info, lambda handle, data=data: handle.write(data), source_marker("ae", "CT")
            )

    def seal(self) -> None:
        self.outbound.promote_quiet_studies()
        self.outbound.seal_ready()

    def outbox(self) -> list[Path]:
        folder = self.spool_a.path("outbox") / self.peer_dir
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def deliver(self) -> list[str]:
        """Move A's outbox into B's inbox and A's sent/, like a successful upload."""
        names = []
        sent = self.spool_a.path("sent") / self.peer_dir
        sent.mkdir(parents=True, exist_ok=True)
        for envelope in self.outbox():
            shutil.copytree(envelope, self.b.inbox / envelope.name)
            envelope.rename(sent / envelope.name)
            names.append(envelope.name)
        return names

    def import_all(self) -> None:
        for entry in sorted(self.b.inbox.iterdir()):
            self.inbound.process(entry)


def make_sites(tmp_path: Path) -> Sites:
    site_a = Site("Site A", tmp_path / "a", "org:demo.site-a")
    site_b = Site("Site B", tmp_path / "b", "org:demo.site-b")
    for site in (site_a, site_b):
        site.root.mkdir(parents=True)
    card_a = site_a.create_keys().card()
    card_b = site_b.create_keys().card()
    site_b.inbox.mkdir(parents=True)
    transport = {"kind": "directory", "path": site_b.inbox}
    write_config(site_a, [{"card": card_b, "transport": transport}], quiet_seconds=0)
    write_config(site_b, [{"card": card_a}], quiet_seconds=0)
    config_a = load_config(site_a.config_path)
    config_b = load_config(site_b.config_path)
    spool_a = Spool(config_a.state_dir)
    spool_b = Spool(config_b.state_dir)
    audit_a, audit_b = Recorder(), Recorder()
    outbound = OutboundPipeline(config_a, spool_a, load_identity(config_a.identity), audit_a)
    inbound = InboundPipeline(config_b, spool_b, load_identity(config_b.identity), audit_b)
    return Sites(
        site_a, site_b, config_a, config_b, spool_a, spool_b, outbound, inbound, audit_a, audit_b
    )


@pytest.fixture
def sites(tmp_path: Path) -> Sites:
    return make_sites(tmp_path)


def imported(site: Site) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in site.import_dir.glob("*/dicom/*.dcm"):
        counts[path.name] = counts.get(path.name, 0) + 1
    return counts


# -- plans and follow-ups ----------------------------------------------------------------


def test_follow_up_instances_get_their_own_envelope(sites: Sites, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 5)
    uids = list(study.files)
    sites.store(study, only=uids[:3])
    sites.seal()
    sites.deliver()
    sites.import_all()
    assert set(imported(sites.b)) == {f"{uid}.dcm" for uid in uids[:3]}

    # The sender sends the rest, and one instance again with the same bytes.
    sites.store(study, only=uids[2:])
    sites.seal()
    sealed = sites.audit_a.events("envelope_sealed")
    assert [record["count"] for record in sealed] == [3, 2]
    sites.deliver()
    sites.import_all()
    assert imported(sites.b) == {f"{uid}.dcm": 1 for uid in uids}
    assert len(list(sites.b.import_dir.iterdir())) == 2


def test_changed_instance_is_sent_again(sites: Sites, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 2)
    sites.store(study)
    sites.seal()
    # Same SOP Instance UID, other bytes: a corrected instance.
    first = next(iter(study.files.values()))
    from pydicom import dcmread

    dataset = dcmread(first)
    dataset.StudyDescription = "corrected"
    dataset.save_as(first, enforce_file_format=True)
    sites.store(study, only=[dataset.SOPInstanceUID])
    sites.seal()
    assert [record["count"] for record in sites.audit_a.events("envelope_sealed")] == [2, 1]


def test_repeated_batch_makes_no_envelope(sites: Sites, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 3)
    sites.store(study)
    sites.seal()
    sites.store(study)
    sites.seal()
    assert len(sites.audit_a.events("envelope_sealed")) == 1
    sealed = list(sites.spool_a.path("sealed").iterdir())
    assert len(sealed) == 2
    plans = [Plan.load(batch / PLAN_FILE) for batch in sealed]
    assert sorted(len(plan.peers["org:demo.site-b"]) for plan in plans if plan) == [0, 3]


def test_unsealed_earlier_batch_counts(sites: Sites, tmp_path: Path) -> None:
    # A batch whose plan is written but which is not sealed yet (sealing failed, or a
    # crash) already covers its instances for later batches of the study.
    study = make_study(tmp_path / "study", 3)
    sites.store(study)
    sites.outbound.promote_quiet_studies()
    (first,) = sites.outbound.ready_batches()
    sites.outbound.plan(first)
    sites.store(study)
    sites.outbound.promote_quiet_studies()
    second = next(b for b in sites.outbound.ready_batches() if b.batch_id != first.batch_id)
    assert sites.outbound.plan(second).peers == {"org:demo.site-b": []}


def test_interrupted_seal_resumes_without_second_envelope(sites: Sites, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 2)
    sites.store(study)
    sites.seal()
    # As if the crash came after sealing but before the batch's rename to sealed/.
    (batch,) = sites.spool_a.path("sealed").iterdir()
    batch.rename(sites.spool_a.path("ready") / batch.name)
    sites.seal()
    assert len(sites.audit_a.events("envelope_sealed")) == 1
    assert len(sites.outbox()) == 1
    assert (sites.spool_a.path("sealed") / batch.name).is_dir()


def test_promotion_skips_interrupted_writes(sites: Sites, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 2)
    sites.store(study)
    study_dir = sites.spool_a.path("incoming") / study.study_uid
    (study_dir / ".tmp-0a1b2c-1.2.3.dcm").write_bytes(b"half an instance")
    empty = sites.spool_a.path("incoming") / "1.2.3.4"
    (empty / ".sources").mkdir(parents=True)
    (empty / ".sources" / "ae-CT").write_bytes(b"")
    past = time.time() - 60
    os.utime(empty, (past, past))

    sites.seal()
    assert not empty.exists()
    (sealed,) = sites.audit_a.events("envelope_sealed")
    assert sealed["count"] == 2
    assert list(sites.spool_a.path("sealed").glob("*/.tmp-*")) == []


def test_sealing_waits_for_free_space(
    sites: Sites, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    study = make_study(tmp_path / "study", 2)
    sites.store(study)
    monkeypatch.setattr(sites.spool_a, "free_bytes", lambda: 1000)
    sites.seal()
    sites.seal()
    assert len(list(sites.spool_a.path("ready").iterdir())) == 1
    assert sites.outbox() == []
    assert caplog.text.count("not enough free space") == 1, "logged once per batch"
    monkeypatch.undo()
    sites.seal()
    assert len(sites.outbox()) == 1


# -- reconciliation ----------------------------------------------------------------------


def test_leftovers_removed_claims_kept(sites: Sites) -> None:
    spool = sites.spool_a
    claim = spool.path("work") / "in-1234"
    (claim / "x.JMIX").mkdir(parents=True)
    staging = spool.path("work") / "retention-abc"
    staging.mkdir()
    outbox = spool.path("outbox") / sites.peer_dir
    (outbox / ".tmp-1234.JMIX").mkdir(parents=True)
    (outbox / "5678.JMIX").mkdir()
    study = spool.path("incoming") / "1.2.3"
    study.mkdir()
    (study / ".tmp-ab-1.2.3.4.dcm").write_bytes(b"x")
    import_dir = sites.config_a.inbound.import_dir
    import_dir.mkdir(parents=True, exist_ok=True)
    (import_dir / ".tmp-ab-5678").mkdir()

    removed = reconcile.remove_leftovers(spool, import_dir)
    assert removed == 4
    assert claim.is_dir()
    assert (outbox / "5678.JMIX").is_dir()
    assert not list(spool.root.rglob(".tmp-*"))
    assert not list(import_dir.glob(".tmp-*"))


def test_stale_uploads_removed(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    old = inbox / ".abc.JMIX.partial-0011223344556677"
    young = inbox / ".def.JMIX.partial-8899aabbccddeeff"
    visible = inbox / "ghi.JMIX"
    for folder in (old, young, visible):
        (folder / "payload").mkdir(parents=True)
        (folder / "payload" / "data").write_bytes(b"x")
    past = time.time() - 7200
    for path in (old, old / "payload", old / "payload" / "data", visible):
        os.utime(path, (past, past))

    assert reconcile.remove_stale_uploads(inbox, 3600) == 1
    assert not old.exists()
    assert young.exists()
    assert visible.exists()


# -- inbound claims ----------------------------------------------------------------------


def _claim(sites: Sites, envelope: Path) -> Path:
    """Put an envelope where a claim interrupted by a crash leaves it."""
    claim = sites.spool_b.path("work") / "in-5e0d7d1e-interrupted"
    claim.mkdir()
    (claim / "open").mkdir()
    (claim / "open" / "partial").write_bytes(b"plaintext that must go")
    shutil.move(envelope, claim / envelope.name)
    return claim


def test_interrupted_claim_is_imported(sites: Sites, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 2)
    sites.store(study)
    sites.seal()
    (name,) = sites.deliver()
    claim = _claim(sites, sites.b.inbox / name)

    results = sites.inbound.recover_claims()
    assert [result.outcome for result in results] == ["imported"]
    assert not claim.exists()
    assert imported(sites.b) == {name: 1 for name in study.names}


def test_claim_kept_after_io_error(
    sites: Sites, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = make_study(tmp_path / "study", 2)
    sites.store(study)
    sites.seal()
    (name,) = sites.deliver()

    def disk_full(*_args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("agent.pipeline.inbound._publish", disk_full)
    with pytest.raises(OSError):
        sites.inbound.process(sites.b.inbox / name)
    (claim,) = sites.spool_b.path("work").glob("in-*")
    assert (claim / name / "manifest.json").is_file(), "the envelope is kept"
    assert not (claim / "open").exists(), "decrypted staging is removed"

    monkeypatch.undo()
    assert [r.outcome for r in sites.inbound.recover_claims()] == ["imported"]
    assert imported(sites.b) == {name: 1 for name in study.names}


def test_crash_after_publish_imports_once(sites: Sites, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 2)
    sites.store(study)
    sites.seal()
    (name,) = sites.deliver()
    copy = tmp_path / "copy" / name
    shutil.copytree(sites.b.inbox / name, copy)
    sites.import_all()
    envelope_id = name.split(".")[0]
    # The crash came after the rename into import/ and before the ledger entry.
    (sites.spool_b.path("ledger") / f"{envelope_id}.json").unlink()
    _claim(sites, copy)

    assert [r.outcome for r in sites.inbound.recover_claims()] == ["imported"]
    assert imported(sites.b) == {name: 1 for name in study.names}
    assert (sites.spool_b.path("ledger") / f"{envelope_id}.json").is_file()

    # The sender's retry after a lost acknowledgement is now a recognised duplicate.
    sent = sites.spool_a.path("sent") / sites.peer_dir / name
    shutil.copytree(sent, sites.b.inbox / name)
    past = time.time() - 60
    os.utime(sites.b.inbox / name, (past, past))
    for path in (sites.b.inbox / name).rglob("*"):
        os.utime(path, (past, past))
    assert [r.outcome for r in sites.inbound.process_all()] == ["duplicate"]
    assert imported(sites.b) == {name: 1 for name in study.names}


# -- retention ---------------------------------------------------------------------------


def _age_sent(sites: Sites, hours: float) -> None:
    past = time.time() - hours * 3600
    for entry in (sites.spool_a.path("sent") / sites.peer_dir).iterdir():
        os.utime(entry, (past, past))
    for batch in sites.spool_a.path("sealed").iterdir():
        os.utime(batch / PLAN_FILE, (past, past))


def test_retention_deletes_delivered_batches(sites: Sites, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 2)
    sites.store(study)
    sites.seal()
    sites.deliver()
    sweeper = RetentionSweeper(sites.spool_a)
    assert sweeper.sweep(2.0, time.time()) == 0, "younger than the retention period"

    _age_sent(sites, 3.0)
    assert sweeper.sweep(2.0, time.time()) == 1
    assert list(sites.spool_a.path("sealed").iterdir()) == []
    assert list((sites.spool_a.path("sent") / sites.peer_dir).iterdir()) == []
    assert list(sites.spool_a.path("work").iterdir()) == []


def test_retention_keeps_undelivered_and_unrouted(sites: Sites, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 2)
    sites.store(study)
    sites.seal()
    (batch,) = sites.spool_a.path("sealed").iterdir()
    past = time.time() - 10 * 3600
    os.utime(batch / PLAN_FILE, (past, past))
    sweeper = RetentionSweeper(sites.spool_a)
    assert sweeper.sweep(1.0, time.time()) == 0, "the envelope is still in the outbox"

    unrouted = sites.spool_a.path("sealed") / "unrouted-batch"
    unrouted.mkdir()
    Plan("1.2.3", {}, {}).save(unrouted / PLAN_FILE)
    os.utime(unrouted / PLAN_FILE, (past, past))
    assert sweeper.sweep(1.0, time.time()) == 0
    assert unrouted.is_dir()


def test_retention_deletes_orphaned_sent_envelopes(sites: Sites) -> None:
    orphan = sites.spool_a.path("sent") / sites.peer_dir / f"{envelope_id_for('x', 'y')}.JMIX"
    orphan.mkdir(parents=True)
    past = time.time() - 10 * 3600
    os.utime(orphan, (past, past))
    RetentionSweeper(sites.spool_a).sweep(1.0, time.time())
    assert not orphan.exists()


def test_plan_file_is_json(sites: Sites, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 1)
    sites.store(study)
    sites.seal()
    (batch,) = sites.spool_a.path("sealed").iterdir()
    document = json.loads((batch / PLAN_FILE).read_text())
    assert document["study_uid"] == study.study_uid
    assert document["peers"]["org:demo.site-b"] == sorted(study.names)
