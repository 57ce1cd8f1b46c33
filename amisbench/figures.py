"""Figures 4-6 of the ATFM paper from our own runs, as PNG and PDF under ``results/figures/<dataset>/``.

* ``samples`` (Fig. 4 / 5): for chosen test images, the image, every reader's mask and ``k`` samples of
  each method (trained runs of one seed). Without ``--images``, the most ambiguous of the first 64 test
  images are shown (largest mean pairwise 1 - IoU between readers).
* ``steps`` (Fig. 6b): GED_100 and HM-IoU_32 against the number of sampler steps, by re-evaluating the
  checkpoint of a trained run (every finished seed) with ``--set method.steps=<v>`` on the first
  ``--eval-images`` test images; the numbers go to ``steps.csv`` next to the plot and are reused on the
  next call (``--force`` recomputes).
* ``alpha`` (Fig. 6c): GED_100 and HM-IoU_32 against ``method.alpha``, from finished runs that differ in it
  (found under ``results/runs`` and ``results/sweeps/*/runs``, e.g. made with
  ``amisbench grid --method atfm --sweep method.alpha=0,1e-4,1e-3,5e-3``); mean ± std over seeds.

The figures read result folders and checkpoints only; plotting uses matplotlib's Agg backend with seaborn's
theme.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import UserError
from .evaluate import sample_items

if TYPE_CHECKING:
    import pandas as pd

FIGURES = "figures"
KINDS = ("samples", "steps", "alpha")
CURVE_METRICS = ("GED_100", "HMIoU_32")


def _title(metric: str) -> str:
    prefix, _, n = metric.rpartition("_")
    name = {"GED": "GED", "HMIoU": "HM-IoU"}.get(prefix, prefix)
    return f"{name}$_{{{n}}}$ ({'lower' if prefix == 'GED' else 'higher'} is better)"


def _curve_keys(keys) -> list[str]:
    """The GED_n and HMIoU_n columns among ``keys`` (GED first)."""
    ged = sorted(k for k in keys if k.startswith("GED_") and k[4:].isdigit())
    hm = sorted(k for k in keys if k.startswith("HMIoU_"))
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


def _save(fig, out: Path, stem: str, formats: tuple[str, ...]) -> list[Path]:
    import io

    from .store import atomic_write_bytes

    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight")
        p = out / f"{stem}.{fmt}"
        atomic_write_bytes(p, buf.getvalue())
        paths.append(p)
    return paths


def _finished(results: Path | str, dataset: str, label: str, profile: str | None, protocol: str | None,
              seeds: list[int] | None = None) -> pd.DataFrame:
    """One row per finished run (run_dir, seed, profile) of ``label`` on ``dataset``."""
    from .results import scan, select_runs

    df, _ = scan(results)
    if seeds is not None:
        df = df[df["seed"].isin(seeds)]
    df, _, _ = select_runs(df, dataset, profile, protocol, label)
    runs = df.drop_duplicates("run_dir")[["run_dir", "seed", "profile", "protocol"]]
    if runs.empty:
        what = f" (profile {profile})" if profile else ""
        method, _, variant = label.partition("-")
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
    from .metrics import pairwise_iou

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

def samples_figure(results: Path | str, dataset: str, methods: list[str], *, profile: str | None = None,
                   seed: int = 0, images: list[int] | None = None, n_images: int = 4, k: int = 6,
                   device: str = "cpu", protocol: str | None = None, out: Path | None = None,
                   formats: tuple[str, ...] = ("png", "pdf")) -> Figure:
    """Image, readers' masks and ``k`` samples per method for each chosen test image (Fig. 4/5 style)."""
    from .runner import load_trained, pick_device
    from .seeding import generator

    plt, sns = _plt()
    dev = pick_device(device)
    models, ds = [], None
    for m in methods:
        runs = _finished(results, dataset, m, profile, protocol, [seed])
        model, eval_ds, res = load_trained(runs.run_dir[0], device)
        models.append((m, model))
        if ds is None:
            ds = eval_ds
            profile = profile or res.profile
    idx = list(images) if images else pick_images(ds, n_images)
    bad = [i for i in idx if not 0 <= i < len(ds)]
    if bad:
        raise UserError(f"--images {','.join(map(str, bad))}: the {dataset} test split has {len(ds)} images")
    readers = int(ds[idx[0]]["masks"].shape[0])
    data = {"images": idx, "readers": readers, "methods": {}}
    grids: dict[str, list[np.ndarray]] = {}
    for m, model in models:
        grids[m] = []
        for i in idx:
            x = ds[i]["image"][None].to(dev)
            s = sample_items(model, ds, [i], x, k, generator=generator(dev, "figure", seed, i))
            grids[m].append(s[0].cpu().numpy())
        data["methods"][m] = grids[m]
    # columns: image | readers | spacer | method 1 samples | spacer | method 2 ...
    widths = [1.0] + [1.0] * readers
    groups = [("image", 0, 1), ("readers", 1, 1 + readers)]
    for m in methods:
        widths.append(0.15)
        start = len(widths)
        widths += [1.0] * k
        groups.append((m, start, start + k))
    pal = sns.color_palette("colorblind", len(methods) + 1)
    from matplotlib.colors import ListedColormap

    fig, axes = plt.subplots(len(idx), len(widths), figsize=(0.95 * sum(widths), 1.0 * len(idx) + 0.5),
                             gridspec_kw={"width_ratios": widths, "wspace": 0.04, "hspace": 0.06}, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    reader_cmap = ListedColormap([(0.08, 0.08, 0.1), pal[0]])
    for r, i in enumerate(idx):
        item = ds[i]
        ax = axes[r, 0]
        ax.imshow(_image_rgb(item["image"]), cmap="gray", interpolation="nearest")
        ax.text(-0.08, 0.5, f"#{i}", transform=ax.transAxes, ha="right", va="center", fontsize=8)
        for a in range(readers):
            axes[r, 1 + a].imshow(item["masks"][a].numpy(), cmap=reader_cmap, vmin=0, vmax=1,
                                  interpolation="nearest")
        for g, (m, start, end) in enumerate(groups[2:]):
            cmap = ListedColormap([(0.08, 0.08, 0.1), pal[g + 1]])
            for j in range(k):
                axes[r, start + j].imshow(grids[m][r][j], cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    for name, start, end in groups:
        left = axes[0, start].get_position()
        right = axes[0, end - 1].get_position()
        fig.text((left.x0 + right.x1) / 2, left.y1 + 0.01, name, ha="center", va="bottom", fontsize=10,
                 weight="bold")
    top = axes[0, 0].get_position().y1
    fig.suptitle(f"{dataset}: test images, the readers' masks and {k} samples per method "
                 f"(profile {profile}, seed {seed})", y=top + 0.3 / fig.get_figheight(), va="bottom", fontsize=10)
    out = Path(out) if out is not None else Path(results) / FIGURES / dataset
    paths = _save(fig, out, "samples", formats)
    plt.close(fig)
    return Figure(paths, data)


# ----------------------------------------------------------------------------------------------------
# Fig. 6b: metrics against sampler steps (re-evaluating a checkpoint)
# ----------------------------------------------------------------------------------------------------

def evaluate_subset(model: Any, ds: Any, indices: list[int], *, samples: int, seed: int, device: torch.device,
                    batch: int = 4) -> dict[str, float]:
    """Mean GED_<samples> and HMIoU_<min(32, samples)> (and diversity) over ``indices``, one draw per image."""
    from .metrics import table_metrics
    from .seeding import generator

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
    for ax, m, color in zip(axes[0], metrics, pal):
        g = df[df["metric"] == m].groupby(x)["value"]
        agg = g.agg(["mean", "count"]).join(g.std(ddof=1).rename("std")).reset_index().sort_values(x)
        ax.errorbar(agg[x], agg["mean"], yerr=agg["std"].fillna(0), marker="o", color=color, capsize=3, lw=1.8)
        ax.set_xlabel(xlabel)
        ax.set_title(_title(m))
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
    n_seeds = df.groupby(x)["seed"].nunique().max()
    fig.suptitle(f"{title} (mean ± std over {n_seeds} seed(s))" if n_seeds > 1 else title, fontsize=10)
    fig.tight_layout()
    paths = _save(fig, out, stem, formats)
    plt.close(fig)
    return paths


def steps_figure(results: Path | str, dataset: str, *, method: str = "atfm", values: list[int] | None = None,
                 param: str = "method.steps", profile: str | None = None, eval_images: int = 8,
                 samples: int = 100, device: str = "cpu", protocol: str | None = None,
                 seeds: list[int] | None = None, out: Path | None = None, force: bool = False,
                 formats: tuple[str, ...] = ("png", "pdf")) -> Figure:
    """GED_100 / HM-IoU_32 against ``param`` (default the sampler's Euler steps) for every finished seed."""
    import pandas as pd

    from .runner import load_trained, pick_device
    from .store import atomic_write_text
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
    configured = None
    for run in runs.itertuples():
        need = [v for v in values if (run.run_dir, param, float(v), eval_images, samples) not in have]
        model, ds, res = load_trained(run.run_dir, device)
        section, _, key = param.partition(".")
        configured = getattr(getattr(res.cfg, section, None), key, None)
        if configured is None and need:
            raise UserError(f"--param {param}: {method}'s config has no such setting")
        idx = list(range(min(eval_images, len(ds))))
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
    paths = _curve_plot(plot, "x", f"sampler {name} ({param})",
                        f"{method} on {dataset}: metrics vs. {name}, {eval_images} test images x {samples} samples",
                        out, "steps", formats, xscale="log", mark=float(configured) if configured else None,
                        mark_label=f"run's setting ({configured})" if configured else "")
    return Figure([*paths, cache], plot)


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

    from .results import scan, select_runs

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
    return df[["x", "seed", "metric", "value", "run_dir", "profile"]].reset_index(drop=True)


def alpha_figure(results: Path | str, dataset: str, *, method: str = "atfm", param: str = "method.alpha",
                 profile: str | None = None, protocol: str | None = None, out: Path | None = None,
                 formats: tuple[str, ...] = ("png", "pdf")) -> Figure:
    """GED_100 / HM-IoU_32 against ``param`` over runs that differ in it (Fig. 6c style)."""
    from .store import atomic_write_text

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
        from .config import resolve

        section, _, key = param.partition(".")
        default = getattr(getattr(resolve(method, dataset, df["profile"].iloc[0]).cfg, section), key)
    except (UserError, AttributeError):
        pass
    name = param.split(".")[-1]
    paths = _curve_plot(df, "x", f"{name} ({param})", f"{method} on {dataset}: metrics vs. {name}", out, "alpha",
                        formats, xscale="symlog", mark=default, mark_label="default" if default is not None else "")
    return Figure([*paths, out / "alpha.csv"], df)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

CLI_HELP = "draw Fig. 4/5 (samples) and Fig. 6 (metrics vs. steps and alpha) from finished runs"


def configure_parser(p) -> None:
    from .cli import add_results_option
    from .config import PROFILES

    p.add_argument("--dataset", required=True, help="dataset of the runs")
    p.add_argument("--kind", default="samples", choices=[*KINDS, "all"], help="which figure (default samples)")
    p.add_argument("--method", default=None, help="samples: method label(s), comma-separated (default: every "
                   "method with a finished run); steps/alpha: one label (default atfm)")
    p.add_argument("--profile", default=None, choices=PROFILES, help="profile of the runs (needed when several)")
    p.add_argument("--protocol", default=None, help="split protocol of the runs")
    p.add_argument("--seed", type=int, default=0, help="samples: seed of the runs (default 0)")
    p.add_argument("--images", default=None, help="samples: test image indices, e.g. 0,5,9 (default: the most "
                   "ambiguous)")
    p.add_argument("--n-images", type=int, default=4, help="samples: how many images without --images")
    p.add_argument("--k", type=int, default=6, help="samples: samples per method and image (default 6)")
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
    from .results import scan
    from .runner import default_results

    results = a.results or default_results()
    if a.out is not None:
        from .store import check_output_dir

        check_output_dir(a.out, "--out")
    kinds = KINDS if a.kind == "all" else (a.kind,)
    made: list[Path] = []
    for kind in kinds:
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
        made += fig.paths
    for p in made:
        print(p)
    return 0
