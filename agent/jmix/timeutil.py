"""UTC timestamps in the RFC 3339 form JMIX manifests use."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """Return the current time in UTC, to the second."""
    return datetime.now(UTC).replace(microsecond=0)


def format_timestamp(moment: datetime) -> str:
    """Return ``YYYY-MM-DDTHH:MM:SSZ``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime:
    """Parse an RFC 3339 timestamp; one without an offset is rejected as ambiguous."""
    value = datetime.fromisoformat(text.strip().replace("z", "Z"))
    if value.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone offset")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # Year 1 with a positive offset, or year 9999 with a negative one.
        raise ValueError(f"timestamp {text!r} is out of range in UTC") from None
