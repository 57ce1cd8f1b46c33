"""Tables as researchers read them: titles per dataset, the paper's numbers only for the paper's dataset,
reference rows apart, LaTeX captions without a number, filled CSV columns, Table 3 for any dataset."""

import io
import json

import pandas as pd
import pytest

from amisbench import cli
from amisbench.errors import UserError
from amisbench.tables import build, build_table, to_csv, to_latex, to_markdown


def fake_run(root, method, seed, metrics, dataset="synthetic", variant=None):
    label = method + (f"-{variant}" if variant else "")
    d = root / "runs" / dataset / label / "quick" / f"seed-{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "run.json").write_text(json.dumps({"status": "done", "method": method, "variant": variant,
                                            "dataset": dataset, "profile": "quick", "seed": seed}))


def five(v):
    return {"GED_16": v, "GED_32": v, "GED_100": v, "HMIoU_32": 1 - v, "MDM_32": 1 - v}


@pytest.fixture
def with_references(tmp_path):
    for s in range(2):
        fake_run(tmp_path, "ssn", s, five(0.30 + 0.01 * s))
        fake_run(tmp_path, "atfm", s, five(0.25 + 0.01 * s))
    fake_run(tmp_path, "oracle", 0, five(0.05))  # better than every method in every column
    fake_run(tmp_path, "unet", 0, five(0.60))
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


def test_latex_caption_has_no_number_of_its_own(with_references):
    tex = to_latex(build_table("1", with_references, dataset="synthetic"))
    caption = next(ln for ln in tex.splitlines() if ln.startswith(r"\caption{"))
    assert caption.startswith(r"\caption{synthetic: ATFM and the baselines") and "Table 1." not in caption
    assert r"\label{tab:amisbench-1}" in tex


def test_csv_has_every_column_filled(with_references):
    for dataset, compare in (("lidc", True), ("synthetic", False)):
        if dataset == "lidc":
            for s in range(2):
                fake_run(with_references, "atfm", s, five(0.17 + 0.01 * s), dataset="lidc")
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


def _timing(root, dataset, label, median, samples, device="cpu"):
    d = root / "timing" / device
    d.mkdir(parents=True, exist_ok=True)
    rec = {"method": label.split("-")[0], "dataset": dataset, "profile": "quick", "samples": samples, "images": 3,
           "median_s": median, "iqr_s": 0.1, "nfe": 5 * samples, "nfe_label": "5/sample", "device": "cpu",
           "device_name": "cpu", "dtype": "float32", "images_per_call": 1, "torch": "2.13.0",
           "peak_memory_bytes": 10**9, "memory_kind": "peak RSS of a process that timed only this method"}
    (d / f"{dataset}__{label}.json").write_text(json.dumps(rec))


def test_table3_for_any_dataset_with_every_timed_method_and_the_real_sample_count(tmp_path):
    _timing(tmp_path, "synthetic", "atfm", 1.0, 20)
    _timing(tmp_path, "synthetic", "ssn", 0.1, 20)  # not a row of the paper's Table 3
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
