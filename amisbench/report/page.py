"""Write one self-contained results page (``index.html`` and its images in one folder) from result files.

Per dataset, protocol and profile: the leaderboard (every metric as mean ± std over seeds with its 95 %
bootstrap interval, the numbers of seeds and images, rows significantly worse than the best marked, leaky
protocols flagged, the calibration rows ``unet``/``oracle`` apart), the paper's numbers beside ours where the
dataset is the paper's, Table 3 timings with device and dtype, the figures found under
``<results>/figures/<dataset>/`` (sample grids, steps and alpha curves), and every run's provenance (git
commit, config hash, the command that reproduces it). The page needs no network and no JavaScript (a small
inline script only makes the columns sortable); the shipped reference results appear beside the user's.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..metric_registry import column_order, direction

if TYPE_CHECKING:
    import pandas as pd

    from .stats import CellStats
    from .tables import Table

INDEX = "index.html"
IMAGES = "img"
MINE, REFERENCE = "yours", "reference"
PRIMARY = ("GED_100", "GED_32", "GED_16")  # the leaderboard is ordered by the first of these present


# ----------------------------------------------------------------------------------------------------
# what the page shows
# ----------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """One results folder shown on the page: the user's, or the shipped reference results."""

    kind: str  # MINE or REFERENCE
    folder: Path
    runs: pd.DataFrame  # results.scan of the folder


@dataclass
class Board:
    """The leaderboard of one (dataset, protocol, profile)."""

    dataset: str
    protocol: str
    profile: str
    protocol_label: str
    rows: list[str]  # row keys: a label, or "<label> (reference)"
    label: dict[str, str]  # row key -> result label
    source: dict[str, str]  # row key -> MINE or REFERENCE
    runs: dict[str, list[str]]  # row key -> run folders
    metrics: list[str]
    cells: dict[tuple[str, str], tuple[float, float, int]]  # (row, metric) -> mean, std, seeds
    stats: dict[tuple[str, str], CellStats] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)  # row key -> test images scored
    primary: str | None = None  # the metric the rows are ordered by


def _row_key(label: str, kind: str) -> str:
    from ..reference import SUFFIX

    return label if kind == MINE else label + SUFFIX


def boards(sources: list[Source], dataset: str) -> list[Board]:
    """Leaderboards of ``dataset`` over every source (one per protocol and profile found)."""
    import pandas as pd

    from ..results import summarize
    from .stats import is_calibration, column_stats, per_image

    frames = [s.runs.assign(source=s.kind) for s in sources if not s.runs.empty]
    if not frames:
        return []
    df = pd.concat(frames, ignore_index=True)
    df = df[df["dataset"] == dataset].fillna({"protocol": "", "protocol_label": ""})
    out = []
    for (protocol, profile), part in df.groupby(["protocol", "profile"], sort=True):
        present = list(part["metric"].unique())
        metrics = column_order(present)
        b = Board(dataset, str(protocol), str(profile), next((x for x in part["protocol_label"] if x), ""),
                  [], {}, {}, {}, metrics, {})
        for (kind, label), rows in part.groupby(["source", "label"], sort=False):
            key = _row_key(str(label), str(kind))
            b.rows.append(key)
            b.label[key], b.source[key] = str(label), str(kind)
            b.runs[key] = sorted(rows["run_dir"].unique())
            for r in summarize(rows).itertuples():
                b.cells[(key, r.metric)] = (float(r.mean), float(r.std), int(r.n))
        values = {key: per_image(b.runs[key]) for key in b.rows}
        values = {k: v for k, v in values.items() if not v.empty}
        for key, v in values.items():
            b.images[key] = int(v["id"].nunique())
        compare = [k for k in values if not is_calibration(b.label[k])]
        for m in metrics:
            for key, s in column_stats(values, m, direction(m), compare=compare).items():
                b.stats[(key, m)] = s
        first = next((m for m in PRIMARY if m in metrics), metrics[0] if metrics else None)
        b.primary = first
        hib = direction(first) if first else None

        def order(key: str, first=first, hib=hib) -> tuple:
            mean = b.cells.get((key, first), (math.nan,))[0]
            return (math.isnan(mean), -mean if hib else mean, key)

        b.rows.sort(key=order)
        out.append(b)
    return out


def _datasets(sources: list[Source]) -> list[str]:
    found: set[str] = set()
    for s in sources:
        if not s.runs.empty:
            found |= set(s.runs["dataset"])
        timing = s.folder / "timing"
        found |= {f.name.split("__", 1)[0] for f in timing.glob("*/*__*.json")} if timing.is_dir() else set()
    return sorted(found)


