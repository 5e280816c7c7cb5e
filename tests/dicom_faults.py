"""Helpers for the hostile DICOM tests: a live agent, DCMTK runs and misbehaving peers.

Everything here connects only to 127.0.0.1, to an agent that the calling test started.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from agent.audit import head_path, read_records
from agent.demo import STORESCU_PROPOSE, Site, free_port, stop_agent, wait_for_port
from agent.dicom.inspect import PART10_PREFIX

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
SCP_AE_TITLE = "JMIX_AGENT"
DIMSE_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")
WAIT_SECONDS = 60.0
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"

# The agent is started through this launcher, not ``python -m agent.cli``, for one reason:
# the drop-folder watcher waits incomplete_seconds (ten minutes) before it quarantines a
# file that looks cut short, and the config has no key for that. The launcher shortens
# the wait so that a test can see such files reach quarantine.
_LAUNCHER = """
import sys
from agent.ingest import watch
watch.DropFolderWatcher.__init__.__kwdefaults__["incomplete_seconds"] = float(sys.argv[1])
from agent.cli import main
sys.exit(main(sys.argv[2:]))
"""


def bundled_files() -> list[Path]:
    """Return every regular file bundled with pydicom's test data (never downloads).

    ``get_testdata_files()`` also lists the folders of its DICOMDIR tree, which are left out.
    """
    return sorted(path for path in map(Path, get_testdata_files()) if path.is_file())


def bundled_file(name: str) -> Path:
    matches = [path for path in bundled_files() if path.name == name]
    assert matches, f"{name} is not among pydicom's bundled test files"
    return matches[0]


def bundled_root() -> Path:
    """Return the folder that contains every bundled file."""
    return Path(os.path.commonpath([str(path) for path in bundled_files()]))


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
    """Poll ``condition`` every 0.1 s and return whether it became true within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


# -- a live agent -----------------------------------------------------------------------


@dataclass
class LiveAgent:
    """A ``jmix-agent run`` process with its DICOM listener on 127.0.0.1:``port``."""

    site: Site
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def incoming(self) -> Path:
        return self.site.state / "incoming"

    @property
    def watch_quarantine(self) -> Path:
        return self.site.quarantine / "watch"

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        if not self.site.log_path.exists():
            return ""
        return self.site.log_path.read_text(errors="replace")

    def records(self, event: str) -> list[dict[str, Any]]:
        if not self.site.audit_log.exists():
            return []
        return [record for record in read_records(self.site.audit_log) if record["event"] == event]

    def wait_for_records(self, event: str, count: int) -> list[dict[str, Any]]:
        """Wait for at least ``count`` records of ``event``, then return all of them."""
        wait_until(lambda: len(self.records(event)) >= count)
        return self.records(event)

    def stored_files(self) -> list[Path]:
        return sorted(self.incoming.glob("*/*.dcm"))

    def stored_path(self, study_uid: str, sop_instance_uid: str) -> Path:
        return self.incoming / study_uid / f"{sop_instance_uid}.dcm"

    def temporary_files(self) -> list[Path]:
        """Return files below incoming/ that an interrupted write left (``.tmp-`` prefix)."""
        return sorted(self.incoming.rglob(".tmp-*"))

    def state_snapshot(self) -> set[Path]:
        """Return every path below the site folder except the log and audit files.

        The audit head is rewritten through a temporary file after each record, so names
        ending in its name come and go while associations end.
        """
        head_name = head_path(self.site.audit_log).name
        return {
            path
            for path in self.site.root.rglob("*")
            if path not in (self.site.log_path, self.site.audit_log)
            and not path.name.endswith(head_name)
        }

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return stop_agent(self.process)


