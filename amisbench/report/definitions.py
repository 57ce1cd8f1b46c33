"""Table definitions (``configs/tables.yaml``) and the paper's reported numbers
(``configs/paper/atfm_tables.yaml``), read and checked strictly; how a paper number is shown.

A new table of the paper is a new entry in ``configs/tables.yaml`` (copy Table 1's); nothing here changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..store import RunSpec, run_label

TABLES_FILE = "tables.yaml"
PAPER_PARTS = ("paper", "atfm_tables.yaml")

#: A value the paper reports: ``[mean, std]`` (a YAML list; std may be null), a number, a text, or None.
Paper = list[float | None] | tuple[float, float | None] | float | str | None


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


def _packaged(*parts: str) -> Path | None:
    from ..config import packaged_config

    return packaged_config(*parts)


def _check_keys(d: dict, allowed: tuple[str, ...], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise UserError(f"{where}: unknown key '{k}'; known: {', '.join(allowed)}")


COLUMN_KEYS = ("key", "paper", "title", "higher_is_better", "compare", "decimals", "paper_value")
ROW_KEYS = ("key", "paper", "name", "also", "reason")


def _entries(items: Any, where: str, what: str, allowed: tuple[str, ...]) -> list[tuple[int, dict]]:
    """The columns or rows of a definition as (index, mapping with 'key'): a bare string is its key."""
    out = []
    for i, item in enumerate(items or []):
        if isinstance(item, str):
            item = {"key": item}
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise UserError(f"{where}[{i}]: expected {what} or a mapping with 'key'")
        _check_keys(item, allowed, f"{where}[{i}]")
        out.append((i, item))
    return out


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
        for i, c in _entries(t["columns"], f"{w}.columns", "a metric key", COLUMN_KEYS):
            if c.get("compare", "diff") not in ("diff", "ratio"):
                raise UserError(f"{w}.columns[{i}].compare: expected diff or ratio, got {c['compare']!r}")
            cols.append(ColumnDef(c["key"], c.get("paper", c["key"]), c.get("title"), c.get("higher_is_better"),
                                  "higher_is_better" in c, c.get("compare", "diff"), c.get("decimals"),
                                  c.get("paper_value")))
        rows = [RowDef(r["key"], r.get("paper", r["key"]), r.get("name"), list(r.get("also") or []), r.get("reason"))
                for _, r in _entries(t["rows"], f"{w}.rows", "a result label", ROW_KEYS)]
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


def with_tag(label: str, tag: str) -> str:
    """The result label of the runs of ``label`` (``method[-variant]``) tagged ``tag``."""
    method, variant, _ = RunSpec.parse_label(label)
    return run_label(method, variant, tag)


def label_method(label: str) -> str:
    """The method of a result label (``method[-variant][+tag]``)."""
    return RunSpec.parse_label(label)[0]


def reference_methods() -> list[str]:
    """Methods whose rows calibrate the others (``reference_rows`` of configs/tables.yaml): never ranked."""
    defs = load_definitions()
    return next(iter(defs.values())).references if defs else []
