"""The DICOM Storage SCP: receives C-STORE requests into the spool and responds to C-ECHO.

Contract with the sender
    A C-STORE gets the Success status only after :meth:`Spool.store_instance` returned,
    so the instance, its file meta and its directory entry are on disk. Every other
    outcome is a failure status, so the sender keeps its copy: out of resources
    when the spool is full or the disk fails, "cannot understand" when the dataset cannot
    be decoded or its UIDs cannot be used, and a processing failure for anything
    unexpected. A handler error never leaves the sender without a response.

Stored bytes
    Each instance is written as a Part 10 file: the standard preamble, File Meta
    Information built from the request and the negotiated transfer syntax, then the Data
    Set bytes exactly as received (still compressed or deflated if they were sent so).

Access control
    ``allowed_callers`` lists (calling AE title, optional source address or network)
    pairs. An association from any other caller is rejected before negotiation and
    audited. An empty list accepts every caller.

Logging
    Only AE titles, addresses and counts are logged at INFO and above; UIDs only at DEBUG;
    patient attributes never.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from agent.audit import AuditSink
from agent.dicom.inspect import (
    PART10_PREFIX,
    InvalidInstanceError,
    UndecodableInstanceError,
    disable_pydicom_value_validation,
    read_dataset_info,
)
from agent.dicom.uids import InstanceInfo, InvalidUIDError
from agent.pipeline.spool import Spool, SpoolFullError, source_marker

LOGGER = logging.getLogger(__name__)

# C-STORE response statuses. PS3.4 section B.2.3 (table B.2-1) defines the Storage Service
# Class ranges; a failure code's low byte is free for the implementation to use.
STATUS_SUCCESS = 0x0000
# "Refused: Out of Resources" (A700-A7FF): the spool is full or the disk failed.
STATUS_OUT_OF_RESOURCES = 0xA700
# "Error: Data Set does not match SOP Class" (A900-A9FF): the dataset's SOPClassUID differs
# from the request's Affected SOP Class UID.
STATUS_SOP_CLASS_MISMATCH = 0xA900
# "Error: Cannot understand" (C000-CFFF), split so a sender's log distinguishes causes:
# the dataset cannot be parsed in the negotiated transfer syntax...
STATUS_CANNOT_DECODE = 0xC210
# ...an unexpected error inside this handler (the code pynetdicom itself returns when a
# C-STORE handler raises)...
STATUS_PROCESSING_FAILURE = 0xC211
# ...or an identifying UID is missing, invalid or unsafe as a file name, or the dataset's
# SOPInstanceUID differs from the request's Affected SOP Instance UID.
STATUS_INVALID_IDENTIFIERS = 0xC212

# A-ASSOCIATE-RJ fields from PS3.8 section 9.3.4: rejected-permanent, by the service user,
# "calling-AE-title-not-recognized". No diagnostic names a source address, so an
# unlisted address gets the same one.
_REJECT_PERMANENT = 0x01
_REJECT_SOURCE_SERVICE_USER = 0x01
_REJECT_CALLING_AE_NOT_RECOGNIZED = 0x03
# pynetdicom's own rejection when maximum_associations is reached: rejected-transient,
# by the service provider (presentation), "local-limit-exceeded".
_REJECTION_LOCAL_LIMIT = (0x02, 0x03, 0x02)

OnStored = Callable[[InstanceInfo, str], None]
"""Called with the stored instance and its source marker after each successful store."""

# pynetdicom 3.0 logs a UID that breaks the PS3.5 grammar with its value, at WARNING
# ("Non-conformant ... value '<uid>'") or ERROR ("Invalid ... value '<uid>' - ...").
_PYNETDICOM_UID_LOGGER = "pynetdicom.utils"
_QUOTED_VALUE = re.compile(r" value '[^']*'")


class _UidValueRedactor(logging.Filter):
    """Remove the quoted UID from pynetdicom's UID messages above DEBUG; keep the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            message = record.getMessage()
            redacted = _QUOTED_VALUE.sub(" value (UID not logged)", message)
            if redacted != message:
                record.msg, record.args = redacted, ()
        return True


def _redact_pynetdicom_uid_messages() -> None:
    """Install the redacting filter on pynetdicom's UID logger once per process."""
    logger = logging.getLogger(_PYNETDICOM_UID_LOGGER)
    if not any(isinstance(item, _UidValueRedactor) for item in logger.filters):
        logger.addFilter(_UidValueRedactor())


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowedCaller:
    """One access-list entry: an AE title and, optionally, the network it must call from."""

    ae_title: str
    network: IPNetwork | None = None

    def matches(self, ae_title: str, address: str) -> bool:
        """Return True if a request from ``ae_title`` at ``address`` is covered by this entry."""
        if ae_title != self.ae_title:
            return False
        return self.network is None or _parse_address(address) in self.network


