from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from amisbench import cli
from amisbench.errors import UserError
from amisbench.registry import DATASETS, METHODS, Registry
from method_helpers import install_entry_point  # tests/fixtures, on sys.path by tests/conftest.py

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def tiny_entry_point(monkeypatch):
    """Fake what `pip install` of a package declaring [project.entry-points."amisbench.methods"] does."""
    yield install_entry_point(monkeypatch, METHODS, "tiny", "amisbench_tiny_plugin:TinyMethod", "amisbench.methods",
                              PLUGINS)
    METHODS.unregister("tiny")


def test_builtins_are_found_by_name():
    assert "ssn" in METHODS.names()
    assert "synthetic" in DATASETS.names()
    assert METHODS.get("ssn").__name__ == "SSN"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UserError, match=r"unknown method 'nope'; known: .*ssn"):
        METHODS.get("nope")
    with pytest.raises(UserError, match=r"unknown dataset 'nope'; known: .*synthetic"):
        DATASETS.get("nope")


def test_entry_point_plugin_is_listed_and_runs_by_name(tiny_entry_point, tmp_path, capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "per-pixel logistic" in out and "[amisbench_tiny_plugin]" in out
    rc = cli.main(["run", "--method", "tiny", "--dataset", "synthetic", "--profile", "smoke", "--quiet",
                   "--results", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "runs/synthetic/tiny/smoke/seed-0/run.json").is_file()


def test_entry_point_that_registers_nothing_is_an_error(monkeypatch):
    reg = Registry("method", "amisbench.methods", "amisbench.test_nothing")
    ep = EntryPoint("ghost", "json", "amisbench.test_nothing")  # a module that registers nothing
    monkeypatch.setattr(reg, "_entry_points", lambda: [ep])
    with pytest.raises(UserError, match="did not register a method named 'ghost'"):
        reg.get("ghost")


def test_duplicate_registration_warns():
    reg = Registry("method", "amisbench.methods", "amisbench.test_dup")

    class A: ...

    class B: ...

    reg.register("x", A)
    with pytest.warns(UserWarning, match="registered twice"):
        reg.register("x", B)
    assert reg.get("x") is B
