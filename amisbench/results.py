"""Read run folders back into tables of numbers (pure functions of the files; no live objects)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import UserError
from .store import RUNS, read_metrics, read_run_info, run_label

COLUMNS = ["dataset", "protocol", "protocol_label", "method", "variant", "tag", "label", "profile", "seed",
           "metric", "value", "run_dir"]


#: ``method[-variant][+tag]``: the row of a run in the tables (runs of one tag are one row)
result_label = run_label


def scan(results: Path | str) -> tuple[pd.DataFrame, list[Path]]:
    """All finished runs under ``results/runs`` as a long DataFrame (one row per run and metric), and the
    folders of runs that have no ``run.json`` (unfinished or failed)."""
    root = Path(results) / RUNS
    rows: list[dict] = []
    unfinished: list[Path] = []
    if root.is_dir():
        for seed_dir in sorted(root.glob("*/*/*/seed-*")):
            run_json = seed_dir / "run.json"
            if not run_json.is_file():
                unfinished.append(seed_dir)
                continue
            info = read_run_info(seed_dir)  # a damaged file is a UserError naming it
            metrics_path = seed_dir / "metrics.json"
            if not metrics_path.is_file():
                unfinished.append(seed_dir)
                continue
            metrics = read_metrics(seed_dir)
            variant, tag = info.get("variant"), info.get("tag")
            for key, value in metrics.items():
                if key == "n_images":
                    continue
                rows.append({
                    "dataset": info["dataset"], "protocol": info.get("protocol"),
                    "protocol_label": info.get("protocol_label"), "method": info["method"], "variant": variant,
                    "tag": tag, "label": result_label(info["method"], variant, tag), "profile": info["profile"],
                    "seed": int(info["seed"]), "metric": key, "value": float(value), "run_dir": str(seed_dir),
                })
    return pd.DataFrame(rows, columns=COLUMNS), unfinished


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof = 1) over seeds of the per-seed means, and the seed count, per
    (dataset, protocol, profile, method label, metric)."""
    if df.empty:
        return pd.DataFrame(columns=["dataset", "protocol", "profile", "label", "metric", "mean", "std", "n"])
    keys = ["dataset", "protocol", "profile", "label", "metric"]
    g = df.fillna({"protocol": ""}).groupby(keys, sort=False)["value"]
    out = g.agg(mean="mean", std=lambda s: s.std(ddof=1), n="count").reset_index()
    return out


def select_runs(df: pd.DataFrame, dataset: str, profile: str | None, protocol: str | None, label: str | None = None
                ) -> tuple[pd.DataFrame, str | None, str]:
    """Rows of :func:`scan` for one profile and one protocol of ``dataset`` (and of one result label when
    given), with the profile and protocol chosen; UserError when the choice is ambiguous."""
    df = df[df["dataset"] == dataset]
    if label is not None:
        df = df[df["label"] == label]
    if profile:
        df = df[df["profile"] == profile]
    what = f"{label} on " if label else ""
    profiles = sorted(df["profile"].unique())
    if len(profiles) > 1:
        raise UserError(f"runs of {what}several profiles ({', '.join(profiles)}) for dataset '{dataset}'; "
                        "pick one with --profile")
    protos = df["protocol"].fillna("")
    if protocol is not None:
        df = df[protos == protocol]
        protos = df["protocol"].fillna("")
    found = sorted(protos.unique())
    if len(found) > 1:
        raise UserError(f"runs of {what}several protocols ({', '.join(p or 'none' for p in found)}) for dataset "
                        f"'{dataset}'; pick one with --protocol")
    return df, (profiles[0] if profiles else profile), (found[0] if found else (protocol or ""))
