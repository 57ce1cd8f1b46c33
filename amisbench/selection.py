"""What the runner needs to train like the releases: per-stage augmentation lists, validation during
training, checkpoint selection (``train.<stage>.select: last | best:<metric>``) and the reduce-on-plateau
learning-rate schedule.

Validation scores the first ``eval.val_images`` images of the validation split with ``eval.val_samples``
samples each, through the same :func:`amisbench.evaluate.evaluate` as the test evaluation (metric names
without the sample count: ``GED``, ``GED_true``, ``HMIoU``, ``MDM``, ``diversity``). Where a protocol's
validation split is its test split, a seeded part of the training split is held out instead (whole groups,
``eval.val_carve_fraction`` of them, seeded by the data, not the run) and the run says so.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import EvalConfig, StageConfig
from .errors import UserError
from .metric_registry import specs
from .seeding import derive_seed


def _metrics() -> dict[str, int]:
    """Registered metric -> -1 when smaller is better, else +1 (larger is better; diversity has no better
    direction and is maximised when asked for)."""
    return {s.prefix: -1 if s.higher_is_better is False else 1 for s in sorted(specs(), key=lambda s: s.prefix)}


# what a plateau schedule may also watch: the mean training loss of the steps since its last observation
# (train_loss), or of every step since the stage began (train_loss_cumulative: MoSE's engine.py steps
# ReduceLROnPlateau on np.mean of a losses_list that it never empties)
TRAIN_LOSS, TRAIN_LOSS_CUMULATIVE = "train_loss", "train_loss_cumulative"
TRAIN_LOSSES = (TRAIN_LOSS, TRAIN_LOSS_CUMULATIVE)


def _directions() -> dict[str, int]:
    """What a plateau schedule or a selection may watch -> -1 (smaller is better) or +1."""
    return {**_metrics(), TRAIN_LOSS: -1, TRAIN_LOSS_CUMULATIVE: -1}


def selection_metric(sc: StageConfig, where: str) -> str | None:
    """The metric of ``select: best:<metric>`` (None for ``last``); a UserError for anything else."""
    if sc.select == "last":
        return None
    kind, _, metric = sc.select.partition(":")
    if kind != "best" or metric not in _metrics():
        raise UserError(f"{where}.select: expected 'last' or 'best:<metric>' with metric one of "
                        f"{', '.join(_metrics())}, got {sc.select!r}")
    return metric


def plateau_metric(sc: StageConfig, where: str) -> str | None:
    if sc.schedule != "plateau":
        return None
    metric = sc.plateau_metric or selection_metric(sc, where)
    if metric not in _directions():
        raise UserError(f"{where}.plateau_metric: expected one of {', '.join(_directions())} (or a select: "
                        f"best:<metric> to take it from), got {sc.plateau_metric!r}")
    return metric


def check_stage(sc: StageConfig, ecfg: EvalConfig, where: str) -> None:
    """Validate the stage keys of this module (the runner calls it before writing anything)."""
    from amisbench.datasets._augment import parse_augment

    if sc.augment is not None:
        parse_augment(sc.augment, f"{where}.augment")
    needs = selection_metric(sc, where) or plateau_metric(sc, where)
    if needs and sc.eval_every < 1:
        # (with plateau_metric train_loss, eval_every is the period of the plateau's observations)
        raise UserError(f"{where}.eval_every: expected a positive number of steps with select '{sc.select}' and "
                        f"schedule '{sc.schedule}', got {sc.eval_every}")
    if sc.eval_every < 0 or sc.patience < 0 or sc.plateau_threshold < 0:
        raise UserError(f"{where}: eval_every, patience and plateau_threshold must be non-negative")
    needs = needs and needs_validation(sc)
    if needs and (ecfg.val_images < 1 or ecfg.val_samples < 1):
        raise UserError(f"eval.val_images and eval.val_samples: expected positive counts, got {ecfg.val_images} "
                        f"and {ecfg.val_samples}")
    if needs and not 0 < ecfg.val_carve_fraction < 1:
        raise UserError(f"eval.val_carve_fraction: expected a fraction in (0, 1), got {ecfg.val_carve_fraction}")


def needs_validation(sc: StageConfig) -> bool:
    return sc.select != "last" or (sc.schedule == "plateau" and sc.plateau_metric not in TRAIN_LOSSES)


def stage_augment(sc: StageConfig, dataset: Any):
    """The augmentation function (image, masks, generator) -> (image, masks) of a stage, or None."""
    if sc.augment is None:
        return getattr(dataset, "augment", None)
    from amisbench.datasets._augment import apply_augment, parse_augment

    transforms = parse_augment(sc.augment)
    if not transforms:
        return None
    return lambda image, masks, g: apply_augment(transforms, image, masks, g)


def describe_augment(sc: StageConfig, dataset: Any) -> str:
    """One line naming a stage's augmentation (run.json)."""
    if sc.augment is None:
        c = getattr(dataset, "cfg", None)
        if c is not None and hasattr(c, "hflip"):
            return (f"dataset default (hflip {c.hflip}, vflip {c.vflip}, rotate_deg {c.rotate_deg}, "
                    f"scale_range {list(c.scale_range)})")
        return "none"
    from amisbench.datasets._augment import parse_augment

    return ", ".join(t.describe() for t in parse_augment(sc.augment)) or "none"


