"""Build tables from result files only: mean ± std (ddof = 1) over seeds of the per-seed means, with the seed
count in every cell and the best value per column in bold."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import UserError
from .metrics import METRICS, metric_info
from .results import scan, summarize

DEFAULT_ORDER = ["GED_16", "GED_32", "GED_100", "HMIoU_32", "MDM_32", "GED_true_100", "diversity_100"]


@dataclass
class Table:
    """A table ready to format: rows (method labels) x columns (metrics) of (mean, std, n) cells."""

    title: str
    columns: list[str]
    rows: list[str]
    cells: dict[tuple[str, str], tuple[float, float, int]]
    notes: list[str] = field(default_factory=list)
    decimals: int = 3

    def best(self, col: str) -> str | None:
        hib = metric_info(col).higher_is_better
        vals = {r: self.cells[(r, col)][0] for r in self.rows if (r, col) in self.cells
                and not math.isnan(self.cells[(r, col)][0])}
        if hib is None or len(vals) < 2:
            return None
        return (max if hib else min)(vals, key=vals.get)

    def cell_text(self, row: str, col: str) -> str:
        if (row, col) not in self.cells:
            return "–"
        mean, std, n = self.cells[(row, col)]
        d = self.decimals
        sd = "n/a" if math.isnan(std) else f"{std:.{d}f}"
        return f"{mean:.{d}f} ± {sd} (n={n})"


def build(results: Path | str, dataset: str, profile: str | None = None, columns: list[str] | None = None
          ) -> Table:
    df, unfinished = scan(results)
    df = df[df["dataset"] == dataset]
    if profile:
        df = df[df["profile"] == profile]
    if df.empty:
        where = f" with profile '{profile}'" if profile else ""
        raise UserError(f"no finished runs for dataset '{dataset}'{where} under {Path(results) / 'runs'}; "
                        f"run e.g. amisbench run --method ssn --dataset {dataset}")
    profiles = sorted(df["profile"].unique())
    if len(profiles) > 1:
        raise UserError(f"runs of several profiles ({', '.join(profiles)}) for dataset '{dataset}'; "
                        "pick one with --profile")
    s = summarize(df)
    present = list(s["metric"].unique())
    cols = columns or [m for m in DEFAULT_ORDER if m in present] + sorted(set(present) - set(DEFAULT_ORDER))
    rows = list(dict.fromkeys(s["label"]))
    cells = {(r.label, r.metric): (float(r.mean), float(r.std), int(r.n)) for r in s.itertuples()}
    notes = [f"mean ± std (ddof=1) over seeds, n = number of seeds; profile {profiles[0]}"]
    labels = sorted({l for l in df["protocol_label"].dropna().unique() if l})
    notes += labels
    mine = [u for u in unfinished if u.parts[-4].split("-")[0] == dataset]
    if mine:
        notes.append(f"{len(mine)} unfinished or failed run(s) left out")
    return Table(f"{dataset}", cols, sorted(rows), cells, notes)


def _direction(col: str) -> str:
    hib = metric_info(col).higher_is_better
    return "" if hib is None else (" ↑" if hib else " ↓")


def to_markdown(t: Table) -> str:
    head = "| method | " + " | ".join(c + _direction(c) for c in t.columns) + " |"
    sep = "|---|" + "---|" * len(t.columns)
    lines = [f"**{t.title}**", "", head, sep]
    best = {c: t.best(c) for c in t.columns}
    for r in t.rows:
        cells = []
        for c in t.columns:
            txt = t.cell_text(r, c)
            cells.append(f"**{txt}**" if best[c] == r else txt)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"_{n}_" for n in t.notes]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    return s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def to_latex(t: Table) -> str:
    lines = [r"\begin{table}[t]", r"\centering",
             r"\caption{" + _tex(t.title + ". " + "; ".join(t.notes)) + "}",
             r"\begin{tabular}{l" + "c" * len(t.columns) + "}", r"\toprule",
             "Method & " + " & ".join(_tex(c) + {" ↑": r" $\uparrow$", " ↓": r" $\downarrow$", "": ""}[_direction(c)]
                                      for c in t.columns) + r" \\", r"\midrule"]
    best = {c: t.best(c) for c in t.columns}
    for r in t.rows:
        cells = []
        for c in t.columns:
            if (r, c) not in t.cells:
                cells.append("--")
                continue
            mean, std, n = t.cells[(r, c)]
            d = t.decimals
            sd = "n/a" if math.isnan(std) else f"{std:.{d}f}"
            txt = f"{mean:.{d}f}"
            txt = r"\textbf{" + txt + "}" if best[c] == r else txt
            cells.append(f"{txt} $\\pm$ {sd}")
        lines.append(_tex(r) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    recs = []
    for r in t.rows:
        for c in t.columns:
            if (r, c) in t.cells:
                mean, std, n = t.cells[(r, c)]
                recs.append({"method": r, "metric": c, "mean": mean, "std": std, "n": n, "best": t.best(c) == r})
    return pd.DataFrame(recs).to_csv(index=False)


FORMATS = {"md": to_markdown, "latex": to_latex, "csv": to_csv}


CLI_HELP = "print a table of finished runs (mean ± std over seeds)"


def configure_parser(p) -> None:
    from .cli import add_results_option

    p.add_argument("--dataset", required=True, help="dataset whose runs to tabulate")
    p.add_argument("--profile", default=None, help="profile of the runs (needed when several exist)")
    p.add_argument("--format", default="md", choices=list(FORMATS), help="output format (default md)")
    add_results_option(p)


def command(a) -> int:
    import sys

    from .runner import default_results

    t = build(a.results or default_results(), a.dataset, a.profile)
    sys.stdout.write(FORMATS[a.format](t))
    return 0
