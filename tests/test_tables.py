"""Tables 1-4 from hand-written result folders: numbers, bold cells, seed counts, labels, paper numbers; the
conventions researchers read them by (titles, reference rows, captions, CSV columns, Table 3 for any dataset)."""

import dataclasses
import io
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from amisbench import cli
from amisbench.errors import UserError
from amisbench.report.definitions import load_definitions, paper_numbers
from amisbench.report.formats import to_csv, to_latex, to_markdown
from amisbench.report.tables import build, build_table

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"


def fake_run(root, method, seed, metrics, dataset="synthetic", profile="quick", variant=None, done=True,
             protocol=None, protocol_label=None):
    label = method + (f"-{variant}" if variant else "")
    ds = dataset + (f"-{protocol}" if protocol and protocol != "clean" else "")
    d = root / "runs" / ds / label / profile / f"seed-{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    if done:
        (d / "run.json").write_text(json.dumps({
            "status": "done", "method": method, "variant": variant, "dataset": dataset, "profile": profile,
            "seed": seed, "protocol": protocol, "protocol_label": protocol_label}))
    return d


def five(g16, g32, g100, hm, mdm):
    return {"GED_16": g16, "GED_32": g32, "GED_100": g100, "HMIoU_32": hm, "MDM_32": mdm}


@pytest.fixture
def table1_runs(tmp_path):
    # LIDC (the dataset of the paper's Table 1); ssn: 3 seeds; atfm: seeds 0 and 2 (seed 1 missing); ccdm: one failed run without run.json;
    # prob_unet and the rest: no runs at all
    ssn = [five(0.30, 0.28, 0.26, 0.50, 0.70), five(0.32, 0.30, 0.27, 0.52, 0.71), five(0.34, 0.29, 0.25, 0.51, 0.72)]
    for s, m in enumerate(ssn):
        fake_run(tmp_path, "ssn", s, m, dataset="lidc")
    fake_run(tmp_path, "atfm", 0, five(0.20, 0.19, 0.16, 0.66, 0.94), dataset="lidc")
    fake_run(tmp_path, "atfm", 2, five(0.22, 0.21, 0.18, 0.68, 0.96), dataset="lidc")
    fake_run(tmp_path, "ccdm", 0, five(0.1, 0.1, 0.1, 0.9, 0.9), dataset="lidc", done=False)
    return tmp_path, ssn


def test_table1_numbers_bold_seed_counts_and_rows_without_runs(table1_runs):
    root, ssn = table1_runs
    t = build_table("1", root)
    assert t.rows == ["prob_unet", "phiseg", "ssn", "mose", "p2sam", "cimd", "analog_bits", "ccdm", "atfm"]
    mean, std, n = t.cells[("ssn", "GED_16")]
    assert mean == pytest.approx(0.32) and std == pytest.approx(np.std([0.30, 0.32, 0.34], ddof=1)) and n == 3
    mean, std, n = t.cells[("atfm", "GED_100")]
    assert (mean, n) == (pytest.approx(0.17), 2) and std == pytest.approx(np.std([0.16, 0.18], ddof=1))
    # direction from metric metadata: GED lower, HM-IoU / MDM higher is better
    assert t.best("GED_16") == "atfm" and t.best("HMIoU_32") == "atfm" and t.best("MDM_32") == "atfm"
    assert t.status["prob_unet"] == "not run" and t.status["ccdm"] == "not run" and t.status["ssn"] == ""
    md = to_markdown(t)
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ") and "method" not in ln}
    assert len(lines) == 9
    assert "**0.210 ± 0.014 (n=2)**" in lines["atfm (ATFM)"]
    assert "0.320 ± 0.020 (n=3)" in lines["ssn (SSN)"] and "**" not in lines["ssn (SSN)"]
    assert "not run (paper: 0.310 ± 0.010)" in lines["prob_unet (Prob. U-Net)"]
    assert "not run (paper: 0.212 ± 0.001)" in lines["ccdm (CCDM)"]
    # a number the paper did not report (SSN's MDM is "-") stays empty in the paper column
    assert "not run" in lines["cimd (CIMD)"].split("|")[2] and "paper" not in lines["cimd (CIMD)"].split("|")[2]
    assert "_seeds: ssn 0,1,2; atfm 0,2_" in md
    assert "1 unfinished or failed run(s) left out" in md
    # P2SAM runs only with a user-supplied SAM checkpoint: without runs its row says so
    assert "not run (profile paper needs your SAM weights) (paper: 0.208 ± 0.000)" in lines["p2sam (P2SAM)"]
    assert md.startswith("**Table 1. LIDC-IDRI: ATFM and the baselines**")
    assert "paper: Li et al." in md and "Table 1 (lidc)" in md


