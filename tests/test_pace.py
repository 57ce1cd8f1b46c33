"""Threads from the free cores, the timed estimate before training, and ETAs on plain progress lines."""

import json
import re

import pytest
import torch

from amisbench import cli, pace
from amisbench.progress import Reporter
from amisbench.runner import run_spec
from amisbench.store import RunSpec


@pytest.mark.parametrize("cores, load, want", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.2, 1), (2, 9.0, 1),
                                                (16, 3.4, 13), (16, 0.0, 16), (1, 0.0, 1), (8, None, 8)])
def test_default_threads_leave_the_busy_cores(monkeypatch, cores, load, want):
    monkeypatch.setattr(pace, "other_load", lambda: None)  # load=None below: an unknown load is idle
    assert pace.default_threads(cores, load) == want


def test_busy_cores_from_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal: cpu1 busy 30 + 10 of 100 jiffies (its iowait is idle)
    stat.write_text("cpu  60 0 20 900 20 0 0 0 0 0\ncpu0 20 0 10 460 10 0 0 0 0 0\n"
                    "cpu1 30 0 10 50 10 0 0 0 0 0\nintr 1 2 3\n")
    assert pace._cpu_times({1}, str(stat)) == (40.0, 100.0)
    assert pace._cpu_times(None, str(stat)) == (70.0, 600.0)
    assert pace._cpu_times({0}, str(tmp_path / "missing")) is None
    # two readings a quarter of a second apart: one of two CPUs fully busy, the other idle
    readings = iter([(100.0, 1000.0), (150.0, 1100.0)])
    monkeypatch.setattr(pace, "_cpu_times", lambda cpus: next(readings))
    monkeypatch.setattr(pace.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert pace.busy_cores(interval=0.0) == pytest.approx(1.0)


def test_threads_follow_the_cores_busy_now_not_the_lagging_load_average(monkeypatch):
    """Right after `pip install` (the README's main job) the one-minute load average still counts the finished
    install; the cores are idle now, so an idle two-core machine gets two threads."""
    monkeypatch.setattr(pace, "busy_cores", lambda: 0.05)
    monkeypatch.setattr(pace, "load_average", lambda: 0.7)
    assert pace.other_load() == 0.05 and pace.default_threads(2) == 2
    monkeypatch.setattr(pace, "busy_cores", lambda: 1.0)  # another process on one core now
    assert pace.default_threads(2) == 1
    monkeypatch.setattr(pace, "busy_cores", lambda: None)  # no /proc/stat: the load average decides
    assert pace.other_load() == 0.7 and pace.default_threads(2) == 1
    line = pace.describe_threads(2, False, 0.05)
    assert "the cores free now" in line and "0.1 busy now" in line and "load average 0.7" in line


def test_usable_cores_follow_affinity(monkeypatch):
    monkeypatch.setattr(pace.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert 1 <= pace.usable_cores() <= 3


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (42, "42s"), (185, "3m05s"), (7620, "2h07m"),
                                           (3 * 86400 + 4 * 3600 + 59, "3d04h"), (float("inf"), "?"), (-1, "?")])
def test_duration(seconds, text):
    assert pace.duration(seconds) == text


def test_pace_eta_from_the_rate_since_start():
    now = [100.0]
    p = pace.Pace(clock=lambda: now[0])
    p.start(done=10)  # resumed at step 10: the rate counts only the steps of this process
    assert p.eta(10, 110) is None
    now[0] += 20.0
    assert p.eta(20, 110) == pytest.approx(180.0)  # 10 steps in 20 s, 90 left


def test_plain_progress_lines_carry_an_eta(capsys):
    rep = Reporter()
    rep.tty = False
    rep.start("main", 4)
    for step in range(1, 5):
        torch.ones(1000, 1000).sum()  # some time passes
        rep.update(step, "loss 1.0")
    lines = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"main 1/4 loss 1\.0 eta \d+s", lines[0])
    assert lines[-1] == "main 4/4 loss 1.0"  # finished: no ETA


