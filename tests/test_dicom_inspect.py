"""Tests for agent.dicom.inspect against pydicom's bundled files and variants of them."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.data import get_testdata_files

from agent.dicom.inspect import (
    PART10_PREFIX,
    IncompleteInstanceError,
    InvalidInstanceError,
    UndecodableInstanceError,
    build_metadata,
    check_complete,
    disable_pydicom_value_validation,
    has_part10_prefix,
    read_dataset_info,
    read_instance_info,
)

METADATA_SCHEMA = Path("/work/shared/jmix-spec/schemas/metadata.schema.json")

# Writing deliberately invalid values makes pydicom warn; that is the point of these files.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def bundled_file(name: str) -> Path:
    """Return a file bundled with pydicom (never downloaded: there is no network)."""
    matches = [Path(item) for item in get_testdata_files() if Path(item).name == name]
    assert matches, f"{name} is not among pydicom's bundled test files"
    return matches[0]


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


def write_variant(tmp_path: Path, name: str = "CT_small.dcm", **changes: Any) -> Path:
    """Save a copy of a bundled file with attributes changed (None deletes one)."""
    dataset = dcmread(bundled_file(name))
    for keyword, value in changes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    path = tmp_path / f"variant-{name}"
    dataset.save_as(path, enforce_file_format=True)
    return path


# -- read_instance_info ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm",  # implicit VR little endian
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "image_dfl.dcm",  # deflated explicit VR little endian
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
        "JPEG2000.dcm",  # JPEG 2000
        "MR_small_RLE.dcm",  # RLE lossless
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_read_instance_info_matches_pydicom(name: str) -> None:
    path = bundled_file(name)
    expected = dcmread(path)

    info = read_instance_info(path)

    assert info.study_uid == expected.StudyInstanceUID
    assert info.series_uid == expected.SeriesInstanceUID
    assert info.sop_instance_uid == expected.SOPInstanceUID
    assert info.sop_class_uid == expected.SOPClassUID
    assert info.transfer_syntax_uid == expected.file_meta.TransferSyntaxUID
    assert info.modality == expected.get("Modality", "")


def test_read_instance_info_accepts_open_file() -> None:
    path = bundled_file("CT_small.dcm")
    with path.open("rb") as handle:
        handle.read(10)  # the position is irrelevant: reading starts at offset 0
        info = read_instance_info(handle)
    assert info == read_instance_info(path)


def test_file_without_preamble_but_with_meta_accepted() -> None:
    data = bundled_file("CT_small.dcm").read_bytes()
    without_preamble = io.BytesIO(data[len(PART10_PREFIX) :])

    info = read_instance_info(without_preamble)

    assert info == read_instance_info(bundled_file("CT_small.dcm"))
    assert not has_part10_prefix(without_preamble)
    assert has_part10_prefix(io.BytesIO(data))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("ExplVR_LitEndNoMeta.dcm", "not a DICOM Part 10 file"),
        ("no_meta.dcm", "not a DICOM Part 10 file"),
        ("README.txt", "not a DICOM Part 10 file"),
        ("meta_missing_tsyntax.dcm", "no TransferSyntaxUID"),
        ("DICOMDIR-empty.dcm", "DICOMDIR"),
        ("JPEGLSNearLossless_08.dcm", "StudyInstanceUID is missing"),
    ],
)
def test_bundled_invalid_files_rejected(name: str, reason: str) -> None:
    with pytest.raises(InvalidInstanceError, match=reason):
        read_instance_info(bundled_file(name))


def test_prefix_without_file_meta_rejected() -> None:
    data = bundled_file("CT_small.dcm").read_bytes()
    bare = PART10_PREFIX + data[dataset_offset(data) :]

    with pytest.raises(InvalidInstanceError, match="no file meta information"):
        read_instance_info(io.BytesIO(bare))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"StudyInstanceUID": "1.2.840.10008/../../etc"}, "StudyInstanceUID contains characters"),
        ({"SeriesInstanceUID": "1." + "2" * 70}, "SeriesInstanceUID is 72 characters long"),
        ({"SOPInstanceUID": None}, "SOPInstanceUID is missing"),
        ({"SOPClassUID": None}, "SOPClassUID is missing"),
        ({"StudyInstanceUID": ""}, "StudyInstanceUID is empty"),
        ({"SeriesInstanceUID": ["1.2.3", "1.2.4"]}, "SeriesInstanceUID has 2 values"),
    ],
)
def test_invalid_uids_rejected(tmp_path: Path, changes: dict[str, Any], reason: str) -> None:
    path = write_variant(tmp_path, **changes)
    with pytest.raises(InvalidInstanceError, match=reason):
        read_instance_info(path)


def test_rejection_reason_contains_no_value(tmp_path: Path) -> None:
    path = write_variant(tmp_path, StudyInstanceUID="1.2.3/SECRET")
    with pytest.raises(InvalidInstanceError) as caught:
        read_instance_info(path)
    assert "SECRET" not in caught.value.reason


def test_invalid_value_not_logged_after_validation_disabled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad_uid = write_variant(tmp_path, StudyInstanceUID="1.2.3/SECRET")
    long_id = write_variant(tmp_path, name="MR_small.dcm", PatientID="P" * 80)
    # The settings are process-wide; put them back for the tests that follow.
    for mode in ("_reading_validation_mode", "_writing_validation_mode"):
        monkeypatch.setattr(pydicom_config.settings, mode, getattr(pydicom_config.settings, mode))
    disable_pydicom_value_validation()
    caplog.clear()

    with caplog.at_level(logging.DEBUG):
        with pytest.raises(InvalidInstanceError):
            read_instance_info(bad_uid)
        build_metadata([long_id])

    assert "SECRET" not in caplog.text
    assert "PPPP" not in caplog.text


# -- read_dataset_info -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm"]
)
def test_read_dataset_info_matches_file(name: str) -> None:
    path = bundled_file(name)
    data = path.read_bytes()
    expected = read_instance_info(path)

    info = read_dataset_info(io.BytesIO(data[dataset_offset(data) :]), expected.transfer_syntax_uid)

    assert info == expected


def test_read_dataset_info_corrupt_deflate_undecodable() -> None:
    with pytest.raises(UndecodableInstanceError, match="cannot be decoded"):
        read_dataset_info(io.BytesIO(b"\xff" * 64), "1.2.840.10008.1.2.1.99")


def test_read_dataset_info_garbage_cannot_be_decoded() -> None:
    with pytest.raises(UndecodableInstanceError, match="cannot be decoded"):
        read_dataset_info(io.BytesIO(b"this is not a dataset" * 8), "1.2.840.10008.1.2.1")


# -- check_complete ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "JPEG2000.dcm",
        "MR_small_RLE.dcm",
        "rtplan.dcm",
        "examples_ybr_color.dcm",
        "waveform_ecg.dcm",
    ],
)
def test_check_complete_accepts_whole_files(name: str) -> None:
    check_complete(bundled_file(name))


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_check_complete_reports_truncated_fixtures(name: str) -> None:
    with pytest.raises(IncompleteInstanceError, match="more bytes than the file has"):
        check_complete(bundled_file(name))


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_dcmtk.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "image_dfl.dcm",
        "SC_rgb_rle.dcm",
        "rtplan.dcm",
    ],
)
def test_cut_file_never_looks_invalid(name: str) -> None:
    """A file cut at any byte is incomplete, or (at an element boundary) a valid header.

    The drop-folder watcher relies on this: a paused writer's file must wait, not be
    quarantined as invalid.
    """
    data = bundled_file(name).read_bytes()
    misjudged = []
    for cut in range(len(data)):
        partial = io.BytesIO(data[:cut])
        try:
            check_complete(partial)
        except IncompleteInstanceError:
            continue
        try:
            read_instance_info(partial)
        except InvalidInstanceError as exc:
            misjudged.append((cut, exc.reason))
    assert misjudged == []


@pytest.mark.parametrize(
    ("name", "pixel_data_tag"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", b"\xe0\x7f\x10\x00"),  # encapsulated, undefined length
        ("MR_small_implicit.dcm", b"\xe0\x7f\x10\x00"),
        ("MR_small_bigendian.dcm", b"\x7f\xe0\x00\x10"),
    ],
)
def test_cut_inside_pixel_data_always_incomplete(name: str, pixel_data_tag: bytes) -> None:
    data = bundled_file(name).read_bytes()
    pixel_data = data.rindex(pixel_data_tag)

    for cut in range(pixel_data, len(data)):
        with pytest.raises(IncompleteInstanceError):
            check_complete(io.BytesIO(data[:cut]))


def test_cut_deflate_stream_incomplete() -> None:
    data = bundled_file("image_dfl.dcm").read_bytes()
    start = dataset_offset(data)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflater.decompress(data[start:])
    stream_end = len(data) - len(inflater.unused_data)

    for cut in range(start, stream_end, 97):
        with pytest.raises(IncompleteInstanceError):
            check_complete(io.BytesIO(data[:cut]))


def test_header_only_image_incomplete() -> None:
    data = bundled_file("MR_small_implicit.dcm").read_bytes()
    header_only = data[: data.rindex(b"\xe0\x7f\x10\x00")]

    with pytest.raises(IncompleteInstanceError, match="Rows but no pixel data"):
        check_complete(io.BytesIO(header_only))


def test_short_file_incomplete() -> None:
    with pytest.raises(IncompleteInstanceError, match="fewer than a DICOM preamble"):
        check_complete(io.BytesIO(b"\x00" * 100))


def test_check_complete_ignores_non_dicom() -> None:
    check_complete(io.BytesIO(b"plain text, not DICOM\n" * 20))


# -- build_metadata ----------------------------------------------------------------------


def validate_metadata(parts: dict[str, Any]) -> None:
    document = {
        "version": "1.0",
        "id": "0b5d3c1e-8f7a-4a53-9a8e-3b0f2d6c7e91",
        "timestamp": "2025-01-01T00:00:00Z",
        **parts,
    }
    schema = json.loads(METADATA_SCHEMA.read_text())
    jsonschema.Draft202012Validator(schema).validate(document)


def test_build_metadata_multi_series_study() -> None:
    base = bundled_file("CT_small.dcm").parent / "dicomdirtests"
    files = sorted(path for path in base.rglob("*") if path.is_file() and path.name.isdigit())
    study_uid = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.1"
    paths = [path for path in files if read_instance_info(path).study_uid == study_uid]
    assert len(paths) > 1

    metadata = build_metadata(paths)

    validate_metadata(metadata)
    studies = metadata["studies"]
    assert studies["study_uid"] == study_uid
    assert sum(series["instance_count"] for series in studies["series"]) == len(paths)
    expected_series = {read_instance_info(path).series_uid for path in paths}
    assert {series["series_uid"] for series in studies["series"]} == expected_series
    numbers = [
        int(dcmread(next(p for p in paths if read_instance_info(p).series_uid == uid)).SeriesNumber)
        for uid in (series["series_uid"] for series in studies["series"])
    ]
    assert numbers == sorted(numbers)


def test_build_metadata_patient_fields(tmp_path: Path) -> None:
    path = write_variant(
        tmp_path,
        PatientName="Doe^Jane^Quinn^Dr^Jr",
        PatientID="PID-7",
        PatientBirthDate="19700102",
        PatientSex="F",
        BodyPartExamined="CHEST",
        StudyDescription="Chest CT",
    )

    metadata = build_metadata([path])

    validate_metadata(metadata)
    assert metadata["patient"] == {
        "id": "PID-7",
        "name": {
            "family": "Doe",
            "given": ["Jane", "Quinn"],
            "prefix": "Dr",
            "suffix": "Jr",
            "text": "Dr Jane Quinn Doe Jr",
        },
        "dob": "1970-01-02",
        "sex": "F",
    }
    assert metadata["studies"]["study_description"] == "Chest CT"
    assert metadata["studies"]["series"][0]["body_part"] == "CHEST"
    assert metadata["studies"]["series"][0]["instance_count"] == 1


def test_build_metadata_omits_absent_values(tmp_path: Path) -> None:
    path = write_variant(
        tmp_path,
        PatientName=None,
        PatientID=None,
        PatientSex="X",
        PatientBirthDate="1970",
        StudyDescription=None,
        Modality=None,
    )

    metadata = build_metadata([path])

    validate_metadata(metadata)
    # The schema requires patient.id and series modality, so they become empty strings.
    assert metadata["patient"] == {"id": ""}
    assert "study_description" not in metadata["studies"]
    assert metadata["studies"]["series"][0]["modality"] == ""
    assert "body_part" not in metadata["studies"]["series"][0]


def test_build_metadata_rejects_two_studies() -> None:
    with pytest.raises(ValueError, match="different study"):
        build_metadata([bundled_file("CT_small.dcm"), bundled_file("MR_small.dcm")])


def test_build_metadata_rejects_empty() -> None:
    with pytest.raises(ValueError, match="no instances"):
        build_metadata([])


def test_build_metadata_names_unreadable_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom" * 40)
    with pytest.raises(InvalidInstanceError, match=r"^broken\.dcm: not a DICOM"):
        build_metadata([broken])
