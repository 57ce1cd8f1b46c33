"""Figures: samples grid (Fig. 4/5), metrics vs. sampler steps (Fig. 6b) and vs. alpha (Fig. 6c)."""

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from amisbench import cli
from amisbench.report import figures
from amisbench.api import Method
from amisbench.errors import UserError
from amisbench.metrics import ged, hm_iou
from amisbench.registry import DATASETS, METHODS
from amisbench.factory import load_trained
from amisbench.runner import run


@dataclass
class StepsConfig:
    steps: int = 25
    alpha: float = 1e-3


class StepsFake(Method):
    """Empty masks with fewer than 10 sampler steps, full masks from 10 on (a known metric curve)."""

    Config = StepsConfig
    config_layers = {"profiles": {"smoke": {"train": {"main": {"steps": 2}}}}}

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.net = nn.Conv2d(spec.channels, 1, 1)

    def loss(self, stage, images, masks):
        return self.net(images).pow(2).mean(), {}

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        b, _, h, w = images.shape
        return torch.full((b, n, h, w), self.cfg.steps >= 10, dtype=torch.bool, device=images.device)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    METHODS.register("stepsfake", StepsFake)
    root = tmp_path_factory.mktemp("res")
    run("stepsfake", "synthetic", profile="smoke", results=root, quiet=True)
    run("ssn", "synthetic", profile="smoke", results=root, quiet=True)
    yield root
    METHODS.unregister("stepsfake")


def _png(path):
    import matplotlib.image as mpimg

    return mpimg.imread(path)


@pytest.mark.slow
def test_samples_grid_images_readers_and_k_samples_per_method(runs):
    fig = figures.samples_figure(runs, "synthetic", ["ssn", "stepsfake"], images=[3, 0], k=3)
    png, pdf, png1, pdf1 = fig.paths
    assert [p.name for p in fig.paths] == ["samples.png", "samples.pdf", "samples_1col.png", "samples_1col.pdf"]
    assert pdf.read_bytes()[:4] == pdf1.read_bytes()[:4] == b"%PDF"
    img, one = _png(png), _png(png1)
    assert img.shape[1] > img.shape[0] > 200 and img[..., :3].std() > 0.1  # drawn, not blank
    # sized for a two-column page (7 in) and one column (3.5 in) at 300 dpi; bbox "tight" trims a little
    assert 6.3 * 300 < img.shape[1] < 7.3 * 300 and 3.0 * 300 < one.shape[1] < 3.7 * 300
    assert fig.data["images"] == [3, 0] and fig.data["readers"] == 4
    assert len(fig.data["zoom"]) == 2 and all(0 <= r0 < r1 <= 32 and 0 <= c0 < c1 <= 32
                                              for r0, r1, c0, c1 in fig.data["zoom"])
    for m in ("ssn", "stepsfake"):
        assert [a.shape for a in fig.data["methods"][m]] == [(3, 32, 32)] * 2  # smoke: 32 px
    assert all(a.all() for a in fig.data["methods"]["stepsfake"])  # its samples at 25 steps: full masks
    assert png.parent == runs / "figures" / "synthetic"
    # rows in order of the runs' own per-image GED_100 on the shown images (best first)
    _, ds, _ = load_trained(runs / "runs/synthetic/ssn/smoke/seed-0")
    ids = [ds[i]["id"] for i in (3, 0)]
    mean_ged = {}
    for m in ("ssn", "stepsfake"):
        per = pd.read_csv(runs / f"runs/synthetic/{m}/smoke/seed-0/per_image.csv")
        mean_ged[m] = per[(per["metric"] == "GED_100") & per["id"].isin(ids)]["value"].mean()
    assert fig.data["metric"] == "GED_100" and fig.data["order"] == sorted(mean_ged, key=mean_ged.get)