def write_agent_config(
    site: Site,
    port: int,
    *,
    allowed_callers: Sequence[str] = (),
    max_associations: int = 10,
    watch: bool = False,
) -> None:
    """Write an agent.toml with the SCP on 127.0.0.1:``port`` and no peers or routes.

    Studies stay in incoming/ for an hour, so a test can inspect what was stored.
    """
    lines = [
        "[agent]",
        f"state_dir = {json.dumps(str(site.state))}",
        "study_quiet_seconds = 3600",
        "min_free_mb = 0",
        "poll_interval = 0.2",
        "[identity]",
        f"id = {json.dumps(site.entity_id)}",
        f"name = {json.dumps(site.name)}",
        f"signing_key = {json.dumps(str(site.root / 'keys' / 'signing.key'))}",
        f"encryption_key = {json.dumps(str(site.root / 'keys' / 'encryption.key'))}",
        "[dicom]",
        "enabled = true",
        f"ae_title = {json.dumps(SCP_AE_TITLE)}",
        'bind = "127.0.0.1"',
        f"port = {port}",
        f"allowed_callers = {json.dumps(list(allowed_callers))}",
        f"max_associations = {max_associations}",
    ]
    if watch:
        lines += [
            "[[watch]]",
            'name = "drop"',
            f"path = {json.dumps(str(site.drop))}",
            "stable_seconds = 1",
        ]
    lines += [
        "[inbound]",
        f"inbox = {json.dumps(str(site.inbox))}",
        f"import_dir = {json.dumps(str(site.import_dir))}",
        f"quarantine_dir = {json.dumps(str(site.quarantine))}",
        "[audit]",
        f"path = {json.dumps(str(site.audit_log))}",
    ]
    site.config_path.write_text("\n".join(lines) + "\n")


def start_live_agent(
    root: Path,
    *,
    allowed_callers: Sequence[str] = (),
    max_associations: int = 10,
    watch: bool = False,
    incomplete_seconds: float = 600.0,
) -> LiveAgent:
    """Create keys and config under ``root``, start the agent and wait for its listener.

    ``incomplete_seconds`` replaces the watcher's default wait for files that look cut short.
    """
    root.mkdir(parents=True)
    port = free_port()
    site = Site("Hostile DICOM Test", root, "org:test.hostile-dicom", dicom_port=port)
    site.create_keys()
    write_agent_config(
        site, port, allowed_callers=allowed_callers, max_associations=max_associations, watch=watch
    )
    if watch:
        site.drop.mkdir(mode=0o700)

    agent = LiveAgent(site, port)
    command = [sys.executable, "-c", _LAUNCHER, str(incomplete_seconds)]
    command += ["--config", str(site.config_path), "run"]
    with site.log_path.open("ab") as log:
        agent.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
    except TimeoutError:
        agent.stop()
        raise TimeoutError(f"the agent did not listen on port {port}:\n{agent.log_text()}")
    return agent


# -- DCMTK ------------------------------------------------------------------------------


def dcmtk(tool: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with TCP_NODELAY=1, which Debian's build needs for speed."""
    assert os.path.exists(tool), f"{tool} is missing: install the dcmtk package"
    return subprocess.run(
        [tool, *arguments],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )


@dataclass
class StoreRun:
    """One storescu run: its exit status, the DIMSE statuses it printed, and its output."""

    returncode: int
    statuses: list[int]
    output: str

    @property
    def association_rejected(self) -> bool:
        return "Association Rejected" in self.output

    def problems(self) -> list[str]:
        """Return storescu's error and fatal lines (``E:`` and ``F:``)."""
        return [line for line in self.output.splitlines() if line.startswith(("E:", "F:"))]


def storescu(
    port: int, files: Sequence[Path], *options: str, calling_ae: str = "STORESCU"
) -> StoreRun:
    """Send ``files`` in one association, with ``-d`` so storescu prints every DIMSE status."""
    result = dcmtk(
        STORESCU,
        "-d",
        "-aet",
        calling_ae,
        "-aec",
        SCP_AE_TITLE,
        *options,
        "127.0.0.1",
        str(port),
        *map(str, files),
    )
    output = result.stdout + result.stderr
    statuses = [int(code, 16) for code in DIMSE_STATUS.findall(output)]
    return StoreRun(result.returncode, statuses, output)


def storescu_own_syntax(port: int, path: Path, calling_ae: str = "STORESCU") -> StoreRun:
    """Send one file in its own transfer syntax, proposed with the demo's storescu option.

    ``-R`` proposes only the file's own SOP class.
    """
    syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    option = STORESCU_PROPOSE.get(syntax)
    return storescu(port, [path], "-R", *([option] if option else []), calling_ae=calling_ae)


def echoscu(port: int, calling_ae: str) -> subprocess.CompletedProcess[str]:
    return dcmtk(ECHOSCU, "-aet", calling_ae, "-aec", SCP_AE_TITLE, "127.0.0.1", str(port))


# -- datasets ---------------------------------------------------------------------------

_UNDEFINED_LENGTH = 0xFFFFFFFF
_UID_CHARACTERS = re.compile(r"[0-9]+(\.[0-9]+)*")
IDENTIFYING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def invalid_identifiers(dataset: Dataset) -> list[str]:
    """Return the identifying UID keywords that are missing or unusable as file names.

    A usable UID has one value of digits and dots, at most 64 characters once its NUL or
    space padding is removed (PS3.5 section 9.1). A leading zero in a component is
    tolerated because real archives contain it.
    """
    invalid = []
    for keyword in IDENTIFYING_UIDS:
        try:
            value = dataset.get(keyword)
        except Exception:
            invalid.append(keyword)
            continue
        if isinstance(value, MultiValue) or not isinstance(value, str):
            invalid.append(keyword)
            continue
        uid = value.rstrip("\x00 ")
        if len(uid) > 64 or _UID_CHARACTERS.fullmatch(uid) is None:
            invalid.append(keyword)
    return invalid


def has_short_value(dataset: Dataset) -> bool:
    """Return True if an element, at any depth, has fewer value bytes than its length field.

    pydicom reads such a value without complaint, but keeps the declared length in the
    raw element. This is how a file cut short looks to a parser other than the agent's.
    """
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.length != _UNDEFINED_LENGTH
            and raw.value is not None
            and len(raw.value) < raw.length
        ):
            return True
        try:
            element = dataset[tag]
        except Exception:
            continue
        if element.VR == "SQ" and any(has_short_value(item) for item in element.value):
            return True
    return False


