"""Figures 4-6 of the ATFM paper from our own runs, as PNG and PDF under ``results/figures/<dataset>/``.

* ``samples`` (Fig. 4 / 5): for chosen test images, one row for the readers and one per method (display
  names, ordered by the run's per-image GED on those images), each with ``k`` masks drawn over the image
  (fill and contour) and their per-pixel mean and variance (readers' contours dashed); two columns wide
  (``samples``) and one column wide (``samples_1col``). Without ``--images``, the most ambiguous of the
  first 64 test images are shown (largest mean pairwise 1 - IoU between readers).
* ``steps`` (Fig. 6b): GED_100 and HM-IoU_32 against the number of sampler steps, by re-evaluating the
  checkpoint of a trained run (every finished seed) with ``--set method.steps=<v>`` on the first
  ``--eval-images`` test images; the numbers go to ``steps.csv`` next to the plot and are reused on the
  next call (``--force`` recomputes).
* ``alpha`` (Fig. 6c): GED_100 and HM-IoU_32 against ``method.alpha``, from finished runs that differ in it
  (found under ``results/runs`` and ``results/sweeps/*/runs``, e.g. made with
  ``amisbench grid --method atfm --sweep method.alpha=0,1e-4,1e-3,5e-3``); mean ± std over distinct runs
  (one per value and seed), with n at every point.

``--kind all`` draws what the runs allow and says what it skipped and why.

The figures read result folders and checkpoints only; plotting uses matplotlib's Agg backend with seaborn's
theme.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..display import display_name
from ..errors import UserError
from ..store import RunSpec

if TYPE_CHECKING:
    import pandas as pd
    import torch

FIGURES = "figures"
KINDS = ("samples", "steps", "alpha")
CURVE_METRICS = ("GED_100", "HMIoU_32")


def metric_title(metric: str) -> str:
    """The axis title of a metric column, from the metric registry (``HM-IoU$_{32}$ (higher is better)``)."""
    from ..metric_registry import axis_label

    return axis_label(metric)


def _curve_keys(keys) -> list[str]:
    """The GED_n and HMIoU_n columns among ``keys`` (GED first)."""
    ged = sorted((k for k in keys if k.startswith("GED_") and k[4:].isdigit()), key=lambda k: int(k[4:]))
    hm = sorted((k for k in keys if k.startswith("HMIoU_") and k[6:].isdigit()), key=lambda k: int(k[6:]))
    return ged[-1:] + hm[-1:]


@dataclass
class Figure:
    """What a figure function made: the files, and the numbers or arrays it drew (for tests and notes)."""

    paths: list[Path]
    data: Any = None
    notes: list[str] = field(default_factory=list)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    return plt, sns


def _save(fig, out: Path, stem: str, formats: tuple[str, ...], dpi: int = 150) -> list[Path]:
    import io

    from ..store import atomic_write_bytes

    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
        p = out / f"{stem}.{fmt}"
        atomic_write_bytes(p, buf.getvalue())
        paths.append(p)
    return paths


def _finished(results: Path | str, dataset: str, label: str, profile: str | None, protocol: str | None,
              seeds: list[int] | None = None) -> pd.DataFrame:
    """One row per finished run (run_dir, seed, profile) of ``label`` on ``dataset``."""
    from ..results import scan, select_runs

    df, _ = scan(results)
    if seeds is not None:
        df = df[df["seed"].isin(seeds)]
    df, _, _ = select_runs(df, dataset, profile, protocol, label)
    runs = df.drop_duplicates("run_dir")[["run_dir", "seed", "profile", "protocol"]]
    if runs.empty:
        what = f" (profile {profile})" if profile else ""
        method, variant, _ = RunSpec.parse_label(label)
        hint = f"amisbench run --method {method}" + (f" --variant {variant}" if variant else "")
        raise UserError(f"no finished run of {label} on {dataset}{what} under {Path(results) / 'runs'}; "
                        f"train one with `{hint} --dataset {dataset}`")
    return runs.sort_values("seed").reset_index(drop=True)


def _image_rgb(img: torch.Tensor) -> np.ndarray:
    x = img.detach().float().cpu().numpy()
    x = x[0] if x.shape[0] != 3 else np.transpose(x, (1, 2, 0))
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def reader_disagreement(masks: torch.Tensor) -> float:
    """Mean pairwise 1 - IoU between the readers' masks of one image (two empty masks: IoU 1)."""
    import torch

    from ..metrics import pairwise_iou

    m = masks.bool()
    iou = pairwise_iou(m, m)
    iou = np.asarray(iou, dtype=np.float64) if not torch.is_tensor(iou) else iou.double().cpu().numpy()
    a = iou.shape[-1]
    return float((1 - iou).sum() / max(1, a * (a - 1)))


