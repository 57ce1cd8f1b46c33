"""Build tables from result files only: mean ± std (ddof = 1) over seeds of the per-seed means, with the seed
count in every cell and the best value per column in bold.

Two modes:

* ``amisbench table --dataset D``: every finished run of ``D`` (one row per method label, one column per
  metric found);
* ``amisbench table --table 1|2|3|4``: a table of the ATFM paper as defined in ``configs/tables.yaml``
  (rows, columns, the paper's reported numbers from ``configs/paper/atfm_tables.yaml``). Every row of the
  definition is printed; a method without finished runs shows "not run" and the paper's number.
  ``--compare-paper`` puts our value, the paper's and their difference side by side. Table 3 is read from
  the timing results (``results/timing/<device>/<dataset>__<method>.json``, see :mod:`amisbench.report.timing`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..store import TIMING

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_ORDER = ["GED_16", "GED_32", "GED_100", "HMIoU_32", "MDM_32", "GED_true_100", "diversity_100"]
TABLES_FILE = "tables.yaml"
PAPER_PARTS = ("paper", "atfm_tables.yaml")

Paper = Any  # (mean, std | None) for a number reported with its spread, a float, a string, or None


# ----------------------------------------------------------------------------------------------------
# the table object
# ----------------------------------------------------------------------------------------------------

@dataclass
class Table:
    """A table ready to format: rows (method labels) x columns (metrics) of (mean, spread, n) cells.

    Attributes:
        title: caption title (without a number: Markdown prefixes ``number``, LaTeX numbers it itself).
        columns: column keys (metric keys of metrics.json, or timing keys).
        rows: row keys (result labels: method or method-variant).
        cells: (row, column) -> (mean, spread, n) of our runs; spread is the sample std (ddof = 1) over
            seeds, or what ``spread`` names; NaN when it cannot be computed (one seed).
        notes: caption lines (protocol label, seed counts, rows left out, where the paper numbers come from).
        decimals: digits after the point, per table (``col_decimals`` overrides per column).
        texts: (row, column) -> text for non-numeric cells of ours (e.g. "1 + 25" network evaluations).
        paper: (row, column) -> the paper's reported value (see ``Paper``).
        status: row -> "" (has runs), "not run" or "not implemented".
        names: row -> the paper's name of the row (shown next to the key).
        headers: column -> display title.
        directions: column -> higher_is_better, for columns without metric metadata.
        compare: show ours, paper and the difference (or ratio) side by side.
        compare_kind: column -> "diff" (ours - paper) or "ratio" (ours / paper).
        spread: "std" (mean ± std) or "iqr" (median with the interquartile range).
        count_label: what n counts ("seeds" or "images").
        marks: (row, column) -> a mark after our number (e.g. "†": worse than the best row, see
            :mod:`amisbench.report.stats`).
        number: the table's id ("1" for Table 1 of configs/tables.yaml; None for a table of all runs).
        references: reference rows (e.g. ``unet``, ``oracle``): listed last, set apart, never bold.
    """

    title: str
    columns: list[str]
    rows: list[str]
    cells: dict[tuple[str, str], tuple[float, float, int]]
    notes: list[str] = field(default_factory=list)
    decimals: int = 3
    texts: dict[tuple[str, str], str] = field(default_factory=dict)
    paper: dict[tuple[str, str], Paper] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    directions: dict[str, bool | None] = field(default_factory=dict)
    compare: bool = False
    compare_kind: dict[str, str] = field(default_factory=dict)
    col_decimals: dict[str, int] = field(default_factory=dict)
    spread: str = "std"
    count_label: str = "seeds"
    marks: dict[tuple[str, str], str] = field(default_factory=dict)
    number: str | None = None
    references: list[str] = field(default_factory=list)

    # -- questions ------------------------------------------------------------------------------------
    def direction(self, col: str) -> bool | None:
        """higher_is_better of a column: the table's own setting, else the metric metadata, else None."""
        if col in self.directions:
            return self.directions[col]
        from ..metrics import metric_info

        try:
            return metric_info(col).higher_is_better
        except ValueError:
            return None

    def best(self, col: str) -> str | None:
        """The row with the best of our values in ``col`` (None without a direction or with < 2 values)."""
        hib = self.direction(col)
        vals = {r: self.cells[(r, col)][0] for r in self.ranked_rows() if (r, col) in self.cells
                and not math.isnan(self.cells[(r, col)][0])}
        if hib is None or len(vals) < 2:
            return None
        return (max if hib else min)(vals, key=vals.get)

    def ranked_rows(self) -> list[str]:
        """The rows that compete for bold (every row but the reference rows)."""
        return [r for r in self.rows if r not in self.references]

    def heading(self) -> str:
        return f"Table {self.number}. {self.title}" if self.number else self.title

    def dec(self, col: str) -> int:
        return self.col_decimals.get(col, self.decimals)

    def has_paper(self) -> bool:
        return bool(self.paper)

    def row_label(self, row: str) -> str:
        return f"{row} ({self.names[row]})" if self.names.get(row) else row

    # -- texts of one cell ----------------------------------------------------------------------------
    def number_text(self, row: str, col: str, with_n: bool = True) -> str | None:
        if (row, col) not in self.cells:
            return None
        mean, spread, n = self.cells[(row, col)]
        d = self.dec(col)
        mark = self.marks.get((row, col), "")
        if math.isnan(spread):  # one seed (or image): the value and its count, no spread to show
            return f"{mean:.{d}f}{mark}" + (f" (n={n})" if with_n else "")
        if self.spread == "iqr":
            return f"{mean:.{d}f}{mark} (IQR {spread:.{d}f}" + (f", n={n})" if with_n else ")")
        return f"{mean:.{d}f}{mark} ± {spread:.{d}f}" + (f" (n={n})" if with_n else "")

    def ours_text(self, row: str, col: str) -> str:
        """Our value: "mean ± std (n=k)", a text cell, "not run" or "–"."""
        if (row, col) in self.texts:
            return self.texts[(row, col)]
        txt = self.number_text(row, col)
        if txt is not None:
            return txt
        return self.status.get(row) or "–"

    def paper_text(self, row: str, col: str) -> str:
        return format_paper(self.paper.get((row, col)), self.dec(col))

    def delta_text(self, row: str, col: str) -> str:
        """ours - paper (or ours / paper) of the means; "–" when either is missing."""
        ours = self.cells.get((row, col))
        ref = paper_mean(self.paper.get((row, col)))
        if ours is None or ref is None or math.isnan(ours[0]):
            return "–"
        if self.compare_kind.get(col, "diff") == "ratio":
            return "–" if ref == 0 else f"×{ours[0] / ref:.3g}"
        return f"{ours[0] - ref:+.{self.dec(col)}f}"

    def cell_text(self, row: str, col: str) -> str:
        """One cell as the non-comparing formats show it: ours, or "not run (paper: x)" for rows without runs."""
        txt = self.ours_text(row, col)
        if self.status.get(row) and (row, col) not in self.cells and (row, col) not in self.texts:
            p = self.paper.get((row, col))
            if p is not None:
                return f"{txt} (paper: {format_paper(p, self.dec(col))})"
        return txt


