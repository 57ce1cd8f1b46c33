"""The runner: trains every stage of a method, checkpoints and resumes, evaluates, writes the run folder.

It owns what must be identical for every method in a fair benchmark: seeding, device, optimizer and
schedule per stage, EMA, gradient clipping, the NaN/inf guard, checkpoints every ``ckpt_every`` steps and
at the end of each stage, resume, evaluation and the results files. It never knows a method by name.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import time
import dataclasses
from pathlib import Path
from typing import Any

import torch

from .config import Resolved, StageConfig, check_values, resolve
from .env import environment, git_info, pick_device
from .errors import RunFailed, SampleError, UserError
from .factory import build_method, check_state, load_weights
from .evaluate import evaluate, sample_items
from .loggers import check_tensorboard, open_logger
from .pace import estimate
from .progress import Reporter
from .registry import DATASETS, METHODS
from .seeding import derive_seed, generator
from . import selection as SEL
from .store import (CheckpointError, FolderLock, WriteFailed, atomic_write_text, check_output_dir,
                    clean_temporaries, default_results, finished_hash, is_done, load_torch, RunSpec, run_label,
                    save_torch, write_json, write_yaml)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

def stage_steps(sc: StageConfig, n_train: int, where: str) -> int:
    if sc.steps is not None:
        if sc.steps < 0:
            raise UserError(f"{where}.steps: expected a non-negative integer, got {sc.steps}")
        return sc.steps
    if sc.epochs is None:
        raise UserError(f"{where}: set steps or epochs")
    return int(math.ceil(sc.epochs * math.ceil(n_train / sc.batch_size)))


def make_optimizer(params: list[torch.nn.Parameter], sc: StageConfig) -> torch.optim.Optimizer:
    if sc.optimizer == "adam":
        return torch.optim.Adam(params, lr=sc.lr, betas=sc.betas, weight_decay=sc.weight_decay)
    if sc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=sc.lr, betas=sc.betas, weight_decay=sc.weight_decay)
    return torch.optim.SGD(params, lr=sc.lr, momentum=sc.betas[0], weight_decay=sc.weight_decay)


def lr_factor(sc: StageConfig, total: int, plateau: SEL.Plateau | None = None):
    """Multiplier of ``sc.lr`` at optimizer step ``step`` (0-based) of a stage of ``total`` steps: linear
    warm-up, then constant, linear (polynomial of power 1, CCDM's release) or cosine decay reaching
    ``min_lr`` at the last step, step decay, or the current factor of a reduce-on-plateau schedule."""
    floor = sc.min_lr / sc.lr if sc.lr > 0 else 0.0

    def f(step: int) -> float:
        if sc.warmup_steps and step < sc.warmup_steps:
            return (step + 1) / sc.warmup_steps
        if plateau is not None:
            return plateau.factor
        if sc.schedule in ("linear", "cosine"):
            frac = min(1.0, (step - sc.warmup_steps) / max(1, total - 1 - sc.warmup_steps))
            shape = 1 - frac if sc.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
            return floor + (1 - floor) * shape
        if sc.schedule == "step" and sc.step_size > 0:
            return sc.gamma ** (step // sc.step_size)
        return 1.0

    return f


def batch_indices(seed: int, stage: str, step: int, n: int, batch_size: int) -> list[int]:
    """Indices of the training batch at ``step``: epoch-wise permutations seeded by (seed, stage, epoch),
    so the order is a pure function of the step (nothing to checkpoint) and resumes exactly."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(derive_seed("order", seed, stage, epoch))
    perm = torch.randperm(n, generator=g).tolist()
    if n < batch_size:
        return (perm * math.ceil(batch_size / n))[:batch_size]
    return perm[k * batch_size:(k + 1) * batch_size]


def collate(dataset: Any, idx: list[int], device: torch.device, aug_seed: tuple | None = None, augment=None):
    """Stack the items ``idx``; with ``aug_seed``, augment each one by ``augment`` (default: the dataset's)
    from a generator seeded by (aug_seed, position in the batch)."""
    images, masks = [], []
    augment = augment if augment is not None else getattr(dataset, "augment", None)
    for j, i in enumerate(idx):
        it = dataset[i]
        im, mk = it["image"], it["masks"]
        if augment is not None and aug_seed is not None:
            im, mk = augment(im, mk, torch.Generator().manual_seed(derive_seed("aug", *aug_seed, j)))
        images.append(im)
        masks.append(mk)
    return torch.stack(images).to(device).float(), torch.stack(masks).to(device).float()


def forward(model: Any, stage: str, sc: StageConfig, dev: torch.device, images: torch.Tensor,
            masks: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch (float32), under bf16 autocast when the stage asks for it on CUDA."""
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=sc.amp and dev.type == "cuda"):
        loss, logs = model.loss(stage, images, masks)
    return loss.float(), logs


def update(loss: torch.Tensor, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, sched: Any,
           sc: StageConfig) -> float | None:
    """One optimizer step on ``loss`` (gradient clipping if set); returns the gradient norm if clipped."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = float(torch.nn.utils.clip_grad_norm_(params, sc.grad_clip)) if sc.grad_clip else None
    opt.step()
    sched.step()
    return gnorm


def split_hash(dataset: Any) -> str | None:
    h = getattr(dataset, "split_hash", None)
    if h is not None:
        return h
    ids = getattr(dataset, "ids", None)
    if ids is None:
        return None
    import hashlib

    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _rows_to_csv(rows: list[dict]) -> str:
    if not rows:
        return "stage,step\n"
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------

TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,-]*")


def check_tag(tag: str | None) -> None:
    if tag is not None and (not TAG_RE.fullmatch(tag) or len(tag) > 100):
        raise UserError(f"--tag {tag!r}: expected letters, digits and . _ = , - (starting with a letter or "
                        "digit), e.g. --tag lr3e-4")


def prepare(spec: RunSpec) -> tuple[Resolved, Path]:
    """Resolve the config and the run folder; validates everything and writes nothing."""
    check_tag(spec.tag)
    sets = list(spec.sets or [])
    labels = list(spec.set_labels or [])
    labels += ["--set"] * (len(sets) - len(labels))
    if spec.seed < 0:
        raise UserError(f"--seed {spec.seed}: expected a non-negative integer")
    res = resolve(spec.method, spec.dataset, spec.profile, spec.variant, sets, set_labels=labels,
                  data_root=spec.data_root, protocol=spec.protocol)
    check_values(res.cfg)  # values the types alone do not check (grid validates through here)
    for stage, sc in res.cfg.train.items():
        SEL.check_stage(sc, res.cfg.eval, f"train.{stage}")
    protocol = getattr(res.cfg.dataset, "protocol", None)
    default_protocol = getattr(type(res.cfg.dataset)(), "protocol", None)
    if res.cfg.logger == "tensorboard":
        check_tensorboard()
    results = check_output_dir(Path(spec.results or default_results()), "--results")
    folder = dataclasses.replace(spec, protocol=protocol if protocol != default_protocol else None).path(results)
    return res, folder


def run(method: str, dataset: str, *, seed: int = 0, profile: str = "quick", variant: str | None = None,
        sets: list[str] | None = None, device: str = "cpu", results: Path | str | None = None,
        force: bool = False, data_root: str | None = None, protocol: str | None = None,
        quiet: bool = False) -> Path:
    """Train and evaluate one (method, dataset, seed, profile, variant); returns the run folder."""
    spec = RunSpec(method, dataset, seed, profile, variant, sets, device, results, force, data_root, protocol)
    return run_spec(spec, Reporter(quiet))


def run_spec(spec: RunSpec, rep: Reporter) -> Path:
    """Run one spec while holding its folder's lock (a second command on the folder is refused, naming this
    one); temporaries of a killed write are removed first; a failed write says what is still intact."""
    res, folder = prepare(spec)
    dev = pick_device(spec.device)
    with FolderLock(folder):
        ckpt_path = folder / "ckpt" / "last.pt"
        try:
            return _run_locked(spec, rep, res, folder, dev)
        except WriteFailed as e:
            kept = (f"the last checkpoint {ckpt_path} is intact; free space (or fix the folder) and rerun the same "
                    "command to resume from it") if ckpt_path.is_file() else "no checkpoint had been written yet"
            raise UserError(f"{e}; {kept}") from None


def check_memory(res: Resolved, data_spec: Any, dev: torch.device) -> None:
    """Refuse a config whose model cannot fit: parameters counted on the ``meta`` device (nothing allocated),
    4 bytes each (float32 weights) and 12 more for a trainable one (its gradient and two Adam moments), against
    the memory of ``dev``. Activations come on top, so this is a lower bound."""
    try:
        params = list(build_method(res, data_spec, device="meta").parameters())
        n = sum(p.numel() for p in params)
        need = 4 * n + 12 * sum(p.numel() for p in params if p.requires_grad)
    except Exception:  # noqa: BLE001 - a bad config is reported by the real build; a method that cannot be
        return         # built on meta is not estimated
    if dev.type == "cuda":
        have, where = torch.cuda.get_device_properties(dev).total_memory, f"{dev} has"
    else:
        try:
            have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
        except (ValueError, OSError, AttributeError):
            return
    if need > have:
        raise UserError(f"{res.method} with this config has {n:,} parameters and needs at least {need / 2**30:,.1f} GiB "
                        f"for its weights, gradients and optimizer state, but {where} {have / 2**30:,.1f} GiB; "
                        "lower the sizes in the method's config (e.g. method.rank or the U-Net widths)")


def _run_locked(spec: RunSpec, rep: Reporter, res: Resolved, folder: Path, dev: torch.device) -> Path:
    cfg = res.cfg
    chash = res.hash()
    name = f"{run_label(spec.method, spec.variant)} on {spec.dataset} ({spec.profile}, seed {spec.seed})"
    if folder.exists() and spec.force:
        shutil.rmtree(folder)
    clean_temporaries(folder)  # of a write killed mid-way (e.g. ckpt/.last.pt.<random>.tmp)
    if is_done(folder):
        try:
            old = finished_hash(folder)
        except UserError as e:
            raise UserError(f"{e}; pass --force to run it again") from None
        if old != chash:
            raise UserError(f"{folder} holds a finished run with another config (hash {old}, now {chash}); "
                            "pass --tag NAME to run this config beside it, --force to replace it, or choose "
                            "another --results folder")
        rep.line(f"{name}: finished already ({folder}); --force reruns it")
        return folder

    mcls = METHODS.get(spec.method)
    dcls = DATASETS.get(spec.dataset)
    train_ds = dcls(cfg.dataset, "train")
    eval_ds = dcls(cfg.dataset, cfg.eval.split)
    val_ds, val_label = None, None
    if any(SEL.needs_validation(sc) for sc in cfg.train.values()):
        train_ds, val_ds, val_label = SEL.validation_split(dcls, cfg, train_ds, split_hash)
    subsets = {s: getattr(train_ds, "stage_rows", lambda _: None)(s) for s in cfg.train}  # a stage's part
    budgets = {s: stage_steps(sc, len(subsets[s]) if subsets[s] is not None else len(train_ds), f"train.{s}")
               for s, sc in cfg.train.items()}

    ckpt_path = folder / "ckpt" / "last.pt"
    state = None
    if ckpt_path.is_file():  # checksum verified, then the contents checked: never resume from garbage
        state = check_state(load_torch(ckpt_path), ckpt_path)
        if state.get("config_hash") != chash:
            raise UserError(f"{folder} holds a checkpoint of another config (hash {state.get('config_hash')}, "
                            f"now {chash}); pass --tag NAME to run this config beside it, --force to start over, "
                            "or choose another --results folder")
    check_memory(res, train_ds.spec, dev)
    model = build_method(res, train_ds.spec, device=dev, seed=spec.seed)
    if state:  # before anything is written: a checkpoint that does not fit is refused with the folder untouched
        load_weights(model, state["model"], ckpt_path)
    folder.mkdir(parents=True, exist_ok=True)
    write_yaml(folder / "config.yaml", {"sources": res.sources, **res.plain()})
    extra_log = open_logger(cfg.logger, folder)
    log_rows: list[dict] = state["log"] if state else []
    done_stages: list[str] = list(state["done_stages"]) if state else []
    timings: dict[str, float] = dict(state.get("timings", {})) if state else {}
    if state:
        rep.line(f"{name}: resuming from {ckpt_path} (stage {state['stage']}, step {state['step']})")
    else:
        rep.line(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                 f"stages {', '.join(f'{s}={budgets[s]} steps' for s in mcls.stages)}")

    if spec.estimate and not rep.quiet:
        left = {s: 0 if s in done_stages else budgets[s] - (state["step"] if state and state["stage"] == s else 0)
                for s in mcls.stages}
        for text in pre_estimate(model, mcls.stages, left, cfg, train_ds, eval_ds, dev, spec.seed):
            rep.line(f"{name}: {text}")

    selection: dict[str, dict] = dict(state.get("selection", {})) if state else {}

    def checkpoint(stage: str, step: int, opt, sched, ema, extra_time: float, path: Path | None = None,
                   plateau: SEL.Plateau | None = None) -> None:
        save_torch(path or ckpt_path, {
            "selection": selection, "plateau": plateau.state_dict() if plateau else None,
            "config_hash": chash, "model": model.state_dict(), "stage": stage, "step": step,
            "optimizer": opt.state_dict() if opt else None, "scheduler": sched.state_dict() if sched else None,
            "ema": ema, "done_stages": done_stages, "log": log_rows,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            "timings": {**timings, **({stage: extra_time} if stage not in done_stages else {})},
        })
        atomic_write_text(folder / "train_log.csv", _rows_to_csv(log_rows))

    for stage in mcls.stages:
        if stage in done_stages:
            continue
        sc = cfg.train[stage]
        total = budgets[stage]
        model.on_stage_start(stage)
        params = [p for p in model.trainable(stage) if p.requires_grad]
        if total > 0 and not params:
            raise RunFailed(f"{spec.method}: stage '{stage}' has no trainable parameters")
        opt = make_optimizer(params, sc) if total > 0 else None
        pmetric = SEL.plateau_metric(sc, f"train.{stage}")
        plateau = SEL.Plateau(sc, pmetric) if pmetric else None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(sc, total, plateau)) if opt else None
        ema = {f"{i}": p.detach().clone() for i, p in enumerate(params)} if sc.ema_decay else None
        smetric = SEL.selection_metric(sc, f"train.{stage}")
        augment = SEL.stage_augment(sc, train_ds)
        if smetric and stage not in selection:
            selection[stage] = {"select": sc.select, "metric": f"{smetric}_{cfg.eval.val_samples}", "step": None,
                                "value": None, "validation": val_label,
                                "val_images": min(len(val_ds), cfg.eval.val_images)}
        step = 0
        stage_time = 0.0
        if state and state["stage"] == stage:
            step = state["step"]
            stage_time = state.get("timings", {}).get(stage, 0.0)
            if opt and state.get("optimizer"):
                try:
                    opt.load_state_dict(state["optimizer"])
                    sched.load_state_dict(state["scheduler"])
                except (ValueError, KeyError, TypeError, RuntimeError) as e:
                    raise CheckpointError(f"checkpoint {ckpt_path}: its optimizer state does not fit this stage "
                                          f"({e}); delete it or pass --force to start over") from None
            ema = state["ema"] if sc.ema_decay else None
            if plateau is not None and state.get("plateau"):
                plateau.load_state_dict(state["plateau"])
            torch.set_rng_state(state["rng"])
            if dev.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], dev)
        else:
            torch.manual_seed(derive_seed("train", spec.seed, stage))
        rep.start(f"{stage}", total, step)
        t0 = time.time() - stage_time
        try:
            while step < total:
                model.train()
                sub = subsets[stage]
                idx = batch_indices(spec.seed, stage, step, len(sub) if sub is not None else len(train_ds),
                                    sc.batch_size)
                if sub is not None:
                    idx = [sub[i] for i in idx]
                images, masks = collate(train_ds, idx, dev, (spec.seed, stage, step), augment)
                loss, logs = forward(model, stage, sc, dev, images, masks)
                if not torch.isfinite(loss):
                    raise RunFailed(
                        f"training diverged: the {stage} loss is {float(loss.detach())} at step {step + 1} of "
                        f"{spec.method} on {spec.dataset} (seed {spec.seed}); lower train.{stage}.lr "
                        f"(now {sc.lr:g}) or set train.{stage}.grad_clip; the last checkpoint is kept")
                gnorm = update(loss, params, opt, sched, sc)
                if plateau is not None and plateau.metric in SEL.TRAIN_LOSSES:  # (a host sync: only when watched)
                    plateau.add_loss(float(loss.detach()))
                if ema is not None:
                    with torch.no_grad():
                        for i, p in enumerate(params):
                            ema[f"{i}"].mul_(sc.ema_decay).add_(p.detach(), alpha=1 - sc.ema_decay)
                step += 1
                if step % sc.log_every == 0 or step == total:
                    row = {"stage": stage, "step": step, "loss": float(loss.detach()),
                           "lr": sched.get_last_lr()[0], "time_s": round(time.time() - t0, 3)}
                    if gnorm is not None:
                        row["grad_norm"] = gnorm
                    row.update({k: float(v) for k, v in logs.items()})
                    log_rows.append(row)
                    if extra_log is not None:
                        extra_log.log(row)
                rep.update(step, f"loss {float(loss.detach()):.4f}", every=sc.log_every)
                saved = False
                if (smetric or plateau) and (val_ds is not None or not SEL.needs_validation(sc)) \
                        and (step % sc.eval_every == 0 or step == total):
                    saved = _validation_step(model, val_ds, cfg.eval, spec.seed, dev, folder, stage, step, sc,
                                             params, ema, plateau, opt, sched, selection, log_rows,
                                             lambda path: checkpoint(stage, step, opt, sched, ema,
                                                                     time.time() - t0, path, plateau))
                if (saved or step % sc.ckpt_every == 0) and step < total:
                    checkpoint(stage, step, opt, sched, ema, time.time() - t0, plateau=plateau)
        finally:
            rep.stop()
        if smetric and selection[stage]["step"] is not None and selection[stage]["step"] != step:
            best_path = folder / "ckpt" / "best.pt"
            best = check_state(load_torch(best_path, map_location=dev), best_path)  # the selected weights
            load_weights(model, best["model"], best_path)
            ema = best["ema"]
            rep.line(f"{name}: {stage} selected step {selection[stage]['step']} "
                     f"({selection[stage]['metric']} {selection[stage]['value']:.4f} on validation)")
        if ema is not None:
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.copy_(ema[f"{i}"])
        done_stages.append(stage)
        timings[stage] = round(time.time() - t0, 3)
        checkpoint(stage, step, None, None, None, timings[stage])
    if extra_log is not None:
        extra_log.close()

    rep.line(f"{name}: evaluating on {cfg.eval.split} "
             f"({min(len(eval_ds), cfg.eval.max_images or len(eval_ds))} images x {cfg.eval.n_samples} samples)")
    t_eval = time.time()
    if cfg.eval.compile:
        from .api import compile_networks

        rep.line(f"{name}: compiling {', '.join(compile_networks(model)) or 'nothing'} with torch.compile")
    n_batches = math.ceil(min(len(eval_ds), cfg.eval.max_images or len(eval_ds)) / max(1, cfg.eval.batch_images))
    rep.start("eval", n_batches)
    try:
        means = evaluate(model, eval_ds, cfg.eval, seed=spec.seed, device=dev, out_dir=folder,
                         progress=lambda d, t: rep.update(d))
    except SampleError as e:
        raise RunFailed(str(e)) from None
    finally:
        rep.stop()
    timings["eval"] = round(time.time() - t_eval, 3)
    write_json(folder / "metrics.json", means)
    atomic_write_text(folder / "train_log.csv", _rows_to_csv(log_rows))
    protocol = getattr(cfg.dataset, "protocol", None)
    labels = getattr(dcls, "protocol_labels", {}) or {}
    info = {
        "status": "done", "method": spec.method, "variant": spec.variant, "tag": spec.tag, "dataset": spec.dataset,
        "profile": spec.profile, "seed": spec.seed, "protocol": protocol,
        "protocol_label": "; ".join(filter(None, [labels.get(protocol) if protocol else None,
                                                   getattr(model, "weights_label", "")])) or None,
        "config_hash": chash, "split_hash": {"train": split_hash(train_ds), cfg.eval.split: split_hash(eval_ds)},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": timings,
        "parameters": sum(p.numel() for p in model.parameters()), "nfe_per_100_samples": model.nfe(100),
        "git": git_info(), "env": environment(dev), "deterministic": dev.type == "cpu",
        "selection": selection or None,
        "augment": {s: SEL.describe_augment(cfg.train[s], train_ds) for s in mcls.stages},
    }
    write_json(folder / "run.json", info)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "n_images")
    rep.line(f"{name}: {summary}")
    return folder


