"""Reading the identifying attributes of DICOM instances, and the metadata of a study.

Every instance that enters the agent passes through here before it is stored: the C-STORE
SCP hands over the raw dataset it received, and the drop-folder watcher hands over a file.
Both get the same checks, so an instance is accepted or rejected for the same reason
whichever way it arrived.

Accepted input
    A DICOM Part 10 file: the 128-byte preamble, the ``DICM`` prefix, the File Meta
    Information group with a Transfer Syntax UID, then the dataset. A file that starts
    directly with the File Meta Information group (no preamble and no prefix, as some old
    writers produce) is also accepted, because its transfer syntax is still stated rather
    than guessed. A bare dataset with no File Meta Information is rejected: its encoding
    would have to be guessed, and a wrong guess stores garbage that fails only when a
    receiver opens it.

Only header elements are read (``stop_before_pixels`` and a fixed tag list), so pixel data
is never loaded into memory by this module.
"""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import PersonName

from agent.dicom.uids import InstanceInfo, InvalidUIDError, validate_uid

PREAMBLE_LENGTH = 128
PART10_PREFIX = b"\x00" * PREAMBLE_LENGTH + b"DICM"
"""The standard preamble (all zeros) and prefix that open a Part 10 file."""

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
"""SOP class of a DICOMDIR, which indexes a medium and is not an instance itself."""

_INSTANCE_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "StudyInstanceUID",
    "SeriesInstanceUID",
]
_METADATA_TAGS = [
    *_INSTANCE_TAGS,
    "StudyDescription",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "BodyPartExamined",
    "SeriesNumber",
]
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_ROWS_TAG = 0x00280010

# Data element layout constants from PS3.5 section 7.1 (data elements) and 7.5 (items).
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_FILE_META_GROUP = 0x0002
_TRANSFER_SYNTAX_TAG = 0x00020010
_MEDIA_STORAGE_CLASS_TAG = 0x00020002
_SERIES_INSTANCE_UID_TAG = 0x0020000E
# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 table 7.1-1).
_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_READ_CHUNK = 1024 * 1024

_PATIENT_SEXES = frozenset({"M", "F", "O"})