@dataclass
class _AssociationTally:
    """Instances stored during one association, counted per study for the audit record."""

    calling_ae: str
    studies: Counter[str] = field(default_factory=Counter)


class StorageSCP:
    """A Storage SCP that stores every accepted instance durably in the spool.

    Accepts every storage SOP class pynetdicom defines, with every transfer syntax it
    defines (uncompressed, deflated and encapsulated), plus Verification (C-ECHO).

    NOTE: private SOP classes (for example vendor raw-data objects) are not accepted,
    because pynetdicom negotiates only the UIDs it was given. A sender gets their
    presentation contexts rejected and reports those instances as failed.
    """

    def __init__(
        self,
        ae_title: str,
        bind: str,
        port: int,
        spool: Spool,
        audit: AuditSink,
        allowed_callers: Sequence[tuple[str, str | None]] = (),
        max_associations: int = 10,
        on_stored: OnStored | None = None,
    ) -> None:
        """Configure the SCP; nothing listens until :meth:`start`.

        ``allowed_callers`` contains (AE title, source) pairs where the source is None (any
        address), an IP address, or a network such as ``10.1.0.0/16``. Raises ValueError
        for a source that is neither, or a ``max_associations`` below 1.
        """
        if max_associations < 1:
            raise ValueError(f"max_associations must be at least 1, not {max_associations}")
        self.ae_title = ae_title
        self.bind = bind
        self.port = port
        self.max_associations = max_associations
        self.allowed_callers = [
            AllowedCaller(title.strip(), _parse_network(source) if source else None)
            for title, source in allowed_callers
        ]
        self._spool = spool
        self._audit = audit
        self._on_stored = on_stored
        self._server: Any = None
        self._lock = threading.Lock()
        self._tallies: dict[object, _AssociationTally] = {}

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start listening in background threads and return at once.

        Raises OSError if the address cannot be bound, and RuntimeError if already started.
        """
        if self._server is not None:
            raise RuntimeError("the storage SCP is already running")
        # pydicom and pynetdicom would otherwise log invalid values, UIDs and patient IDs
        # included, at WARNING and above.
        disable_pydicom_value_validation()
        _redact_pynetdicom_uid_messages()

        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        # Second line of defence: if the EVT_REQUESTED check ever failed to run, pynetdicom
        # would still reject unlisted AE titles (though it cannot check addresses).
        ae.require_calling_aet = sorted({caller.ae_title for caller in self.allowed_callers})

        # pynetdicom types its event constants loosely, hence list[Any].
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_ABORTED, self._handle_aborted),
            (evt.EVT_CONN_CLOSE, self._handle_connection_closed),
        ]
        self._server = ae.start_server((self.bind, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        LOGGER.info(
            "storage SCP %r listening on %s port %d (max %d associations, %s)",
            self.ae_title,
            self.bind,
            self.port,
            self.max_associations,
            f"{len(self.allowed_callers)} allowed callers"
            if self.allowed_callers
            else "any caller allowed",
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, abort open associations and wait up to ``timeout`` for them.

        Instances already acknowledged with Success stay stored. An instance in transfer
        is not stored, and its sender receives an A-ABORT.
        """
        server = self._server
        if server is None:
            return
        self._server = None

        # Shut down first so that no association starts after the list is taken.
        server.shutdown()
        associations = list(server.active_associations)
        for association in associations:
            association.abort()
        for association in associations:
            association.join(timeout)

        # Associations that ended without a release or abort event still get their record.
        with self._lock:
            leftovers = list(self._tallies.items())
            self._tallies.clear()
        for _association, tally in leftovers:
            self._audit_received(tally, "aborted")
        LOGGER.info("storage SCP %r stopped", self.ae_title)

    # -- association control ---------------------------------------------------------

    def _handle_requested(self, event: Any) -> None:
        """Reject an unlisted caller before negotiation (EVT_REQUESTED)."""
        association = event.assoc
        calling_ae = "?"
        try:
            calling_ae = str(association.requestor.primitive.calling_ae_title).strip()
            address = str(association.requestor.address)
            reason = self._caller_rejection(calling_ae, address)
        except Exception:
            # Fail closed: a caller whose request cannot be checked is not let in.
            LOGGER.exception("checking the association request from AE %r failed", calling_ae)
            address = "?"
            reason = "the association request could not be checked"

        if reason is None:
            return
        LOGGER.warning("rejected association from AE %r at %s: %s", calling_ae, address, reason)
        self._record("association_rejected", calling_ae=calling_ae, reason=reason)
        association.acse.send_reject(
            _REJECT_PERMANENT, _REJECT_SOURCE_SERVICE_USER, _REJECT_CALLING_AE_NOT_RECOGNIZED
        )
        # Wait until the peer has read the rejection and closed the connection, because
        # pynetdicom shuts the socket when this handler returns and could drop the PDU.
        association.kill()

    def _caller_rejection(self, calling_ae: str, address: str) -> str | None:
        """Return why a caller is not allowed, or None if it is."""
        if not self.allowed_callers:
            return None
        if any(caller.matches(calling_ae, address) for caller in self.allowed_callers):
            return None
        if any(caller.ae_title == calling_ae for caller in self.allowed_callers):
            return f"calling AE title is not allowed from address {address}"
        return "calling AE title is not in the allowed callers"

    def _handle_rejected(self, event: Any) -> None:
        """Log and audit rejections made by pynetdicom itself (EVT_REJECTED)."""
        association = event.assoc
        primitive = association.acceptor.primitive
        calling_ae = str(association.requestor.ae_title).strip()
        result = (primitive.result, primitive.result_source, primitive.diagnostic)
        if result == _REJECTION_LOCAL_LIMIT:
            reason = f"maximum of {self.max_associations} associations reached"
            LOGGER.warning("rejected association from AE %r: %s", calling_ae, reason)
        else:
            reason = "rejected by the DICOM stack (result {}, source {}, diagnostic {})".format(
                *result
            )
            LOGGER.warning("rejected association from AE %r: %s", calling_ae, reason)
        self._record("association_rejected", calling_ae=calling_ae, reason=reason)

    def _handle_released(self, event: Any) -> None:
        self._finish_association(event.assoc, "released")

    def _handle_aborted(self, event: Any) -> None:
        self._finish_association(event.assoc, "aborted")

    def _handle_connection_closed(self, event: Any) -> None:
        """Free the slot of a connection closed before its A-ASSOCIATE-RQ (EVT_CONN_CLOSE).

        pynetdicom 3.0 leaves that acceptor waiting ``acse_timeout`` (30 s) for a request
        that can no longer arrive, and counts it against ``maximum_associations``. Without
        this handler, each TCP health check or port scan takes a slot for 30 s. The DUL is
        in state Sta2 only while it waits for the request, and putting None on its queue
        ends the wait as the timeout would.
        """
        association = event.assoc
        if association.is_acceptor and association.dul.state_machine.current_state == "Sta2":
            association.dul.to_user_queue.put(None)

    def _finish_association(self, association: object, outcome: str) -> None:
        """Write one instances_received record per study stored during the association."""
        with self._lock:
            tally = self._tallies.pop(association, None)
        if tally is None:
            return
        LOGGER.info(
            "association from AE %r %s: %d instances stored in %d studies",
            tally.calling_ae,
            outcome,
            sum(tally.studies.values()),
            len(tally.studies),
        )
        self._audit_received(tally, outcome)

    def _audit_received(self, tally: _AssociationTally, outcome: str) -> None:
        for study_uid, count in sorted(tally.studies.items()):
            self._record(
                "instances_received",
                calling_ae=tally.calling_ae,
                source=source_marker("ae", tally.calling_ae),
                study_uid=study_uid,
                count=count,
                outcome=outcome,
            )

    # -- C-STORE ---------------------------------------------------------------------

    def _handle_store(self, event: Any) -> int:
        """Store one instance and return its C-STORE status (EVT_C_STORE); never raises."""
        calling_ae = "?"
        try:
            calling_ae = str(event.assoc.requestor.ae_title).strip()
            return self._store(event, calling_ae)
        except Exception:
            LOGGER.exception(
                "C-STORE from AE %r failed unexpectedly; answering 0x%04X",
                calling_ae,
                STATUS_PROCESSING_FAILURE,
            )
            self._reject_instance(calling_ae, None, "internal error", STATUS_PROCESSING_FAILURE)
            return STATUS_PROCESSING_FAILURE

    def _store(self, event: Any, calling_ae: str) -> int:
        request = event.request
        transfer_syntax = str(event.context.transfer_syntax)
        dataset: BinaryIO = request.DataSet

        # Step 1: read and validate the identifying UIDs. Malformed values surface here
        # rather than later, because read_dataset_info accesses each one it needs.
        try:
            info = read_dataset_info(dataset, transfer_syntax)
        except UndecodableInstanceError as exc:
            return self._reject_instance(calling_ae, None, exc.reason, STATUS_CANNOT_DECODE)
        except InvalidInstanceError as exc:
            return self._reject_instance(calling_ae, None, exc.reason, STATUS_INVALID_IDENTIFIERS)

        # Step 2: the command set names the instance too; the file name and the file meta
        # come from the dataset, so both must agree.
        if str(request.AffectedSOPInstanceUID).rstrip("\x00 ") != info.sop_instance_uid:
            return self._reject_instance(
                calling_ae,
                info.study_uid,
                "dataset SOPInstanceUID differs from the request's Affected SOP Instance UID",
                STATUS_INVALID_IDENTIFIERS,
            )
        if str(request.AffectedSOPClassUID).rstrip("\x00 ") != info.sop_class_uid:
            return self._reject_instance(
                calling_ae,
                info.study_uid,
                "dataset SOPClassUID differs from the request's Affected SOP Class UID",
                STATUS_SOP_CLASS_MISMATCH,
            )

        # Step 3: write preamble, file meta and the received bytes; durable on return.
        source = source_marker("ae", calling_ae)
        header = PART10_PREFIX + encode_file_meta(
            create_file_meta(
                sop_class_uid=UID(info.sop_class_uid),
                sop_instance_uid=UID(info.sop_instance_uid),
                transfer_syntax=UID(info.transfer_syntax_uid),
            )
        )

        def write(handle: BinaryIO) -> None:
            handle.write(header)
            # getbuffer() avoids copying a dataset that may be hundreds of megabytes.
            with dataset.getbuffer() as received:  # type: ignore[attr-defined]
                handle.write(received)

        try:
            self._spool.store_instance(info, write, source)
        except SpoolFullError as exc:
            return self._reject_instance(
                calling_ae, info.study_uid, str(exc), STATUS_OUT_OF_RESOURCES, logging.ERROR
            )
        except InvalidUIDError as exc:
            return self._reject_instance(
                calling_ae, info.study_uid, str(exc), STATUS_INVALID_IDENTIFIERS
            )
        except OSError as exc:
            return self._reject_instance(
                calling_ae,
                info.study_uid,
                f"writing to the spool failed: {exc.strerror or type(exc).__name__}",
                STATUS_OUT_OF_RESOURCES,
                logging.ERROR,
            )

        # Step 4: count it for the association's audit record and tell the pipeline.
        LOGGER.debug(
            "stored SOP instance %s of study %s from AE %r",
            info.sop_instance_uid,
            info.study_uid,
            calling_ae,
        )
        with self._lock:
            tally = self._tallies.setdefault(event.assoc, _AssociationTally(calling_ae))
            tally.studies[info.study_uid] += 1
        if self._on_stored is not None:
            try:
                self._on_stored(info, source)
            except Exception:
                # The instance is durably stored, so the sender still gets Success.
                LOGGER.exception("on_stored callback failed for an instance from AE %r", calling_ae)
        return STATUS_SUCCESS

    def _reject_instance(
        self,
        calling_ae: str,
        study_uid: str | None,
        reason: str,
        status: int,
        level: int = logging.WARNING,
    ) -> int:
        """Log and audit a failed C-STORE, then return ``status`` for the handler to send.

        Sender faults log at WARNING; faults of this host (disk full, I/O) at ERROR.
        """
        LOGGER.log(
            level, "C-STORE from AE %r failed with status 0x%04X: %s", calling_ae, status, reason
        )
        self._record(
            "instance_rejected",
            calling_ae=calling_ae,
            source=source_marker("ae", calling_ae),
            study_uid=study_uid,
            reason=reason,
            outcome=f"0x{status:04X}",
        )
        return status

    def _record(self, event: str, **fields: Any) -> None:
        """Append an audit record; a failing audit log is logged, never raised to the peer."""
        try:
            self._audit.record(event, **fields)
        except Exception:
            LOGGER.exception("writing audit record %r failed", event)


def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse an IP address, unwrapping IPv4-mapped IPv6 as a dual-stack socket reports it."""
    address = ipaddress.ip_address(text.strip())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_network(text: str) -> IPNetwork:
    """Parse an address or network; a bare address becomes a network of one (/32, /128)."""
    return ipaddress.ip_network(text.strip(), strict=False)