def warmup_step(cfg: Any, train_ds: Any, dev: torch.device, seed: int, left: dict[str, int]):
    """A ``train_step(model, stage, k)`` for :func:`amisbench.pace.estimate`: this runner's training step
    (batch ``k`` of ``stage``, loss, optimizer step); ``k = -1`` builds the stage's optimizer."""
    optimisers: dict[str, tuple] = {}

    def train_step(twin: torch.nn.Module, stage: str, k: int) -> None:
        sc = cfg.train[stage]
        if k < 0:
            params = [p for p in twin.trainable(stage) if p.requires_grad]
            opt = make_optimizer(params, sc)
            total = max(1, left.get(stage, 1))
            optimisers[stage] = (params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(sc, total)))
            return
        params, opt, sched = optimisers[stage]
        images, masks = collate(train_ds, batch_indices(seed, stage, k, len(train_ds), sc.batch_size), dev,
                                (seed, stage, k), SEL.stage_augment(sc, train_ds))
        update(forward(twin, stage, sc, dev, images, masks)[0], params, opt, sched, sc)

    return train_step


def pre_estimate(model: torch.nn.Module, stages: list[str], left: dict[str, int], cfg: Any, train_ds: Any,
                 eval_ds: Any, dev: torch.device, seed: int) -> list[str]:
    """The estimate lines printed before training (:func:`amisbench.pace.estimate` with this runner's training
    step and the evaluator's sampling call); the run itself is unchanged by it."""
    n_eval = min(len(eval_ds), cfg.eval.max_images or len(eval_ds))

    def eval_call(twin: torch.nn.Module, k: int, n: int) -> None:
        idx = list(range(k))
        images = torch.stack([eval_ds[i]["image"] for i in idx]).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.eval.amp and dev.type == "cuda"):
            sample_items(twin, eval_ds, idx, images, n, generator=generator(dev, "estimate", seed))

    est = estimate(model, list(stages), left, train_step=warmup_step(cfg, train_ds, dev, seed, left),
                   eval_call=eval_call, eval_images=n_eval, eval_batch=max(1, cfg.eval.batch_images),
                   eval_samples=cfg.eval.n_samples, device=dev)
    return est.lines(cfg.eval.n_samples)