def test_compare_paper_puts_ours_paper_and_difference_side_by_side(table1_runs):
    root, _ = table1_runs
    t = build_table("1", root, compare=True)
    md = to_markdown(t)
    head = [ln for ln in md.splitlines() if ln.startswith("| method")][0]
    assert head.count("| paper |") == 5 and head.count("| Δ |") == 5
    atfm = [ln for ln in md.splitlines() if ln.startswith("| atfm ")][0].split("|")[2:-1]
    cells = [c.strip() for c in atfm]
    # GED_100: ours 0.170, paper 0.162, difference +0.008
    assert cells[6:9] == ["**0.170 ± 0.014 (n=2)**", "0.162 ± 0.002", "+0.008"]
    prob = [c.strip() for c in [ln for ln in md.splitlines() if ln.startswith("| prob_unet")][0].split("|")[2:-1]]
    assert prob[:3] == ["not run", "0.310 ± 0.010", "–"]


def _latex_rows(tex):
    """Column count of every LaTeX row (\\multicolumn{k} counts k), splitting on unescaped &."""
    counts = []
    for line in tex.splitlines():
        if not line.rstrip().endswith(r"\\"):
            continue
        cells = re.split(r"(?<!\\)&", line.rstrip()[:-2])
        counts.append(sum(int(m.group(1)) if (m := re.search(r"\\multicolumn\{(\d+)\}", c)) else 1
                          for c in cells))
    return counts


@pytest.mark.parametrize("compare", [False, True])
def test_latex_is_balanced_with_one_row_per_method(table1_runs, compare):
    root, _ = table1_runs
    t = build_table("1", root, compare=compare)
    tex = to_latex(t)
    assert tex.count(r"\begin{") == tex.count(r"\end{") == 2
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):  # escaped braces are text
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    assert tex.count("$") % 2 == 0
    ncol = 1 + 5 * (3 if compare else 1)
    counts = _latex_rows(tex)
    header_rows = 2 if compare else 1
    assert counts == [ncol] * (header_rows + 9)
    assert re.search(r"\\begin\{tabular\}\{l(c+)\}", tex).group(1) == "c" * (ncol - 1)
    assert r"\textbf{0.210}" in tex and "not run" in tex
    body = tex.split(r"\midrule")[1]
    assert [ln.split(" & ")[0] for ln in body.splitlines() if ln.endswith(r"\\")][0] == r"prob\_unet (Prob. U-Net)"


def test_protocol_label_in_caption_and_ambiguous_protocols(tmp_path):
    label = "leaky protocol (ATFM release split: test slices overlap SFM training)"
    fake_run(tmp_path, "ssn", 0, five(0.3, 0.3, 0.3, 0.5, 0.7), dataset="lidc", protocol="atfm-paper",
             protocol_label=label)
    fake_run(tmp_path, "atfm", 0, five(0.2, 0.2, 0.2, 0.6, 0.9), dataset="lidc", protocol="atfm-paper",
             protocol_label=label)
    t = build_table("1", tmp_path)
    assert label in to_markdown(t) and label in to_latex(t).split(r"\caption{")[1].split("\n")[0].replace(r"\_", "_")
    fake_run(tmp_path, "ssn", 0, five(0.25, 0.25, 0.25, 0.55, 0.75), dataset="lidc", protocol="clean")
    with pytest.raises(UserError, match=r"several protocols \(atfm-paper, clean\).*--protocol"):
        build_table("1", tmp_path)
    t = build_table("1", tmp_path, protocol="clean")
    assert t.cells[("ssn", "GED_16")][0] == pytest.approx(0.25) and t.status["atfm"] == "not run"
    assert label not in to_markdown(t) and "protocol: clean" in to_markdown(t)


