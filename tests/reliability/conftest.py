"""Fixtures of the reliability tests; their helpers (rel_helpers.py) are made importable here."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from rel_helpers import SMOKE_RUN  # noqa: E402

from amisbench import cli  # noqa: E402


@pytest.fixture(scope="session")
def finished_results(tmp_path_factory) -> Path:
    """A results folder holding one finished ssn smoke run on synthetic (seed 0), trained once per session."""
    root = tmp_path_factory.mktemp("finished") / "results"
    assert cli.main([*SMOKE_RUN, "--results", str(root)]) == 0
    return root


@pytest.fixture
def results_copy(finished_results, tmp_path) -> Path:
    """A private copy of :func:`finished_results` that a test may damage."""
    dst = tmp_path / "results"
    shutil.copytree(finished_results, dst)
    return dst