def dataset_elements(path: Path) -> dict[int, object]:
    """Return every top-level element's value by tag, without padding and group lengths.

    DCMTK's storescu re-encodes the dataset it sends. It drops the trailing padding
    element (FFFC,FFFC) and group lengths, and writes encapsulated pixel data as OB
    where a file has OW, so only the values can be compared with the file's.
    """
    dataset = dcmread(path)
    return {
        int(element.tag): element.value
        for element in dataset
        if element.tag != 0xFFFCFFFC and element.tag.element != 0
    }


def encode_dataset(dataset: Dataset, implicit_vr: bool = False) -> bytes:
    """Encode a dataset in little endian without checking its values."""
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit_vr
    buffer.is_little_endian = True
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def write_raw_instance(
    path: Path,
    dataset_bytes: bytes,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """Write a Part 10 file: file meta naming the instance, then any dataset bytes.

    Told to send files unparsed (``STORE_SEND_CHUNKED_DATASET``), pynetdicom puts the
    file meta's SOP class and instance UIDs in the C-STORE request and sends the dataset
    bytes as they are, so the dataset can be whatever a broken sender produces.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    with path.open("wb") as handle:
        handle.write(PART10_PREFIX)
        write_file_meta_info(handle, meta, enforce_standard=True)  # type: ignore[arg-type]
        handle.write(dataset_bytes)
    return path


def dataset_offset(data: bytes) -> int:
    """Return where the dataset starts in Part 10 bytes (after the group 0002 elements)."""
    offset = len(PART10_PREFIX) if data[128:132] == b"DICM" else 0
    while struct.unpack("<H", data[offset : offset + 2])[0] == 0x0002:
        vr = data[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
            offset += 12 + struct.unpack("<L", data[offset + 8 : offset + 12])[0]
        else:
            offset += 8 + struct.unpack("<H", data[offset + 6 : offset + 8])[0]
    return offset


# -- a peer that stops in the middle of an instance -------------------------------------

# PDU types and layouts from PS3.8 section 9.3.
_PDU_HEADER = struct.Struct(">BxL")
_A_ASSOCIATE_AC = 0x02
_P_DATA_TF = 0x04
_A_RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])
_A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])
# Message control header of a PDV (PS3.8 annex E.2): bit 0 command, bit 1 last fragment.
_COMMAND_LAST_FRAGMENT = 0x03
_DATASET_FRAGMENT = 0x00
_DATASET_LAST_FRAGMENT = 0x02
_CONTEXT_ID = 1
_MAX_PDU_RECEIVED = 16384


@dataclass
class RawAssociation:
    """An association driven PDU by PDU over a plain socket, so it can stop at any byte.

    pynetdicom's own SCU always finishes a message it has started, so a peer that dies
    in the middle of an instance is built from pynetdicom's PDU classes and a socket.
    """

    sock: socket.socket
    max_pdu: int

    @classmethod
    def open(
        cls, port: int, calling_ae: str, sop_class_uid: str, transfer_syntax: str
    ) -> RawAssociation:
        """Connect to 127.0.0.1:``port`` and negotiate one presentation context."""
        request = A_ASSOCIATE()
        request.application_context_name = "1.2.840.10008.3.1.1.1"
        request.calling_ae_title = calling_ae
        request.called_ae_title = SCP_AE_TITLE
        context = build_context(sop_class_uid, [transfer_syntax])
        context.context_id = _CONTEXT_ID
        request.presentation_context_definition_list = [context]
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = _MAX_PDU_RECEIVED
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        request.user_information = [max_length, implementation]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(request)

        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(pdu.encode())
        kind, reply = _read_pdu(sock)
        if kind != _A_ASSOCIATE_AC:
            sock.close()
            raise ConnectionError(f"association not accepted: PDU type 0x{kind:02X}")
        accept = A_ASSOCIATE_AC()
        accept.decode(reply)
        if not any(
            item.context_id == _CONTEXT_ID and item.result == 0
            for item in accept.presentation_context
        ):
            sock.close()
            raise ConnectionError("the presentation context was not accepted")
        return cls(sock, accept.user_information.maximum_length or _MAX_PDU_RECEIVED)

    def send_command(self, command: bytes) -> None:
        self._send_pdv(command, _COMMAND_LAST_FRAGMENT)

    def send_dataset(self, data: bytes, last: bool) -> int:
        """Send dataset bytes in PDUs no larger than the agent accepts and return their count."""
        chunk = self.max_pdu - 6  # 4-byte item length, context id, control header
        count = 0
        for start in range(0, len(data), chunk):
            final = last and start + chunk >= len(data)
            control = _DATASET_LAST_FRAGMENT if final else _DATASET_FRAGMENT
            self._send_pdv(data[start : start + chunk], control)
            count += 1
        return count

    def read_store_status(self) -> int:
        """Read a C-STORE-RSP that arrives whole in one P-DATA-TF PDU and return its Status."""
        kind, reply = _read_pdu(self.sock)
        if kind != _P_DATA_TF:
            raise ConnectionError(f"expected a C-STORE response, got PDU type 0x{kind:02X}")
        pdu = P_DATA_TF()
        pdu.decode(reply)
        value = pdu.presentation_data_value_items[0].presentation_data_value
        # The first byte is the message control header, and the command set follows it.
        response = read_dataset(BytesIO(value[1:]), True, True)
        return int(response.Status)

    def abort(self) -> None:
        """Send A-ABORT and close, as a sender that gives up does."""
        self.sock.sendall(_A_ABORT)
        self.sock.close()

    def drop(self) -> None:
        """Close the TCP connection without A-ABORT, as a crashed sender does."""
        self.sock.close()

    def release(self) -> None:
        self.sock.sendall(_A_RELEASE_RQ)
        _read_pdu(self.sock)
        self.sock.close()

    def _send_pdv(self, data: bytes, control: int) -> None:
        item = struct.pack(">LBB", len(data) + 2, _CONTEXT_ID, control) + data
        self.sock.sendall(_PDU_HEADER.pack(_P_DATA_TF, len(item)) + item)


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """Read one PDU and return its type and all its bytes, header included."""
    header = _read_exactly(sock, _PDU_HEADER.size)
    kind, length = _PDU_HEADER.unpack(header)
    return kind, header + _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        data += chunk
    return data


def c_store_command(sop_class_uid: str, sop_instance_uid: str, message_id: int = 1) -> bytes:
    """Encode a C-STORE-RQ command set, always implicit VR little endian (PS3.7 6.3.1)."""
    command = Dataset()
    command.CommandGroupLength = 0
    command.AffectedSOPClassUID = sop_class_uid
    command.CommandField = 0x0001  # C-STORE-RQ
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0000  # a dataset follows
    command.AffectedSOPInstanceUID = sop_instance_uid
    # The group length counts the bytes after its own 12-byte element.
    command.CommandGroupLength = len(encode_dataset(command, implicit_vr=True)) - 12
    return encode_dataset(command, implicit_vr=True)
