"""Bootstrap intervals, the paired comparison with the best row, Holm's correction and the table marks."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from amisbench.report import stats
from amisbench.report.formats import to_markdown
from amisbench.report.tables import Table


def test_identical_values_give_a_zero_width_interval():
    low, high = stats.bootstrap_ci(np.full(30, 0.25), groups=np.repeat(np.arange(10), 3))
    assert low == high == pytest.approx(0.25)


def test_interval_covers_the_mean_and_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 0.1, size=400)
    low, high = stats.bootstrap_ci(x, seed=3)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))  # the CLT interval the bootstrap approximates
    assert low < x.mean() < high and (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert stats.bootstrap_ci(x, seed=3) == (low, high)  # seeded: the same numbers every time


def test_groups_are_resampled_whole():
    # two groups of 50 identical values each: a resample holds 0, 1 or 2 copies of the first group, so the
    # group bootstrap gives only the means 0, 0.5 and 1 (an image bootstrap would be far narrower)
    values = np.r_[np.zeros(50), np.ones(50)]
    groups = np.r_[np.zeros(50), np.ones(50)]
    means = stats._boot_means(values, groups, 500, 0)
    assert set(np.round(means, 12)) == {0.0, 0.5, 1.0}
    assert stats.bootstrap_ci(values, groups) == (0.0, 1.0)
    low, high = stats.bootstrap_ci(values)
    assert 0.35 < low < high < 0.65


def test_a_shifted_copy_is_significant_an_exchangeable_one_is_not():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 0.6, size=60)
    groups = np.repeat(np.arange(30), 2)
    assert stats.paired_p(a + 0.02, a, groups) < 0.001
    assert stats.paired_p(a, a, groups) == 1.0
    # exchangeable: each pair is (x, y) or (y, x) with probability 1/2. One draw can be unlucky, so the test
    # is on the rejection rate over 200 draws: about the nominal 5 % (binomial sd 1.5 %), never the 100 %
    # of the shifted copy
    rejected = []
    for _ in range(200):
        x, y = rng.uniform(0.2, 0.6, size=(2, 60))
        swap = rng.random(60) < 0.5
        rejected.append(stats.paired_p(np.where(swap, x, y), np.where(swap, y, x), groups, n_perm=500) < 0.05)
    assert 0.01 <= np.mean(rejected) <= 0.10


def test_few_groups_cannot_be_significant():
    # two groups that both differ a little: 2 of the 4 sign patterns are as extreme (p = 0.5, exact)
    assert stats.paired_p([0.3, 0.31, 0.5, 0.52], [0.2, 0.2, 0.4, 0.4], ["p1", "p1", "p2", "p2"]) == 0.5


def test_holm_against_a_hand_computed_example():
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan})
    assert adjusted["a"] == pytest.approx(0.03) and adjusted["b"] == adjusted["c"] == pytest.approx(0.06)
    assert math.isnan(adjusted["d"])


def _frame(values, seeds=1):
    return pd.DataFrame({"id": [f"i{k}" for k in range(len(values))], "group": [f"g{k // 2}" for k in range(len(values))],
                         "metric": "GED_100", "value": values, "seeds": seeds})


def test_column_stats_compare_each_row_with_the_best_on_the_same_images():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.2, 0.4, size=40)
    rows = {"best": _frame(base), "worse": _frame(base + 0.05), "tie": _frame(base + rng.normal(0, 0.01, size=40)),
            "oracle": _frame(base - 0.1)}
    out = stats.column_stats(rows, "GED_100", higher_is_better=False, compare=["best", "worse", "tie"])
    assert out["best"].best and not out["best"].worse and math.isnan(out["best"].p_holm)
    assert out["worse"].worse and not out["tie"].worse
    assert not out["oracle"].best and math.isnan(out["oracle"].p_holm)  # calibration row: interval only
    assert out["worse"].images == 40 and out["worse"].groups == 20


def test_per_image_values_are_averaged_over_seeds_first(tmp_path):
    for seed, vals in enumerate([[0.2, 0.4], [0.4, 0.6]]):
        d = tmp_path / f"seed-{seed}"
        d.mkdir()
        pd.DataFrame({"id": ["a", "b"], "metric": "GED_100", "value": vals}).to_csv(d / "per_image.csv", index=False)
        (d / "groups.csv").write_text("id,group\na,p1\nb,p1\n")
    df = stats.per_image([tmp_path / "seed-0", tmp_path / "seed-1"])
    assert df.set_index("id")["value"].to_dict() == pytest.approx({"a": 0.3, "b": 0.5})
    assert set(df["group"]) == {"p1"} and set(df["seeds"]) == {2}


def test_the_table_marks_rows_worse_than_the_best(tmp_path):
    rng = np.random.default_rng(5)
    base = rng.uniform(0.2, 0.4, size=30)
    values = {"atfm": _frame(base), "ssn": _frame(base + 0.03), "unet": _frame(base + 0.5)}
    t = Table("t", ["GED_100"], ["atfm", "ssn", "unet"], {(r, "GED_100"): (float(v["value"].mean()), 0.01, 2)
                                                          for r, v in values.items()})
    stats.mark_table(t, values)
    assert t.marks == {("ssn", "GED_100"): "†"}  # unet is a calibration row: never compared
    md = to_markdown(t)
    assert f"{values['ssn']['value'].mean():.3f}† ± 0.010 (n=2)" in md and "Holm" in md
    json.dumps(stats.PROCEDURE)  # a plain string for the notes
