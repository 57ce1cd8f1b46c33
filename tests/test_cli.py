"""Command-line conventions: help texts, variants in `methods`, broken plugins, closed pipes, GPU grids,
and the test isolation from the user's results folder and installed plugins."""

import argparse
import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from amisbench import cli, grid
from amisbench.registry import METHODS, PLUGINS_ENV, PluginWarning
from amisbench.store import default_results

PLUGINS = Path(__file__).parent / "plugins"


def _subparsers(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subparsers(sub, (*prefix, name))


def test_every_subcommand_has_a_description_and_every_flag_a_help():
    subs = list(_subparsers(cli.build_parser()))
    assert {"run", "table", "timing", "figures", "grid", "methods", "datasets", "data"} <= {s[0] for s, _ in subs}
    assert ("data", "prepare") in {s for s, _ in subs}
    for names, sub in subs:
        assert (sub.description or "").strip(), f"amisbench {' '.join(names)} has no description"
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert (action.help or "").strip(), f"amisbench {' '.join(names)} {action.option_strings or action.dest}"


def test_methods_lists_each_methods_variants(capsys):
    assert cli.main(["methods"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert "variants: act_gtr, atfm, atfm_no_lsf, release, sfm, sfm_no_lsf" in lines["atfm"]
    assert "variants: flips, l1" in lines["phiseg"] and "variants" not in lines["unet"]


def test_a_broken_plugin_is_one_warning_line_and_the_others_list_and_run(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(PLUGINS))
    ep = EntryPoint("broken", "amisbench_broken_plugin:Method", "amisbench.methods")
    real = METHODS._entry_points
    monkeypatch.setattr(METHODS, "_entry_points", lambda: [*real(), ep])
    monkeypatch.setattr(METHODS, "broken", {})
    assert cli.main(["methods"]) == 0
    out, err = capsys.readouterr()
    assert "ssn" in out and "broken" not in out
    assert err.count("\n") == 1 and err.startswith("amisbench: warning: method plugin 'broken'")
    assert "amisbench_broken_plugin:Method" in err and "ModuleNotFoundError: No module named" in err
    res = os.environ["AMISBENCH_RESULTS"]
    assert cli.main(["run", "--method", "oracle", "--dataset", "synthetic", "--profile", "smoke", "--quiet",
                     "--results", res]) == 0
    assert cli.main(["run", "--method", "broken", "--dataset", "synthetic", "--results", res]) == 2
    err = capsys.readouterr().err
    assert "method 'broken' is a plugin that could not be loaded" in err and "Traceback" not in err
    with pytest.warns(PluginWarning):  # the library warns too (once per registry scan)
        monkeypatch.setattr(METHODS, "broken", {})
        monkeypatch.setattr(METHODS, "_scanned_entry_points", False)
        METHODS.names()


@pytest.mark.slow
def test_every_command_exits_quietly_on_a_closed_pipe(tmp_path):
    for args in (["grid", "--method", "ssn", "--dataset", "synthetic", "--seeds", "3", "--profile", "smoke",
                  "--results", str(tmp_path)], ["methods"]):
        p = subprocess.Popen([sys.executable, "-P", "-m", "amisbench.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        p.stdout.close()  # the reader is gone before the command prints (`| head` that has read its lines)
        err = p.stderr.read().decode()
        p.wait(timeout=120)
        assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
        assert p.returncode == 141, (args[0], err)


def test_grid_jobs_that_ask_for_gpus_run_on_cuda(tmp_path, capsys):
    p = cli.build_parser()
    base = ["grid", "--method", "ssn", "--dataset", "synthetic", "--profile", "smoke", "--results", str(tmp_path)]
    for launcher, gpus, want in [("slurm", "1", "cuda"), ("submitit", "2", "cuda"), ("slurm", "0", "cpu"),
                                 ("print", "1", "cpu")]:
        a = p.parse_args([*base, "--launcher", launcher, "--gpus-per-job", gpus])
        grid.apply_grid(a)
        assert a.device == want, (launcher, gpus)
    a = p.parse_args([*base, "--launcher", "slurm", "--gpus-per-job", "1", "--device", "cuda:1"])
    grid.apply_grid(a)
    assert a.device == "cuda:1"
    assert cli.main([*base, "--launcher", "slurm", "--gpus-per-job", "1", "--device", "cpu"]) == 2
    assert "would run on the CPU of GPU nodes" in capsys.readouterr().err
    out = tmp_path / "grid"
    assert cli.main([*base, "--launcher", "slurm", "--gpus-per-job", "1", "--out", str(out)]) == 0
    (argv,) = json.loads((out / "jobs.json").read_text())["jobs"]
    assert argv[argv.index("--device") + 1] == "cuda"


def test_tests_use_a_temporary_results_folder_and_only_the_projects_plugins(tmp_path, monkeypatch):
    assert default_results() == Path(os.environ["AMISBENCH_RESULTS"]) and default_results() != Path("results")
    assert not Path(os.environ["AMISBENCH_RESULTS"]).resolve().is_relative_to(Path.cwd().resolve() / "results")
    # an installed third-party plugin (a dist-info folder on sys.path) is not seen ...
    site = tmp_path / "site"
    info = site / "amisbench_other-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: amisbench-other\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[amisbench.methods]\nother = amisbench_other:Other\n")
    monkeypatch.syspath_prepend(str(site))
    assert "other" not in [ep.name for ep in METHODS._entry_points()]
    # ... unless its distribution is named
    monkeypatch.setenv(PLUGINS_ENV, "amisbench,amisbench_other")
    assert "other" in [ep.name for ep in METHODS._entry_points()]