def pick_images(ds: Any, count: int, pool: int = 64) -> list[int]:
    """The ``count`` most ambiguous of the first ``pool`` images (ties: lower index first)."""
    n = min(len(ds), pool)
    scores = [(-reader_disagreement(ds[i]["masks"]), i) for i in range(n)]
    return [i for _, i in sorted(scores)[:count]]


# ----------------------------------------------------------------------------------------------------
# Fig. 4 / 5: samples
# ----------------------------------------------------------------------------------------------------

#: figure widths in inches: one column and two columns of a two-column paper (e.g. MICCAI/AAAI templates)
WIDTHS = {"1col": 3.5, "2col": 7.0}


def _per_image_metric(run_dir: Path | str, ids: list[str], metric: str | None = None) -> tuple[str | None, dict]:
    """(metric, image id -> value) from a run's per_image.csv: ``metric``, or the largest GED_n there."""
    import pandas as pd

    path = Path(run_dir) / "per_image.csv"
    if not path.is_file():
        return None, {}
    df = pd.read_csv(path, dtype={"id": str})
    if metric is None:
        metric = (_curve_keys(df["metric"].unique()) or [None])[0]
    sel = df[(df["metric"] == metric) & df["id"].isin(ids)]
    return metric, dict(zip(sel["id"], sel["value"].astype(float)))


def _draw_mask(ax, image: np.ndarray, mask: np.ndarray, color, *, fill: bool = True, lw: float = 0.9,
               hidden: bool = False) -> None:
    """A mask over its image: translucent fill and its contour (nothing drawn for an empty mask).

    ``hidden``: the mask has pixels outside the shown part of the image (labelled when none is inside)."""
    from matplotlib.colors import ListedColormap

    ax.imshow(image, cmap="gray", interpolation="nearest")
    if not mask.any():
        ax.text(0.5, 0.93, "outside view" if hidden else "empty", transform=ax.transAxes, ha="center", va="top",
                fontsize=5, color="white")
        return
    if fill:
        ax.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap([color]), alpha=0.35, interpolation="nearest")
    ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=lw)


def _draw_map(ax, image: np.ndarray, values: np.ndarray, cmap: str, vmax: float, readers: np.ndarray | None):
    """A per-pixel map (mean or variance of the samples) over the image, with the readers' contours."""
    ax.imshow(image, cmap="gray", interpolation="nearest")
    im = ax.imshow(np.ma.masked_where(values <= 0, values), cmap=cmap, vmin=0, vmax=vmax, alpha=0.85,
                   interpolation="nearest")
    if readers is not None:
        for m in readers:
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors=["white"], linewidths=0.5, linestyles="dashed")
    return im


def zoom_box(readers: np.ndarray, samples: Sequence[np.ndarray], shape: tuple[int, int], *,
             margin: float = 0.35, min_side: int = 16) -> tuple[slice, slice]:
    """The square part of an image the samples figure shows: the box of the readers' pixels and of the
    pixels set in at least two and a quarter of the shown samples (all methods together: a stray pixel, or one
    method's noise over the whole image, does not widen it), widened by ``margin`` of its side on each side and
    to at least ``min_side`` pixels, moved inside the image. The whole image when nothing is set or the box
    would cover most of it."""
    height, width = shape
    union = readers.reshape(-1, height, width).any(axis=0)
    votes = sum((m.reshape(-1, height, width).sum(axis=0) for m in samples if m.size), np.zeros(shape, int))
    shown = sum(m.reshape(-1, height, width).shape[0] for m in samples if m.size)
    union = union | (votes >= max(2, 0.25 * shown))
    if not union.any():
        return slice(0, height), slice(0, width)
    rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    side = max(min_side, int(np.ceil(side * (1 + 2 * margin))))
    if side >= 0.8 * min(height, width):
        return slice(0, height), slice(0, width)
    centre_r, centre_c = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    r0 = int(min(max(0, round(centre_r - side / 2)), height - side))
    c0 = int(min(max(0, round(centre_c - side / 2)), width - side))
    return slice(r0, r0 + side), slice(c0, c0 + side)


