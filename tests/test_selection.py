"""Checkpoint selection (best:<metric>) with resume, the plateau schedule, the validation part carved from train
(amisbench/selection.py)."""

import csv
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from amisbench import runner as R
from amisbench import selection as SEL
from amisbench.config import StageConfig, resolve
from amisbench.errors import UserError
from amisbench.registry import DATASETS
from amisbench.runner import run
from amisbench.selection import Plateau, carve, validation_split

# ---------------------------------------------------------------------------------------------------
# checkpoint selection, resume, plateau, validation split
# ---------------------------------------------------------------------------------------------------

# SSN smoke on synthetic: its validation GED_true improves up to step 10 and not at 12 (CPU, seed 0), so the
# selected step lies after the last.pt of step 9 and before the end
SELECT = ["train.main.steps=12", "train.main.ckpt_every=3", "train.main.eval_every=2", "train.main.lr=0.03",
          "train.main.select=best:GED_true", "eval.val_images=4", "eval.val_samples=4",
          "train.main.augment=[hflip, rot90, {rotate: 10}]"]


def val_column(folder, key):
    with open(folder / "train_log.csv") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


class Killed(BaseException):
    pass


@pytest.mark.slow
def test_kill_between_best_save_and_next_log_resumes_to_the_same_selection(tmp_path, monkeypatch):
    ref = run("ssn", "synthetic", profile="smoke", sets=SELECT, results=tmp_path / "ref", quiet=True)
    info = json.loads((ref / "run.json").read_text())
    sel = info["selection"]["main"]
    assert sel["select"] == "best:GED_true" and sel["validation"] == "val" and sel["metric"] == "GED_true_4"
    vals = val_column(ref, "val_GED_true_4")
    assert [s for s, _ in vals] == [2, 4, 6, 8, 10, 12]
    assert min(v for _, v in vals) == sel["value"] and dict(vals)[sel["step"]] == sel["value"]
    assert (ref / "ckpt" / "best.pt").is_file() and (ref / "ckpt" / "last.pt").is_file()
    best = torch.load(ref / "ckpt" / "best.pt", weights_only=True)
    assert best["step"] == sel["step"] and best["selection"]["main"]["step"] == sel["step"]

    # kill right after ckpt/best.pt of the selected step is written, before the next last.pt / log
    real = R.save_torch
    last_steps = []

    def save(path, state):
        real(path, state)
        if Path(path).name == "last.pt":
            last_steps.append(state["step"])
        if Path(path).name == "best.pt" and state["step"] == sel["step"]:
            raise Killed

    monkeypatch.setattr(R, "save_torch", save)
    with pytest.raises(Killed):
        run("ssn", "synthetic", profile="smoke", sets=SELECT, results=tmp_path / "cut", quiet=True)
    monkeypatch.setattr(R, "save_torch", real)
    cut = tmp_path / "cut" / ref.relative_to(tmp_path / "ref")
    assert not (cut / "run.json").exists()
    assert last_steps and max(last_steps) < sel["step"]  # the resume replays steps from an older last.pt
    run("ssn", "synthetic", profile="smoke", sets=SELECT, results=tmp_path / "cut", quiet=True)
    got = json.loads((cut / "run.json").read_text())
    assert got["selection"] == info["selection"]
    assert json.loads((cut / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
    assert (cut / "per_image.csv").read_text() == (ref / "per_image.csv").read_text()


@pytest.mark.slow
def test_selected_weights_are_the_ones_evaluated(tmp_path):
    folder = run("ssn", "synthetic", profile="smoke", sets=SELECT, results=tmp_path / "best", quiet=True)
    best = torch.load(folder / "ckpt" / "best.pt", weights_only=True)
    last = torch.load(folder / "ckpt" / "last.pt", weights_only=True)
    for k, v in best["model"].items():
        assert torch.equal(v, last["model"][k]), k  # the final checkpoint holds the selected model
    # the same run with select: last evaluates other weights whenever the selected step is not the last one
    plain = run("ssn", "synthetic", profile="smoke", sets=SELECT + ["train.main.select=last"],
                results=tmp_path / "last", quiet=True)
    step = json.loads((folder / "run.json").read_text())["selection"]["main"]["step"]
    same = json.loads((plain / "metrics.json").read_text()) == json.loads((folder / "metrics.json").read_text())
    assert same == (step == 12)


@pytest.mark.parametrize("sets, words", [
    (["train.main.select=best:Dice", "train.main.eval_every=2"], "best:<metric>"),
    (["train.main.select=best:GED"], "eval_every"),
    (["train.main.schedule=plateau", "train.main.eval_every=2"], "plateau_metric"),
    (["train.main.augment=[shear]"], "train.main.augment\\[0\\]: unknown transform"),
    (["train.main.select=best:GED", "train.main.eval_every=2", "eval.val_carve_fraction=1.5"], "val_carve"),
])
def test_bad_selection_settings_fail_before_anything_is_written(tmp_path, sets, words):
    with pytest.raises(UserError, match=words):
        run("unet", "synthetic", profile="smoke", sets=sets, results=tmp_path, quiet=True)
    assert not any(tmp_path.iterdir())


def test_plateau_reduces_after_patience_and_resumes_from_its_state():
    sc = StageConfig(lr=1.0, gamma=0.5, patience=1, min_lr=0.2, schedule="plateau")
    p = Plateau(sc, "GED")
    seq = [1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85]
    factors = []
    for v in seq:
        p.observe(v)
        factors.append(p.factor)
    assert factors == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2]
    q = Plateau(sc, "GED")
    q.load_state_dict(p.state_dict())
    assert (q.factor, q.best, q.bad) == (p.factor, p.best, p.bad)
    f = R.lr_factor(sc, 100, p)
    assert f(50) == 0.2


@pytest.mark.slow
def test_plateau_schedule_in_a_run_logs_a_lower_lr(tmp_path):
    sets = ["train.main.steps=8", "train.main.eval_every=2", "train.main.schedule=plateau",
            "train.main.plateau_metric=GED", "train.main.patience=0", "train.main.gamma=0.5",
            "eval.val_images=2", "eval.val_samples=2", "train.main.lr=0.001"]
    with pytest.raises(UserError, match="min_lr"):
        run("unet", "synthetic", profile="smoke", sets=sets + ["train.main.min_lr=1.0"], results=tmp_path,
            quiet=True)
    folder = run("unet", "synthetic", profile="smoke", sets=sets + ["train.main.log_every=1"], results=tmp_path,
                 quiet=True)
    lrs = [float(r.split(",")[3]) for r in (folder / "train_log.csv").read_text().splitlines()[1:]
           if r.split(",")[3]]
    assert lrs[0] == pytest.approx(1e-3) and min(lrs) < 1e-3


def test_carved_validation_is_whole_groups_disjoint_and_seeded():
    ds = DATASETS.get("synthetic")(resolve("unet", "synthetic", "smoke").cfg.dataset, "train")
    tr, va = carve(ds, 0.25, seed=5)
    tr2, va2 = carve(ds, 0.25, seed=5)
    assert va.indices == va2.indices and tr.indices == tr2.indices
    assert sorted(tr.indices + va.indices) == list(range(len(ds)))
    assert len(va) >= 0.25 * len(ds)
    groups = [ds.group_of(gi) for gi in ds.global_indices]
    assert not {groups[i] for i in va.indices} & {groups[i] for i in tr.indices}
    assert carve(ds, 0.25, seed=6)[1].indices != va.indices
    assert va.ids == [ds.ids[i] for i in va.indices]


def test_where_validation_is_the_test_split_a_labelled_part_of_train_is_used():
    base = DATASETS.get("synthetic")
    cfg = resolve("unet", "synthetic", "smoke").cfg

    class ValIsTest(base):
        def __init__(self, c, split="train"):
            super().__init__(c, "test" if split == "val" else split)

    train = ValIsTest(cfg.dataset, "train")
    tr, va, label = validation_split(ValIsTest, cfg, train, R.split_hash)
    assert label.startswith("carved from train") and len(tr) + len(va) == len(train)
    test_ids = set(ValIsTest(cfg.dataset, "test").ids)
    assert not set(va.ids) & test_ids
    tr, va, label = validation_split(base, cfg, base(cfg.dataset, "train"), R.split_hash)
    assert label == "val" and len(tr) == len(train)


def test_plateau_on_training_loss_windows_and_cumulative_means():
    sc = StageConfig(lr=1.0, gamma=0.5, patience=0, schedule="plateau", plateau_metric="train_loss")
    win, cum = Plateau(sc, "train_loss"), Plateau(sc, "train_loss_cumulative")
    for p in (win, cum):
        for v in (4.0, 2.0):
            p.add_loss(v)
    assert win.mean_loss() == 3.0 and cum.mean_loss() == 3.0
    for p in (win, cum):
        p.add_loss(6.0)
    assert win.mean_loss() == 6.0  # the window since the last observation
    assert cum.mean_loss() == 4.0  # (4 + 2 + 6) / 3: MoSE's never-emptied losses_list
    assert win.mean_loss() is None
    q = Plateau(sc, "train_loss_cumulative")
    q.load_state_dict(cum.state_dict())
    q.add_loss(0.0)
    assert q.mean_loss() == 3.0  # the running sums travel with the checkpoint
    assert not SEL.needs_validation(sc)
    assert SEL.needs_validation(dataclasses.replace(sc, select="best:GED"))


def test_plateau_on_training_loss_lowers_the_lr_without_a_validation_set(tmp_path):
    # threshold 10 (relative): no later mean counts as an improvement, so with patience 0 every observation
    # after the first halves the lr (observations at steps 2, 4, 6, each after that step's log row)
    sets = ["train.main.steps=6", "train.main.eval_every=2", "train.main.schedule=plateau",
            "train.main.plateau_metric=train_loss_cumulative", "train.main.patience=0", "train.main.gamma=0.5",
            "train.main.plateau_threshold=10", "train.main.lr=0.001", "train.main.log_every=1"]
    folder = run("unet", "synthetic", profile="smoke", sets=sets, results=tmp_path, quiet=True)
    rows = list(csv.DictReader(io.StringIO((folder / "train_log.csv").read_text())))
    lrs = [float(r["lr"]) for r in rows if r.get("lr")]
    assert lrs == [pytest.approx(v) for v in (1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4)]
    observed = [r for r in rows if r.get("mean_train_loss_cumulative")]
    assert len(observed) == 3 and not any(k.startswith("val_") and r[k] for r in rows for k in r)
