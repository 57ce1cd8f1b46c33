"""`amisbench run --config FILE`, `--print-config`, `--tag NAME` (and tables by tag), `train.logger`."""

import csv
import json

import pytest
import yaml

from amisbench import cli
from amisbench.config import resolve
from amisbench.tables import build, build_table, to_markdown

SMOKE = ["--dataset", "synthetic", "--profile", "smoke", "--quiet"]


def test_config_file_has_the_flags_keys_and_set_and_the_command_line_wins(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("method: ssn\ndataset: synthetic\nprofile: smoke\nseeds: 2\n"
                 "set:\n  method: {rank: 3}\n  train.main.lr: 3.0e-4\n  eval.ged_ns: [16, 32, 100]\n")
    res_dir = tmp_path / "res"
    assert cli.main(["run", "--config", str(f), "--seed", "1", "--set", "method.rank=4", "--results", str(res_dir),
                     "--print-config"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split(":")[0].strip(): ln for ln in out.splitlines() if not ln.startswith("#")}
    assert lines["method"].endswith(f"# {f}") and "ssn" in lines["method"]
    assert "[1]" in lines["seeds"] and lines["seeds"].endswith("# --seed")  # the command line wins
    assert "method.rank: 4" in lines["method.rank"] and lines["method.rank"].endswith("# --set")  # applied last
    assert "0.0003" in lines["train.main.lr"] and lines["train.main.lr"].endswith(f"# {f} set:")
    assert lines["train.main.steps"].endswith("# configs/profiles/smoke.yaml")
    assert lines["method.unet.widths"].endswith("# configs/methods/ssn.yaml")
    assert lines["eval.n_samples"].endswith("# defaults")
    assert "run folder(s): " + str(res_dir / "runs/synthetic/ssn/smoke/seed-1") in out
    # the same config as the flags give
    want = resolve("ssn", "synthetic", "smoke", sets=["method.rank=4", "train.main.lr=3e-4"]).hash()
    assert f"config hash {want}" in out
    assert not res_dir.exists()  # --print-config writes nothing


@pytest.mark.parametrize("text, message", [
    ("method: ssn\ndatset: synthetic\n", "unknown key 'datset'; known: method, dataset"),
    ("method: ssn\ndataset: synthetic\nseeds: two\n", "'seeds' should be int, got str"),
    ("method: ssn\ndataset: synthetic\nset: [3]\n", "'set' should be a list of KEY=VALUE strings or a mapping"),
    ("method: ssn\ndataset: synthetic\nset: {method: {rnk: 3}}\n", "unknown key 'rnk'"),
    ("dataset: synthetic\n", "give --method (or method: in"),
    ("method: ssn\ndataset: synthetic\nseed: 1\nseeds: 2\n", "give 'seed' or 'seeds', not both"),
])
def test_bad_config_files_get_one_sentence_and_write_nothing(tmp_path, capsys, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert cli.main(["run", "--config", str(f), "--results", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "res").exists()


def test_a_tag_puts_a_changed_setting_beside_the_finished_run(tmp_path, capsys):
    res = str(tmp_path)
    base = ["run", "--method", "oracle", *SMOKE, "--results", res]
    assert cli.main(base) == 0
    assert cli.main([*base, "--set", "eval.max_images=2"]) == 2
    assert "pass --tag NAME to run this config beside it" in capsys.readouterr().err
    assert cli.main([*base, "--set", "eval.max_images=2", "--tag", "four"]) == 0
    tagged = tmp_path / "runs/synthetic/oracle+four/smoke/seed-0"
    assert json.loads((tagged / "run.json").read_text())["tag"] == "four"
    assert (tmp_path / "runs/synthetic/oracle/smoke/seed-0/run.json").is_file()
    assert cli.main([*base, "--tag", "a/b"]) == 2
    assert "--tag 'a/b': expected letters, digits" in capsys.readouterr().err
    t = build(tmp_path, "synthetic")
    assert t.rows == ["oracle", "oracle+four"] and t.cells[("oracle+four", "GED_100")][2] == 1


def _fake(root, method, metrics, tag=None, seed=0):
    d = root / "runs" / "synthetic" / (method + (f"+{tag}" if tag else "")) / "quick" / f"seed-{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "run.json").write_text(json.dumps({"method": method, "variant": None, "tag": tag, "dataset": "synthetic",
                                            "profile": "quick", "seed": seed}))


def test_tables_group_runs_by_tag(tmp_path, capsys):
    _fake(tmp_path, "ssn", {"GED_100": 0.30})
    _fake(tmp_path, "ssn", {"GED_100": 0.20}, tag="lr3e-4")
    _fake(tmp_path, "ssn", {"GED_100": 0.22}, tag="lr3e-4", seed=1)
    _fake(tmp_path, "atfm", {"GED_100": 0.25}, tag="lr3e-4")
    t = build(tmp_path, "synthetic")
    assert t.rows == ["atfm+lr3e-4", "ssn", "ssn+lr3e-4"] and t.cells[("ssn+lr3e-4", "GED_100")][2] == 2
    t = build_table("1", tmp_path, dataset="synthetic")
    assert t.cells[("ssn", "GED_100")][0] == pytest.approx(0.30) and t.status["atfm"] == "not run"
    assert "tagged runs not in this table: atfm+lr3e-4, ssn+lr3e-4 (build it from one tag with --tag NAME)" in t.notes
    t = build_table("1", tmp_path, dataset="synthetic", tag="lr3e-4")
    assert t.cells[("ssn", "GED_100")] == (pytest.approx(0.21), pytest.approx(0.01414, abs=1e-4), 2)
    assert t.cells[("atfm", "GED_100")][0] == pytest.approx(0.25) and "runs tagged lr3e-4" in t.notes
    assert "ssn 0,1 (from ssn+lr3e-4)" in to_markdown(t)
    assert cli.main(["table", "--dataset", "synthetic", "--tag", "x", "--results", str(tmp_path)]) == 2
    assert "--tag needs --table N" in capsys.readouterr().err


def _tb_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_logger_csv_is_the_default_and_tensorboard_logs_the_same_scalars(tmp_path, capsys):
    base = ["run", "--method", "ssn", *SMOKE, "--results", str(tmp_path), "--set", "train.main.steps=4"]
    assert cli.main(base) == 0
    folder = tmp_path / "runs/synthetic/ssn/smoke/seed-0"
    rows = list(csv.DictReader((folder / "train_log.csv").open()))
    assert [r["step"] for r in rows] == ["2", "4"] and not (folder / "tensorboard").exists()
    assert yaml.safe_load((folder / "config.yaml").read_text())["train"]["logger"] == "csv"
    assert cli.main([*base, "--set", "train.logger=wandb"]) == 2
    assert "train.logger: expected one of csv, tensorboard" in capsys.readouterr().err
    try:
        import tensorboard  # noqa: F401
    except ImportError:  # refused before anything is written, --print-config included
        for extra in (["--print-config"], ["--tag", "tb"]):
            assert cli.main([*base, "--set", "train.logger=tensorboard", *extra]) == 2
            assert "pip install 'amisbench[tensorboard]'" in capsys.readouterr().err
        assert not (tmp_path / "runs/synthetic/ssn+tb").exists()
        return
    # the logger is not part of the config: the finished run is the same run
    assert cli.main([*base, "--set", "train.logger=tensorboard", "--print-config"]) == 0
    out = capsys.readouterr().out
    logger = next(ln for ln in out.splitlines() if ln.startswith("  train.logger:"))
    assert logger.split("#")[0].split() == ["train.logger:", "tensorboard"] and logger.endswith("# --set")
    assert f"config hash {json.loads((folder / 'run.json').read_text())['config_hash']}" in out
    assert cli.main([*base, "--set", "train.logger=tensorboard", "--tag", "tb"]) == 0
    tb = tmp_path / "runs/synthetic/ssn+tb/smoke/seed-0"
    rows = list(csv.DictReader((tb / "train_log.csv").open()))
    scalars = _tb_scalars(tb / "tensorboard")
    cols = [c for c in rows[0] if c not in ("stage", "step")]
    assert sorted(scalars) == sorted(f"main/{c}" for c in cols)
    for c in cols:
        assert scalars[f"main/{c}"] == [(int(r["step"]), pytest.approx(float(r[c]), rel=1e-6)) for r in rows]


def test_tensorboard_without_the_package_is_one_sentence_and_nothing_written(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if the extra were not installed
    assert cli.main(["run", "--method", "ssn", *SMOKE, "--results", str(tmp_path), "--set",
                     "train.logger=tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "train.logger: tensorboard needs the tensorboard package: pip install 'amisbench[tensorboard]'" in err
    assert not (tmp_path / "runs").exists()