def test_table4_rows_are_atfm_variants_with_their_paper_rows(tmp_path):
    fake_run(tmp_path, "atfm", 0, {"GED_100": 0.25, "HMIoU_32": 0.5}, dataset="lidc", variant="act_gtr")
    fake_run(tmp_path, "atfm", 1, {"GED_100": 0.27, "HMIoU_32": 0.6}, dataset="lidc", variant="act_gtr")
    fake_run(tmp_path, "atfm", 0, {"GED_100": 0.15, "HMIoU_32": 0.7}, dataset="lidc", variant="atfm")
    t = build_table("4", tmp_path, compare=True)
    assert t.rows == ["atfm-act_gtr", "atfm-sfm_no_lsf", "atfm-sfm", "atfm-atfm_no_lsf", "atfm"]
    assert t.cells[("atfm-act_gtr", "GED_100")] == (pytest.approx(0.26), pytest.approx(np.std([0.25, 0.27], ddof=1)), 2)
    assert t.paper[("atfm-act_gtr", "GED_100")] == [0.230, 0.001]
    assert t.cells[("atfm", "HMIoU_32")][0] == pytest.approx(0.7)  # from the atfm-atfm folder
    assert "atfm 0 (from atfm-atfm)" in " ".join(t.notes)
    assert t.best("GED_100") == "atfm" and t.best("HMIoU_32") == "atfm"
    assert t.delta_text("atfm-act_gtr", "GED_100") == "+0.030"
    assert t.status["atfm-sfm"] == "not run"


def _timing(root, device, method, median, iqr, nfe, label, samples=100):
    d = root / "timing" / device
    d.mkdir(parents=True, exist_ok=True)
    rec = {"method": method, "dataset": "lidc", "profile": "paper", "samples": samples, "images": 5,
           "median_s": median, "iqr_s": iqr, "nfe": nfe, "nfe_label": label, "device": "cuda",
           "device_name": "NVIDIA H100", "dtype": "float32", "images_per_call": 1, "sample_chunk": 256,
           "torch": "2.13.0", "peak_memory_bytes": 2 * 10**9}
    (d / f"lidc__{method}.json").write_text(json.dumps(rec))


def test_table3_from_timing_records(tmp_path):
    _timing(tmp_path, "cuda-H100", "atfm", 2.0, 0.1, 2501, "1 + 25/sample")
    _timing(tmp_path, "cuda-H100", "ccdm", 30.0, 1.5, 25000, "250/sample")
    _timing(tmp_path, "cpu", "atfm", 50.0, 3.0, 2501, "1 + 25/sample")
    with pytest.raises(UserError, match=r"several devices \(cpu, cuda-H100\).*--device"):
        build_table("3", tmp_path)
    t = build_table("3", tmp_path, device="cuda-H100", compare=True)
    assert t.rows == ["cimd", "analog_bits", "ccdm", "atfm"]
    assert t.texts[("atfm", "nfe")] == "1 + 25/sample" and t.paper[("atfm", "nfe")] == "GTR + 25"
    assert t.cells[("ccdm", "seconds_100")] == (30.0, 1.5, 5)
    assert t.best("seconds_100") == "atfm"  # direction from the table definition (lower is better)
    assert t.delta_text("atfm", "seconds_100") == f"×{2.0 / 113:.3g}"
    md = to_markdown(t)
    assert "**2.00 (IQR 0.10, n=5)**" in md and "not run" in md
    assert "ccdm/atfm time ×15 (NFE ×10; paper time ×9.73)" in md
    assert "NVIDIA H100, float32, 1 image x 100 samples per call, chunk 256, torch 2.13.0" in md
    tex = to_latex(t)
    assert _latex_rows(tex) == [1 + 2 * 3] * (2 + 4)


def test_csv_of_a_defined_table_keeps_rows_without_runs(table1_runs):
    import io

    import pandas as pd

    root, _ = table1_runs
    df = pd.read_csv(io.StringIO(to_csv(build_table("1", root))))
    assert len(df) == 9 * 5
    row = df[(df.method == "prob_unet") & (df.metric == "GED_16")].iloc[0]
    assert row.status == "not run" and np.isnan(row["mean"]) and row.paper_mean == pytest.approx(0.310)
    row = df[(df.method == "atfm") & (df.metric == "GED_16")].iloc[0]
    assert row.n == 2 and bool(row.best) and row["mean"] == pytest.approx(0.21)