def method_colors(sns, n: int) -> list:
    """``n`` distinct colours for masks drawn over a grey image: seaborn's colour-blind palette, then its dark
    one, each without its grey (invisible on the image); a colour repeats only beyond 18 methods."""
    colors = [c for pal in ("colorblind", "dark") for i, c in enumerate(sns.color_palette(pal, 10)) if i != 7]
    return [colors[i % len(colors)] for i in range(max(1, n))]


def _samples_layout(plt, sns, rows: list[tuple[str, list[np.ndarray], list[str], list[np.ndarray]]],
                    images: list[np.ndarray],
                    readers: list[np.ndarray], heads: list[str], k: int, width: float, title: str):
    """The grid: one row per method (readers first), per image ``k`` sample panels, the mean and variance.

    Geometry in inches: row names on the left, the title, image headers and column titles on top, the two
    colour bars below; panels are square and fill the rest of ``width``.
    """
    per = k + 2
    ncols = per * len(images)
    left, top, bottom, gap = 0.62, 0.5, 0.38, 0.1  # inches; gap between the images' blocks
    cell = (width - left - 0.05 - gap * (len(images) - 1)) / ncols
    height = top + cell * len(rows) + bottom
    fig = plt.figure(figsize=(width, height))
    pal = method_colors(sns, len(rows) - 1)
    font = 6.0 if width < 5 else 7.0
    mean_im = var_im = None

    def axes_at(r: int, b: int, j: int):
        x = left + b * (per * cell + gap) + j * cell
        y = height - top - (r + 1) * cell
        pad = 0.02 * cell
        return fig.add_axes([(x + pad) / width, (y + pad) / height, (cell - 2 * pad) / width, (cell - 2 * pad) / height])

    for r, (name, draws, notes, outside) in enumerate(rows):
        for b, (image, masks, truth) in enumerate(zip(images, draws, readers)):
            for j in range(per):
                ax = axes_at(r, b, j)
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_linewidth(0.3)
                if j < k:
                    if j < len(masks):  # the readers in white (their dashed contours elsewhere), methods in colour
                        _draw_mask(ax, image, masks[j], "white" if r == 0 else pal[r - 1],
                                   hidden=bool(outside[b][j]))
                    else:
                        ax.set_axis_off()
                elif j == k:
                    mean_im = _draw_map(ax, image, masks.mean(0), "viridis", 1.0, None if r == 0 else truth)
                else:
                    p = masks.mean(0)
                    var_im = _draw_map(ax, image, p * (1 - p), "magma", 0.25, None if r == 0 else truth)
                if r == 0:
                    ax.set_title(str(j + 1) if j < k else ("mean" if j == k else "var."), fontsize=font - 1, pad=1.5)
                if j == 0 and b == 0:
                    ax.set_ylabel(name, fontsize=font, rotation=0, ha="right", va="center", labelpad=2)
                if j == 0 and notes[b]:
                    ax.text(0.04, 0.04, notes[b], transform=ax.transAxes, fontsize=font - 1.5, color="white",
                            va="bottom", ha="left", bbox={"facecolor": "black", "alpha": 0.6, "pad": 0.6, "lw": 0})
            if r == 0:
                x = left + b * (per * cell + gap) + per * cell / 2
                fig.text(x / width, (height - top + 0.17) / height, heads[b], ha="center", va="bottom",
                         fontsize=font - 0.5)
    for im, label, x0 in ((mean_im, "mean of the masks", 0.1), (var_im, "per-pixel variance p(1-p)", 0.55)):
        if im is not None:
            cax = fig.add_axes([x0, 0.2 / height, 0.35, 0.06 / height])
            cb = fig.colorbar(im, cax=cax, orientation="horizontal")
            cb.ax.tick_params(labelsize=font - 1.5, length=1.5, pad=1)
            cb.set_label(label, fontsize=font - 1, labelpad=1)
    import textwrap

    title = textwrap.fill(title, int(width * 19))  # within the figure's width: bbox "tight" would widen it
    top_extra = 0.1 * title.count("\n")
    fig.set_figheight(height + top_extra)
    for ax in fig.axes:  # keep the panels where they were, measured from the bottom
        pos = ax.get_position()
        ax.set_position([pos.x0, pos.y0 * height / (height + top_extra), pos.width,
                         pos.height * height / (height + top_extra)])
    for txt in fig.texts:
        x, y = txt.get_position()
        txt.set_position((x, y * height / (height + top_extra)))
    fig.text(0.5, (height + top_extra - 0.04) / (height + top_extra), title, ha="center", va="top", fontsize=font)
    return fig


