"""Names from inside a rejected payload reach the journal and audit log only as labels."""

from __future__ import annotations

from agent.pipeline.inbound import redact_payload_names, safe_log_name

PATIENT_NAME = "DOE^JANE"


def test_member_name_replaced_by_label() -> None:
    message = f"archive member '{PATIENT_NAME}/../scan.dcm' climbs out with '..'"
    shown = redact_payload_names("unsafe_path", message)
    assert PATIENT_NAME not in shown
    assert "climbs out with" in shown
    assert shown.count("name-") == 2


def test_double_quoted_name_replaced() -> None:
    message = f"files.json lists \"{PATIENT_NAME}'s scan.dcm\", which is missing"
    assert PATIENT_NAME not in redact_payload_names("file_missing", message)


def test_identity_messages_unchanged() -> None:
    message = "sender assertion: signing key SHA256:ab is not pinned for 'org:site-x'"
    assert redact_payload_names("key_not_pinned", message) == message


def test_label_is_stable() -> None:
    first = redact_payload_names("dicom_invalid", f"payload file '{PATIENT_NAME}' is bad")
    second = redact_payload_names("dicom_invalid", f"payload file '{PATIENT_NAME}' is bad")
    assert first == second


def test_envelope_names_kept_in_log() -> None:
    name = "5b0f3a52-9a55-4d36-8a43-3f5b0e2a8c11.JMIX"
    assert safe_log_name(name) == name
    assert safe_log_name(f"{PATIENT_NAME}.JMIX").startswith("name-")