def format_paper(p: Paper, d: int) -> str:
    if p is None:
        return "–"
    if isinstance(p, (list, tuple)):
        mean, std = p[0], p[1] if len(p) > 1 else None
        return f"{mean:.{d}f}" + ("" if std is None else f" ± {std:.{d}f}")
    if isinstance(p, bool):
        return str(p)
    if isinstance(p, (int, float)):
        return f"{p:g}" if float(p).is_integer() else f"{p:.{d}f}"
    return str(p)


def paper_mean(p: Paper) -> float | None:
    if isinstance(p, (list, tuple)) and p and isinstance(p[0], (int, float)):
        return float(p[0])
    if isinstance(p, (int, float)) and not isinstance(p, bool):
        return float(p)
    return None


# ----------------------------------------------------------------------------------------------------
# table definitions (configs/tables.yaml) and the paper's numbers (configs/paper/atfm_tables.yaml)
# ----------------------------------------------------------------------------------------------------

@dataclass
class ColumnDef:
    key: str
    paper: str
    title: str | None = None
    higher_is_better: bool | None = None
    has_direction: bool = False
    compare: str = "diff"
    decimals: int | None = None
    paper_value: Any = None  # the same paper text for every row (e.g. the paper's GPU)


@dataclass
class RowDef:
    key: str
    paper: str
    name: str | None = None
    also: list[str] = field(default_factory=list)
    reason: str | None = None  # why the row cannot run here (shown instead of a bare "not run")

    @property
    def method(self) -> str:
        return self.key.split("-", 1)[0]

    @property
    def variant(self) -> str | None:
        return self.key.split("-", 1)[1] if "-" in self.key else None