def samples_figure(results: Path | str, dataset: str, methods: list[str], *, profile: str | None = None,
                   seed: int = 0, images: list[int] | None = None, n_images: int = 2, k: int = 4,
                   device: str = "cpu", protocol: str | None = None, out: Path | None = None,
                   formats: tuple[str, ...] = ("png", "pdf")) -> Figure:
    """Samples of each method over the test image (Fig. 4/5 style), sized for a paper.

    Rows: the readers, then the methods (display names) in order of their mean per-image GED on the shown
    images (from the run's per_image.csv; best first). Per image: ``k`` samples (readers in the first row)
    as translucent masks with their contours over the image, then the per-pixel mean and variance of the
    ``k`` samples (first row: of all readers), with the readers' contours dashed. ``samples.png/.pdf`` is two columns wide (7 in, every image), ``samples_1col.png/.pdf`` one
    column (3.5 in, the first image).
    """
    from ..env import pick_device
    from ..evaluate import sample_items
    from ..factory import load_trained
    from ..seeding import generator

    plt, sns = _plt()
    dev = pick_device(device)
    models, ds, run_dirs = [], None, {}
    for m in methods:
        runs = _finished(results, dataset, m, profile, protocol, [seed])
        model, eval_ds, res = load_trained(runs.run_dir[0], device)
        models.append((m, model))
        run_dirs[m] = runs.run_dir[0]
        if ds is None:
            ds = eval_ds
            profile = profile or res.profile
    idx = list(images) if images else pick_images(ds, n_images)
    bad = [i for i in idx if not 0 <= i < len(ds)]
    if bad:
        raise UserError(f"--images {','.join(map(str, bad))}: the {dataset} test split has {len(ds)} images")
    items = [ds[i] for i in idx]
    ids = [str(it["id"]) for it in items]
    readers = int(items[0]["masks"].shape[0])
    data: dict[str, Any] = {"images": idx, "readers": readers, "methods": {}, "order": [], "metric": None}
    for m, model in models:
        draws = []
        for i, item in zip(idx, items):
            x = item["image"][None].to(dev)
            s = sample_items(model, ds, [i], x, k, generator=generator(dev, "figure", seed, i))
            draws.append(s[0].cpu().numpy())
        data["methods"][m] = draws
    score = {}
    for m in methods:
        metric, vals = _per_image_metric(run_dirs[m], ids)
        data["metric"] = data["metric"] or metric
        score[m] = (float(np.mean([vals[i] for i in ids])) if vals and all(i in vals for i in ids) else float("inf"),
                    {i: vals.get(i) for i in ids})
    order = sorted(methods, key=lambda m: (score[m][0], methods.index(m)))
    data["order"] = order
    metric = data["metric"]
    truth = [it["masks"].numpy().astype(bool) for it in items]
    # each image zoomed to its readers' and shown samples' masks (the same part in every row)
    boxes = [zoom_box(truth[b], [data["methods"][m][b].astype(bool) for m in methods], truth[b].shape[-2:])
             for b in range(len(items))]
    data["zoom"] = [(z[0].start, z[0].stop, z[1].start, z[1].stop) for z in boxes]
    pics = [_image_rgb(it["image"])[z] for it, z in zip(items, boxes)]
    shown = {m: [d[(Ellipsis,) + z] for d, z in zip(data["methods"][m], boxes)] for m in methods}
    truth_shown = [t[(Ellipsis,) + z] for t, z in zip(truth, boxes)]
    heads = [f"{i}, readers disagree {reader_disagreement(it['masks']):.2f}"
             + (f" (rows {z[0].start}-{z[0].stop - 1}, columns {z[1].start}-{z[1].stop - 1})"
                if (z[0].stop - z[0].start, z[1].stop - z[1].start) != tuple(t.shape[-2:]) else "")
             for i, it, z, t in zip(ids, items, boxes, truth)]

    def hidden(full: list[np.ndarray], part: list[np.ndarray]) -> list[np.ndarray]:
        """Per image, which masks have pixels outside the shown part."""
        return [f.reshape(len(f), -1).sum(1) > p.reshape(len(p), -1).sum(1) for f, p in zip(full, part)]

    def rows_for(n: int) -> list[tuple[str, list[np.ndarray], list[str], list[np.ndarray]]]:
        out_rows = [("readers", truth_shown[:n], [""] * n, hidden(truth[:n], truth_shown[:n]))]
        for m in order:
            notes = [f"{score[m][1][i]:.2f}" if metric and score[m][1][i] is not None else "" for i in ids[:n]]
            out_rows.append((display_name(m), shown[m][:n], notes, hidden(data["methods"][m][:n], shown[m][:n])))
        return out_rows

    out = Path(out) if out is not None else Path(results) / FIGURES / dataset
    paths = []
    where = f"{dataset}, profile {profile}, seed {seed}"
    for stem, layout, n in (("samples", "2col", len(idx)), ("samples_1col", "1col", 1)):
        fig = _samples_layout(plt, sns, rows_for(n), pics[:n], truth_shown[:n], heads[:n], k, WIDTHS[layout],
                              f"{where}: {k} samples per method; rows by per-image {metric or '?'} "
                              "(in the corner), best first; dashed: readers")
        paths += _save(fig, out, stem, formats, dpi=300)
        plt.close(fig)
    return Figure(paths, data)


