"""Inbound pipeline: claim an envelope from the inbox, verify it, import it or quarantine it.

    inbox/<name>  --claim (rename)-->  work/in-<uuid>/<name>
        --verified-->  import/<envelope-id>/      (one rename; ledger records the id)
        --rejected-->  quarantine/<time>-<name>/  (the input as received + reason.json)

The inbox is untrusted: names are never used to build paths except as the last
component inside our own folders, after a character check.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent import fsutil
from agent.audit import AuditSink
from agent.config import Config
from agent.dicom.inspect import (
    InvalidInstanceError,
    disable_pydicom_value_validation,
    read_instance_info,
)
from agent.identity import LocalIdentity
from agent.jmix.assertion import TrustedKeys
from agent.jmix.errors import JmixError
from agent.jmix.reader import (
    MAX_MANIFEST_BYTES,
    Check,
    EnvelopeRejected,
    OpenedEnvelope,
    OpenPolicy,
    open_envelope,
)
from agent.jmix.tarsafe import ArchiveLimits
from agent.pipeline.spool import Spool

LOGGER = logging.getLogger(__name__)
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
IGNORED_SUFFIXES = (".partial", ".tmp", ".part")


def safe_display_name(name: str) -> str:
    """Return ``name`` if it is a plain file name, else a hex form that cannot form a path."""
    if _SAFE_NAME.fullmatch(name) and not name.startswith("."):
        return name
    return "x" + name.encode("utf-8", "surrogateescape").hex()[:120]


@dataclass(frozen=True)
class InboundResult:
    """The outcome of processing one inbox entry."""

    name: str
    outcome: str
    envelope_id: str | None = None
    reason: str | None = None


class InboundPipeline:
    """Processes the inbox; driven by the daemon's main loop."""

    def __init__(
        self, config: Config, spool: Spool, identity: LocalIdentity, audit: AuditSink
    ) -> None:
        self.config = config
        self.spool = spool
        self.identity = identity
        self.audit = audit
        self.inbox = fsutil.make_private_dir(config.inbound.inbox)
        self.import_dir = fsutil.make_private_dir(config.inbound.import_dir)
        self.quarantine = fsutil.make_private_dir(config.inbound.quarantine_dir)
        self.ledger = fsutil.make_private_dir(spool.path("ledger"))
        # pydicom would otherwise log invalid values it reads, patient attributes included.
        disable_pydicom_value_validation()

    def policy(self) -> OpenPolicy:
        """Return the open policy built from the peers' pinned keys."""
        trusted = TrustedKeys(
            {peer.id: tuple(peer.signing_keys) for peer in self.config.peers},
            frozenset(self.config.inbound.revoked_fingerprints),
        )
        inbound = self.config.inbound
        limits = ArchiveLimits(
            max_members=inbound.max_members,
            max_file_bytes=min(ArchiveLimits.max_file_bytes, inbound.max_envelope_bytes),
            max_total_bytes=inbound.max_envelope_bytes,
            max_ratio=inbound.max_expansion_ratio,
        )
        return OpenPolicy(
            recipient_keys=self.identity.encryption_keys,
            trusted=trusted,
            our_id=self.identity.id,
            require_sender_identity=True,
            allow_plain=False,
            allow_plain_senders=frozenset(p.id for p in self.config.peers if p.allow_plain),
            require_jws_senders=frozenset(p.id for p in self.config.peers if p.require_jws),
            directory_keys=(inbound.directory_public_key,) if inbound.directory_public_key else (),
            limits=limits,
            max_age=timedelta(hours=inbound.max_envelope_age_hours),
            max_clock_skew=timedelta(seconds=inbound.max_clock_skew_seconds),
        )

    def due_entries(self) -> list[Path]:
        """Return inbox entries that are complete: not hidden and unchanged for the settle time."""
        now = time.time()
        entries = []
        for entry in sorted(self.inbox.iterdir()):
            if entry.name.startswith(".") or entry.name.endswith(IGNORED_SUFFIXES):
                continue
            if now - _newest_mtime(entry) < self.config.inbound.settle_seconds:
                continue
            entries.append(entry)
        return entries

    def process_all(self) -> list[InboundResult]:
        """Process every due inbox entry; never raises for a bad envelope."""
        results = []
        for entry in self.due_entries():
            try:
                results.append(self.process(entry))
            except Exception:
                LOGGER.exception("processing inbox entry %r failed unexpectedly", entry.name)
        return results

    def process(self, entry: Path) -> InboundResult:
        """Claim, verify and import or quarantine one inbox entry."""
        name = entry.name
        claim = self.spool.path("work") / f"in-{uuid.uuid4()}"
        claim.mkdir(mode=0o700)
        claimed = claim / safe_display_name(name)
        try:
            fsutil.rename_durably(entry, claimed)
        except FileNotFoundError:
            fsutil.remove_tree(claim)
            return InboundResult(name, "vanished")
        return self._process_claimed(claim, claimed, name)

    def recover_claims(self) -> list[InboundResult]:
        """Process entries claimed earlier but not finished (a crash, or a disk error).

        Only the main loop claims entries, so call this from the same thread, between
        calls to :meth:`process`.
        """
        results = []
        for claim in sorted(self.spool.path("work").glob("in-*")):
            fsutil.remove_tree(claim / "open")
            entries = list(claim.iterdir())
            if not entries:
                # The crash came between creating the claim folder and the claim rename.
                fsutil.remove_tree(claim)
                continue
            LOGGER.info("resuming inbox entry %r, claimed before a restart", entries[0].name)
            try:
                results.append(self._process_claimed(claim, entries[0], entries[0].name))
            except Exception:
                LOGGER.exception("resuming inbox entry %r failed; it is kept", entries[0].name)
        return results

    def _process_claimed(self, claim: Path, claimed: Path, name: str) -> InboundResult:
        # An unexpected error (such as a full disk) keeps the claimed entry in work/, so
        # that recover_claims() processes it again instead of losing it.
        keep_claim = False
        try:
            if claimed.is_symlink():
                return self._reject(
                    claimed, name, "symlink", "inbox entry is a symbolic link", None
                )
            opened = self._open(claimed, claim / "open")
            if isinstance(opened, InboundResult):
                return opened
            try:
                opened.checks.append(Check("dicom", True, check_dicom_files(opened)))
            except JmixError as exc:
                opened.checks.append(Check("dicom", False, exc.message))
                rejected = EnvelopeRejected(exc, opened.checks)
                return self._reject(
                    claimed, name, exc.code, exc.message, opened.envelope_id, rejected
                )
            return self._import(opened, claimed, name)
        except BaseException:
            keep_claim = True
            raise
        finally:
            fsutil.remove_tree(claim / "open" if keep_claim else claim)

    def _open(self, claimed: Path, work: Path) -> OpenedEnvelope | InboundResult:
        work.mkdir(mode=0o700)
        policy = self.policy()
        try:
            return open_envelope(claimed, policy, work)
        except EnvelopeRejected as exc:
            envelope_id = exc.envelope_id or _manifest_id(claimed)
            return self._reject(claimed, claimed.name, exc.code, exc.message, envelope_id, exc)
        except JmixError as exc:
            return self._reject(claimed, claimed.name, exc.code, exc.message, _manifest_id(claimed))
        except OSError:
            raise
        except Exception as exc:
            # A verifier bug triggered by hostile input must neither drop the input nor
            # stop the inbox: quarantine it like any rejection, with the traceback logged.
            LOGGER.exception("verifying inbox entry %r failed unexpectedly", claimed.name)
            message = (
                f"verification failed unexpectedly ({type(exc).__name__}); "
                "the agent's log has the traceback"
            )
            return self._reject(
                claimed, claimed.name, "internal_error", message, _manifest_id(claimed)
            )

    def _import(self, opened: OpenedEnvelope, claimed: Path, name: str) -> InboundResult:
        envelope_id = opened.envelope_id
        # The digest of the verified bytes, which also covers a manifest inside a zip.
        digest = opened.manifest_sha256 or _manifest_digest(claimed)
        ledger_entry = self.ledger / f"{envelope_id}.json"
        if ledger_entry.exists():
            previous = json.loads(ledger_entry.read_bytes())
            if previous.get("manifest_sha256") == digest:
                self.audit.record(
                    "envelope_duplicate",
                    envelope_id=envelope_id,
                    peer=opened.sender_id,
                    outcome="ignored",
                    reason="already imported",
                )
                LOGGER.info("envelope %s was already imported; duplicate ignored", envelope_id)
                return InboundResult(name, "duplicate", envelope_id)
            return self._reject(
                claimed,
                name,
                "replay",
                "a different envelope with this id was already imported (replay)",
                envelope_id,
            )

        # Read before publishing, which moves the payload folder away.
        study_uid = _safe_uid(opened.study_uid)
        target = self.import_dir / envelope_id
        if target.exists():
            # A crash came between publishing and writing the ledger entry below, and
            # recover_claims() verified the same envelope again.
            LOGGER.info("envelope %s was published before a restart; recording it", envelope_id)
        else:
            _publish(opened.payload_dir, target)
        record = {
            "envelope_id": envelope_id,
            "sender": opened.sender_id,
            "manifest_sha256": digest,
            "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        fsutil.write_bytes_durably(ledger_entry, json.dumps(record).encode())
        # count is DICOM instances, as in the sender's envelope_sealed record.
        instances = sum(1 for name in opened.files if name.startswith("dicom/"))
        self.audit.record(
            "envelope_imported",
            envelope_id=envelope_id,
            peer=opened.sender_id,
            study_uid=study_uid,
            count=instances,
            dialect=opened.hkdf_dialect,
            hash_rule=opened.hash_rule,
            outcome="ok",
        )
        LOGGER.info(
            "imported envelope %s from %s (%d instances, %d files)",
            envelope_id,
            opened.sender_id,
            instances,
            len(opened.files),
        )
        return InboundResult(name, "imported", envelope_id)

    def _reject(
        self,
        claimed: Path,
        name: str,
        code: str,
        message: str,
        envelope_id: str | None,
        rejected: EnvelopeRejected | None = None,
    ) -> InboundResult:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        # The folder name reaches the journal and audit log, so a free-form name is a label.
        folder = self.quarantine / f"{stamp}-{safe_log_name(name)}-{uuid.uuid4().hex[:6]}"
        folder.mkdir(mode=0o700)
        if claimed.exists() or claimed.is_symlink():
            fsutil.rename_durably(claimed, folder / claimed.name)

        reason: dict[str, Any] = {
            "code": code,
            "reason": message,
            "inbox_name": name,
            "envelope_id": envelope_id,
            "rejected_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if rejected is not None:
            reason["checks"] = [check.__dict__ for check in rejected.checks]
        fsutil.write_bytes_durably(folder / "reason.json", json.dumps(reason, indent=2).encode())

        # The journal and the audit log get names from inside the payload only as labels;
        # reason.json, beside the quarantined input, keeps them as they are.
        shown = redact_payload_names(code, message)
        self.audit.record(
            "envelope_rejected",
            envelope_id=envelope_id,
            reason=f"{code}: {shown}",
            path=folder.name,
            outcome="quarantined",
        )
        LOGGER.warning(
            "rejected inbox entry %r (%s): %s; moved to %s",
            safe_log_name(name),
            code,
            shown,
            folder.name,
        )
        return InboundResult(name, "rejected", envelope_id, code)


# Codes whose messages quote names chosen by the sender inside the payload (archive member
# and file names), which a foreign sender may have named after the patient.
PAYLOAD_NAME_CODES = frozenset(
    {
        "unsafe_path",
        "unsafe_member_type",
        "duplicate_member",
        "archive_invalid",
        "archive_too_large",
        "file_hash_mismatch",
        "file_missing",
        "file_unlisted",
        "files_json_invalid",
        "dicom_invalid",
        "internal_error",
    }
)
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_ENVELOPE_NAME = re.compile(r"[0-9a-fA-F-]{36}(\.[A-Za-z]{1,6})?")


def _label(text: str) -> str:
    return "name-" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def redact_payload_names(code: str, message: str) -> str:
    """Replace quoted payload names in a rejection message by hash labels, for logs."""
    if code not in PAYLOAD_NAME_CODES:
        return message
    return _QUOTED.sub(lambda match: _label(match.group(0)), message)


def safe_log_name(name: str) -> str:
    """Return an inbox entry's name for the journal: as is for ``<uuid>.<suffix>``, else a label."""
    return name if _ENVELOPE_NAME.fullmatch(name) else _label(name)


def check_dicom_files(opened: OpenedEnvelope) -> str:
    """Check that every file under ``dicom/`` is a DICOM Part 10 instance.

    The reader proves that the files are the ones the sender signed, and this check
    proves that they are DICOM. A signed but wrong file (a document, an executable)
    therefore never reaches the import folder under a ``.dcm`` name. Raises JmixError
    with code ``dicom_invalid``.
    """
    names = [name for name in opened.files if name.startswith("dicom/")]
    for name in names:
        try:
            # pydicom reports structural problems through warnings.warn, printed to stderr
            # with the file's path, outside the log format. The rejection reports them.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_instance_info(opened.payload_dir / name)
        except InvalidInstanceError as exc:
            raise JmixError(
                f"payload file {name!r} is not a DICOM instance: {exc.reason}",
                code="dicom_invalid",
            ) from exc
    return f"{len(names)} files under dicom/ are DICOM Part 10 instances"


def _newest_mtime(entry: Path) -> float:
    newest = entry.lstat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for child in entry.rglob("*"):
            newest = max(newest, child.lstat().st_mtime)
    return newest


def _manifest_digest(package: Path) -> str:
    path = package / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _manifest_id(package: Path) -> str | None:
    """Return the manifest's id if it is a UUID (for the audit record), else None."""
    path = package / "manifest.json"
    try:
        # Only a regular file is read: opening a FIFO would block the inbox for good.
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        value = json.loads(path.read_bytes()).get("id")
        return str(uuid.UUID(value)) if isinstance(value, str) else None
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        return None


def _safe_uid(value: str | None) -> str | None:
    if value and re.fullmatch(r"[0-9.]{1,64}", value):
        return value
    return None


def _publish(staging: Path, target: Path) -> None:
    """Make ``staging`` appear as ``target`` in one rename, copying first across filesystems."""
    fsutil.fsync_tree(staging)
    try:
        fsutil.rename_durably(staging, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    temporary = fsutil.temp_name(target)
    shutil.copytree(staging, temporary)
    fsutil.fsync_tree(temporary)
    fsutil.rename_durably(temporary, target)
