import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amisbench import cli
from amisbench.config import StageConfig
from amisbench.runner import batch_indices, lr_factor, run

SMOKE = dict(profile="smoke", quiet=True)


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


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
    from amisbench.runner import load_trained

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