# ----------------------------------------------------------------------------------------------------
# HTML pieces
# ----------------------------------------------------------------------------------------------------

def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: float, d: int = 3) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.{d}f}"


def _header(metric: str, hib: bool | None) -> str:
    arrow = "" if hib is None else (" ↑" if hib else " ↓")
    return esc(metric + arrow)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem auto;max-width:1400px;
color:#1d1d1f;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}h3{margin-top:1.6rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.88rem}
th,td{border-bottom:1px solid #e3e3e3;padding:.3rem .45rem;text-align:right;vertical-align:top}
th{background:#f4f5f7;position:sticky;top:0}th.sortable{cursor:pointer}
td.name,th.name{text-align:left;white-space:nowrap}
tr.reference td.name::after{content:" reference";font-size:.72rem;color:#fff;background:#6c7a89;
border-radius:3px;padding:0 .3rem;margin-left:.35rem}
td.best{font-weight:700;background:#eaf6ea}.v,.ci{white-space:nowrap}
.ci{display:block;color:#666;font-size:.75rem;font-weight:400}
.worse{color:#b3261e}.badge{display:inline-block;border-radius:4px;padding:.05rem .45rem;font-size:.8rem}
.leaky{background:#fde7e5;color:#8c1d18;border:1px solid #e7a29c}.ok{background:#e8f1fb;color:#1b4f8a}
.note{color:#555;font-size:.85rem;margin:.2rem 0}figure{margin:1rem 0}
figure img{max-width:100%;border:1px solid #ddd;background:#fff}figure img.narrow{max-width:min(100%,520px)}
.wide{overflow-x:auto}.js-only{display:none}.js .js-only{display:inline}.wide td{white-space:nowrap}figcaption{color:#555;font-size:.85rem}
code{background:#f4f5f7;padding:0 .25rem;border-radius:3px;font-size:.82rem}
details{margin:.5rem 0}summary{cursor:pointer;font-weight:600}nav a{margin-right:.8rem}
"""

# Collects script and resource errors for the browser test (``index.html#selftest`` prints a JSON summary).
HEAD_SCRIPT = """window.pageErrors=[];window.addEventListener('error',function(e){
window.pageErrors.push(String(e.message||(e.target&&(e.target.src||e.target.href))||'error'));},true);"""

# Sorting is a convenience: without JavaScript the rows stay in their printed order (best first).
SCRIPT = """
document.documentElement.classList.add('js');
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.classList.add('sortable');th.title='click to sort';
    th.addEventListener('click',function(){
      var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows),asc=th.dataset.dir!=='asc';
      rows.sort(function(a,b){
        var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v;
        var nx=parseFloat(x),ny=parseFloat(y);
        if(isNaN(nx)&&isNaN(ny)){x=a.cells[i].textContent;y=b.cells[i].textContent;return asc?x.localeCompare(y):y.localeCompare(x);}
        if(isNaN(nx))return 1;if(isNaN(ny))return -1;return asc?nx-ny:ny-nx;});
      rows.forEach(function(r){body.appendChild(r);});th.dataset.dir=asc?'asc':'desc';});});});
if(location.hash==='#selftest'){window.addEventListener('load',function(){
  var imgs=Array.prototype.slice.call(document.images);
  var out={rows:document.querySelectorAll('table.leaderboard tbody tr').length,images:imgs.length,errors:window.pageErrors||[],
    broken:imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);}).map(function(i){return i.getAttribute('src');})};
  var pre=document.createElement('pre');pre.id='selftest';pre.textContent=JSON.stringify(out);document.body.appendChild(pre);});}
"""


def board_html(b: Board) -> str:
    from ..display import display_name
    from .stats import PROCEDURE, WORSE_MARK, is_calibration

    parts = []
    label = b.protocol_label if "leaky" in b.protocol_label.lower() else f"leaky protocol: {b.protocol_label}"
    flag = (f'<span class="badge leaky">⚠ {esc(label)}</span>' if b.protocol_label
            else f'<span class="badge ok">protocol: {esc(b.protocol or "default")}</span>')
    parts.append(f"<h3>{esc(b.dataset)}, profile {esc(b.profile)} {flag}</h3>")
    competing = [r for r in b.rows if not is_calibration(b.label[r])]
    calibration = [r for r in b.rows if is_calibration(b.label[r])]
    for title, rows in (("", competing), ("Calibration rows (floor and ceiling; not ranked)", calibration)):
        if not rows:
            continue
        if title:
            parts.append(f'<p class="note"><b>{esc(title)}</b></p>')
        head = ['<th class="name">method</th>', "<th>seeds</th>", "<th>images</th>"]
        head += [f"<th>{_header(m, direction(m))}</th>" for m in b.metrics]
        body = []
        for r in rows:
            cls = ' class="reference"' if b.source[r] == REFERENCE else ""
            name = display_name(b.label[r])
            label = esc(name) + ("" if name == b.label[r] else f' <code>{esc(b.label[r])}</code>')
            seeds = max((b.cells[(r, m)][2] for m in b.metrics if (r, m) in b.cells), default=0)
            cells = [f'<td class="name" data-v="{esc(name)}">{label}</td>', f'<td data-v="{seeds}">{seeds}</td>',
                     f'<td data-v="{b.images.get(r, "")}">{b.images.get(r, "–")}</td>']
            for m in b.metrics:
                if (r, m) not in b.cells:
                    cells.append('<td data-v="">–</td>')
                    continue
                mean, std, _ = b.cells[(r, m)]
                s = b.stats.get((r, m))
                mark = f' <span class="worse" title="Holm-adjusted p = {s.p_holm:.3g}">{WORSE_MARK}</span>' \
                    if s is not None and s.worse else ""
                ci = f'<span class="ci">[{_num(s.low)}, {_num(s.high)}]</span>' if s is not None else ""
                best = ' class="best"' if s is not None and s.best else ""
                cells.append(f'<td{best} data-v="{mean!r}"><span class="v">{_num(mean)} ± {_num(std)}{mark}</span>'
                             f'{ci}</td>')
            body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
        parts.append('<div class="wide"><table class="sortable leaderboard"><thead><tr>' + "".join(head)
                     + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>")
    parts.append(f'<p class="note">mean ± std (ddof = 1) over seeds of the per-seed means, [95 % CI] below; '
                 f'green: best row of the column (calibration rows excluded); {esc(PROCEDURE)}. Rows in order of {esc(b.primary)}'
                 f'<span class="js-only"> (click a header to sort)</span>.</p>' if b.metrics else "")
    return "\n".join(parts)


def table_html(t: Table) -> str:
    """Any :class:`~amisbench.report.tables.Table` (paper comparison, Table 3) as an HTML table with its notes.

    Compact: one column per metric, our value on top and the paper's number with the difference below; a
    row without runs says why once, under its name.
    """
    from ..reference import SUFFIX, is_reference_row

    head = ['<th class="name">method</th>'] + [f"<th>{esc(t.headers.get(c, c))}{_header('', t.direction(c))}</th>"
                                              for c in t.columns]
    best = {c: t.best(c) for c in t.columns}
    body = []
    for r in t.rows:
        cls = ' class="reference"' if is_reference_row(r) else ""
        status = t.status.get(r, "")
        # a reference row: its name without the suffix (the row's badge says "reference")
        label = t.row_label(r)
        if is_reference_row(r):
            base = r[:-len(SUFFIX)]
            label = f"{base} ({t.names[r]})" if t.names.get(r) else base
        cells = [f'<td class="name">{esc(label)}'
                 + (f'<span class="ci">{esc(status)}</span>' if status else "") + "</td>"]
        for c in t.columns:
            mean = t.cells.get((r, c), (math.nan,))[0]
            bold = ' class="best"' if best[c] == r else ""
            ours = "–" if status and (r, c) not in t.texts else t.ours_text(r, c)
            below = ""
            if (r, c) in t.paper:
                delta = t.delta_text(r, c)
                below = (f'<span class="ci">paper {esc(t.paper_text(r, c))}'
                         + ("" if delta == "–" else f" (Δ {esc(delta)})") + "</span>")
            cells.append(f'<td{bold} data-v="{mean!r}"><span class="v">{esc(ours)}</span>{below}</td>')
        body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in t.notes)
    return (f"<h3>{esc((f'Table {t.number}. ' if t.number else '') + t.title)}</h3>" + '<div class="wide"><table class="sortable"><thead><tr>' + "".join(head)
            + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>" + notes)


def _command(info: dict, run_dir: Path) -> str:
    """The ``amisbench run`` command that reproduces a finished run (with its ``--set`` overrides)."""
    import shlex

    import yaml

    parts = ["amisbench", "run", "--method", info["method"]]
    if info.get("variant"):
        parts += ["--variant", info["variant"]]
    parts += ["--dataset", info["dataset"], "--seed", str(info["seed"]), "--profile", info["profile"]]
    if info.get("protocol"):
        parts += ["--protocol", info["protocol"]]
    try:
        sources = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("sources") or []
    except (OSError, yaml.YAMLError, AttributeError):
        sources = []
    for src in sources:
        if isinstance(src, str) and src.startswith("--data-root "):
            parts += ["--data-root", src[len("--data-root "):]]
            continue
        if not isinstance(src, str) or not src.startswith("--set ") or src[6:].startswith("dataset.protocol="):
            continue  # the protocol is --protocol above
        key, _, value = src[6:].partition("=")
        parts += ["--data-root", value] if key == "dataset.root" else ["--set", src[6:]]
    return " ".join(shlex.quote(p) for p in parts)


def provenance_html(b: Board) -> str:
    from ..display import display_name

    rows = []
    for r in b.rows:
        for d in b.runs[r]:
            d = Path(d)
            try:
                info = json.loads((d / "run.json").read_text())
            except (OSError, ValueError):
                continue
            git = info.get("git") or {}
            commit = (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
            env = info.get("env") or {}
            seconds = sum(v for v in (info.get("seconds") or {}).values() if isinstance(v, (int, float)))
            rows.append(
                f"<tr><td class='name'>{esc(display_name(b.label[r]))}{' (reference)' if b.source[r] == REFERENCE else ''}"
                f"</td><td>{esc(info.get('seed'))}</td><td><code>{esc(commit)}</code></td>"
                f"<td><code>{esc(info.get('config_hash', '?'))}</code></td><td>{esc(info.get('finished', '?'))}</td>"
                f"<td>{esc(env.get('device', '?'))}</td><td>{seconds:.0f}</td>"
                f"<td class='name'><code>{esc(_command(info, d))}</code></td></tr>")
    if not rows:
        return ""
    return ("<details><summary>Provenance of these runs (git commit, config hash, command to reproduce)</summary>"
            '<div class="wide"><table class="sortable"><thead><tr><th class="name">method</th><th>seed</th>'
            "<th>commit</th><th>config hash</th><th>finished</th><th>device</th><th>seconds</th>"
            "<th class='name'>reproduce</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></div></details>")


# ----------------------------------------------------------------------------------------------------
# the paper's tables, Table 3 and figures
# ----------------------------------------------------------------------------------------------------

def paper_tables(results: Path, dataset: str, hide_reference: bool) -> tuple[list[str], list[str]]:
    """HTML of every table definition about ``dataset`` (the paper's numbers beside ours; Table 3 per
    device), and notes on what was left out."""
    from ..reference import reference_results, with_reference
    from .cells import timing_records
    from .definitions import load_definitions
    from .tables import build_table

    out, skipped = [], []
    for tid, d in load_definitions().items():
        if d.kind == "metrics" and d.dataset != dataset:
            continue
        if d.kind == "timing":
            folders = [results] + [f for f in [reference_results(hide_reference)] if f is not None]
            devices = sorted({dev for f in folders for dev in timing_records(f, dataset)})
            for dev in devices:
                try:
                    t = with_reference(lambda f, dev=dev: build_table(tid, f, dataset, device=dev), results,
                                       hide_reference)
                except UserError as e:
                    skipped.append(f"Table {tid} ({dev}): {e}")
                    continue
                t.title += f" — {dataset}, device {dev}"
                out.append(table_html(t))
            continue
        try:
            t = with_reference(lambda f: build_table(tid, f, dataset, compare=True), results, hide_reference)
        except UserError as e:  # e.g. several profiles: the leaderboard above still shows them
            skipped.append(f"Table {tid}: {e}")
            continue
        if any(not s for s in t.status.values()):
            out.append(table_html(t))
    return out, skipped


def copy_figures(sources: list[Source], dataset: str, out: Path) -> list[tuple[str, str, str]]:
    """Copy the PNG figures of ``dataset`` (``<folder>/figures/<dataset>/*.png``) into the page folder;
    returns (relative path, source kind, file name) of each."""
    found = []
    for s in sources:
        for png in sorted((s.folder / "figures" / dataset).glob("*.png")):
            rel = f"{IMAGES}/{s.kind}-{dataset}-{png.name}"
            (out / IMAGES).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, out / rel)
            found.append((rel, s.kind, png.name))
    return found


FIGURE_TEXT = {"samples": "Samples of each method over the test image: reader and sample contours, per-pixel "
               "mean and variance of the samples", "steps": "Metrics against the sampler's steps",
               "alpha": "Metrics against alpha (runs that differ in it)"}


def figures_html(figs: list[tuple[str, str, str]], dataset: str) -> str:
    if not figs:
        return (f'<p class="note">No figures yet: <code>amisbench figures --dataset {esc(dataset)} --kind all</code> '
                "draws them from finished runs.</p>")
    parts = []
    for rel, kind, name in figs:
        stem = Path(name).stem
        text = next((v for k, v in FIGURE_TEXT.items() if stem.startswith(k)), stem)
        narrow = ' class="narrow"' if stem.endswith("_1col") else ""
        parts.append(f'<figure><img{narrow} src="{esc(rel)}" alt="{esc(stem)} ({esc(kind)})" loading="eager">'
                     f"<figcaption>{esc(text)} — <code>{esc(name)}</code> ({esc(kind)} results; the PDF lies "
                     "beside the PNG in the figures folder)</figcaption></figure>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------------

def sources_of(results: Path | str, hide_reference: bool = False) -> list[Source]:
    from ..reference import reference_results
    from ..results import scan

    out = [Source(MINE, Path(results), scan(results)[0])]
    ref = reference_results(hide_reference)
    if ref is not None:
        out.append(Source(REFERENCE, ref, scan(ref)[0]))
    return out


def write_report(results: Path | str, out: Path | str, dataset: str | None = None,
                 hide_reference: bool = False) -> Path:
    """Write ``<out>/index.html`` (and ``<out>/img/``) for every dataset with results, or ``dataset``.

    Returns:
        The path of ``index.html``.
    """
    from .. import __version__
    from ..reference import REGENERATE
    from ..store import atomic_write_text

    results, out = Path(results), Path(out)
    sources = sources_of(results, hide_reference)
    datasets = _datasets(sources)
    if dataset is not None:
        if dataset not in datasets:
            raise UserError(f"--dataset {dataset}: no finished runs or timings of it under {results}"
                            + (f"; found: {', '.join(datasets)}" if datasets else ""))
        datasets = [dataset]
    if not datasets:
        raise UserError(f"no finished runs under {results / 'runs'} (and no reference results); run e.g. "
                        "amisbench run --method ssn --dataset synthetic")
    if (out / IMAGES).is_dir():
        shutil.rmtree(out / IMAGES)  # figures of an earlier page that may no longer exist
    sections, nav = [], []
    for ds in datasets:
        nav.append(f'<a href="#{esc(ds)}">{esc(ds)}</a>')
        parts = [f'<h2 id="{esc(ds)}">{esc(ds)}</h2>']
        bs = boards(sources, ds)
        for b in bs:
            parts += [board_html(b), provenance_html(b)]
        if not bs:
            parts.append('<p class="note">No finished runs of this dataset (timings only).</p>')
        tables, skipped = paper_tables(results, ds, hide_reference)
        if tables:
            parts.append("<h3>The paper's tables</h3>")
            parts += tables
        parts += [f'<p class="note">left out: {esc(s)}</p>' for s in skipped]
        parts.append("<h3>Figures</h3>")
        parts.append(figures_html(copy_figures(sources, ds, out), ds))
        sections.append("\n".join(parts))
    ref_note = ""
    if any(s.kind == REFERENCE for s in sources):
        ref_note = (f'<p class="note">Rows marked <i>reference</i> are the results shipped with amisbench '
                    f"(regenerate: <code>{esc(REGENERATE)}</code>; hide: <code>--no-reference</code>).</p>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>amisbench results</title><style>{CSS}</style><script>{HEAD_SCRIPT}</script></head>
<body><h1>amisbench results</h1>
<p class="note">Results folder <code>{esc(results)}</code>; amisbench {esc(__version__)}. GED lower is better (↓);
HM-IoU, MDM higher is better (↑). n = number of seeds, each seed scored on the same test images.</p>
{ref_note}<nav>{''.join(nav)}</nav>
{''.join(sections)}
<script>{SCRIPT}</script>
</body></html>
"""
    atomic_write_text(out / INDEX, page)
    return out / INDEX


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

CLI_HELP = "write a self-contained results page (HTML and images in one folder) from the result files"


def configure_parser(p) -> None:
    from ..options import add_hide_option, add_results_option

    p.add_argument("--dataset", default=None, help="only this dataset (default: every dataset with results)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default <results>/report)")
    add_results_option(p)
    add_hide_option(p)


def command(a) -> int:
    from ..options import results_folder
    from ..store import check_output_dir

    results = results_folder(a)
    out = check_output_dir(a.out or Path(results) / "report", "--out")  # before any work
    path = write_report(results, out, a.dataset, a.no_reference)
    print(path)
    return 0
