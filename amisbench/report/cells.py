"""Cell builders: fill a :class:`~amisbench.report.tables.Table` from result files.

* metric cells (Tables 1, 2, 4): mean ± std (ddof = 1) over seeds of the per-seed means of ``metrics.json``,
  with the caption notes (protocol, seeds, overrides, settings, unfinished runs);
* timing cells (Table 3): one function per timing column (:data:`TIMING_CELLS`) turns a timing record
  (``results/timing/<device>/<dataset>__<label>.json``, see :mod:`amisbench.report.timing`) into a number
  cell or a text; a column without one shows the record's field of the same name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import UserError
from ..store import TIMING, RunSpec
from .definitions import RowDef, TableDef, label_method, paper_mean, with_tag

if TYPE_CHECKING:
    import pandas as pd

    from .tables import Table


# ----------------------------------------------------------------------------------------------------
# metric cells
# ----------------------------------------------------------------------------------------------------

def protocol_notes(df: pd.DataFrame, protocol: str) -> list[str]:
    labels = sorted({lab for lab in df["protocol_label"].dropna().unique() if lab})
    if labels:
        return labels
    return [f"protocol: {protocol}"] if protocol else []


def override_notes(df: pd.DataFrame, labels: list[str]) -> list[str]:
    """One note per row whose runs were made with ``--set`` overrides (from their config.yaml sources)."""
    import yaml

    out = []
    for label in labels:
        sets: set[str] = set()
        for d in df[df["label"] == label]["run_dir"].unique():
            try:
                sources = (yaml.safe_load((Path(d) / "config.yaml").read_text()) or {}).get("sources") or []
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            sets |= {src[len("--set "):] for src in sources if isinstance(src, str) and src.startswith("--set ")}
        if sets:
            out.append(f"{label} ran with overrides: {'; '.join(sorted(sets))}")
    return out


def unfinished_note(unfinished: list[Path], dataset: str, profile: str | None) -> list[str]:
    mine = [u for u in unfinished if u.parts[-4].split("-")[0] == dataset
            and (profile is None or u.parts[-2] == profile)]
    return [f"{len(mine)} unfinished or failed run(s) left out"] if mine else []


def fill_metrics(t: Table, d: TableDef, results: Path | str, ds: str, profile: str | None,
                  protocol: str | None, tag: str | None = None) -> None:
    from ..results import scan, select_runs, summarize

    df, unfinished = scan(results)
    df, prof, proto = select_runs(df, ds, profile, protocol)
    s = summarize(df)
    labels = set(s["label"])
    if tag:  # the runs of one --tag: a row's labels gain "+tag"
        rows = [dataclasses.replace(r, also=[with_tag(lab, tag) for lab in [r.key, *r.also]]) for r in d.rows]
        t.notes.append(f"runs tagged {tag}")
    else:
        rows = list(d.rows)
    tagged = sorted(lab for lab in labels if RunSpec.parse_label(lab)[2] not in (None, tag))
    if tagged:
        t.notes.append(f"tagged runs not in this table: {', '.join(tagged)} (build it from one tag with --tag NAME)")
    seeds_note, used = [], []
    for lab in sorted(labels):  # reference rows with runs (unet, oracle) follow the table's rows, set apart
        if label_method(lab) in d.references and lab not in t.rows and not RunSpec.parse_label(lab)[2]:
            t.rows.append(lab)
            t.references.append(lab)
            rows.append(RowDef(lab, lab))
    for r in rows:
        tagged_row = tag and r.key not in t.references  # reference rows: their untagged runs
        label = next((lab for lab in (r.also if tagged_row else [r.key, *r.also]) if lab in labels), None)
        if label is None:
            t.status[r.key] = f"not run ({r.reason})" if r.reason else "not run"
            continue
        t.status[r.key] = ""
        used.append(label)
        for row in s[s["label"] == label].itertuples():
            if row.metric in t.columns:
                t.cells[(r.key, row.metric)] = (float(row.mean), float(row.std), int(row.n))
        seeds = sorted(df[df["label"] == label]["seed"].unique())
        seeds_note.append(f"{r.key} {','.join(map(str, seeds))}")
        if label != r.key:
            seeds_note[-1] += f" (from {label})"
    if df.empty:
        t.notes.append(f"no finished runs for dataset '{ds}'" + (f" with profile '{profile}'" if profile else "")
                       + f" under {Path(results) / 'runs'}")
    else:
        t.notes.append(f"ours: mean ± std (ddof=1) over seeds, n = number of seeds; profile {prof}")
    t.notes += protocol_notes(df, proto)
    if seeds_note:
        t.notes.append("seeds: " + "; ".join(seeds_note))
    t.notes += override_notes(df, used)
    t.notes += _setting_notes(df, used, d.settings)
    t.notes += unfinished_note(unfinished, ds, prof)


def _setting_notes(df: pd.DataFrame, labels: list[str], settings: dict[str, dict]) -> list[str]:
    """One caption line per ``settings`` key: its value in the rows' runs (from their config.yaml)."""
    import yaml

    out = []
    for key, spec in settings.items():
        by_value: dict[str, list[str]] = {}
        for label in labels:
            for d in df[df["label"] == label]["run_dir"].unique():
                try:
                    val: Any = yaml.safe_load((Path(d) / "config.yaml").read_text()) or {}
                    for part in key.split("."):
                        val = val[part]
                except (OSError, yaml.YAMLError, KeyError, TypeError):
                    continue
                rows = by_value.setdefault(str(val), [])
                if label not in rows:
                    rows.append(label)
        if by_value:
            texts = spec.get("values") or {}
            parts = [f"{v}" + (f" = {texts[v]}" if v in texts else "") + f" ({', '.join(rows)})"
                     for v, rows in by_value.items()]
            out.append(f"{spec.get('title', key)} ({key}): " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------------------------------
# Table 3 from timing results
# ----------------------------------------------------------------------------------------------------

def timing_records(results: Path | str, dataset: str) -> dict[str, dict[str, dict]]:
    """device folder -> result label -> the timing record, from ``results/timing/*/<dataset>__*.json``."""
    root = Path(results) / TIMING
    out: dict[str, dict[str, dict]] = {}
    if not root.is_dir():
        return out
    for f in sorted(root.glob(f"*/{dataset}__*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        label = f.stem.split("__", 1)[1]
        out.setdefault(f.parent.name, {})[label] = rec
    return out


def setup_text(rec: dict) -> str:
    parts = [rec.get("device_name") or rec.get("device", "?"), rec.get("dtype", "?"),
             f"{rec.get('images_per_call', 1)} image x {rec.get('samples')} samples per call"]
    if rec.get("sample_chunk"):
        parts.append(f"chunk {rec['sample_chunk']}")
    parts.append(f"torch {rec.get('torch', '?')}")
    return ", ".join(str(p) for p in parts)


def _nfe(rec: dict) -> str:
    return rec.get("nfe_label", str(rec.get("nfe")))


def _seconds(rec: dict) -> tuple[float, float, int]:
    return float(rec["median_s"]), float(rec["iqr_s"]), int(rec["images"])


def _peak_memory(rec: dict) -> tuple[float, float, int] | None:
    if rec.get("peak_memory_bytes") is None:
        return None
    return rec["peak_memory_bytes"] / 1e9, float("nan"), int(rec["images"])


def _record_field(key: str) -> Callable[[dict], str | None]:
    """A column without a builder: the record's field of the same name, as text."""
    return lambda rec: str(rec[key]) if key in rec else None


#: timing column key -> the cell of one timing record (a new Table 3 column is one entry here, or a field of
#: the timing record of the same name).
TIMING_CELLS: dict[str, Callable[[dict], Any]] = {
    "nfe": _nfe, "seconds_100": _seconds, "peak_memory_gb": _peak_memory, "setup": setup_text}


def fill_timing(t: Table, d: TableDef, results: Path | str, ds: str, profile: str | None,
                 device: str | None) -> str:
    """Fill a timing table from ``results/timing/<device>/<ds>__*.json``: the definition's rows, then a row
    for every other timed method. Returns the samples per call of the records ("n" when they differ)."""
    recs = timing_records(results, ds)
    devices = sorted(recs)
    if device is not None:
        devices = [dev for dev in devices if dev == device]
    if len(devices) > 1:
        raise UserError(f"timing results of several devices ({', '.join(devices)}) for dataset '{ds}'; "
                        "pick one with --device")
    mine = recs.get(devices[0], {}) if devices else {}
    t.spread, t.count_label = "iqr", "images"
    rows = list(d.rows)
    defined = {lab for r in d.rows for lab in [r.key, *r.also]}
    for lab in sorted(set(mine) - defined):  # timed methods that are not rows of the paper's table
        t.rows.append(lab)
        rows.append(RowDef(lab, lab))
    other_profile = []
    used: dict[str, dict] = {}  # row key -> the record shown in that row (its own label or one of `also`)
    for r in rows:
        rec = next((mine[lab] for lab in [r.key, *r.also] if lab in mine), None)
        if rec is not None and profile and rec.get("profile") != profile:
            other_profile.append(f"{r.key} ({rec.get('profile')})")
            rec = None
        if rec is None:
            t.status[r.key] = "not run"
            continue
        t.status[r.key] = ""
        used[r.key] = rec
        for c in d.columns:
            value = TIMING_CELLS.get(c.key, _record_field(c.key))(rec)
            if isinstance(value, tuple):
                t.cells[(r.key, c.key)] = value
            elif value is not None:
                t.texts[(r.key, c.key)] = value
    counts = sorted({int(rec.get("samples") or 0) for rec in used.values()})
    samples = str(counts[0]) if len(counts) == 1 else ("100" if not counts else "n")
    if len(counts) > 1:
        t.notes.append("samples per call: " + "; ".join(f"{k} {rec.get('samples')}" for k, rec in used.items()))
    if devices:
        profs = sorted({str(rec.get("profile")) for rec in used.values()})
        t.notes.append(f"ours: median over n test images (one call of {samples} samples each, after warm-up), "
                       f"IQR = interquartile range; device {devices[0]}; profile {', '.join(profs)}")
        setups = [f"{key}: {setup_text(rec)}" for key, rec in used.items()]
        if setups:
            t.notes.append("setup: " + "; ".join(setups))
        kinds = sorted({str(rec.get("memory_kind")) for rec in used.values() if rec.get("memory_kind")})
        if "peak_memory_gb" in t.columns and kinds:
            t.notes.append("peak memory: " + "; ".join(kinds))
    else:
        others = sorted({f.name.split("__", 1)[0] for f in (Path(results) / TIMING).glob("*/*__*.json")} - {ds})
        hint = f"; timing results exist for: {', '.join(others)} (--dataset)" if others else ""
        t.notes.append(f"no timing results for dataset '{ds}' under {Path(results) / TIMING}; run e.g. "
                       f"amisbench timing --method atfm --dataset {ds}{hint}")
    if other_profile:
        t.notes.append("left out (other profile): " + ", ".join(other_profile))
    _ratio_notes(t, d, used)
    return samples


def _ratio_notes(t: Table, d: TableDef, used: dict[str, dict]) -> None:
    """Every row's time and NFE relative to the definition's reference row, ours and the paper's."""
    ref = d.reference
    if not ref or (ref, "seconds_100") not in t.cells:
        return
    ref_s = t.cells[(ref, "seconds_100")][0]
    ref_p = paper_mean(t.paper.get((ref, "seconds_100")))
    parts = []
    for r in t.rows:
        if r == ref or (r, "seconds_100") not in t.cells:
            continue
        s = t.cells[(r, "seconds_100")][0] / ref_s if ref_s > 0 else float("nan")
        txt = f"{r}/{ref} time ×{s:.3g}"
        nfe_a, nfe_b = used[r].get("nfe"), used[ref].get("nfe")
        if nfe_a and nfe_b:
            txt += f" (NFE ×{nfe_a / nfe_b:.3g}"
            p = paper_mean(t.paper.get((r, "seconds_100")))
            txt += f"; paper time ×{p / ref_p:.3g})" if p and ref_p else ")"
        parts.append(txt)
    if parts:
        t.notes.append("ratios: " + "; ".join(parts))