@dataclass
class TableDef:
    id: str
    title: str
    kind: str
    dataset: str
    paper: str | None
    columns: list[ColumnDef]
    rows: list[RowDef]
    inference: dict[str, list[str]] = field(default_factory=dict)
    reference: str | None = None
    references: list[str] = field(default_factory=list)  # reference methods (top-level reference_rows)
    dataset_names: dict[str, str] = field(default_factory=dict)  # dataset -> name in titles
    settings: dict[str, dict] = field(default_factory=dict)  # config key -> {title, values}: caption notes

    def title_for(self, dataset: str, samples: str = "100") -> str:
        """The caption title for runs on ``dataset`` (``{dataset}`` and ``{samples}`` filled in)."""
        name = self.dataset_names.get(dataset, dataset)
        try:
            text = self.title.format(dataset=name, samples=samples)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"configs/tables.yaml: tables.{self.id}.title: only {{dataset}} and {{samples}} may "
                            f"be filled in, got {self.title!r} ({e})") from None
        if dataset != self.dataset:
            text += f" (the layout of the paper's Table {self.id}, which is on " \
                    f"{self.dataset_names.get(self.dataset, self.dataset)})"
        return text


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _packaged(*parts: str) -> Path | None:
    from ..config import packaged_config

    return packaged_config(*parts)


