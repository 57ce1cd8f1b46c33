"""Adding a metric is one registration (amisbench.metric_registry): its function and metadata together reach
table_metrics (and so the evaluator), the tables' columns and direction, and the figures' axis titles."""

import json

import numpy as np
import pytest
import torch

from amisbench import cli
from amisbench.metric_registry import (METRICS, column_order, default_columns, metric_info, register_metric,
                                       unregister_metric)
from amisbench.metrics import pairwise_iou, table_metrics
from amisbench.report.figures import metric_title
from amisbench.report.formats import to_markdown
from amisbench.report.tables import build


def _mean_iou(c, n):  # mean IoU of the first n samples with the readers, from the shared counts
    return c.iou_sy[:, :n].mean(dim=(-2, -1))


@pytest.fixture
def toy():
    spec = register_metric("toy", higher_is_better=True, range=(0.0, 1.0), n=(8,), label="Toy",
                           description="Mean IoU of {n} samples with the readers (a test metric).", compute=_mean_iou)
    yield spec
    unregister_metric("toy")


def _masks(b, k, seed):
    return torch.from_numpy(np.random.default_rng(seed).random((b, k, 10, 10)) > 0.6)


def test_builtin_registry_keeps_the_table_order_and_metadata():
    assert default_columns() == ["GED_16", "GED_32", "GED_100", "HMIoU_32", "MDM_32", "GED_true_100",
                                 "diversity_100"]
    assert column_order(["zz_1", "MDM_32", "GED_100"]) == ["GED_100", "MDM_32", "zz_1"]
    assert metric_title("HMIoU_32") == "HM-IoU$_{32}$ (higher is better)"
    assert metric_title("GED_100") == "GED$_{100}$ (lower is better)"
    assert metric_title("diversity_100") == "diversity$_{100}$"
    with pytest.raises(ValueError, match="registered already"):
        register_metric("GED", higher_is_better=False, range=(0, 2), n=(16,), description="again")


def test_a_registered_metric_is_computed_tabulated_and_labelled(toy, tmp_path):
    s, y = _masks(2, 12, 0), _masks(2, 3, 1)
    out = table_metrics(s, y, ns=(4, 12), hm_n=4, mdm_n=None)
    assert list(out) == ["GED_4", "GED_12", "HMIoU_4", "diversity_12", "toy_8"]
    want = torch.as_tensor(pairwise_iou(s[:, :8], y), dtype=torch.float64).mean(dim=(-2, -1))
    assert torch.allclose(out["toy_8"], want, rtol=0, atol=1e-12)
    assert "toy_8" not in table_metrics(s[:, :6], y)  # n above the draw: left out, as for the built-ins
    info = metric_info("toy_8")
    assert (info.higher_is_better, info.range, info.n) == (True, (0.0, 1.0), 8) and "8 samples" in info.description
    assert "toy_8" in METRICS and default_columns()[-1] == "toy_8"
    # a table column, after the built-in ones, ranked by its direction (higher is better: bold 0.7)
    for seed, (m, g, v) in enumerate([("ssn", 0.3, 0.5), ("atfm", 0.2, 0.7)]):
        d = tmp_path / "runs" / "synthetic" / m / "quick" / "seed-0"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"toy_8": v, "GED_100": g}))
        (d / "run.json").write_text(json.dumps({"status": "done", "method": m, "variant": None,
                                                "dataset": "synthetic", "profile": "quick", "seed": 0}))
    t = build(tmp_path, "synthetic")
    assert t.columns == ["GED_100", "toy_8"] and t.best("toy_8") == "atfm"
    assert "| toy_8 ↑ |" in to_markdown(t).replace("GED_100 ↓ | ", "")
    # a figure's axis title
    assert metric_title("toy_8") == "Toy$_{8}$ (higher is better)"


def test_the_evaluator_writes_a_registered_metric(toy, tmp_path, capsys):
    assert cli.main(["run", "--method", "oracle", "--dataset", "synthetic", "--profile", "smoke", "--quiet",
                     "--no-estimate", "--results", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "runs/synthetic/oracle/smoke/seed-0/metrics.json").read_text())
    assert 0.0 <= metrics["toy_8"] <= 1.0 and "GED_100" in metrics
    rows = (tmp_path / "runs/synthetic/oracle/smoke/seed-0/per_image.csv").read_text().splitlines()
    assert sum(",toy_8," in r for r in rows) == metrics["n_images"]


def test_unregistered_metric_is_gone():
    assert "toy_8" not in METRICS
    with pytest.raises(ValueError, match="unknown metric 'toy_8'"):
        metric_info("toy_8")
    assert "toy_8" not in table_metrics(_masks(1, 10, 2), _masks(1, 2, 3))
    assert metric_title("GED_16") == "GED$_{16}$ (lower is better)"
