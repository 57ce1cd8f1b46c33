"""Bad values and names: one sentence, exit 2, nothing written, refused before anything runs."""

from __future__ import annotations

import pytest

from rel_helpers import SMOKE_RUN, assert_refused, call

CONFIG_CASES = [  # (extra arguments of a smoke run, key words of the sentence)
    (["--set", "train.main.batch_size=0"], ["train.main.batch_size: expected a positive integer, got 0"]),
    (["--set", "train.default.batch_size=-5"], ["train.main.batch_size: expected a positive integer, got -5"]),
    (["--set", "train.main.ckpt_every=0"], ["train.main.ckpt_every: expected a positive number of steps"]),
    (["--set", "train.main.log_every=-1"], ["train.main.log_every: expected a positive number of steps"]),
    (["--set", "eval.n_samples=0"], ["eval.n_samples: expected a positive integer, got 0"]),
    (["--set", "eval.max_images=0"], ["eval.max_images: expected a positive integer or null"]),
    (["--set", "eval.batch_images=-2"], ["eval.batch_images: expected a positive integer, got -2"]),
    (["--set", "train.main.lr=nan"], ["train.main.lr: expected a positive finite learning rate, got nan"]),
    (["--set", "train.main.lr=0"], ["train.main.lr: expected a positive finite learning rate, got 0.0"]),
    (["--set", "train.main.lr=-1e-3"], ["train.main.lr:", "got -0.001"]),
    (["--set", "train.main.epochs=.inf", "--set", "train.main.steps=null"], ["train.main.epochs: expected"]),
    (["--seed", "-1"], ["--seed -1: expected a non-negative integer"]),
    (["--set", "method.rank=1000000000"], ["ssn with this config has", "parameters and needs at least", "GiB",
                                    "this machine has", "method.rank"]),
]


@pytest.mark.parametrize("extra, words", CONFIG_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_config_values_are_refused_before_anything_runs(tmp_path, capsys, extra, words):
    res = tmp_path / "res"
    rc, out, err = call(capsys, *SMOKE_RUN, "--results", res, *extra)
    assert_refused(rc, err, words)
    assert not res.exists()


def test_a_grid_refuses_a_bad_value_before_launching(tmp_path, capsys):
    rc, out, err = call(capsys, "grid", "--method", "ssn", "--dataset", "synthetic", "--profile", "smoke",
                        "--launcher", "local", "--results", tmp_path / "res", "--set", "train.main.batch_size=0")
    assert_refused(rc, err, ["train.main.batch_size: expected a positive integer"])
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("encoding, words", [("utf-16", ["UTF-16", "save it as UTF-8"]),
                                             ("latin-1", ["not UTF-8 text", "save it as UTF-8"])])
def test_a_grid_file_in_another_encoding_gets_one_sentence(tmp_path, capsys, encoding, words):
    grid = tmp_path / "g.yaml"
    grid.write_text("method: ssn\ndataset: synthetic\ndescription: caf\u00e9\n", encoding=encoding)
    rc, out, err = call(capsys, "grid", "--grid", grid, "--results", tmp_path / "res")
    assert_refused(rc, err, [str(grid), *words])
    assert not (tmp_path / "res").exists()


def test_timing_checks_every_method_name_before_timing_any(tmp_path, capsys):
    rc, out, err = call(capsys, "timing", "--method", "ssn,nope", "--dataset", "synthetic", "--profile", "smoke",
                        "--untrained", "--images", "1", "--samples", "2", "--results", tmp_path / "res")
    assert_refused(rc, err, ["unknown method 'nope'"])
    assert "ssn: median" not in err  # ssn was not timed first
    assert not (tmp_path / "res").exists()


def test_timing_refuses_a_negative_seed(tmp_path, capsys):
    rc, out, err = call(capsys, "timing", "--method", "ssn", "--dataset", "synthetic", "--profile", "smoke",
                        "--seed", "-3", "--results", tmp_path / "res")
    assert_refused(rc, err, ["--seed -3: expected a non-negative integer"])
    assert not (tmp_path / "res").exists()
