"""Streaming evaluation: draw n samples per test image in batches and score prefixes of the same draw.

Per batch of images, one call of ``method.sample(images, N)`` (N = ``eval.n_samples``, 100 by default)
gives the samples; GED at every n of ``eval.ged_ns``, HM-IoU and MDM at their n, and the sample diversity
are computed on prefixes of that one draw (:func:`amisbench.metrics.table_metrics`). On datasets that can
draw from their true reader distribution (``true_masks``), ``GED_true_<N>`` scores the samples against
``eval.true_samples`` such draws. Memory does not grow with the test set: each batch's values go to a
partial file, which also lets a killed evaluation resume at the next unfinished batch. Every batch draws
from its own generator seeded by (seed, batch index), so resuming reproduces the uninterrupted numbers.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import metrics as M
from .api import SampleContext
from .config import EvalConfig
from .errors import SampleError
from .seeding import derive_seed, generator
from .store import atomic_write_text

PARTIAL = "per_image.partial.csv"


def _read_partial(path: Path) -> tuple[list[list[str]], int]:
    if not path.is_file():
        return [], 0
    rows = list(csv.reader(path.open()))
    done = 0
    body = []
    for r in rows[1:]:
        if r and r[0] == "#batch":
            done = int(r[1])
        else:
            body.append(r)
    return body, done


def _write_rows(path: Path, rows: list[list[Any]], done: int | None = None) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "metric", "value"])
    for r in rows:
        w.writerow(r)
    if done is not None:
        w.writerow(["#batch", done, ""])
    atomic_write_text(path, buf.getvalue())


def _write_groups(path: Path, dataset: Any, n: int) -> None:
    """``id,group`` of the first ``n`` images (the patient on LIDC): the statistics resample whole groups.
    Datasets without ``ids``/``groups`` properties write nothing (the statistics then resample images)."""
    ids, groups = getattr(dataset, "ids", None), getattr(dataset, "groups", None)
    if ids is None or groups is None:
        return
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "group"])
    w.writerows(zip(ids[:n], groups[:n]))
    atomic_write_text(path, buf.getvalue())


def sample_items(method: torch.nn.Module, dataset: Any, indices: list[int], images: torch.Tensor, n: int, *,
                 generator: torch.Generator | None, ids: list[str] | None = None) -> torch.Tensor:
    """``method.sample`` of the dataset items ``indices`` (their images stacked on the device), with the
    :class:`SampleContext` that reference methods (``wants_context``) need, and the output checked.

    Every caller that samples dataset images (evaluation, figures, timing) goes through here.
    """
    ctx = None
    if getattr(method, "wants_context", False):
        ctx = SampleContext(dataset, list(indices), ids if ids is not None else [dataset[i]["id"] for i in indices])
    with torch.no_grad():
        samples = method.sample(images, n, generator=generator, context=ctx)
    expected = (len(indices), n, *images.shape[-2:])
    if tuple(samples.shape) != expected or samples.dtype != torch.bool:
        raise SampleError(f"{type(method).__name__}.sample returned {samples.dtype} {tuple(samples.shape)}; "
                           f"expected torch.bool {expected}")
    return samples


def evaluate(method: torch.nn.Module, dataset: Any, ecfg: EvalConfig, *, seed: int, device: torch.device,
             out_dir: Path, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Score ``method`` on ``dataset``; writes ``per_image.csv`` into ``out_dir`` and returns the means.

    Returns:
        Mapping metric name -> mean over images (plus ``n_images``).
    """
    n_total = len(dataset) if ecfg.max_images is None else min(len(dataset), ecfg.max_images)
    if n_total == 0:
        raise ValueError("the evaluation split is empty")
    bsz = max(1, ecfg.batch_images)
    n_batches = math.ceil(n_total / bsz)
    partial = Path(out_dir) / PARTIAL
    rows, done = _read_partial(partial)
    has_truth = hasattr(dataset, "true_masks") and ecfg.true_samples > 0
    ns = tuple(n for n in ecfg.ged_ns if n <= ecfg.n_samples)
    method.eval()
    for b in range(done, n_batches):
        idx = list(range(b * bsz, min(n_total, (b + 1) * bsz)))
        items = [dataset[i] for i in idx]
        images = torch.stack([it["image"] for it in items]).to(device)
        gts = torch.stack([it["masks"] for it in items]).to(device).bool()
        g = generator(device, "eval", seed, b)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ecfg.amp and device.type == "cuda"):
            samples = sample_items(method, dataset, idx, images, ecfg.n_samples, generator=g,
                                   ids=[it["id"] for it in items])
        vals = M.table_metrics(samples, gts, ns=ns, hm_n=ecfg.hm_iou_n, mdm_n=ecfg.mdm_n)
        if has_truth:
            truth = np.stack([dataset.true_masks(i, ecfg.true_samples, derive_seed("true", i)) for i in idx])
            truth_t = torch.from_numpy(truth).to(device).bool()
            vals[f"GED_true_{ecfg.n_samples}"] = M.ged(samples, truth_t)
        for key, v in vals.items():
            v = v.detach().double().cpu().numpy()
            for j, it in enumerate(items):
                rows.append([it["id"], key, repr(float(v[j]))])
        _write_rows(partial, rows, done=b + 1)
        if progress is not None:
            progress(b + 1, n_batches)
    _write_rows(Path(out_dir) / "per_image.csv", rows)
    _write_groups(Path(out_dir) / "groups.csv", dataset, n_total)
    partial.unlink(missing_ok=True)
    means: dict[str, list[float]] = {}
    for _, key, v in rows:
        means.setdefault(key, []).append(float(v))
    out = {k: float(np.mean(v)) for k, v in means.items()}
    out["n_images"] = n_total
    return out
