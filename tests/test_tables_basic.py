import json
import math

import numpy as np
import pytest

from amisbench import cli
from amisbench.errors import UserError
from amisbench.tables import build, to_csv, to_latex, to_markdown


def fake_run(root, method, seed, metrics, dataset="synthetic", profile="quick", variant=None, done=True):
    label = method + (f"-{variant}" if variant else "")
    d = root / "runs" / dataset / label / profile / f"seed-{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    if done:
        (d / "run.json").write_text(json.dumps({"status": "done", "method": method, "variant": variant,
                                                "dataset": dataset, "profile": profile, "seed": seed}))


def test_mean_std_ddof1_seed_count_and_best(tmp_path, capsys):
    for seed, (g, h) in enumerate([(0.30, 0.50), (0.34, 0.52), (0.32, 0.54)]):
        fake_run(tmp_path, "ssn", seed, {"GED_100": g, "HMIoU_32": h})
    fake_run(tmp_path, "atfm", 0, {"GED_100": 0.20, "HMIoU_32": 0.40})
    fake_run(tmp_path, "atfm", 1, {"GED_100": 0.22, "HMIoU_32": 0.42})
    fake_run(tmp_path, "atfm", 2, {"GED_100": 0.0, "HMIoU_32": 0.0}, done=False)  # unfinished: left out
    t = build(tmp_path, "synthetic")
    mean, std, n = t.cells[("ssn", "GED_100")]
    assert mean == pytest.approx(0.32) and std == pytest.approx(np.std([0.30, 0.34, 0.32], ddof=1)) and n == 3
    assert t.cells[("atfm", "GED_100")][2] == 2
    assert t.best("GED_100") == "atfm" and t.best("HMIoU_32") == "ssn"  # lower vs higher is better
    md = to_markdown(t)
    assert "**0.210 ± 0.014 (n=2)**" in md and "**0.520 ± 0.020 (n=3)**" in md
    assert "1 unfinished or failed run(s) left out" in md
    rows = to_csv(t).strip().splitlines()
    assert rows[0] == "method,metric,mean,std,n,best,reference,text" and len(rows) == 5
    assert "0.210 ± 0.014 (n=2)" in to_csv(t)
    assert cli.main(["table", "--dataset", "synthetic", "--results", str(tmp_path), "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert tex.count(r"\\") == 3 and r"\textbf{0.210}" in tex  # header + one row per method


def test_single_seed_has_no_std(tmp_path):
    fake_run(tmp_path, "ssn", 0, {"GED_100": 0.3})
    t = build(tmp_path, "synthetic")
    assert math.isnan(t.cells[("ssn", "GED_100")][1])
    md = to_markdown(t)
    assert "| 0.300 (n=1) |" in md and "n/a" not in md
    assert r"0.300 {\scriptsize ($n$=1)}" in to_latex(t) and "n/a" not in to_latex(t)


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no finished runs for dataset 'synthetic'"):
        build(tmp_path, "synthetic")