# ----------------------------------------------------------------------------------------------------
# Fig. 6b: metrics against sampler steps (re-evaluating a checkpoint)
# ----------------------------------------------------------------------------------------------------

def evaluate_subset(model: Any, ds: Any, indices: list[int], *, samples: int, seed: int, device: torch.device,
                    batch: int = 4) -> dict[str, float]:
    """Mean GED_<samples> and HMIoU_<min(32, samples)> (and diversity) over ``indices``, one draw per image."""
    import torch

    from ..evaluate import sample_items
    from ..metrics import table_metrics
    from ..seeding import generator

    vals: dict[str, list[float]] = {}
    for s in range(0, len(indices), batch):
        part = indices[s:s + batch]
        x = torch.stack([ds[i]["image"] for i in part]).to(device)
        gts = torch.stack([ds[i]["masks"] for i in part]).to(device).bool()
        out = sample_items(model, ds, part, x, samples, generator=generator(device, "figure-eval", seed, s))
        hm = min(32, samples)
        res = table_metrics(out, gts, ns=(samples,), hm_n=hm, mdm_n=None)
        for key, v in res.items():
            vals.setdefault(key, []).extend(v.double().cpu().tolist())
    return {key: float(np.mean(v)) for key, v in vals.items()}


def _curve_plot(df: pd.DataFrame, x: str, xlabel: str, title: str, out: Path, stem: str,
                formats: tuple[str, ...], *, xscale: str = "linear", mark: float | None = None,
                mark_label: str = "") -> list[Path]:
    plt, sns = _plt()
    metrics = _curve_keys(df["metric"].unique())
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.3), squeeze=False)
    pal = sns.color_palette("colorblind", len(metrics))
    counts = set()
    for ax, m, color in zip(axes[0], metrics, pal):
        agg = curve_points(df[df["metric"] == m], x)
        counts |= set(agg["n"])
        ax.errorbar(agg[x], agg["mean"], yerr=agg["std"].fillna(0), marker="o", color=color, capsize=3, lw=1.8)
        for xv, yv, n in zip(agg[x], agg["mean"], agg["n"]):
            ax.annotate(f"n={n}", (xv, yv), textcoords="offset points", xytext=(5, -11), ha="left", fontsize=7,
                        color="0.3")
        ax.set_xlabel(xlabel)
        ax.set_title(metric_title(m))
        if xscale == "symlog":
            nonzero = sorted(v for v in agg[x] if v > 0)
            ax.set_xscale("symlog", linthresh=nonzero[0] if nonzero else 1.0)
        elif xscale != "linear":
            ax.set_xscale(xscale)
        ax.set_xticks(list(agg[x]))
        ax.set_xticklabels([f"{v:g}" for v in agg[x]], rotation=45 if xscale == "symlog" else 0)
        if mark is not None:
            ax.axvline(mark, ls="--", color="0.4", lw=1)
            ax.text(mark, ax.get_ylim()[1], f" {mark_label}", va="top", ha="left", fontsize=8, color="0.3")
    lo, hi = min(counts, default=0), max(counts, default=0)
    runs = f"{lo}" if lo == hi else f"{lo}-{hi}"
    spread = "mean ± std (ddof=1) over" if hi > 1 else "one run per point, no spread:"
    fig.suptitle(f"{title}\n{spread} n = {runs} distinct run(s) per point", fontsize=10)
    fig.tight_layout()
    paths = _save(fig, out, stem, formats)
    plt.close(fig)
    return paths


