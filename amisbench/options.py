"""Command-line options that several commands share (``run``, ``table``, ``timing``, ``figures``, ``grid``,
``report``) and the reader of their YAML flag files. The command modules import them from here, never from
:mod:`amisbench.cli` (which imports the command modules), so the imports go one way."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import UserError
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


def read_flag_file(path: Path | str, keys: dict[str, type | tuple[type, ...]], what: str) -> dict:
    """A YAML mapping whose keys are those of a command's flags, checked by key and type (one sentence
    naming the file and the key otherwise)."""
    from .config import read_yaml

    data = read_yaml(path, what)
    if not isinstance(data, dict):
        raise UserError(f"{what} file {path}: expected a mapping of keys ({', '.join(keys)})")
    for key, value in data.items():
        if key not in keys:
            raise UserError(f"{what} file {path}: unknown key '{key}'; known: {', '.join(keys)}")
        want = keys[key]
        if not isinstance(value, want) or isinstance(value, bool):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise UserError(f"{what} file {path}: '{key}' should be {names}, got {type(value).__name__}")
    return data
