"""Inputs shared by the JMIX format tests."""

from __future__ import annotations

from pathlib import Path

import pytest
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
