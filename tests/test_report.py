"""The results page (``amisbench report``) and the reference results shown beside the user's own runs."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from amisbench import cli
from amisbench.report import figures
from amisbench.report.page import write_report
from amisbench.runner import run


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Smoke runs: the user's ``ssn`` (2 seeds); "reference" results with ``ssn`` (2 seeds), ``unet`` and a
    samples figure; a Table 3 timing record; a leaky-protocol LIDC run written by hand."""
    mine = tmp_path_factory.mktemp("mine")
    ref = tmp_path_factory.mktemp("ref")
    for seed in (0, 1):
        run("ssn", "synthetic", seed=seed, profile="smoke", results=mine, quiet=True)
        run("ssn", "synthetic", seed=seed, profile="smoke", results=ref, quiet=True)
    run("unet", "synthetic", profile="smoke", results=ref, quiet=True)
    figures.samples_figure(ref, "synthetic", ["ssn", "unet"], images=[0, 1], k=2)
    timing = {"device": "cpu", "device_name": "x86_64 test CPU", "dtype": "float32", "images_per_call": 1,
              "samples": 100, "median_s": 1.5, "iqr_s": 0.1, "images": 3, "nfe": 26, "nfe_label": "1 + 25",
              "torch": "2.13.0", "profile": "smoke"}
    (mine / "timing" / "cpu").mkdir(parents=True)
    (mine / "timing" / "cpu" / "synthetic__atfm.json").write_text(json.dumps(timing))
    leaky = mine / "runs" / "lidc-atfm-paper" / "atfm" / "paper" / "seed-0"
    leaky.mkdir(parents=True)
    (leaky / "metrics.json").write_text(json.dumps({"GED_100": 0.17, "HMIoU_32": 0.66}))
    (leaky / "run.json").write_text(json.dumps({
        "status": "done", "method": "atfm", "variant": None, "dataset": "lidc", "profile": "paper", "seed": 0,
        "protocol": "atfm-paper", "protocol_label": "leaky protocol: test slices also in training",
        "config_hash": "abc123", "git": {"commit": "0123456789abcdef", "dirty": False}}))
    return mine, ref


@pytest.fixture
def show_reference(folders, monkeypatch):
    monkeypatch.delenv("AMISBENCH_NO_REFERENCE")
    monkeypatch.setenv("AMISBENCH_REFERENCE", str(folders[1]))
    return folders


def _rows(page: str, table: int = 0, dataset: str = "synthetic") -> list[str]:
    """Rows of the ``table``-th leaderboard of ``dataset``'s section."""
    section = page.split(f'<h2 id="{dataset}">')[1].split("<h2 ")[0]
    tables = re.findall(r'<table class="sortable leaderboard">(.*?)</table>', section, re.S)
    return re.findall(r"<tr[^>]*>(.*?)</tr>", tables[table].split("<tbody>")[1], re.S)


def test_page_has_leaderboard_reference_rows_timing_figures_and_provenance(show_reference, tmp_path):
    mine, ref = show_reference
    index = write_report(mine, tmp_path / "page")
    page = index.read_text()
    # synthetic: the user's and the reference SSN in the ranked table, the U-Net floor apart
    ranked = _rows(page, 0)
    assert len(ranked) == 2 and sum("reference" in r for r in ranked) == 0  # the badge is CSS (class)
    assert page.count('<tr class="reference">') >= 2
    calib = _rows(page, 1)
    assert len(calib) == 1 and "U-Net (floor)" in calib[0]
    first = re.sub(r"<[^>]+>", " ", ranked[0])
    assert re.search(r"SSN\s+ssn\s+2\s+\d+\s+\d\.\d{3} ± \d\.\d{3}\s+\[\d\.\d{3}, \d\.\d{3}\]", first)
    # the leaky LIDC run is flagged and the paper's Table 1 and 4 numbers sit beside ours
    assert "⚠ leaky protocol: test slices also in training</span>" in page and len(_rows(page, 0, "lidc")) == 1
    assert "Table 1. LIDC-IDRI" in page and "0.162" in page
    # Table 3 from the timing record, with device and dtype
    assert "Table 3" in page and "x86_64 test CPU, float32" in page
    # the reference figure is copied next to the page and shown
    img = index.parent / "img" / "reference-synthetic-samples.png"
    assert img.is_file() and 'src="img/reference-synthetic-samples.png"' in page
    # provenance: the command that reproduces each run
    assert "amisbench run --method ssn --dataset synthetic --seed 1 --profile smoke" in page
    assert "amisbench run --method atfm --dataset lidc --seed 0 --profile paper --protocol atfm-paper" in page
    assert "0123456789" in page and "abc123" in page
    # self-contained: nothing is fetched from the network
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def test_reference_rows_are_hidden_by_the_flag_and_the_environment(show_reference, tmp_path, monkeypatch, capsys):
    mine, _ = show_reference
    assert cli.main(["table", "--dataset", "synthetic", "--results", str(mine)]) == 0
    out = capsys.readouterr().out
    assert "| ssn (reference) |" in out and "| unet (reference) |" in out and "| ssn |" in out
    assert "rows marked (reference)" in out
    assert cli.main(["table", "--dataset", "synthetic", "--results", str(mine), "--no-reference"]) == 0
    assert "(reference)" not in capsys.readouterr().out
    assert cli.main(["report", "--results", str(mine), "--out", str(tmp_path / "a"), "--no-reference"]) == 0
    assert "reference" not in "".join(_rows((tmp_path / "a" / "index.html").read_text()))
    monkeypatch.setenv("AMISBENCH_NO_REFERENCE", "1")
    assert cli.main(["table", "--dataset", "synthetic", "--results", str(mine)]) == 0
    assert "(reference)" not in capsys.readouterr().out