@pytest.mark.slow
def test_estimate_is_printed_and_leaves_the_run_unchanged(tmp_path, capsys):
    """The warm-up runs on a copy with the random state restored: same metrics and losses as without it."""
    folders = {}
    for est in (True, False):
        spec = RunSpec("ssn", "synthetic", 0, "smoke", results=tmp_path / str(est), estimate=est)
        folders[est] = run_spec(spec, Reporter())
        err = capsys.readouterr().err
        assert ("estimate: training" in err) == est and ("estimate: evaluation" in err) == est
    m = [json.loads((folders[e] / "metrics.json").read_text()) for e in (True, False)]
    assert m[0] == m[1]
    logs = [(folders[e] / "train_log.csv").read_text().splitlines() for e in (True, False)]
    assert [r.split(",")[:4] for r in logs[0]] == [r.split(",")[:4] for r in logs[1]]  # time_s aside


def test_estimate_scales_the_timed_steps(monkeypatch):
    """Each timed call below takes 1 s of a fake clock: steps cost 1 s; the CPU evaluation probe (1 image x
    10 samples) scales to batches of 4 images x 100 samples and ceil(10 / 4) = 3 batches: 120 s."""
    now, calls = [0.0], []
    monkeypatch.setattr(pace.time, "perf_counter", lambda: now[0])

    def record(*call):
        calls.append(call)
        now[0] += 1.0

    class Twin(torch.nn.Module):
        def on_stage_start(self, stage):
            calls.append(("start", stage))

    est = pace.estimate(Twin(), ["a", "b", "c"], {"a": 0, "b": 100, "c": 10},
                        train_step=lambda m, s, k: record(s, k), eval_call=lambda m, k, n: record("eval", k, n),
                        eval_images=10, eval_batch=4, eval_samples=100, device=torch.device("cpu"), warmup_steps=2)
    assert [c for c in calls if c[0] == "start"] == [("start", "a"), ("start", "b"), ("start", "c")]
    assert ("a", 0) not in calls and [c for c in calls if c[0] == "b"] == [("b", -1), ("b", 0), ("b", 1), ("b", 2)]
    assert est.step_s == {"b": 1.0, "c": 1.0} and est.train_s == 110.0
    assert ("eval", 1, 10) in calls and (est.timed_images, est.timed_samples) == (1, 10)
    assert est.eval_s == 120.0
    assert est.lines(100) == ["estimate: training 1m50s (b: 100 steps x 1s; c: 10 steps x 1s)",
                              "estimate: evaluation 2m00s (10 images x 100 samples, timed on 1 image(s) x 10); "
                              "total about 3m50s"]


def test_cli_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert cli.main(["run", "--method", "unet", "--dataset", "synthetic", "--profile", "smoke", "--threads", "0",
                         "--results", str(tmp_path)]) == 2
        assert "--threads 0: expected a positive number of threads" in capsys.readouterr().err
        assert not any(tmp_path.iterdir())
        assert cli.main(["run", "--method", "unet", "--dataset", "synthetic", "--profile", "smoke", "--threads", "1",
                         "--no-estimate", "--results", str(tmp_path)]) == 0
        err = capsys.readouterr().err
        assert "torch threads: 1 (set by --threads" in err and "estimate:" not in err
        assert torch.get_num_threads() == 1
        info = json.loads(next(tmp_path.rglob("run.json")).read_text())
        assert info["env"]["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_one_warm_up_per_command_before_the_first_seed_that_trains(tmp_path, capsys):
    before = torch.get_num_threads()
    base = ["run", "--method", "unet", "--dataset", "synthetic", "--profile", "smoke", "--threads", "1",
            "--results", str(tmp_path)]
    try:
        assert cli.main(base + ["--seed", "0", "--no-estimate"]) == 0
        capsys.readouterr()
        assert cli.main(base + ["--seeds", "3"]) == 0  # seed 0 is finished: the warm-up runs before seed 1
        err = capsys.readouterr().err
        assert err.count("estimate: training") == 1 and err.count("estimate: evaluation") == 1
        assert err.index("seed 1): estimate: training") < err.index("seed 2)")
    finally:
        torch.set_num_threads(before)