def test_cli_table_modes_and_errors(table1_runs, capsys, tmp_path):
    root, _ = table1_runs
    out = tmp_path / "t1.tex"
    assert cli.main(["table", "--table", "1", "--results", str(root), "--format", "latex",
                     "--compare-paper", "--out", str(out)]) == 0
    assert capsys.readouterr().out == out.read_text()
    assert cli.main(["table", "--dataset", "lidc", "--results", str(root), "--compare-paper"]) == 2
    assert "--compare-paper needs --table" in capsys.readouterr().err
    assert cli.main(["table", "--table", "7", "--results", str(root)]) == 2
    assert "unknown table '7'; known: 1, 2, 3, 4" in capsys.readouterr().err
    assert cli.main(["table", "--results", str(root)]) == 2


def test_runs_with_overrides_are_flagged(tmp_path):
    d = fake_run(tmp_path, "ccdm", 0, five(0.3, 0.3, 0.3, 0.5, 0.7))
    (d / "config.yaml").write_text(yaml.safe_dump({"sources": ["defaults", "configs/methods/ccdm.yaml",
                                                               "--set train.main.steps=60 eval.max_images=4"]}))
    d = fake_run(tmp_path, "atfm", 0, five(0.2, 0.2, 0.2, 0.6, 0.9))
    (d / "config.yaml").write_text(yaml.safe_dump({"sources": ["defaults"]}))
    md = to_markdown(build_table("1", tmp_path, dataset="synthetic"))
    assert "_ccdm ran with overrides: train.main.steps=60 eval.max_images=4_" in md
    assert "atfm ran with" not in md


def test_a_metric_without_direction_gets_no_bold(tmp_path):
    fake_run(tmp_path, "ssn", 0, {"GED_100": 0.3, "train_loss": 1.0})
    fake_run(tmp_path, "atfm", 0, {"GED_100": 0.2, "train_loss": 2.0})
    t = build(tmp_path, "synthetic")
    assert t.best("train_loss") is None and t.best("GED_100") == "atfm"
    assert "train_loss" in to_markdown(t)


def test_rows_of_methods_that_do_not_exist_are_kept_and_labelled(tmp_path):
    fake_run(tmp_path, "ssn", 0, {"GED_100": 0.3})
    path = tmp_path / "tables.yaml"
    path.write_text(yaml.safe_dump({"tables": {"9": {"dataset": "synthetic", "paper": "table1_lidc",
                                                     "columns": ["GED_100"],
                                                     "rows": ["ssn", {"key": "no_such_method", "paper": "mose"}]}}}))
    t = build_table("9", tmp_path, definitions=load_definitions(path))
    md = to_markdown(t)
    assert "| no_such_method | not run (paper: 0.189 ± 0.002) |" in md
    assert "_not implemented in amisbench: no_such_method_" in md and t.status["ssn"] == ""


def test_table3_row_filled_from_an_also_label(tmp_path):
    _timing(tmp_path, "cpu", "atfm-atfm", 4.0, 0.2, 2501, "1 + 25/sample")
    _timing(tmp_path, "cpu", "ccdm", 40.0, 2.0, 25000, "250/sample")
    defs = load_definitions()
    d3 = defs["3"]
    atfm = next(r for r in d3.rows if r.key == "atfm")
    d3.rows[d3.rows.index(atfm)] = dataclasses.replace(atfm, also=("atfm-atfm",))
    t = build_table("3", tmp_path, definitions=defs)
    assert t.cells[("atfm", "seconds_100")] == (4.0, 0.2, 5)
    md = to_markdown(t)
    assert "ccdm/atfm time ×10 (NFE ×10;" in md and "atfm: " in md.split("setup: ")[1]