# ----------------------------------------------------------------------------------------------------
# the validation split
# ----------------------------------------------------------------------------------------------------

class Subset:
    """Rows ``indices`` of a dataset, with its ids, groups, spec, augmentation and true reader masks."""

    def __init__(self, base: Any, indices: list[int]):
        self.base = base
        self.indices = list(indices)
        self.spec = base.spec
        self.cfg = getattr(base, "cfg", None)
        if hasattr(base, "augment"):
            self.augment = base.augment
        if hasattr(base, "true_masks"):
            self.true_masks = lambda i, n, seed: base.true_masks(self.indices[i], n, seed)
        if hasattr(base, "stage_rows"):
            self.stage_rows = self._stage_rows

    def _stage_rows(self, stage: str) -> list[int] | None:
        """The base's rows of a stage (e.g. ATFM's GTR part), as positions in this subset."""
        rows = self.base.stage_rows(stage)
        if rows is None:
            return None
        keep = set(rows)
        return [j for j, i in enumerate(self.indices) if i in keep]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self.indices):
            raise IndexError(i)
        return self.base[self.indices[i]]

    @property
    def ids(self) -> list[str]:
        ids = self.base.ids
        return [ids[i] for i in self.indices]


def _groups(ds: Any) -> list[str]:
    groups = getattr(ds, "groups", None)
    if groups is not None:
        return list(groups)
    if hasattr(ds, "group_of") and hasattr(ds, "global_indices"):
        return [ds.group_of(gi) for gi in ds.global_indices]
    return list(ds.ids)


