"""Statistics over per-image values: bootstrap confidence intervals and paired comparisons with the best row.

The procedure (also in the README):

1. per-image values (``per_image.csv`` of every seed of a row) are averaged over seeds first, so that an image
   counts once however many seeds ran;
2. the 95 % confidence interval of a cell is a percentile bootstrap of the mean over resampled *groups*
   (the dataset's ``group`` of each test image, from ``groups.csv``: the patient on LIDC, the image on ISIC3,
   the lesion group on synthetic; the image itself when a run has no ``groups.csv``), with a fixed seed;
3. each row is compared with the best row of its column on the test images both have, by a paired sign-flip
   permutation test over the same groups (two-sided; exact when there are few groups), and the p-values of
   one column are adjusted with Holm's step-down correction.

Pure numpy and pandas; no torch.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

PER_IMAGE = "per_image.csv"
GROUPS = "groups.csv"  # id,group of every evaluated image, written by the evaluation
BOOTSTRAP = 2000
LEVEL = 0.95
ALPHA = 0.05
SEED = 0


# ----------------------------------------------------------------------------------------------------
# reading per-image values
# ----------------------------------------------------------------------------------------------------

def read_groups(run_dir: Path | str) -> dict[str, str]:
    """image id -> group from ``groups.csv`` of a run folder (empty when the run has none)."""
    path = Path(run_dir) / GROUPS
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["id"]: row["group"] for row in csv.DictReader(f)}


def per_image(run_dirs: Iterable[Path | str]) -> pd.DataFrame:
    """Per-image values of several seeds of one row, averaged over seeds: columns id, group, metric, value,
    seeds (how many seeds scored the image). Runs without ``per_image.csv`` are left out."""
    import pandas as pd

    frames = []
    for d in run_dirs:
        path = Path(d) / PER_IMAGE
        if not path.is_file():
            continue
        df = pd.read_csv(path, dtype={"id": str})
        groups = read_groups(d)
        frames.append(df.assign(group=df["id"].map(groups).fillna(df["id"]), run=str(d)))
    if not frames:
        return pd.DataFrame(columns=["id", "group", "metric", "value", "seeds"])
    df = pd.concat(frames, ignore_index=True)
    out = df.groupby(["id", "metric"], sort=False).agg(group=("group", "first"), value=("value", "mean"),
                                                       seeds=("run", "nunique")).reset_index()
    return out[["id", "group", "metric", "value", "seeds"]]


# ----------------------------------------------------------------------------------------------------
# the bootstrap
# ----------------------------------------------------------------------------------------------------

def _group_sums(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse).astype(np.float64)
    return sums, counts


def _boot_means(values: np.ndarray, groups: np.ndarray | None, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of whole groups; each resample keeps the number of
    groups. Returns (n_boot,) float64."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.arange(len(values)) if groups is None else np.asarray(groups)
    sums, counts = _group_sums(values, groups)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    return sums[pick].sum(axis=1) / counts[pick].sum(axis=1)


def bootstrap_ci(values, groups=None, *, level: float = LEVEL, n_boot: int = BOOTSTRAP, seed: int = SEED
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` resampling whole ``groups``.

    Args:
        values: (N,) per-image values (already averaged over seeds).
        groups: (N,) group of each value (patient, image, ...); None = every value its own group.
        level: coverage of the interval.
        n_boot: number of resamples.
        seed: seed of the resampling (the same inputs always give the same interval).

    Returns:
        (low, high); (nan, nan) without values.

    Example:
        >>> bootstrap_ci([0.3, 0.3, 0.3])
        (0.3, 0.3)
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan)
    means = _boot_means(values, groups, n_boot, seed)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


def paired_p(a, b, groups=None, *, n_perm: int = BOOTSTRAP, seed: int = SEED) -> float:
    """Two-sided p-value of "a and b are exchangeable within each group" (paired sign-flip permutation test).

    The statistic is the sum of the per-image differences d = a - b; under the null the difference of each
    group is as likely to have either sign, so the group sums are flipped at random (all 2^G sign patterns
    when there are at most ``n_perm`` of them, else ``n_perm`` random ones, counting the observed one). A
    percentile bootstrap of the mean difference would call two groups that both differ a little
    "significant" (p = 1/2001); flipping signs gives p >= 0.5 there, as it should.

    Args:
        a, b: (N,) per-image values of two rows on the same images, in the same order.
        groups: (N,) group of each image; None = every image its own group.

    Example:
        >>> paired_p([0.2, 0.3, 0.4], [0.2, 0.3, 0.4])
        1.0
        >>> paired_p([0.3, 0.4, 0.5], [0.2, 0.3, 0.4])  # 3 images all better: 2 of the 8 sign patterns as extreme
        0.25
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        return math.nan
    sums, _ = _group_sums(d, np.arange(len(d)) if groups is None else np.asarray(groups))
    observed = abs(float(sums.sum()))
    tol = 1e-12 * max(1.0, float(np.abs(sums).sum()))
    g = len(sums)
    if 2 ** g <= n_perm:
        signs = 1 - 2 * ((np.arange(2 ** g)[:, None] >> np.arange(g)) & 1)
        return float((np.abs(signs @ sums) >= observed - tol).mean())
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(n_perm, g))
    return float(((np.abs(signs @ sums) >= observed - tol).sum() + 1) / (n_perm + 1))


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (NaN entries are left out and stay NaN).

    Example:
        >>> holm({"a": 0.01, "b": 0.04, "c": 0.03})
        {'a': 0.03, 'b': 0.06, 'c': 0.06}
    """
    valid = sorted((p, k) for k, p in pvalues.items() if not math.isnan(p))
    m = len(valid)
    out = {k: math.nan for k in pvalues}
    running = 0.0
    for i, (p, k) in enumerate(valid):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = round(running, 12)
    return out


# ----------------------------------------------------------------------------------------------------
# one column of a leaderboard
# ----------------------------------------------------------------------------------------------------

@dataclass
class CellStats:
    """Statistics of one (row, metric) cell from per-image values averaged over seeds."""

    mean: float
    low: float
    high: float
    images: int
    groups: int
    p_holm: float = math.nan  # against the best row of the column (NaN for the best row itself)
    worse: bool = False  # significantly worse than the best row after Holm's correction
    best: bool = False


def column_stats(values: dict[str, pd.DataFrame], metric: str, higher_is_better: bool | None, *,
                 compare: Iterable[str] | None = None, alpha: float = ALPHA, n_boot: int = BOOTSTRAP,
                 seed: int = SEED) -> dict[str, CellStats]:
    """Confidence intervals of every row and the paired comparison of each row with the best one.

    Args:
        values: row label -> :func:`per_image` frame of that row.
        metric: the metric key (a ``metric`` value of per_image.csv).
        higher_is_better: direction of the metric; None = no comparison (intervals only).
        compare: the rows that take part in the comparison (default: all); the others (e.g. calibration rows
            such as ``oracle``) get intervals only.
        alpha: family-wise error rate for ``worse``.
    """
    cols = {}
    for label, df in values.items():
        sel = df[df["metric"] == metric]
        if sel.empty:
            continue
        cols[label] = sel.set_index("id")
    out = {}
    for label, sel in cols.items():
        low, high = bootstrap_ci(sel["value"].to_numpy(), sel["group"].to_numpy(), n_boot=n_boot, seed=seed)
        out[label] = CellStats(float(sel["value"].mean()), low, high, len(sel), int(sel["group"].nunique()))
    pool = [r for r in (compare if compare is not None else cols) if r in cols]
    if higher_is_better is None or len(pool) < 2:
        return out
    best = (max if higher_is_better else min)(pool, key=lambda r: out[r].mean)
    out[best].best = True
    raw = {}
    for label in pool:
        if label == best:
            continue
        common = cols[label].index.intersection(cols[best].index)
        if len(common) == 0:
            continue
        raw[label] = paired_p(cols[label].loc[common, "value"].to_numpy(), cols[best].loc[common, "value"].to_numpy(),
                              cols[best].loc[common, "group"].to_numpy(), n_perm=n_boot, seed=seed)
    for label, p in holm(raw).items():
        out[label].p_holm = p
        out[label].worse = p < alpha
    return out


PROCEDURE = ("per-image values averaged over seeds; 95 % CI: percentile bootstrap over groups of test images "
             f"({BOOTSTRAP} resamples, seed {SEED}); † = worse than the column's best row (paired sign-flip "
             f"permutation test over the same groups, Holm-corrected p < {ALPHA})")


# ----------------------------------------------------------------------------------------------------
# marking a table
# ----------------------------------------------------------------------------------------------------

WORSE_MARK = "†"


def is_calibration(label: str) -> bool:
    """Rows that calibrate the metrics rather than compete (floor and ceiling: ``reference_rows`` of
    configs/tables.yaml): intervals, but no comparison."""
    from .definitions import label_method, reference_methods

    return label_method(label) in reference_methods()


def row_values(results: Path | str, dataset: str, profile: str | None, protocol: str | None
               ) -> dict[str, pd.DataFrame]:
    """Result label -> per-image values (averaged over seeds) of the finished runs of one dataset, profile
    and protocol under ``results``."""
    from ..results import scan, select_runs

    df, _ = scan(results)
    df, _, _ = select_runs(df, dataset, profile, protocol)
    out = {}
    for label, runs in df.groupby("label", sort=False)["run_dir"]:
        vals = per_image(sorted(set(runs)))
        if not vals.empty:
            out[str(label)] = vals
    return out


def mark_table(t, values: dict[str, pd.DataFrame]) -> dict[tuple[str, str], CellStats]:
    """Put :data:`WORSE_MARK` on the cells of ``t`` (a :class:`~amisbench.report.tables.Table`) whose row is
    significantly worse than the column's best row, and the procedure in its notes.

    Args:
        t: the table; its rows are result labels (rows without per-image values are left alone).
        values: :func:`row_values`.

    Returns:
        (row, column) -> the cell's statistics.
    """
    rows = {r: values[r] for r in t.rows if r in values}
    if not rows:
        return {}
    out = {}
    compare = [r for r in rows if not is_calibration(r)]
    for col in t.columns:
        stats = column_stats(rows, col, t.direction(col), compare=compare)
        for r, s in stats.items():
            out[(r, col)] = s
            if s.worse:
                t.marks[(r, col)] = WORSE_MARK
    if out:
        t.notes.append(PROCEDURE)
    return out