def test_samples_figure_zooms_to_the_readers_and_the_samples_they_share():
    shape = (64, 64)
    readers = np.zeros((2, *shape), dtype=bool)
    readers[0, 20:30, 22:28] = True
    readers[1, 24:34, 26:30] = True
    a = np.zeros((3, *shape), dtype=bool)
    a[:2, 30:36, 30:34] = True  # set in two samples: inside the view
    a[2, 60, 2] = True  # a stray pixel of one sample: does not widen it
    rows, cols = figures.zoom_box(readers, [a], shape)
    assert (rows.stop - rows.start) == (cols.stop - cols.start) >= 16  # square
    assert rows.start <= 20 and rows.stop >= 36 and cols.start <= 22 and cols.stop >= 34
    assert not (rows.start <= 60 < rows.stop and cols.start <= 2 < cols.stop)
    assert 0 <= rows.start and rows.stop <= 64 and 0 <= cols.start and cols.stop <= 64
    # one method's noise over the whole image (as an undertrained SSN draws) does not widen it either
    noise = np.random.default_rng(0).random((4, *shape)) < 0.5
    sane = [np.repeat(readers[:1], 4, axis=0) for _ in range(4)]
    assert figures.zoom_box(readers, [noise, *sane], shape) == figures.zoom_box(readers, sane, shape)
    assert figures.zoom_box(readers, sane, shape) != (slice(0, 64), slice(0, 64))
    # nothing set, or masks over most of the image: the whole image
    whole = (slice(0, 64), slice(0, 64))
    assert figures.zoom_box(np.zeros((2, *shape), bool), [np.zeros((3, *shape), bool)], shape) == whole
    big = np.zeros((1, *shape), dtype=bool)
    big[0, 5:60, 5:60] = True
    assert figures.zoom_box(big, [], shape) == whole
    # near the border the square view is moved inside the image
    edge = np.zeros((1, *shape), dtype=bool)
    edge[0, 0:4, 60:64] = True
    r, c = figures.zoom_box(edge, [], shape)
    assert r.start == 0 and c.stop == 64 and r.stop - r.start == c.stop - c.start == 16


def test_display_names_come_from_the_table_definitions():
    from amisbench.display import display_name

    assert display_name("prob_unet") == "Prob. U-Net" and display_name("analog_bits") == "AB"
    assert display_name("atfm-act_gtr") == "ATFM (act_gtr)" and display_name("unknown_x") == "unknown_x"


def test_most_ambiguous_images_are_picked():
    ds = DATASETS.get("synthetic")(DATASETS.get("synthetic").Config(), "test")
    pick = figures.pick_images(ds, 3, pool=12)
    scores = [figures.reader_disagreement(ds[i]["masks"]) for i in range(12)]
    assert sorted(pick, key=lambda i: -scores[i]) == pick and min(scores[i] for i in pick) >= sorted(scores)[-3]
    same = torch.ones((4, 8, 8), dtype=torch.uint8)
    assert figures.reader_disagreement(same) == 0.0


@pytest.mark.slow
def test_steps_curve_reevaluates_the_checkpoint_at_each_setting(runs, monkeypatch):
    fig = figures.steps_figure(runs, "synthetic", method="stepsfake", values=[1, 10], eval_images=3, samples=20)
    df = fig.data
    _, ds, _ = load_trained(runs / "runs/synthetic/stepsfake/smoke/seed-0")
    gts = torch.stack([ds[i]["masks"] for i in range(3)]).bool()
    for steps, fill in ((1, False), (10, True)):
        s = torch.full((3, 20, *gts.shape[-2:]), fill, dtype=torch.bool)
        got = df[(df["x"] == steps)].set_index("metric")["value"]
        assert got["GED_20"] == pytest.approx(float(ged(s, gts).mean()))  # 20 samples: GED_20, HMIoU_20
        assert got["HMIoU_20"] == pytest.approx(float(hm_iou(s, gts).mean()))
    assert [p.suffix for p in fig.paths] == [".png", ".pdf", ".csv"] and _png(fig.paths[0])[..., :3].std() > 0.05
    # the title counts the images there are, not the ones asked for
    more = figures.steps_figure(runs, "synthetic", method="stepsfake", values=[1], eval_images=10_000, samples=4)
    assert f"{len(ds)} test images x 4 samples" in more.notes[0]
    # the next call reuses the cached numbers (nothing is sampled again)
    monkeypatch.setattr(figures, "evaluate_subset", lambda *a, **k: pytest.fail("recomputed"))
    again = figures.steps_figure(runs, "synthetic", method="stepsfake", values=[1, 10], eval_images=3, samples=20)
    pd.testing.assert_frame_equal(again.data.reset_index(drop=True), df.reset_index(drop=True))
    with pytest.raises(UserError, match="no finished run of atfm on synthetic"):
        figures.steps_figure(runs, "synthetic", method="atfm", values=[1])


def _alpha_run(root, alpha, seed, g100, hm):
    d = root / "runs" / "synthetic" / "atfm" / "quick" / f"seed-{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"GED_100": g100, "HMIoU_32": hm, "GED_16": 1.0}))
    (d / "config.yaml").write_text(yaml.safe_dump({"method": {"alpha": alpha, "steps": 5}}))
    (d / "run.json").write_text(json.dumps({"status": "done", "method": "atfm", "variant": None,
                                            "dataset": "synthetic", "profile": "quick", "seed": seed}))