def curve_points(df: pd.DataFrame, x: str) -> pd.DataFrame:
    """Per value of ``x``: mean, std (ddof = 1) and n of the values of distinct runs (one value per run;
    ``run_dir`` names the run)."""
    one = df.drop_duplicates(["run_dir", x])
    g = one.groupby(x)["value"]
    return g.agg(["mean", "count"]).join(g.std(ddof=1).rename("std")).rename(columns={"count": "n"}) \
        .reset_index().sort_values(x)


def steps_figure(results: Path | str, dataset: str, *, method: str = "atfm", values: list[int] | None = None,
                 param: str = "method.steps", profile: str | None = None, eval_images: int = 8,
                 samples: int = 100, device: str = "cpu", protocol: str | None = None,
                 seeds: list[int] | None = None, out: Path | None = None, force: bool = False,
                 formats: tuple[str, ...] = ("png", "pdf")) -> Figure:
    """GED_100 / HM-IoU_32 against ``param`` (default the sampler's Euler steps) for every finished seed."""
    import pandas as pd

    from ..env import pick_device
    from ..factory import load_trained
    from ..store import atomic_write_text
    from .timing import with_settings

    values = values or [1, 5, 10, 25, 50]
    dev = pick_device(device)
    runs = _finished(results, dataset, method, profile, protocol, seeds)
    out = Path(out) if out is not None else Path(results) / FIGURES / dataset
    cache = out / "steps.csv"
    cols = ["run_dir", "seed", "param", "value", "eval_images", "samples", "metric", "metric_value"]
    old = pd.read_csv(cache) if cache.is_file() and not force else pd.DataFrame(columns=cols)
    rows = [r for r in old.to_dict("records")]
    have = {(r["run_dir"], r["param"], float(r["value"]), int(r["eval_images"]), int(r["samples"]))
            for r in rows}
    configured, used = None, eval_images
    for run in runs.itertuples():
        need = [v for v in values if (run.run_dir, param, float(v), eval_images, samples) not in have]
        model, ds, res = load_trained(run.run_dir, device)
        section, _, key = param.partition(".")
        configured = getattr(getattr(res.cfg, section, None), key, None)
        if configured is None and need:
            raise UserError(f"--param {param}: {method}'s config has no such setting")
        idx = list(range(min(eval_images, len(ds))))
        used = len(idx)
        for v in need:
            m = with_settings(model, res, [f"{param}={v}"], dev)
            print(f"amisbench figures: {method} seed {run.seed}: {param}={v} on {len(idx)} images",
                  file=sys.stderr, flush=True)
            vals = evaluate_subset(m, ds, idx, samples=samples, seed=int(run.seed), device=dev)
            for metric, val in vals.items():
                rows.append({"run_dir": run.run_dir, "seed": int(run.seed), "param": param, "value": float(v),
                             "eval_images": eval_images, "samples": samples, "metric": metric,
                             "metric_value": val})
        df_new = pd.DataFrame(rows, columns=cols)
        atomic_write_text(cache, df_new.to_csv(index=False))  # after each seed: a killed call keeps its work
    df = pd.DataFrame(rows, columns=cols)
    keep = df["run_dir"].isin(set(runs["run_dir"])) & (df["param"] == param) & df["value"].isin(
        [float(v) for v in values]) & (df["eval_images"] == eval_images) & (df["samples"] == samples)
    df = df[keep].rename(columns={"metric_value": "value_m"})
    plot = df.rename(columns={"value": "x", "value_m": "value"})
    name = param.split(".")[-1]
    title = f"{display_name(method)} on {dataset}: metrics vs. {name}, {used} test images x {samples} samples"
    paths = _curve_plot(plot, "x", f"sampler {name} ({param})", title, out, "steps", formats, xscale="log",
                        mark=float(configured) if configured else None,
                        mark_label=f"run's setting ({configured})" if configured else "")
    return Figure([*paths, cache], plot, [title])