def test_definitions_are_checked(tmp_path):
    defs = load_definitions()
    assert set(defs) == {"1", "2", "3", "4"}
    assert [c.key for c in defs["1"].columns] == ["GED_16", "GED_32", "GED_100", "HMIoU_32", "MDM_32"]
    assert defs["3"].inference["atfm"] == ["method.steps=25"]
    bad = tmp_path / "tables.yaml"
    bad.write_text(yaml.safe_dump({"tables": {"1": {"dataset": "lidc", "columns": ["GED_16"], "rows": ["ssn"],
                                                     "colour": "red"}}}))
    with pytest.raises(UserError, match=r"tables.yaml: tables.1: unknown key 'colour'"):
        load_definitions(bad)
    bad.write_text(yaml.safe_dump({"tables": {"1": {"dataset": "lidc", "columns": ["GED_16"]}}}))
    with pytest.raises(UserError, match="missing key 'rows'"):
        load_definitions(bad)


def test_paper_numbers_ship_with_the_package_in_one_copy():
    data = paper_numbers()
    assert data["table1_lidc"]["rows"]["atfm"]["GED_100"] == [0.162, 0.002]
    packaged = (ROOT / "configs" / "paper" / "atfm_tables.yaml").read_text()
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True).stdout.split()
    if tracked:  # a git checkout: no second copy of the numbers anywhere in the project
        assert [f for f in tracked if f.endswith("atfm_tables.yaml")] == ["configs/paper/atfm_tables.yaml"]
    assert not (ROOT / "results" / "paper").exists()
    # every row and column of the definitions exists in the paper's sections
    for d in load_definitions().values():
        rows = data[d.paper]["rows"]
        for r in d.rows:
            assert r.paper in rows, (d.id, r.paper)
            for c in d.columns:
                assert c.paper in rows[r.paper] or c.paper_value is not None, (d.id, r.paper, c.paper)
    shared = SHARED / "paper" / "atfm_tables.yaml"
    if not shared.is_file():
        pytest.skip("../shared is absent")
    assert packaged == shared.read_text()


def test_table4_caption_states_which_dice_l_sf_used(tmp_path):
    for variant, dice in (("act_gtr", "soft"), ("atfm", "release")):
        d = fake_run(tmp_path, "atfm", 0, {"GED_100": 0.2, "HMIoU_32": 0.6}, dataset="lidc", variant=variant)
        (d / "config.yaml").write_text(f"sources: []\nmethod: {{dice: {dice}}}\n")
    notes = " ".join(build_table("4", tmp_path).notes)
    assert ("L_SF Dice (method.dice): soft = the paper's differentiable soft Dice (atfm-act_gtr); "
            "release = the release's detached batch-global hard Dice (atfm-atfm)") in notes


# ---------------------------------------------------------------------------------------------------
# build(): mean, std (ddof 1) and seed count per cell, the best cell, runs left out, errors
# ---------------------------------------------------------------------------------------------------

