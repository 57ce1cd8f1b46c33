"""Shared test set-up.

* The format fixtures (tests/fixtures/data_formats.py) import as ``data_formats`` in every test.
* Every test runs against a fresh results folder (``$AMISBENCH_RESULTS``) and sees only the project's own
  plugin entry points (``$AMISBENCH_PLUGINS``), so neither the user's ``./results`` nor the plugins
  installed next to amisbench change what a test sees. Child processes inherit both variables.
"""

import sys
from pathlib import Path

import pytest

_FIXTURES = str(Path(__file__).parent / "fixtures")
if _FIXTURES not in sys.path:
    sys.path.insert(0, _FIXTURES)


@pytest.fixture(autouse=True)
def isolated_results_and_plugins(tmp_path_factory, monkeypatch):
    """$AMISBENCH_RESULTS -> a temporary folder; the registries -> the project's own entry points; the shipped
    reference rows hidden (tests of the reference mechanism undo this with ``monkeypatch.delenv``)."""
    from amisbench.registry import DATASETS, METHODS, PLUGINS_ENV

    results = tmp_path_factory.mktemp("results")
    monkeypatch.setenv("AMISBENCH_RESULTS", str(results))
    monkeypatch.setenv(PLUGINS_ENV, "amisbench")
    monkeypatch.setenv("AMISBENCH_NO_REFERENCE", "1")
    for reg in (METHODS, DATASETS):  # entry points found before this test may come from elsewhere
        monkeypatch.setattr(reg, "_scanned_entry_points", False)
    yield results