def test_reference_rows_alone_fill_an_empty_results_folder(show_reference, tmp_path, capsys):
    empty = tmp_path / "fresh"
    assert cli.main(["table", "--dataset", "synthetic", "--results", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "| ssn (reference) |" in out and "| ssn |" not in out
    assert cli.main(["report", "--results", str(empty), "--out", str(tmp_path / "p")]) == 0
    assert len(_rows((tmp_path / "p" / "index.html").read_text())) == 1  # SSN (reference); U-Net apart


def test_reference_timings_carry_their_device_and_dtype(show_reference, tmp_path):
    mine, ref = show_reference
    empty = tmp_path / "fresh"
    (ref / "timing" / "cpu").mkdir(parents=True, exist_ok=True)
    shutil.copy(mine / "timing" / "cpu" / "synthetic__atfm.json", ref / "timing" / "cpu" / "synthetic__atfm.json")
    try:
        page = write_report(empty, tmp_path / "p").read_text()
    finally:
        (ref / "timing" / "cpu" / "synthetic__atfm.json").unlink()
    table3 = page.split("Table 3.")[1].split("</table>")[1].split("<h")[0]
    assert "reference setup: atfm: x86_64 test CPU, float32, 1 image x 100 samples per call" in table3
    body = page.split("Table 3.")[1].split("</table>")[0]
    # the reference ATFM stands in for the user's ATFM row; the methods neither has timed say "not run"
    assert body.count('<tr class="reference">') == 1 and body.count("atfm (ATFM)") == 1
    assert body.count("not run") == 3


def test_no_runs_anywhere_names_the_users_folder(show_reference, tmp_path, capsys):
    assert cli.main(["table", "--dataset", "isic3", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no finished runs for dataset 'isic3' under {tmp_path / 'runs'}" in err


def test_report_errors_name_what_is_missing(folders, tmp_path, capsys):
    mine, _ = folders
    assert cli.main(["report", "--results", str(mine), "--dataset", "isic3", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--dataset isic3: no finished runs" in err and "found: lidc, synthetic" in err
    assert not (tmp_path / "x").exists()
    assert cli.main(["report", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "y")]) == 2
    assert "no finished runs" in capsys.readouterr().err and not (tmp_path / "y").exists()
    (tmp_path / "file").write_text("x")
    assert cli.main(["report", "--results", str(mine), "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


# ----------------------------------------------------------------------------------------------------
# in a real browser
# ----------------------------------------------------------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("no headless Chromium found (CI=true): install Debian's `chromium` package")
        pytest.skip("no Chromium installed (apt-get install chromium)")
    return found


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_page_renders_in_headless_chromium(show_reference, tmp_path):
    browser = _browser()
    mine, _ = show_reference
    index = write_report(mine, tmp_path / "page")
    url = index.resolve().as_uri()
    dom = _chromium(browser, "--dump-dom", url + "#selftest")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="selftest">(.*?)</pre>', dom.stdout)
    assert found, "the page's self-test did not run: " + dom.stdout[-500:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["rows"] == 3 + 1  # synthetic: two ranked + one calibration; lidc: the leaky ATFM run
    assert check["images"] >= 1 and check["broken"] == [] and check["errors"] == []
    assert "CONSOLE" not in dom.stderr, [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    shot = tmp_path / "shot.png"
    res = _chromium(browser, f"--screenshot={shot}", "--window-size=1280,4000", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    import matplotlib.image as mpimg

    px = mpimg.imread(shot)[..., :3]
    assert px.std() > 0.05  # not blank
    dark = (px.mean(axis=-1) < 0.5).mean()  # text and the figure's dark panels
    assert dark > 0.01
    # the sample grid's colours (the readers' blue contours, the viridis/magma maps) reach the screen
    colourful = (np.ptp(px, axis=-1) > 0.3).mean()
    assert colourful > 0.002
    keep = os.environ.get("AMISBENCH_KEEP_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


# ----------------------------------------------------------------------------------------------------
# the shipped reference results
# ----------------------------------------------------------------------------------------------------

def test_reference_grid_covers_every_registered_method_but_p2sam():
    from amisbench.grid import load_grid
    from amisbench.registry import METHODS

    grid, _ = load_grid("reference")
    assert sorted(grid["method"].split(",")) == sorted(set(METHODS.names()) - {"p2sam"})
    assert (grid["dataset"], grid["profile"]) == ("synthetic", "quick") and grid["seeds"] >= 3


def test_shipped_reference_results_are_complete_result_folders(monkeypatch, tmp_path):
    from amisbench.reference import reference_results, shipped

    monkeypatch.delenv("AMISBENCH_NO_REFERENCE")
    if not (shipped() / "runs").is_dir():
        pytest.skip("no reference results shipped yet (see configs/grids/reference.yaml)")
    assert reference_results() == shipped()
    runs = sorted(shipped().glob("runs/*/*/*/seed-*"))
    for d in runs:
        names = {p.name for p in d.iterdir()}
        assert {"config.yaml", "metrics.json", "per_image.csv", "run.json"} <= names, d
    from amisbench.grid import load_grid

    grid, _ = load_grid("reference")
    methods = grid["method"].split(",") if isinstance(grid["method"], str) else list(grid["method"])
    assert len(methods) == 12 and "p2sam" not in methods
    # every method of the grid, each with its seeds finished
    for method in methods:
        seeds = sorted(d.name for d in runs if d.parts[-3] == method)
        assert seeds == [f"seed-{k}" for k in range(int(grid["seeds"]))], (method, seeds)
    index = write_report(tmp_path / "empty", tmp_path / "page", "synthetic")
    page = index.read_text()
    for method in methods:
        assert f"<code>{method}</code>" in page or f'data-v="{method}"' in page, method