def test_mean_std_ddof1_seed_count_and_best(tmp_path, capsys):
    for seed, (g, h) in enumerate([(0.30, 0.50), (0.34, 0.52), (0.32, 0.54)]):
        fake_run(tmp_path, "ssn", seed, {"GED_100": g, "HMIoU_32": h})
    fake_run(tmp_path, "atfm", 0, {"GED_100": 0.20, "HMIoU_32": 0.40})
    fake_run(tmp_path, "atfm", 1, {"GED_100": 0.22, "HMIoU_32": 0.42})
    fake_run(tmp_path, "atfm", 2, {"GED_100": 0.0, "HMIoU_32": 0.0}, done=False)  # unfinished: left out
    t = build(tmp_path, "synthetic")
    mean, std, n = t.cells[("ssn", "GED_100")]
    assert mean == pytest.approx(0.32) and std == pytest.approx(np.std([0.30, 0.34, 0.32], ddof=1)) and n == 3
    assert t.cells[("atfm", "GED_100")][2] == 2
    assert t.best("GED_100") == "atfm" and t.best("HMIoU_32") == "ssn"  # lower vs higher is better
    md = to_markdown(t)
    assert "**0.210 ± 0.014 (n=2)**" in md and "**0.520 ± 0.020 (n=3)**" in md
    assert "1 unfinished or failed run(s) left out" in md
    rows = to_csv(t).strip().splitlines()
    assert rows[0] == "method,metric,mean,std,n,best,reference,text" and len(rows) == 5
    assert "0.210 ± 0.014 (n=2)" in to_csv(t)
    assert cli.main(["table", "--dataset", "synthetic", "--results", str(tmp_path), "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert tex.count(r"\\") == 3 and r"\textbf{0.210}" in tex  # header + one row per method


def test_single_seed_has_no_std(tmp_path):
    fake_run(tmp_path, "ssn", 0, {"GED_100": 0.3})
    t = build(tmp_path, "synthetic")
    assert math.isnan(t.cells[("ssn", "GED_100")][1])
    md = to_markdown(t)
    assert "| 0.300 (n=1) |" in md and "n/a" not in md
    assert r"0.300 {\scriptsize ($n$=1)}" in to_latex(t) and "n/a" not in to_latex(t)


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no finished runs for dataset 'synthetic'"):
        build(tmp_path, "synthetic")


# ---------------------------------------------------------------------------------------------------
# Tables as researchers read them: titles per dataset, the paper's numbers only for the paper's dataset, reference
# rows apart, LaTeX captions without a number, filled CSV columns, Table 3 for any dataset.
# ---------------------------------------------------------------------------------------------------

def five_equal(v):
    return {"GED_16": v, "GED_32": v, "GED_100": v, "HMIoU_32": 1 - v, "MDM_32": 1 - v}


@pytest.fixture
def with_references(tmp_path):
    for s in range(2):
        fake_run(tmp_path, "ssn", s, five_equal(0.30 + 0.01 * s))
        fake_run(tmp_path, "atfm", s, five_equal(0.25 + 0.01 * s))
    fake_run(tmp_path, "oracle", 0, five_equal(0.05))  # better than every method in every column
    fake_run(tmp_path, "unet", 0, five_equal(0.60))
    return tmp_path


def test_titles_name_the_dataset_the_runs_are_on(with_references):
    t = build_table("1", with_references, dataset="synthetic")
    assert t.heading().startswith("Table 1. synthetic: ATFM and the baselines")
    assert "the layout of the paper's Table 1, which is on LIDC-IDRI" in t.title
    assert build_table("2", with_references).heading() == "Table 2. ISIC3 subset: ATFM and the baselines"
    assert build_table("4", with_references, dataset="synthetic").title.startswith("Ablation of ATFM on synthetic")
    assert to_markdown(build(with_references, "synthetic")).startswith("**synthetic: every finished run**")


def test_the_papers_numbers_only_beside_runs_on_the_papers_dataset(with_references, capsys):
    t = build_table("1", with_references, dataset="synthetic")
    assert t.paper == {} and not any("paper:" in ln for ln in to_markdown(t).splitlines() if ln.startswith("|"))
    assert "the paper's numbers are not shown: its Table 1 is on lidc, not synthetic" in t.notes
    with pytest.raises(UserError, match="--compare-paper: the paper's Table 1 reports lidc numbers, and these "
                                        "runs are on synthetic"):
        build_table("1", with_references, dataset="synthetic", compare=True)
    assert cli.main(["table", "--table", "1", "--dataset", "synthetic", "--compare-paper", "--results",
                     str(with_references)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "build --dataset lidc" in err
    t = build_table("1", with_references, compare=True)  # lidc: no runs, but the paper's numbers
    assert t.paper[("atfm", "GED_100")] == [0.162, 0.002]


def test_reference_rows_are_set_apart_and_never_bold(with_references):
    for t in (build(with_references, "synthetic"), build_table("1", with_references, dataset="synthetic")):
        assert t.rows[-2:] == ["oracle", "unet"] and t.references == ["oracle", "unet"]
        assert t.best("GED_100") == "atfm" and t.best("HMIoU_32") == "atfm"
        md = to_markdown(t).splitlines()
        sep = md.index(next(ln for ln in md if "reference rows" in ln and ln.startswith("|")))
        assert md[sep + 1].startswith("| oracle") and md[sep + 2].startswith("| unet")
        assert "**" not in md[sep + 1] and "**" in "".join(md[:sep])
        tex = to_latex(t).splitlines()
        oracle = next(i for i, ln in enumerate(tex) if ln.startswith("oracle"))
        assert tex[oracle - 1] == r"\midrule" and r"\textbf" not in tex[oracle]


def test_a_reference_row_stands_in_for_the_users_row_that_was_not_run(tmp_path, monkeypatch):
    from amisbench.reference import with_reference

    mine, ref = tmp_path / "mine", tmp_path / "ref"
    fake_run(mine, "atfm", 0, five_equal(0.25))
    fake_run(ref, "ssn", 0, five_equal(0.30))
    monkeypatch.delenv("AMISBENCH_NO_REFERENCE", raising=False)
    monkeypatch.setenv("AMISBENCH_REFERENCE", str(ref))
    t = with_reference(lambda f: build_table("1", f, dataset="synthetic"), mine)
    # the user's ssn row only said "not run": the reference's ssn row takes its place
    assert "ssn (reference)" in t.rows and "ssn" not in t.rows
    assert t.cells[("ssn (reference)", "GED_100")][0] == pytest.approx(0.30)
    # rows neither folder has still say why; the user's own runs stay
    assert t.status["ccdm"] == "not run" and t.status["atfm"] == ""
    alone = build_table("1", mine, dataset="synthetic")
    assert alone.status["ssn"] == "not run"


def test_latex_caption_has_no_number_of_its_own(with_references):
    tex = to_latex(build_table("1", with_references, dataset="synthetic"))
    caption = next(ln for ln in tex.splitlines() if ln.startswith(r"\caption{"))
    assert caption.startswith(r"\caption{synthetic: ATFM and the baselines") and "Table 1." not in caption
    assert r"\label{tab:amisbench-1}" in tex


def test_csv_has_every_column_filled(with_references):
    for dataset, compare in (("lidc", True), ("synthetic", False)):
        if dataset == "lidc":
            for s in range(2):
                fake_run(with_references, "atfm", s, five_equal(0.17 + 0.01 * s), dataset="lidc")
        t = build_table("1", with_references, dataset=dataset, compare=compare)
        df = pd.read_csv(io.StringIO(to_csv(t)), keep_default_na=False, na_values=[""])
        empty = [c for c in df.columns if df[c].isna().all()]
        assert empty == [], (dataset, empty)
        assert df["text"].notna().all() and (df["status"] != "").all()
        atfm = df[(df.method == "atfm") & (df.metric == "GED_100")].iloc[0]
        assert atfm.text == t.ours_text("atfm", "GED_100")
        if compare:
            assert atfm.paper_text == "0.162 ± 0.002" and float(atfm.delta) == pytest.approx(0.013)
        else:
            assert "paper_text" not in df.columns


def _timing_record(root, dataset, label, median, samples, device="cpu"):
    d = root / "timing" / device
    d.mkdir(parents=True, exist_ok=True)
    rec = {"method": label.split("-")[0], "dataset": dataset, "profile": "quick", "samples": samples, "images": 3,
           "median_s": median, "iqr_s": 0.1, "nfe": 5 * samples, "nfe_label": "5/sample", "device": "cpu",
           "device_name": "cpu", "dtype": "float32", "images_per_call": 1, "torch": "2.13.0",
           "peak_memory_bytes": 10**9, "memory_kind": "peak RSS of a process that timed only this method"}
    (d / f"{dataset}__{label}.json").write_text(json.dumps(rec))


def test_table3_for_any_dataset_with_every_timed_method_and_the_real_sample_count(tmp_path):
    _timing_record(tmp_path, "synthetic", "atfm", 1.0, 20)
    _timing_record(tmp_path, "synthetic", "ssn", 0.1, 20)  # not a row of the paper's Table 3
    t = build_table("3", tmp_path)
    assert any("no timing results for dataset 'lidc'" in n and "exist for: synthetic" in n for n in t.notes)
    t = build_table("3", tmp_path, dataset="synthetic")
    assert t.rows == ["cimd", "analog_bits", "ccdm", "atfm", "ssn"]
    assert t.cells[("ssn", "seconds_100")][0] == pytest.approx(0.1) and t.status["ssn"] == ""
    assert t.headers["seconds_100"] == "seconds for 20 samples"
    assert t.heading() == "Table 3. synthetic: inference cost of 20 samples per image (the layout of the " \
                          "paper's Table 3, which is on LIDC-IDRI)"
    md = to_markdown(t)
    assert "100 samples" not in md and "one call of 20 samples each" in md and "ssn/atfm time ×0.1" in md
