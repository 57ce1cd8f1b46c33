"""Makes the format fixtures (tests/fixtures/data_formats.py) importable as ``data_formats`` by every test."""

import sys
from pathlib import Path

import pytest

_FIXTURES = str(Path(__file__).parent / "fixtures")
if _FIXTURES not in sys.path:
    sys.path.insert(0, _FIXTURES)


@pytest.fixture(autouse=True)
def _no_reference_results(monkeypatch):
    """Tests see only the results they make: the shipped reference rows are hidden (tests of the reference
    mechanism undo this with ``monkeypatch.delenv``)."""
    monkeypatch.setenv("AMISBENCH_NO_REFERENCE", "1")
