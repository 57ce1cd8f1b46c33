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

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..metric_registry import column_order, direction
from ..options import add_hide_option, add_results_option, results_folder
from .cells import fill_metrics, fill_timing, override_notes, protocol_notes, unfinished_note
from .definitions import (Paper, TableDef, format_paper, label_method, load_definitions, paper_mean, paper_numbers,
                          reference_methods)
from .formats import FORMATS

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
        return self.directions[col] if col in self.directions else direction(col)

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


# ----------------------------------------------------------------------------------------------------
# building tables
# ----------------------------------------------------------------------------------------------------

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
    cols = columns or column_order(present)
    rows = list(dict.fromkeys(s["label"]))
    cells = {(r.label, r.metric): (float(r.mean), float(r.std), int(r.n)) for r in s.itertuples()}
    notes = [f"mean ± std (ddof=1) over seeds, n = number of seeds; profile {prof}"]
    notes += protocol_notes(df, proto)
    notes += override_notes(df, sorted(rows))
    notes += unfinished_note(unfinished, dataset, prof)
    refs = reference_methods()
    ranked = sorted(r for r in rows if label_method(r) not in refs)
    references = sorted(r for r in rows if label_method(r) in refs)
    return Table(f"{dataset}: every finished run", cols, ranked + references, cells, notes, references=references)


def _is_implemented(method: str) -> bool:
    from ..registry import METHODS

    return METHODS.has(method)


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
        samples = fill_timing(t, d, results, ds, profile, device)
        t.title = d.title_for(ds, samples)
        t.headers = {k: v.replace("{samples}", samples) for k, v in t.headers.items()}
    else:
        fill_metrics(t, d, results, ds, profile, protocol, tag)
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


def with_stats(t: Table, results: Path | str, dataset: str, profile: str | None, protocol: str | None) -> Table:
    """``t`` with the rows that are significantly worse than each column's best marked
    (:mod:`amisbench.report.stats`)."""
    from .stats import mark_table, row_values

    mark_table(t, row_values(results, dataset, profile, protocol))
    return t


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

CLI_HELP = "print a table of finished runs, or Table 1-4 of the paper next to its numbers"


def configure_parser(p) -> None:
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
    from ..store import atomic_write_text, check_output_file

    results = results_folder(a)
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