class InvalidInstanceError(ValueError):
    """An input is not a DICOM instance the agent can store; ``reason`` names the cause.

    The reason names the failed check and never contains attribute values, so it is
    safe for logs, audit records and quarantine files.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UndecodableInstanceError(InvalidInstanceError):
    """The bytes claim to be DICOM but the dataset cannot be parsed."""


class IncompleteInstanceError(InvalidInstanceError):
    """A file ends inside a data element or sequence: it is probably still being written."""


# -- reading instances ------------------------------------------------------------------


def disable_pydicom_value_validation() -> None:
    """Stop pydicom from checking values it reads or sets, for the whole process.

    With its default settings pydicom logs each invalid value at WARNING, with the value
    itself (for example ``Invalid value for VR UI: '1.2/../3'``, or an over-long
    PatientID), and repeats it through :mod:`warnings` to stderr. That would put UIDs and
    patient attributes in the journal. It happens on reading and also when the SCP sets
    a file meta UID with a leading-zero component, which real archives use and
    :func:`validate_uid` accepts. The agent checks the values it relies on (UIDs, dates,
    sex codes) itself and copies the others unchanged, so pydicom's check adds nothing.
    Components that handle untrusted DICOM call this when they start.
    """
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE


def read_instance_info(source: Path | BinaryIO) -> InstanceInfo:
    """Read the identifying UIDs of a Part 10 file (see the module docstring for the format).

    ``source`` is a path or a binary file. A file object is read from offset 0, left open,
    and its position is undefined afterwards.

    Raises InvalidInstanceError with a reason when the input is not DICOM, has no File
    Meta Information or Transfer Syntax UID, or lacks a valid StudyInstanceUID,
    SeriesInstanceUID, SOPInstanceUID or SOPClassUID. Raises OSError when the file cannot
    be read. Callers should treat that as transient rather than as invalid input.
    """
    with _open_binary(source) as handle:
        dataset = _read_part10_header(handle, _INSTANCE_TAGS)
    return _instance_info(dataset, _transfer_syntax(dataset))


def read_dataset_info(dataset: BinaryIO, transfer_syntax_uid: str) -> InstanceInfo:
    """Read the identifying UIDs of a raw dataset encoded in ``transfer_syntax_uid``.

    This is the network form of :func:`read_instance_info`: ``dataset`` contains the bytes
    of a C-STORE request's Data Set, with no preamble and no File Meta Information. Raises
    InvalidInstanceError for the same reasons.
    """
    syntax = validate_uid(transfer_syntax_uid, "TransferSyntaxUID")
    is_implicit, is_little_endian, is_deflated = _encoding_of(syntax)

    # Deflated datasets (PS3.5 section A.5) are inflated whole, as pydicom does for files.
    # NOTE: the whole inflated dataset is kept in memory. Deflate is in practice used for
    # small non-image objects.
    stream: BinaryIO = dataset
    try:
        dataset.seek(0)
        if is_deflated:
            stream = io.BytesIO(zlib.decompress(dataset.read(), -zlib.MAX_WBITS))
        _check_dataset_ends_cleanly(stream, is_implicit, is_little_endian)
        stream.seek(0)
        parsed = read_dataset(
            stream,
            is_implicit,
            is_little_endian,
            stop_when=_at_pixel_data,
            specific_tags=_tags_of(_INSTANCE_TAGS),
        )
    except (OSError, InvalidInstanceError):
        raise
    except Exception as exc:
        raise UndecodableInstanceError(_decode_failure(exc)) from exc
    return _instance_info(parsed, syntax)


def has_part10_prefix(handle: BinaryIO) -> bool:
    """Return True if the file starts with a preamble and ``DICM``; restore its position."""
    position = handle.tell()
    try:
        handle.seek(0)
        return handle.read(len(PART10_PREFIX))[PREAMBLE_LENGTH:] == b"DICM"
    finally:
        handle.seek(position)


def _read_part10_header(handle: BinaryIO, keywords: list[str]) -> Dataset:
    """Parse the file meta and the named header elements of a Part 10 file."""
    # Step 1: decide whether this is a Part 10 file at all, from its first bytes.
    head = handle.read(len(PART10_PREFIX))
    handle.seek(0)
    has_prefix = head[PREAMBLE_LENGTH:] == b"DICM"
    starts_with_meta = len(head) >= 2 and struct.unpack("<H", head[:2])[0] == _FILE_META_GROUP
    if not has_prefix and not starts_with_meta:
        raise InvalidInstanceError(
            "not a DICOM Part 10 file: no 'DICM' prefix at byte 128 and no file meta "
            "information at the start"
        )

    # Step 2: parse. force=True only skips pydicom's prefix check, which step 1 replaced.
    try:
        dataset = dcmread(
            handle, stop_before_pixels=True, force=not has_prefix, specific_tags=keywords
        )
    except OSError:
        raise
    except Exception as exc:
        raise UndecodableInstanceError(_decode_failure(exc)) from exc

    # Step 3: the file meta must be there and must state the transfer syntax.
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is None or len(file_meta) == 0:
        raise InvalidInstanceError("the file has no file meta information (group 0002)")
    if "TransferSyntaxUID" not in file_meta:
        raise InvalidInstanceError("the file meta information has no TransferSyntaxUID")
    return dataset


def _transfer_syntax(dataset: Dataset) -> str:
    try:
        return validate_uid(dataset.file_meta.get("TransferSyntaxUID"), "TransferSyntaxUID")
    except InvalidUIDError as exc:
        raise InvalidInstanceError(str(exc)) from exc


def _instance_info(dataset: Dataset, transfer_syntax_uid: str) -> InstanceInfo:
    """Build InstanceInfo from a parsed header, validating every UID used as a name."""
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is not None and file_meta.get("MediaStorageSOPClassUID") == (
        MEDIA_STORAGE_DIRECTORY
    ):
        raise InvalidInstanceError("the file is a DICOMDIR (media directory), not an instance")

    return InstanceInfo(
        study_uid=_required_uid(dataset, "StudyInstanceUID"),
        series_uid=_required_uid(dataset, "SeriesInstanceUID"),
        sop_instance_uid=_required_uid(dataset, "SOPInstanceUID"),
        sop_class_uid=_required_uid(dataset, "SOPClassUID"),
        transfer_syntax_uid=transfer_syntax_uid,
        modality=_text(dataset, "Modality") or "",
    )


def _required_uid(dataset: Dataset, keyword: str) -> str:
    try:
        value = dataset.get(keyword)
    except Exception as exc:
        # pydicom converts values lazily, so a malformed value fails here, not in dcmread.
        raise UndecodableInstanceError(
            f"{keyword} cannot be decoded: {type(exc).__name__}"
        ) from exc
    if isinstance(value, MultiValue):
        raise InvalidInstanceError(f"{keyword} has {len(value)} values (expected one)")
    try:
        return validate_uid(value, keyword)
    except InvalidUIDError as exc:
        raise InvalidInstanceError(str(exc)) from exc


def _encoding_of(transfer_syntax_uid: str) -> tuple[bool, bool, bool]:
    """Return (implicit VR, little endian, deflated) for a transfer syntax.

    A syntax pydicom does not know is read as explicit VR little endian, which PS3.5
    section A.4 prescribes for every encapsulated (compressed) syntax.
    """
    syntax = UID(transfer_syntax_uid)
    if not syntax.is_transfer_syntax:
        return False, True, False
    # NOTE: only Deflated Explicit VR Little Endian is inflated, as pydicom does for files.
    # Datasets in the rare JPIP Referenced Deflate syntaxes do not parse and are rejected.
    return syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated


def _tags_of(keywords: list[str]) -> list[BaseTag | int]:
    tags: list[BaseTag | int] = []
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(f"unknown DICOM keyword {keyword!r}")
        tags.append(tag)
    return tags


def _at_pixel_data(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return int(tag) in _PIXEL_DATA_TAGS


def _decode_failure(exc: Exception) -> str:
    # NOTE: the pydicom 3.0 read errors seen so far describe the structure (offsets, VRs,
    # lengths) and not element values. The first line only is kept, cut to 200 characters.
    detail = str(exc).splitlines()[0][:200] if str(exc) else ""
    kind = "not DICOM" if isinstance(exc, InvalidDicomError) else "cannot be decoded"
    return f"{kind}: {type(exc).__name__}" + (f": {detail}" if detail else "")


@contextlib.contextmanager
def _open_binary(source: Path | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(source, Path):
        with source.open("rb") as handle:
            yield handle
    else:
        source.seek(0)
        yield source


# -- completeness -----------------------------------------------------------------------


class _StructureNotUnderstood(Exception):
    """The element walk met an encoding it does not model; completeness is unknown."""


@dataclass
class _WalkState:
    size: int
    last_tag: int = 0
    seen_rows: bool = False
    seen_pixel_data: bool = False
    media_storage_class: str | None = None


def check_complete(source: Path | BinaryIO) -> None:
    """Raise IncompleteInstanceError if a file ends before its last data element does.

    A file copied into a drop folder may be looked at while its writer is paused, so run
    this before :func:`read_instance_info`: a file cut inside its header would otherwise
    be rejected as invalid. The check walks every data element, seeking over values so
    memory stays bounded, and requires the file to end exactly where a top-level element
    ends. A file shorter than the preamble and prefix is incomplete. So is a dataset that
    ends before SeriesInstanceUID, or an image header with Rows but no pixel data element,
    because that is what a file cut at an element boundary looks like. A deflated dataset
    is complete when its deflate stream has its final block.

    Returns without raising when the file is complete or when completeness cannot be
    judged: the input is not recognisably Part 10, the file meta has no Transfer Syntax
    UID, or the encoding is one the walk does not model (an explicit VR file whose
    sequences switch to implicit VR, an unexpected delimiter). :func:`read_instance_info`
    reports the first two cases.

    NOTE: a file cut exactly at a top-level element boundary between SeriesInstanceUID
    and Rows, or after SeriesInstanceUID in an object without pixel data, still looks
    complete. The drop-folder quiet period is the defence there.
    """
    with _open_binary(source) as handle:
        size = handle.seek(0, io.SEEK_END)
        head = _read_at(handle, 0, len(PART10_PREFIX))
        if size < len(PART10_PREFIX):
            raise IncompleteInstanceError(
                f"the file has {size} bytes, fewer than a DICOM preamble and prefix"
            )
        if head[PREAMBLE_LENGTH:] == b"DICM":
            handle.seek(len(PART10_PREFIX))
        elif struct.unpack("<H", head[:2])[0] == _FILE_META_GROUP:
            handle.seek(0)
        else:
            return

        state = _WalkState(size)
        try:
            transfer_syntax = _skip_file_meta(handle, state)
            if transfer_syntax is None:
                return
            is_implicit, is_little_endian, is_deflated = _encoding_of(transfer_syntax)
            if is_deflated:
                _check_deflate_stream(handle)
                return
            _skip_elements(
                handle, state, is_implicit, is_little_endian, in_item=False, top_level=True
            )
        except _StructureNotUnderstood:
            return

    if state.media_storage_class == MEDIA_STORAGE_DIRECTORY:
        # A DICOMDIR has no series; read_instance_info rejects it with its own reason.
        return
    if state.last_tag < _SERIES_INSTANCE_UID_TAG:
        # Elements are in ascending tag order and SeriesInstanceUID is Type 1 in every
        # composite IOD, so a dataset that ends before it was cut short.
        raise IncompleteInstanceError(
            "the dataset ends before SeriesInstanceUID (0020,000E); it appears cut short"
        )
    if state.seen_rows and not state.seen_pixel_data:
        raise IncompleteInstanceError(
            "the file has Rows but no pixel data element; it appears to end after its header"
        )


def _skip_file_meta(handle: BinaryIO, state: _WalkState) -> str | None:
    """Move past the group 0002 elements; return the Transfer Syntax UID if present."""
    transfer_syntax: str | None = None
    while True:
        start = handle.tell()
        group_bytes = _read_at(handle, start, 2)
        if len(group_bytes) < 2:
            # A file meta with no dataset after it is a header whose writer has paused.
            raise IncompleteInstanceError("the file ends in or after its file meta information")
        if struct.unpack("<H", group_bytes)[0] != _FILE_META_GROUP:
            return transfer_syntax
        tag = _skip_one_element(handle, state, is_implicit=False, is_little_endian=True)
        if tag in (_TRANSFER_SYNTAX_TAG, _MEDIA_STORAGE_CLASS_TAG):
            # The header is 8 bytes whether the meta is explicit VR (as required) or not.
            end = handle.tell()
            value = _read_at(handle, start + 8, end - start - 8)
            text = value.decode("ascii", "replace").rstrip("\x00 ") or None
            if tag == _TRANSFER_SYNTAX_TAG:
                transfer_syntax = text
            else:
                state.media_storage_class = text


def _check_dataset_ends_cleanly(
    stream: BinaryIO, is_implicit: bool, is_little_endian: bool
) -> None:
    """Raise UndecodableInstanceError if a received dataset ends inside a data element.

    A C-STORE data set arrives whole, so unlike a file in a drop folder it cannot be
    "still being written": an element that runs past the end means corrupt or truncated
    data, which pydicom would otherwise silently cut off (pixel data included).
    """
    state = _WalkState(stream.seek(0, io.SEEK_END))
    stream.seek(0)
    try:
        _skip_elements(stream, state, is_implicit, is_little_endian, in_item=False, top_level=True)
    except IncompleteInstanceError as exc:
        raise UndecodableInstanceError(
            f"cannot be decoded: the data set ends inside a data element ({exc.reason})"
        ) from exc
    except _StructureNotUnderstood as exc:
        raise UndecodableInstanceError(f"cannot be decoded: {exc}") from exc


def _read_at(handle: BinaryIO, offset: int, count: int) -> bytes:
    """Read up to ``count`` bytes at ``offset`` and leave the position where it was."""
    position = handle.tell()
    handle.seek(offset)
    data = handle.read(count)
    handle.seek(position)
    return data


def _skip_elements(
    handle: BinaryIO,
    state: _WalkState,
    is_implicit: bool,
    is_little_endian: bool,
    in_item: bool,
    top_level: bool = False,
) -> None:
    """Walk a dataset to its end: end of file at top level, an item delimiter inside one."""
    while True:
        start = handle.tell()
        if start == state.size and not in_item:
            return
        tag = _skip_one_element(handle, state, is_implicit, is_little_endian)
        if tag == _ITEM_DELIMITER:
            if in_item:
                return
            raise _StructureNotUnderstood("item delimiter outside an item")
        if top_level:
            state.last_tag = max(state.last_tag, tag)
            state.seen_rows |= tag == _ROWS_TAG
            state.seen_pixel_data |= tag in _PIXEL_DATA_TAGS


def _skip_one_element(
    handle: BinaryIO, state: _WalkState, is_implicit: bool, is_little_endian: bool
) -> int:
    """Move past one data element (recursing into undefined-length values); return its tag."""
    order = "<" if is_little_endian else ">"
    header = _read_exactly(handle, 8)
    group, element = struct.unpack(f"{order}HH", header[:4])
    tag: int = group << 16 | element
    vr = header[4:6]

    # Items and delimiters always have a 4-byte length and no VR (PS3.5 section 7.5).
    if is_implicit or group == 0xFFFE:
        length = struct.unpack(f"{order}L", header[4:])[0]
        vr = b""
    elif vr in _LONG_LENGTH_VRS:
        length = struct.unpack(f"{order}L", _read_exactly(handle, 4))[0]
    elif vr.isalpha() and vr.isupper():
        length = struct.unpack(f"{order}H", header[6:])[0]
    else:
        raise _StructureNotUnderstood("invalid VR in an explicit VR dataset")

    if tag in (_ITEM_DELIMITER, _SEQUENCE_DELIMITER):
        return tag
    if length != _UNDEFINED_LENGTH:
        _seek_within(handle, state, length)
        return tag

    # An undefined-length UN value is encoded in implicit VR little endian (PS3.5 6.2.2).
    if vr == b"UN":
        is_implicit, is_little_endian = True, True
    _skip_items(handle, state, is_implicit, is_little_endian)
    return tag


def _skip_items(
    handle: BinaryIO, state: _WalkState, is_implicit: bool, is_little_endian: bool
) -> None:
    """Walk the items of an undefined-length sequence or encapsulated pixel data."""
    order = "<" if is_little_endian else ">"
    while True:
        group, element, length = struct.unpack(f"{order}HHL", _read_exactly(handle, 8))
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            return
        if tag != _ITEM:
            raise _StructureNotUnderstood("expected an item inside a sequence")
        if length == _UNDEFINED_LENGTH:
            _skip_elements(handle, state, is_implicit, is_little_endian, in_item=True)
        else:
            _seek_within(handle, state, length)


def _read_exactly(handle: BinaryIO, count: int) -> bytes:
    data = handle.read(count)
    if len(data) < count:
        raise IncompleteInstanceError("the file ends inside a data element header")
    return data


def _seek_within(handle: BinaryIO, state: _WalkState, length: int) -> None:
    end = handle.tell() + length
    if end > state.size:
        raise IncompleteInstanceError(
            f"a data element needs {end - state.size} more bytes than the file has"
        )
    handle.seek(end)


def _check_deflate_stream(handle: BinaryIO) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        while chunk := handle.read(_READ_CHUNK):
            # Output is discarded in bounded pieces; only the end-of-stream flag matters.
            inflater.decompress(chunk, _READ_CHUNK)
            while inflater.unconsumed_tail:
                inflater.decompress(inflater.unconsumed_tail, _READ_CHUNK)
            if inflater.eof:
                return
    except zlib.error as exc:
        raise InvalidInstanceError(f"the deflated dataset is corrupt: {exc}") from exc
    raise IncompleteInstanceError("the deflated dataset ends before its final block")


# -- study metadata ---------------------------------------------------------------------


@dataclass
class _SeriesSummary:
    series_uid: str
    modality: str
    body_part: str | None
    number: int | None
    instance_count: int = 0


def build_metadata(paths: Iterable[Path]) -> dict[str, Any]:
    """Build the ``patient`` and ``studies`` parts of a JMIX metadata.json for one study.

    The files are read one at a time, headers only. Values absent from every instance are
    omitted, except the two the schema requires: ``patient.id`` and a series'
    ``modality`` become empty strings. When instances disagree, the first non-empty value
    in ``paths`` order wins. Series are ordered by SeriesNumber, then SeriesInstanceUID.
    The caller adds ``version``, ``id`` and ``timestamp``.

    Raises ValueError if ``paths`` is empty or spans more than one study, and
    InvalidInstanceError (its reason prefixed with the file name) for an unreadable file.
    """
    patient_values: dict[str, Any] = {}
    study_uid: str | None = None
    study_description: str | None = None
    series: dict[str, _SeriesSummary] = {}

    for path in paths:
        dataset, info = _read_metadata_header(path)

        if study_uid is None:
            study_uid = info.study_uid
        elif info.study_uid != study_uid:
            raise ValueError(
                f"{path.name} belongs to a different study than the files before it; "
                "metadata.json describes one study"
            )
        study_description = study_description or _text(dataset, "StudyDescription")
        for key, value in _patient_values(dataset).items():
            patient_values.setdefault(key, value)

        summary = series.get(info.series_uid)
        if summary is None:
            summary = _SeriesSummary(
                info.series_uid,
                info.modality,
                _text(dataset, "BodyPartExamined"),
                _integer(dataset, "SeriesNumber"),
            )
            series[info.series_uid] = summary
        summary.modality = summary.modality or info.modality
        summary.body_part = summary.body_part or _text(dataset, "BodyPartExamined")
        summary.instance_count += 1

    if study_uid is None:
        raise ValueError("no instances given; metadata.json needs at least one")

    studies: dict[str, Any] = {"study_uid": study_uid}
    if study_description:
        studies["study_description"] = study_description
    studies["series"] = [_series_entry(item) for item in sorted(series.values(), key=_order)]
    return {"patient": {"id": "", **patient_values}, "studies": studies}


def _read_metadata_header(path: Path) -> tuple[Dataset, InstanceInfo]:
    try:
        with path.open("rb") as handle:
            dataset = _read_part10_header(handle, _METADATA_TAGS)
        return dataset, _instance_info(dataset, _transfer_syntax(dataset))
    except InvalidInstanceError as exc:
        raise InvalidInstanceError(f"{path.name}: {exc.reason}") from exc


def _patient_values(dataset: Dataset) -> dict[str, Any]:
    values: dict[str, Any] = {}
    patient_id = _text(dataset, "PatientID")
    if patient_id:
        values["id"] = patient_id
    name = _human_name(dataset)
    if name:
        values["name"] = name
    birth_date = _iso_date(_text(dataset, "PatientBirthDate"))
    if birth_date:
        values["dob"] = birth_date
    sex = (_text(dataset, "PatientSex") or "").upper()
    if sex in _PATIENT_SEXES:
        values["sex"] = sex
    return values


def _human_name(dataset: Dataset) -> dict[str, Any] | None:
    """Map the alphabetic group of PatientName to a JMIX humanName, or None if empty."""
    value = _safe_get(dataset, "PatientName")
    if not isinstance(value, PersonName):
        return None

    family = value.family_name.strip()
    # FHIR-style "given" lists given and middle names in order; DICOM keeps them apart.
    given = [part for part in (value.given_name.strip(), value.middle_name.strip()) if part]
    prefix = value.name_prefix.strip()
    suffix = value.name_suffix.strip()
    text = " ".join(part for part in (prefix, *given, family, suffix) if part)
    if not text:
        return None

    name: dict[str, Any] = {}
    if family:
        name["family"] = family
    if given:
        name["given"] = given
    if prefix:
        name["prefix"] = prefix
    if suffix:
        name["suffix"] = suffix
    name["text"] = text
    return name


def _iso_date(value: str | None) -> str | None:
    """Convert a DA value (YYYYMMDD, or the ACR-NEMA YYYY.MM.DD) to YYYY-MM-DD."""
    if not value:
        return None
    digits = value.replace(".", "") if len(value) == 10 else value
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        return None


def _series_entry(summary: _SeriesSummary) -> dict[str, Any]:
    entry: dict[str, Any] = {"series_uid": summary.series_uid, "modality": summary.modality}
    if summary.body_part:
        entry["body_part"] = summary.body_part
    entry["instance_count"] = summary.instance_count
    return entry


def _order(summary: _SeriesSummary) -> tuple[int, int, str]:
    if summary.number is None:
        return (1, 0, summary.series_uid)
    return (0, summary.number, summary.series_uid)


def _safe_get(dataset: Dataset, keyword: str) -> Any:
    """Return an element's value, or None when it is absent or cannot be decoded."""
    try:
        return dataset.get(keyword)
    except Exception:
        # Optional attributes must not make an otherwise valid study unsendable.
        return None


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = _safe_get(dataset, keyword)
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _integer(dataset: Dataset, keyword: str) -> int | None:
    value = _safe_get(dataset, keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
