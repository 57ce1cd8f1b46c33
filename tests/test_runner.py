"""`amisbench run`: seeds, skipping finished runs, resuming after a kill, usage errors, the NaN guard, schedules;
`--config FILE`, `--print-config`, `--tag NAME` (and tables by tag), `train.logger`."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from amisbench import cli
from amisbench.config import StageConfig, resolve
from amisbench.report.formats import to_markdown
from amisbench.report.tables import build, build_table
from amisbench.runner import batch_indices, lr_factor, run

SMOKE = dict(profile="smoke", quiet=True)


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_other_samples(tmp_path):
    a = run("ssn", "synthetic", seed=0, results=tmp_path / "a", **SMOKE)
    b = run("ssn", "synthetic", seed=0, results=tmp_path / "b", **SMOKE)
    c = run("ssn", "synthetic", seed=1, results=tmp_path / "c", **SMOKE)
    assert metrics(a) == metrics(b)
    assert (a / "per_image.csv").read_text() == (b / "per_image.csv").read_text()
    assert metrics(a) != metrics(c)
    for name in ("config.yaml", "metrics.json", "per_image.csv", "train_log.csv", "ckpt/last.pt", "run.json"):
        assert (a / name).is_file(), name
    info = json.loads((a / "run.json").read_text())
    assert info["status"] == "done" and info["seed"] == 0 and info["config_hash"]
    assert set(metrics(a)) >= {"GED_16", "GED_32", "GED_100", "HMIoU_32", "MDM_32", "GED_true_100"}


def test_finished_run_is_skipped_and_force_reruns(tmp_path, capsys):
    folder = run("ssn", "synthetic", results=tmp_path, profile="smoke")
    stamp = (folder / "run.json").stat().st_mtime_ns
    run("ssn", "synthetic", results=tmp_path, profile="smoke")
    assert "finished already" in capsys.readouterr().err
    assert (folder / "run.json").stat().st_mtime_ns == stamp
    run("ssn", "synthetic", results=tmp_path, profile="smoke", force=True, quiet=True)
    assert (folder / "run.json").stat().st_mtime_ns != stamp


def test_changed_config_does_not_silently_reuse_a_finished_run(tmp_path, capsys):
    run("ssn", "synthetic", results=tmp_path, **SMOKE)
    rc = cli.main(["run", "--method", "ssn", "--dataset", "synthetic", "--profile", "smoke", "--results",
                   str(tmp_path), "--set", "method.rank=2"])
    assert rc == 2
    assert "holds a finished run with another config" in capsys.readouterr().err


def test_batch_order_is_a_function_of_the_step():
    a = [batch_indices(0, "main", s, 10, 4) for s in range(6)]
    assert a == [batch_indices(0, "main", s, 10, 4) for s in range(6)]
    assert sorted(a[0] + a[1]) == sorted(set(a[0] + a[1]))  # no repeats within an epoch
    assert batch_indices(1, "main", 0, 10, 4) != a[0]
    assert len(batch_indices(0, "main", 0, 3, 4)) == 4  # a split smaller than a batch


def _cmd(results: Path) -> list[str]:
    return [sys.executable, "-P", "-m", "amisbench.cli", "run", "--method", "ssn", "--dataset", "synthetic",
            "--profile", "smoke", "--results", str(results), "--set", "train.main.steps=300",
            "--set", "train.main.ckpt_every=20"]


@pytest.mark.slow
def test_sigkill_during_training_resumes_to_the_same_metrics(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "runs/synthetic/ssn/smoke/seed-0/ckpt/last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it could be killed; give it more steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(ckpt, weights_only=True)
    assert state["stage"] == "main" and 0 < state["step"] < 300
    assert not (ckpt.parent.parent / "run.json").exists()
    out = subprocess.run(_cmd(killed), check=True, env=env, capture_output=True, text=True)
    assert "resuming from" in out.stderr
    a = straight / "runs/synthetic/ssn/smoke/seed-0"
    b = killed / "runs/synthetic/ssn/smoke/seed-0"
    assert metrics(a) == metrics(b)
    assert (a / "per_image.csv").read_text() == (b / "per_image.csv").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope", "--dataset", "synthetic"], "unknown method 'nope'; known: "),
    (["--method", "ssn", "--dataset", "nope"], "unknown dataset 'nope'; known: "),
    (["--method", "ssn", "--dataset", "synthetic", "--profile", "huge"], "invalid choice: 'huge'"),
    (["--method", "ssn", "--dataset", "synthetic", "--set", "method.rnak=2"], "unknown key 'rnak'"),
    (["--method", "ssn", "--dataset", "synthetic", "--set", "train.main.lr=fast"], "expected a number"),
    (["--method", "ssn", "--dataset", "synthetic", "--variant", "x"], "unknown variant 'x'"),
    (["--method", "ssn", "--dataset", "synthetic", "--seeds", "0"], "expected a positive number of seeds"),
    (["--method", "ssn", "--dataset", "synthetic", "--device", "tpu"], "expected cpu, cuda"),
    (["--method", "ssn", "--dataset", "synthetic", "--set", "train.main.min_lr=1"],
     "train.main.min_lr: expected a value between 0 and lr"),
])
def test_usage_errors_one_line_exit_2_nothing_written(tmp_path, capsys, argv, message):
    rc = cli.main(["run", *argv, "--results", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "res").exists()


@pytest.mark.slow
def test_usage_error_from_the_console_script_has_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-P", "-m", "amisbench.cli", "run", "--method", "nope", "--dataset",
                          "synthetic", "--results", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_nan_guard_stops_with_a_clear_message(tmp_path, capsys):
    rc = cli.main(["run", "--method", "ssn", "--dataset", "synthetic", "--profile", "smoke", "--quiet",
                   "--results", str(tmp_path), "--set", "train.main.lr=1e30"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "training diverged: the main loss is" in err and "lower train.main.lr" in err
    assert not (tmp_path / "runs/synthetic/ssn/smoke/seed-0/run.json").exists()


def test_interrupted_evaluation_resumes_at_the_next_batch(tmp_path):
    from amisbench.config import EvalConfig
    from amisbench.evaluate import PARTIAL, evaluate
    from amisbench.factory import load_trained

    folder = run("ssn", "synthetic", results=tmp_path, **SMOKE)
    model, ds, res = load_trained(folder)
    ecfg = EvalConfig(batch_images=1, max_images=3, n_samples=20, ged_ns=(16,), hm_iou_n=8, mdm_n=8,
                      true_samples=10)
    straight = evaluate(model, ds, ecfg, seed=0, device=torch.device("cpu"), out_dir=tmp_path / "a")

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ds, ecfg, seed=0, device=torch.device("cpu"), out_dir=tmp_path / "b",
                 progress=stop_after_two)
    assert (tmp_path / "b" / PARTIAL).is_file() and not (tmp_path / "b" / "per_image.csv").exists()
    seen = []
    resumed = evaluate(model, ds, ecfg, seed=0, device=torch.device("cpu"), out_dir=tmp_path / "b",
                       progress=lambda d, t: seen.append(d))
    assert seen == [3]  # only the third batch was evaluated again
    assert resumed == straight
    assert (tmp_path / "a" / "per_image.csv").read_text() == (tmp_path / "b" / "per_image.csv").read_text()
    assert not (tmp_path / "b" / PARTIAL).exists()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decaying_schedules_reach_min_lr_at_the_last_step(schedule):
    sc = StageConfig(lr=1e-4, min_lr=1e-6, schedule=schedule, warmup_steps=2)
    f = lr_factor(sc, total=12)
    lrs = [sc.lr * f(k) for k in range(12)]
    assert lrs[0] == pytest.approx(0.5e-4) and lrs[1] == pytest.approx(1e-4)  # warm-up
    assert lrs[-1] == pytest.approx(1e-6)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # monotone after the warm-up
    mid = 2 + (12 - 1 - 2) / 2  # halfway through the decay both shapes are at the mean of lr and min_lr
    assert sc.lr * f(mid) == pytest.approx((1e-4 + 1e-6) / 2)
    if schedule == "linear":  # CCDM's polynomial decay of power 1: equal steps
        steps = [a - b for a, b in zip(lrs[2:], lrs[3:])]
        assert max(steps) == pytest.approx(min(steps))


# ---------------------------------------------------------------------------------------------------
# `amisbench run --config FILE`, `--print-config`, `--tag NAME` (and tables by tag), `train.logger`.
# ---------------------------------------------------------------------------------------------------

SMOKE_ARGS = ["--dataset", "synthetic", "--profile", "smoke", "--quiet"]


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


@pytest.mark.slow
def test_a_tag_puts_a_changed_setting_beside_the_finished_run(tmp_path, capsys):
    res = str(tmp_path)
    base = ["run", "--method", "oracle", *SMOKE_ARGS, "--results", res]
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


@pytest.mark.slow
def test_logger_csv_is_the_default_and_tensorboard_logs_the_same_scalars(tmp_path, capsys):
    base = ["run", "--method", "ssn", *SMOKE_ARGS, "--results", str(tmp_path), "--set", "train.main.steps=4"]
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
    assert cli.main(["run", "--method", "ssn", *SMOKE_ARGS, "--results", str(tmp_path), "--set",
                     "train.logger=tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "train.logger: tensorboard needs the tensorboard package: pip install 'amisbench[tensorboard]'" in err
    assert not (tmp_path / "runs").exists()


def test_a_method_returning_bad_samples_fails_the_run_by_its_error_type(tmp_path, monkeypatch, capsys):
    from amisbench.errors import SampleError
    from amisbench.registry import METHODS

    ssn = METHODS.get("ssn")
    monkeypatch.setattr(ssn, "sample", lambda self, images, n, **kw: torch.zeros(len(images), n, 3, 3))
    rc = cli.main(["run", "--method", "ssn", "--dataset", "synthetic", "--profile", "smoke", "--quiet",
                   "--no-estimate", "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "amisbench run: failed: SSN.sample returned torch.float32" in err and "Traceback" not in err
    assert not (tmp_path / "runs/synthetic/ssn/smoke/seed-0/run.json").exists()

    def broken(self, images, n, **kw):  # the same words from a bug inside sample are not a failed run
        raise RuntimeError("sample returned nothing")

    monkeypatch.setattr(ssn, "sample", broken)
    with pytest.raises(RuntimeError, match="sample returned nothing") as e:
        run("ssn", "synthetic", results=tmp_path / "b", **SMOKE)
    assert not isinstance(e.value, SampleError)


@pytest.mark.parametrize("name", ["2024", "lidc: v2"])
def test_data_root_is_a_folder_name_never_yaml(tmp_path, monkeypatch, capsys, name):
    """``--data-root 2024`` (a number to YAML) and ``lidc: v2`` (a mapping to YAML) are folder names."""
    import data_formats as F
    import yaml

    from amisbench.datasets._prepare import prepare

    monkeypatch.chdir(tmp_path)
    src = F.write_lidc_pickle(tmp_path / "data_lidc.pickle", F.make_lidc_entries(n_scans=10, slices=3))
    prepare("lidc", src, tmp_path / name, show_progress=False)
    argv = ["run", "--method", "unet", "--dataset", "lidc", "--profile", "smoke", "--quiet", "--no-estimate",
            "--data-root", name, "--protocol", "clean", "--results", "res", "--set", "train.main.steps=1"]
    assert cli.main([*argv, "--print-config"]) == 0
    shown = capsys.readouterr().out
    assert re.search(rf"dataset.root: '{name}' +# --data-root", shown)
    assert cli.main(argv) == 0
    saved = yaml.safe_load((tmp_path / "res/runs/lidc/unet/smoke/seed-0/config.yaml").read_text())
    assert saved["dataset"]["root"] == name and "--data-root " + name in saved["sources"]
    assert cli.main([*argv, "--data-root", "2025", "--results", "other"]) == 2  # missing: named, not parsed
    assert "2025" in capsys.readouterr().err and not (tmp_path / "other").exists()