def _check_keys(d: dict, allowed: tuple[str, ...], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise UserError(f"{where}: unknown key '{k}'; known: {', '.join(allowed)}")


def load_definitions(path: Path | str | None = None) -> dict[str, TableDef]:
    """The table definitions of ``configs/tables.yaml`` (or ``path``), checked strictly."""
    from ..config import read_yaml

    if path is None:
        path = _packaged(TABLES_FILE)
        if path is None:
            raise UserError("configs/tables.yaml is missing from this installation of amisbench")
    where = str(path)
    raw = read_yaml(path, "table definitions")
    if not isinstance(raw, dict) or not isinstance(raw.get("tables"), dict):
        raise UserError(f"{where}: expected a mapping with key 'tables' (table id -> definition)")
    _check_keys(raw, ("tables", "reference_rows", "dataset_names"), where)
    refs = raw.get("reference_rows") or []
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise UserError(f"{where}: reference_rows: expected a list of method names")
    names = raw.get("dataset_names") or {}
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise UserError(f"{where}: dataset_names: expected a mapping of dataset -> name")
    out: dict[str, TableDef] = {}
    for tid, t in raw["tables"].items():
        w = f"{where}: tables.{tid}"
        if not isinstance(t, dict):
            raise UserError(f"{w}: expected a mapping")
        _check_keys(t, ("title", "kind", "dataset", "paper", "columns", "rows", "inference", "reference",
                        "settings"), w)
        for req in ("dataset", "columns", "rows"):
            if req not in t:
                raise UserError(f"{w}: missing key '{req}'")
        kind = t.get("kind", "metrics")
        if kind not in ("metrics", "timing"):
            raise UserError(f"{w}.kind: expected metrics or timing, got {kind!r}")
        cols = []
        for i, c in enumerate(t["columns"] or []):
            if isinstance(c, str):
                c = {"key": c}
            if not isinstance(c, dict) or not isinstance(c.get("key"), str):
                raise UserError(f"{w}.columns[{i}]: expected a metric key or a mapping with 'key'")
            _check_keys(c, ("key", "paper", "title", "higher_is_better", "compare", "decimals", "paper_value"),
                        f"{w}.columns[{i}]")
            if c.get("compare", "diff") not in ("diff", "ratio"):
                raise UserError(f"{w}.columns[{i}].compare: expected diff or ratio, got {c['compare']!r}")
            cols.append(ColumnDef(c["key"], c.get("paper", c["key"]), c.get("title"), c.get("higher_is_better"),
                                  "higher_is_better" in c, c.get("compare", "diff"), c.get("decimals"),
                                  c.get("paper_value")))
        rows = []
        for i, r in enumerate(t["rows"] or []):
            if isinstance(r, str):
                r = {"key": r}
            if not isinstance(r, dict) or not isinstance(r.get("key"), str):
                raise UserError(f"{w}.rows[{i}]: expected a result label or a mapping with 'key'")
            _check_keys(r, ("key", "paper", "name", "also", "reason"), f"{w}.rows[{i}]")
            rows.append(RowDef(r["key"], r.get("paper", r["key"]), r.get("name"), list(r.get("also") or []),
                               r.get("reason")))
        inference = t.get("inference") or {}
        if not isinstance(inference, dict) or not all(isinstance(v, list) for v in inference.values()):
            raise UserError(f"{w}.inference: expected a mapping of method -> list of key=value settings")
        out[str(tid)] = TableDef(str(tid), t.get("title", "{dataset}"), kind, t["dataset"], t.get("paper"),
                                 cols, rows, {k: [str(s) for s in v] for k, v in inference.items()},
                                 t.get("reference"), list(refs), dict(names),
                                 _settings(t.get("settings") or {}, f"{w}.settings"))
    return out


def _settings(raw: Any, where: str) -> dict[str, dict]:
    """``settings``: config key (``method.dice``) -> {title, values: {value: text}}, stated in the caption."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping of config key -> {{title, values}}")
    for key, spec in raw.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("values", {}), dict):
            raise UserError(f"{where}.{key}: expected a mapping with 'title' and 'values' (value -> text)")
        _check_keys(spec, ("title", "values"), f"{where}.{key}")
    return raw


def paper_numbers() -> dict:
    """The paper's reported numbers: ``configs/paper/atfm_tables.yaml``, the one copy, shipped in the package."""
    from ..config import read_yaml

    path = _packaged(*PAPER_PARTS)
    if path is None:
        raise UserError("the paper's numbers (configs/paper/atfm_tables.yaml) are missing from this "
                        "installation of amisbench")
    data = read_yaml(path, "paper numbers")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of table sections")
    return data


# ----------------------------------------------------------------------------------------------------
# selecting runs
# ----------------------------------------------------------------------------------------------------

def _protocol_notes(df: pd.DataFrame, protocol: str) -> list[str]:
    labels = sorted({lab for lab in df["protocol_label"].dropna().unique() if lab})
    if labels:
        return labels
    return [f"protocol: {protocol}"] if protocol else []


def _override_notes(df: pd.DataFrame, labels: list[str]) -> list[str]:
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


def _unfinished_note(unfinished: list[Path], dataset: str, profile: str | None) -> list[str]:
    mine = [u for u in unfinished if u.parts[-4].split("-")[0] == dataset
            and (profile is None or u.parts[-2] == profile)]
    return [f"{len(mine)} unfinished or failed run(s) left out"] if mine else []


def build(results: Path | str, dataset: str, profile: str | None = None, columns: list[str] | None = None,
          protocol: str | None = None) -> Table:
    """Every finished run of ``dataset`` (one row per method label, one column per metric)."""
    from ..results import scan, select_runs, summarize

    df, unfinished = scan(results)
    df, prof, proto = select_runs(df, dataset, profile, protocol)
    if df.empty:
        where = f" with profile '{profile}'" if profile else ""
        raise UserError(f"no finished runs for dataset '{dataset}'{where} under {Path(results) / 'runs'}; "
                        f"run e.g. amisbench run --method ssn --dataset {dataset}")
    s = summarize(df)
    present = list(s["metric"].unique())
    cols = columns or [m for m in DEFAULT_ORDER if m in present] + sorted(set(present) - set(DEFAULT_ORDER))
    rows = list(dict.fromkeys(s["label"]))
    cells = {(r.label, r.metric): (float(r.mean), float(r.std), int(r.n)) for r in s.itertuples()}
    notes = [f"mean ± std (ddof=1) over seeds, n = number of seeds; profile {prof}"]
    notes += _protocol_notes(df, proto)
    notes += _override_notes(df, sorted(rows))
    notes += _unfinished_note(unfinished, dataset, prof)
    refs = reference_methods()
    ranked = sorted(r for r in rows if label_method(r) not in refs)
    references = sorted(r for r in rows if label_method(r) in refs)
    return Table(f"{dataset}: every finished run", cols, ranked + references, cells, notes, references=references)


def label_method(label: str) -> str:
    """The method of a result label (``method[-variant][+tag]``)."""
    return label.split("+", 1)[0].split("-", 1)[0]


def reference_methods() -> list[str]:
    """Methods whose rows calibrate the others (``reference_rows`` of configs/tables.yaml): never ranked."""
    defs = load_definitions()
    return next(iter(defs.values())).references if defs else []


def _is_implemented(method: str) -> bool:
    from ..registry import METHODS

    return method in METHODS


def build_table(table_id: str, results: Path | str, dataset: str | None = None, profile: str | None = None,
                protocol: str | None = None, compare: bool = False, device: str | None = None,
                definitions: dict[str, TableDef] | None = None, paper: dict | None = None,
                tag: str | None = None) -> Table:
    """Table ``table_id`` of ``configs/tables.yaml`` from the result folders under ``results``.

    Args:
        table_id: "1", "2", "3" or "4" (any id of the definitions).
        results: the results folder (holding runs/ and timing/).
        dataset: build the table from this dataset's runs instead of the paper's dataset.
        profile: profile of the runs (needed when several exist).
        protocol: split protocol of the runs (needed when several exist).
        compare: show ours, the paper's number and the difference side by side.
        device: timing tables: the device folder under results/timing (needed when several exist).
        tag: metrics tables: take the runs of ``amisbench run --tag TAG`` (default: the untagged runs).
    """
    defs = definitions if definitions is not None else load_definitions()
    if str(table_id) not in defs:
        raise UserError(f"unknown table '{table_id}'; known: {', '.join(defs)}")
    d = defs[str(table_id)]
    ds = dataset or d.dataset
    same = ds == d.dataset  # the paper's numbers belong to its dataset only
    if compare and not same:
        raise UserError(f"--compare-paper: the paper's Table {d.id} reports {d.dataset} numbers, and these runs "
                        f"are on {ds}; drop --compare-paper, or build --dataset {d.dataset}")
    pap = paper if paper is not None else (paper_numbers() if d.paper and same else {})
    section = pap.get(d.paper) if d.paper and same else None
    if d.paper and same and not isinstance(section, dict):
        raise UserError(f"the paper's numbers have no section '{d.paper}' (table {d.id} of configs/tables.yaml)")
    t = Table(d.title_for(ds), [c.key for c in d.columns], [r.key for r in d.rows], {}, compare=compare,
              number=d.id)
    for c in d.columns:
        if c.title:
            t.headers[c.key] = c.title
        if c.has_direction:
            t.directions[c.key] = c.higher_is_better
        if c.decimals is not None:
            t.col_decimals[c.key] = c.decimals
        t.compare_kind[c.key] = c.compare
    for r in d.rows:
        if r.name:
            t.names[r.key] = r.name
        prow = ((section or {}).get("rows") or {}).get(r.paper) or {}
        for c in d.columns:
            val = c.paper_value if c.paper_value is not None else prow.get(c.paper)
            if val is not None:
                t.paper[(r.key, c.key)] = val
    if d.kind == "timing":
        samples = _fill_timing(t, d, results, ds, profile, device)
        t.title = d.title_for(ds, samples)
        t.headers = {k: v.replace("{samples}", samples) for k, v in t.headers.items()}
    else:
        _fill_metrics(t, d, results, ds, profile, protocol, tag)
    missing = [r.key + (f" ({r.reason})" if r.reason else "") for r in d.rows if not _is_implemented(r.method)]
    if missing:
        t.notes.append("not implemented in amisbench: " + ", ".join(missing))
    if d.paper and same:
        src = pap.get("source", "the paper")
        spread = "; mean ± std over five runs" if d.kind == "metrics" else ""
        gpu = (pap.get("settings") or {}).get("gpu") if d.kind == "timing" else None
        t.notes.append(f"paper: {src}, Table {d.id} ({d.dataset}){spread}" + (f"; {gpu}" if gpu else ""))
    elif d.paper:
        t.notes.append(f"the paper's numbers are not shown: its Table {d.id} is on {d.dataset}, not {ds}")
    return t


def _fill_metrics(t: Table, d: TableDef, results: Path | str, ds: str, profile: str | None,
                  protocol: str | None, tag: str | None = None) -> None:
    from ..results import scan, select_runs, summarize

    df, unfinished = scan(results)
    df, prof, proto = select_runs(df, ds, profile, protocol)
    s = summarize(df)
    labels = set(s["label"])
    if tag:  # the runs of one --tag: a row's labels gain "+tag"
        rows = [dataclasses.replace(r, also=[f"{lab}+{tag}" for lab in [r.key, *r.also]]) for r in d.rows]
        t.notes.append(f"runs tagged {tag}")
    else:
        rows = list(d.rows)
    tagged = sorted(lab for lab in labels if "+" in lab and not (tag and lab.endswith(f"+{tag}")))
    if tagged:
        t.notes.append(f"tagged runs not in this table: {', '.join(tagged)} (build it from one tag with --tag NAME)")
    seeds_note, used = [], []
    for lab in sorted(labels):  # reference rows with runs (unet, oracle) follow the table's rows, set apart
        if label_method(lab) in d.references and lab not in t.rows and "+" not in lab:
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
    t.notes += _protocol_notes(df, proto)
    if seeds_note:
        t.notes.append("seeds: " + "; ".join(seeds_note))
    t.notes += _override_notes(df, used)
    t.notes += _setting_notes(df, used, d.settings)
    t.notes += _unfinished_note(unfinished, ds, prof)


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


def _fill_timing(t: Table, d: TableDef, results: Path | str, ds: str, profile: str | None,
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
            if c.key == "nfe":
                t.texts[(r.key, c.key)] = rec.get("nfe_label", str(rec.get("nfe")))
            elif c.key == "seconds_100":
                t.cells[(r.key, c.key)] = (float(rec["median_s"]), float(rec["iqr_s"]), int(rec["images"]))
            elif c.key == "peak_memory_gb":
                if rec.get("peak_memory_bytes") is not None:
                    t.cells[(r.key, c.key)] = (rec["peak_memory_bytes"] / 1e9, float("nan"), int(rec["images"]))
            elif c.key == "setup":
                t.texts[(r.key, c.key)] = setup_text(rec)
            elif c.key in rec:
                t.texts[(r.key, c.key)] = str(rec[c.key])
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


# ----------------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------------

def _arrow(t: Table, col: str) -> str:
    hib = t.direction(col)
    return "" if hib is None else (" ↑" if hib else " ↓")


def _header(t: Table, col: str) -> str:
    return t.headers.get(col, col) + _arrow(t, col)


REFERENCE_NOTE = "reference rows (calibration, not ranked)"


def to_markdown(t: Table) -> str:
    best = {c: t.best(c) for c in t.columns}
    if t.compare:
        head = "| method | " + " | ".join(f"{_header(t, c)} ours | paper | "
                                         + ("ours/paper" if t.compare_kind.get(c) == "ratio" else "Δ")
                                         for c in t.columns) + " |"
        sep = "|---|" + "---|---|---|" * len(t.columns)
    else:
        head = "| method | " + " | ".join(_header(t, c) for c in t.columns) + " |"
        sep = "|---|" + "---|" * len(t.columns)
    lines = [f"**{t.heading()}**", "", head, sep]
    width = len(sep.split("|")) - 3
    for r in t.rows:
        if t.references and r == t.references[0]:
            lines.append(f"| _{REFERENCE_NOTE}_ |" + " |" * width)
        cells = []
        for c in t.columns:
            txt = t.ours_text(r, c) if t.compare else t.cell_text(r, c)
            cells.append(f"**{txt}**" if best[c] == r else txt)
            if t.compare:
                cells += [t.paper_text(r, c), t.delta_text(r, c)]
        lines.append(f"| {t.row_label(r)} | " + " | ".join(cells) + " |")
    lines.append("")
    if any(best.values()):
        lines.append("_bold: best of our runs per column (↓ lower is better, ↑ higher is better)"
                     + ("; reference rows are not ranked" if t.references else "") + "_")
    lines += [f"_{n}_" for n in t.notes]
    return "\n".join(lines) + "\n"


_TEX_CHARS = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
              "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
              "±": r"$\pm$", "×": r"$\times$", "↑": r"$\uparrow$", "↓": r"$\downarrow$", "–": "--",
              "Δ": r"$\Delta$", "†": r"$^\dagger$"}


def _tex(s: str) -> str:
    return "".join(_TEX_CHARS.get(ch, ch) for ch in str(s))


def _tex_ours(t: Table, r: str, c: str, bold: bool) -> str:
    if (r, c) in t.cells and (r, c) not in t.texts:
        mean, spread, n = t.cells[(r, c)]
        d = t.dec(c)
        m = f"{mean:.{d}f}"
        m = (r"\textbf{" + m + "}" if bold else m) + _tex(t.marks.get((r, c), ""))
        if math.isnan(spread):
            return f"{m} {{\\scriptsize ($n$={n})}}"
        if t.spread == "iqr":
            return f"{m} {{\\scriptsize (IQR {spread:.{d}f}, $n$={n})}}"
        return f"{m} $\\pm$ {spread:.{d}f} {{\\scriptsize ($n$={n})}}"
    return _tex(t.ours_text(r, c) if t.compare else t.cell_text(r, c))


def to_latex(t: Table) -> str:
    """A booktabs table; every row of the table is one LaTeX row (``\\\\``), the notes go in the caption.
    The caption carries no number of its own (LaTeX numbers the table); reference rows follow a rule."""
    ncol = len(t.columns) * (3 if t.compare else 1)
    caption = ". ".join(p for p in [t.title, "; ".join(t.notes)] if p)
    lines = [r"\begin{table}[t]", r"\centering", r"\caption{" + _tex(caption) + "}"]
    if t.number:
        lines.append(r"\label{tab:amisbench-" + _tex(t.number) + "}")
    lines += [r"\begin{tabular}{l" + "c" * ncol + "}", r"\toprule"]
    if t.compare:
        lines.append("Method & " + " & ".join(r"\multicolumn{3}{c}{" + _tex(_header(t, c)) + "}"
                                              for c in t.columns) + r" \\")
        lines.append(" ".join(rf"\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(len(t.columns))))
        lines.append(" & " + " & ".join("ours & paper & " + (r"ours/paper" if t.compare_kind.get(c) == "ratio"
                                                              else r"$\Delta$") for c in t.columns) + r" \\")
    else:
        lines.append("Method & " + " & ".join(_tex(_header(t, c)) for c in t.columns) + r" \\")
    lines.append(r"\midrule")
    best = {c: t.best(c) for c in t.columns}
    for r in t.rows:
        if t.references and r == t.references[0]:
            lines.append(r"\midrule")
        cells = []
        for c in t.columns:
            cells.append(_tex_ours(t, r, c, best[c] == r))
            if t.compare:
                cells += [_tex(t.paper_text(r, c)), _tex(t.delta_text(r, c))]
        lines.append(_tex(t.row_label(r)) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    """Long format, one line per (method, column); numbers stay numbers, ``text`` is the cell as the other
    formats show it. Tables with a definition also carry the row status (``ok`` for rows with results) and,
    where the paper reports numbers for this dataset, the paper's number as value and text and the difference."""
    import pandas as pd

    recs = []
    defined = bool(t.status)
    for r in t.rows:
        for c in t.columns:
            rec: dict[str, Any] = {"method": r, "metric": c}
            if (r, c) in t.cells:
                mean, std, n = t.cells[(r, c)]
                rec.update(mean=mean, std=std, n=n, best=t.best(c) == r)
            elif not defined:
                continue
            else:
                rec.update(mean=None, std=None, n=0, best=False)
            rec["reference"] = r in t.references
            rec["text"] = t.ours_text(r, c)
            if defined:
                rec["status"] = t.status.get(r) or "ok"
            if t.has_paper():
                p = t.paper.get((r, c))
                rec.update(paper_mean=paper_mean(p),
                           paper_std=(p[1] if isinstance(p, (list, tuple)) and len(p) > 1 else None),
                           paper_text=None if p is None else format_paper(p, t.dec(c)))
                dt = t.delta_text(r, c)
                rec["delta"] = None if dt == "–" else dt
            recs.append(rec)
    return pd.DataFrame(recs).to_csv(index=False)


def with_stats(t: Table, results: Path | str, dataset: str, profile: str | None, protocol: str | None) -> Table:
    """``t`` with the rows that are significantly worse than each column's best marked (:mod:`amisbench.report.stats`)."""
    from .stats import mark_table, row_values

    mark_table(t, row_values(results, dataset, profile, protocol))
    return t


FORMATS = {"md": to_markdown, "latex": to_latex, "csv": to_csv}


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

CLI_HELP = "print a table of finished runs, or Table 1-4 of the paper next to its numbers"


def configure_parser(p) -> None:
    from ..cli import add_results_option
    from ..reference import add_hide_option

    p.add_argument("--table", default=None, help="a table of configs/tables.yaml: 1 (LIDC), 2 (ISIC3), "
                   "3 (inference time), 4 (ATFM ablation)")
    p.add_argument("--dataset", default=None, help="dataset whose runs to tabulate (default with --table: the "
                   "paper's dataset of that table)")
    p.add_argument("--profile", default=None, help="profile of the runs (needed when several exist)")
    p.add_argument("--protocol", default=None, help="split protocol of the runs (needed when several exist)")
    p.add_argument("--device", default=None, help="Table 3: device folder under results/timing")
    p.add_argument("--tag", default=None, metavar="NAME", help="with --table: the runs of `amisbench run --tag NAME` "
                   "(default: untagged runs; without --table every tag is its own row, method+NAME)")
    p.add_argument("--format", default="md", choices=list(FORMATS), help="output format (default md)")
    p.add_argument("--compare-paper", action="store_true",
                   help="with --table: ours, the paper's number and the difference side by side")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    add_results_option(p)
    add_hide_option(p)


def command(a) -> int:
    import sys

    from ..reference import with_reference
    from ..runner import default_results
    from ..store import atomic_write_text, check_output_file

    results = a.results or default_results()
    if a.out is not None:  # before any work or output: a folder or a read-only place is refused here
        check_output_file(a.out, "--out")
    if a.table is not None:
        defs = load_definitions()
        if str(a.table) not in defs:
            raise UserError(f"unknown table '{a.table}'; known: {', '.join(defs)}")
        ds = a.dataset or defs[str(a.table)].dataset

        def make(folder):
            t = build_table(a.table, folder, a.dataset, a.profile, a.protocol, a.compare_paper, a.device, defs,
                            tag=a.tag)
            return with_stats(t, folder, ds, a.profile, a.protocol) if defs[str(a.table)].kind == "metrics" else t
    else:
        if a.dataset is None:
            raise UserError("give --dataset D (every run of D) or --table N (a table of the paper)")
        if a.compare_paper:
            raise UserError("--compare-paper needs --table N (the paper's numbers belong to its tables)")
        if a.tag:
            raise UserError("--tag needs --table N (without it every tag is a row of its own, method+NAME)")

        def make(folder):
            return with_stats(build(folder, a.dataset, a.profile, protocol=a.protocol), folder, a.dataset,
                              a.profile, a.protocol)
    t = with_reference(make, results, a.no_reference)
    text = FORMATS[a.format](t)
    sys.stdout.write(text)
    if a.out is not None:
        atomic_write_text(a.out, text)
    return 0