@pytest.mark.slow
def test_alpha_curve_counts_a_run_found_in_two_folders_once(tmp_path):
    # the sweep over alpha includes the default value: the same configuration and seed also sits in the
    # sweep's folder; seed 0 must count once (the bug: 0.001 pooled 0.559, 0.350 and 0.559 again)
    _alpha_run(tmp_path, 0.001, 0, 0.559, 0.60)
    _alpha_run(tmp_path, 0.001, 1, 0.350, 0.62)
    _alpha_run(tmp_path / "sweeps" / "method.alpha=0.001", 0.001, 0, 0.559, 0.60)
    _alpha_run(tmp_path / "sweeps" / "method.alpha=0", 0.0, 0, 0.30, 0.50)
    df = figures.alpha_figure(tmp_path, "synthetic").data
    ged = df[(df["metric"] == "GED_100") & (df["x"] == 0.001)]["value"]
    assert sorted(ged) == [0.350, 0.559]
    points = figures.curve_points(df[df["metric"] == "GED_100"], "x").set_index("x")
    assert points.loc[0.001, "n"] == 2 and points.loc[0.001, "mean"] == pytest.approx((0.559 + 0.350) / 2)
    assert points.loc[0.0, "n"] == 1 and np.isnan(points.loc[0.0, "std"])


@pytest.mark.slow
def test_figures_all_writes_what_it_can_and_says_what_it_skipped(runs, tmp_path, capsys):
    args = ["figures", "--dataset", "synthetic", "--kind", "all", "--results", str(runs), "--method", "stepsfake",
            "--values", "1,10", "--eval-images", "2", "--samples", "10", "--k", "2", "--out", str(tmp_path / "f")]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    names = sorted(p.rsplit("/", 1)[1] for p in out.split())
    assert names == ["samples.pdf", "samples.png", "samples_1col.pdf", "samples_1col.png", "steps.csv", "steps.pdf",
                     "steps.png"]
    assert "skipped alpha:" in err and "at least two values of method.alpha" in err
    assert cli.main(["figures", "--dataset", "synthetic", "--kind", "all", "--results", str(tmp_path / "none")]) == 2
    assert "no figure written" in capsys.readouterr().err


@pytest.mark.slow
def test_alpha_curve_from_runs_that_differ_in_alpha(tmp_path, capsys):
    _alpha_run(tmp_path, 0.001, 0, 0.20, 0.60)
    with pytest.raises(UserError, match=r"at least two values of method.alpha \(found: 0.001\).*--sweep"):
        figures.alpha_figure(tmp_path, "synthetic")
    _alpha_run(tmp_path, 0.001, 1, 0.22, 0.62)
    _alpha_run(tmp_path / "sweeps" / "method.alpha=0", 0.0, 0, 0.30, 0.50)
    _alpha_run(tmp_path / "sweeps" / "method.alpha=5e-3", 0.005, 0, 0.25, 0.55)
    fig = figures.alpha_figure(tmp_path, "synthetic")
    df = fig.data
    assert sorted(df["x"].unique()) == [0.0, 0.001, 0.005]
    g = df[df["metric"] == "GED_100"].groupby("x")["value"]
    assert g.mean()[0.001] == pytest.approx(0.21) and g.std(ddof=1)[0.001] == pytest.approx(np.std([0.2, 0.22], ddof=1))
    assert set(df["metric"]) == {"GED_100", "HMIoU_32"}
    assert pd.read_csv(tmp_path / "figures" / "synthetic" / "alpha.csv").shape[0] == len(df) == 8
    assert cli.main(["figures", "--dataset", "synthetic", "--kind", "alpha", "--results", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[0].endswith("figures/synthetic/alpha.png") and _png(printed[0])[..., :3].std() > 0.05


@pytest.mark.slow
def test_samples_figure_of_a_reference_method_that_needs_the_sample_context(tmp_path):
    # the oracle draws from the dataset's true reader distribution: it needs the dataset items it samples
    run("oracle", "synthetic", profile="smoke", results=tmp_path, quiet=True)
    fig = figures.samples_figure(tmp_path, "synthetic", ["oracle"], images=[1], k=4)
    (draws,) = fig.data["methods"]["oracle"]
    assert draws.shape == (4, 32, 32) and draws.any()