def carve(train: Any, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Split a training set into (train, validation) by whole groups: a seeded permutation of the groups is
    taken into validation until it holds at least ``fraction`` of the rows."""
    groups = _groups(train)
    order = sorted(set(groups))
    g = torch.Generator().manual_seed(derive_seed("carve", seed))
    perm = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    want = max(1, math.ceil(fraction * len(groups)))
    chosen: set[str] = set()
    count = 0
    for grp in perm:
        if count >= want or len(chosen) == len(order) - 1:
            break
        chosen.add(grp)
        count += groups.count(grp)
    val = [i for i, grp in enumerate(groups) if grp in chosen]
    rest = [i for i, grp in enumerate(groups) if grp not in chosen]
    return Subset(train, rest), Subset(train, val)


def validation_split(dcls: Any, cfg: Any, train: Any, split_hash) -> tuple[Any, Any, str]:
    """(training set, validation set, label). The protocol's own validation split when it differs from the
    test split; otherwise a part carved from train, labelled in run.json."""
    val = dcls(cfg.dataset, "val")
    test = dcls(cfg.dataset, "test")
    if split_hash(val) != split_hash(test):
        return train, val, "val"
    seed = derive_seed("carve", getattr(cfg.dataset, "split_seed", 0), getattr(cfg.dataset, "seed", 0))
    train2, val2 = carve(train, cfg.eval.val_carve_fraction, seed)
    label = (f"carved from train: {len(val2)} of {len(train)} training images (whole groups, fraction "
             f"{cfg.eval.val_carve_fraction}), because this protocol's validation split is its test split")
    return train2, val2, label


# ----------------------------------------------------------------------------------------------------
# validation, selection and the plateau schedule
# ----------------------------------------------------------------------------------------------------

def validation_config(ecfg: EvalConfig) -> EvalConfig:
    n = ecfg.val_samples
    return dataclasses.replace(ecfg, split="val", n_samples=n, ged_ns=(n,), hm_iou_n=n, mdm_n=n,
                               max_images=ecfg.val_images)


def validate(model: torch.nn.Module, val_ds: Any, ecfg: EvalConfig, *, seed: int, device: torch.device,
             out_dir: Path) -> dict[str, float]:
    """Score the model on the validation set; the training RNG streams are left as they were."""
    from .evaluate import evaluate

    vcfg = validation_config(ecfg)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        means = evaluate(model, val_ds, vcfg, seed=derive_seed("val", seed), device=device, out_dir=out_dir)
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        shutil.rmtree(out_dir, ignore_errors=True)
    n = vcfg.n_samples
    out = {}
    for base in _metrics():
        key = f"{base}_{n}"
        if key in means:
            out[base] = means[key]
    return out


def improved(value: float, best: float | None, metric: str, threshold: float = 0.0) -> bool:
    """Strictly better than ``best`` (by more than ``threshold`` relative, torch's rel mode)."""
    if best is None:
        return math.isfinite(value)
    if _directions()[metric] < 0:
        return value < best * (1 - threshold) if best >= 0 else value < best * (1 + threshold)
    return value > best * (1 + threshold) if best >= 0 else value > best * (1 - threshold)


class Plateau:
    """Reduce-on-plateau factor of the learning rate (a multiplier on top of warm-up), checkpointed."""

    def __init__(self, sc: StageConfig, metric: str):
        self.sc = sc
        self.metric = metric
        self.factor = 1.0
        self.best: float | None = None
        self.bad = 0
        self.loss_sum, self.loss_n = 0.0, 0  # plateau_metric train_loss: the steps since the last observation

    def add_loss(self, value: float) -> None:
        if self.metric in TRAIN_LOSSES:
            self.loss_sum += value
            self.loss_n += 1

    def mean_loss(self) -> float | None:
        """The mean training loss since the last call (``train_loss``: then start anew) or since the stage began
        (``train_loss_cumulative``); None when no step was taken."""
        if not self.loss_n:
            return None
        mean = self.loss_sum / self.loss_n
        if self.metric == TRAIN_LOSS:
            self.loss_sum, self.loss_n = 0.0, 0
        return mean

    def floor(self) -> float:
        return self.sc.min_lr / self.sc.lr if self.sc.lr > 0 else 0.0

    def observe(self, value: float) -> bool:
        """Record one validation value; True when the factor was just reduced."""
        if improved(value, self.best, self.metric, self.sc.plateau_threshold):
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        if self.bad > self.sc.patience and self.factor > self.floor():
            self.factor = max(self.floor(), self.factor * self.sc.gamma)
            self.bad = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {"factor": self.factor, "best": self.best, "bad": self.bad, "loss_sum": self.loss_sum,
                "loss_n": self.loss_n}

    def load_state_dict(self, state: dict) -> None:
        self.factor, self.best, self.bad = state["factor"], state["best"], state["bad"]
        self.loss_sum, self.loss_n = state.get("loss_sum", 0.0), state.get("loss_n", 0)
