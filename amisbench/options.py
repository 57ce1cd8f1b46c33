"""Command-line options that several commands share (``run``, ``table``, ``timing``, ``figures``, ``grid``,
``report``). The command modules import them from here, never from :mod:`amisbench.cli` (which imports the
command modules), so the imports go one way."""

from __future__ import annotations

import argparse
from pathlib import Path

from .reference import HIDE_ENV
from .store import default_results


def add_results_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=None,
                   help="results folder (default: $AMISBENCH_RESULTS or ./results)")


def results_folder(a: argparse.Namespace) -> Path:
    """The folder of ``--results``, else ``$AMISBENCH_RESULTS``, else ``./results``."""
    return Path(a.results) if a.results is not None else default_results()


def add_hide_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-reference", action="store_true",
                   help=f"leave out the shipped reference results (also: {HIDE_ENV}=1)")
