"""Inputs shared by the JMIX format tests."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest
from jsonschema import FormatChecker
from pydicom.data import get_testdata_files


def bundled_ct_study(count: int | None = None) -> list[Path]:
    """Return files of pydicom's bundled CT study ``dicomdirtests/98892001`` (seven small files).

    ``count`` limits how many are returned; the test is skipped if fewer are installed.
    """
    files = sorted(
        Path(name)
        for name in get_testdata_files()
        if "98892001" in Path(name).parts and Path(name).is_file()
    )
    needed = count or 3
    if len(files) < needed:
        pytest.skip("pydicom's bundled study dicomdirtests/98892001 is not installed")
    return files[:count] if count else files


RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not RFC3339.fullmatch(value):
        return False
    datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return True


def format_checker() -> FormatChecker:
    """Return jsonschema's format checker plus an RFC 3339 date-time check if it lacks one."""
    checker = FormatChecker()
    if "date-time" not in checker.checkers:
        checker.checks("date-time", raises=ValueError)(_is_date_time)
    return checker