# ----------------------------------------------------------------------------------------------------
# Fig. 6c: metrics against alpha (runs that differ in it)
# ----------------------------------------------------------------------------------------------------

def _config_value(run_dir: Path, param: str) -> Any:
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    node: Any = cfg
    for part in param.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def result_roots(results: Path | str) -> list[Path]:
    """``results`` and every sweep folder under it (``results/sweeps/*``)."""
    root = Path(results)
    return [root, *sorted(p for p in (root / "sweeps").glob("*") if (p / "runs").is_dir())]


def alpha_table(results: Path | str, dataset: str, *, method: str = "atfm", param: str = "method.alpha",
                profile: str | None = None, protocol: str | None = None) -> pd.DataFrame:
    """Long table (x, seed, metric, value, run_dir) of every finished run of ``method`` on ``dataset``
    under ``results`` and its sweeps, with x = the run's ``param`` from its config.yaml."""
    import pandas as pd

    from ..results import scan, select_runs

    frames = []
    for root in result_roots(results):
        df, _ = scan(root)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    df, _, _ = select_runs(df[df["metric"].isin(CURVE_METRICS)], dataset, profile, protocol, method)
    xs = {d: _config_value(Path(d), param) for d in df["run_dir"].unique()}
    df = df.assign(x=df["run_dir"].map(xs))
    df = df[df["x"].notna()]
    df = df.assign(x=df["x"].astype(float))
    # The default value's runs also sit in its sweep folder when the sweep includes it (the same
    # configuration and seed trained twice): one run per (value, seed), the first folder's, or seed 0
    # would count twice.
    df = df.drop_duplicates(["x", "seed", "metric"], keep="first")
    return df[["x", "seed", "metric", "value", "run_dir", "profile"]].reset_index(drop=True)


def alpha_figure(results: Path | str, dataset: str, *, method: str = "atfm", param: str = "method.alpha",
                 profile: str | None = None, protocol: str | None = None, out: Path | None = None,
                 formats: tuple[str, ...] = ("png", "pdf")) -> Figure:
    """GED_100 / HM-IoU_32 against ``param`` over runs that differ in it (Fig. 6c style)."""
    from ..store import atomic_write_text

    df = alpha_table(results, dataset, method=method, param=param, profile=profile, protocol=protocol)
    if df["x"].nunique() < 2:
        found = ", ".join(f"{v:g}" for v in sorted(df["x"].unique())) or "none"
        raise UserError(f"the {param} curve needs finished runs of {method} on {dataset} with at least two "
                        f"values of {param} (found: {found}); train them with `amisbench grid --method "
                        f"{method} --dataset {dataset} --sweep {param}=0,1e-4,1e-3,5e-3 --launcher local`")
    out = Path(out) if out is not None else Path(results) / FIGURES / dataset
    atomic_write_text(out / "alpha.csv", df.to_csv(index=False))
    default = None
    try:
        from ..config import resolve

        section, _, key = param.partition(".")
        default = getattr(getattr(resolve(method, dataset, df["profile"].iloc[0]).cfg, section), key)
    except (UserError, AttributeError):
        pass
    name = param.split(".")[-1]
    paths = _curve_plot(df, "x", f"{name} ({param})", f"{display_name(method)} on {dataset}: metrics vs. {name}",
                        out, "alpha", formats, xscale="symlog", mark=default,
                        mark_label="default" if default is not None else "")
    return Figure([*paths, out / "alpha.csv"], df)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