def _validation_step(model, val_ds, ecfg, seed, dev, folder, stage, step, sc, params, ema, plateau, opt, sched,
                     selection, log_rows, save) -> bool:
    """Score the validation set at ``step`` (with the EMA weights when the stage keeps an EMA), log it, feed
    the plateau schedule and, on a new best, write ckpt/best.pt through ``save``. True when it saved."""
    backup = None
    if ema is not None:
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for i, p in enumerate(params):
                p.copy_(ema[f"{i}"])
    rec = selection.get(stage)
    try:
        vals = SEL.validate(model, val_ds, ecfg, seed=seed, device=dev, out_dir=folder / "val_tmp") \
            if rec is not None or (plateau is not None and plateau.metric not in SEL.TRAIN_LOSSES) else {}
    finally:
        if backup is not None:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
    n = ecfg.val_samples
    row = {f"val_{k}_{n}": v for k, v in vals.items()}
    if plateau is not None and plateau.metric in SEL.TRAIN_LOSSES:
        vals = {**vals, plateau.metric: plateau.mean_loss()}
        row[f"mean_{plateau.metric}"] = vals[plateau.metric]
    log_rows.append({"stage": stage, "step": step, **row})
    if plateau is not None and vals.get(plateau.metric) is not None and plateau.observe(vals[plateau.metric]):
        for g, base, lam in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            g["lr"] = base * lam(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    if rec is None:
        return False
    metric = sc.select.partition(":")[2]
    if metric not in vals:
        raise UserError(f"train.{stage}.select: the validation set has no {metric} "
                        f"(known here: {', '.join(vals)})")
    if not SEL.improved(vals[metric], rec["value"], metric):
        return False
    rec["step"], rec["value"] = step, vals[metric]
    save(folder / "ckpt" / "best.pt")
    return True
