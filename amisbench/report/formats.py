"""Output formats of a :class:`~amisbench.report.tables.Table`: Markdown, LaTeX (booktabs) and CSV (long).

A new format is one function ``Table -> str`` added to :data:`FORMATS` (``amisbench table --format``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .definitions import format_paper, paper_mean

if TYPE_CHECKING:
    from .tables import Table


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


FORMATS = {"md": to_markdown, "latex": to_latex, "csv": to_csv}