CLI_HELP = "draw Fig. 4/5 (samples) and Fig. 6 (metrics vs. steps and alpha) from finished runs"


def configure_parser(p) -> None:
    from ..options import add_results_option
    from ..config import PROFILES

    p.add_argument("--dataset", required=True, help="dataset of the runs")
    p.add_argument("--kind", default="samples", choices=[*KINDS, "all"], help="which figure (default samples)")
    p.add_argument("--method", default=None, help="samples: method label(s), comma-separated (default: every "
                   "method with a finished run); steps/alpha: one label (default atfm)")
    p.add_argument("--profile", default=None, choices=PROFILES, help="profile of the runs (needed when several)")
    p.add_argument("--protocol", default=None, help="split protocol of the runs")
    p.add_argument("--seed", type=int, default=0, help="samples: seed of the runs (default 0)")
    p.add_argument("--images", default=None, help="samples: test image indices, e.g. 0,5,9 (default: the most "
                   "ambiguous)")
    p.add_argument("--n-images", type=int, default=2, help="samples: how many images without --images (default 2)")
    p.add_argument("--k", type=int, default=4, help="samples: samples per method and image (default 4)")
    p.add_argument("--values", default=None, help="steps: values of --param (default 1,5,10,25,50)")
    p.add_argument("--param", default=None, help="steps: sampler setting to vary (default method.steps); "
                   "alpha: config value of the runs (default method.alpha)")
    p.add_argument("--eval-images", type=int, default=8, help="steps: test images to re-evaluate (default 8)")
    p.add_argument("--samples", type=int, default=100, help="steps: samples per image (default 100)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/figures/<dataset>)")
    p.add_argument("--force", action="store_true", help="steps: recompute cached values")
    add_results_option(p)


def _ints(s: str, what: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} {s!r}: expected comma-separated integers") from None


def command(a) -> int:
    from ..options import results_folder

    results = results_folder(a)
    if a.out is not None:
        from ..store import check_output_dir

        check_output_dir(a.out, "--out")
    kinds = KINDS if a.kind == "all" else (a.kind,)
    made: list[Path] = []
    skipped: list[str] = []
    for kind in kinds:
        try:
            made += _one_kind(kind, a, results)
        except UserError as e:
            if a.kind != "all":
                raise
            skipped.append(f"{kind}: {e}")
            print(f"amisbench figures: skipped {kind}: {e}", file=sys.stderr)
    if not made:
        raise UserError("no figure written (" + "; ".join(skipped) + ")")
    for p in made:
        print(p)
    return 0


def _one_kind(kind: str, a, results: Path) -> list[Path]:
    """The files of one figure kind (UserError when its runs are missing)."""
    from ..results import scan

    if kind == "samples":
        if a.method:
            methods = [m.strip() for m in a.method.split(",") if m.strip()]
        else:
            df, _ = scan(results)
            df = df[(df["dataset"] == a.dataset) & (df["seed"] == a.seed)]
            if a.profile:
                df = df[df["profile"] == a.profile]
            methods = sorted(df["label"].unique())
            if not methods:
                raise UserError(f"no finished runs on {a.dataset} under {Path(results) / 'runs'}")
        fig = samples_figure(results, a.dataset, methods, profile=a.profile, seed=a.seed,
                             images=_ints(a.images, "--images") if a.images else None, n_images=a.n_images,
                             k=a.k, device=a.device, protocol=a.protocol, out=a.out)
    elif kind == "steps":
        fig = steps_figure(results, a.dataset, method=a.method or "atfm",
                           values=_ints(a.values, "--values") if a.values else None,
                           param=a.param or "method.steps", profile=a.profile, eval_images=a.eval_images,
                           samples=a.samples, device=a.device, protocol=a.protocol, out=a.out, force=a.force)
    else:
        fig = alpha_figure(results, a.dataset, method=a.method or "atfm", param=a.param or "method.alpha",
                           profile=a.profile, protocol=a.protocol, out=a.out)
    return fig.paths
