"""The results store (amisbench/store.py): the run identity (RunSpec: label, folder, label parser), the run
folder layout, JSON/YAML/checkpoint round trips, the one-sentence errors of damaged results files and of output
places that cannot be written, and the clean-up of temporaries. (Damaged checkpoints, full disks and locks under
load: tests/reliability.)"""

import errno
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from amisbench import store
from amisbench.errors import UserError
from amisbench.runner import prepare
from amisbench.store import RunSpec


def test_run_dir_layout(tmp_path):
    assert store.RunSpec("atfm", "lidc", 2, "paper").path(tmp_path) == tmp_path / "runs/lidc/atfm/paper/seed-2"
    assert (store.RunSpec("atfm", "lidc", 0, "paper", "act_gtr", protocol="leaky", tag="lr3").path(tmp_path)
            == tmp_path / "runs/lidc-leaky/atfm-act_gtr+lr3/paper/seed-0")
    assert store.lock_path(tmp_path / "x" / "seed-0") == tmp_path / "x" / ".seed-0.lock"


def test_json_yaml_and_checkpoint_round_trips_leave_no_temporaries(tmp_path):
    obj = {"b": [1, 2.5, None], "a": "ü", "nan": float("nan")}
    store.write_json(tmp_path / "d" / "x.json", obj)  # the folder is created
    back = store.read_json(tmp_path / "d" / "x.json", "test file")
    assert back["a"] == "ü" and back["b"] == [1, 2.5, None] and math.isnan(back["nan"])
    assert list(json.loads((tmp_path / "d" / "x.json").read_text())) == ["a", "b", "nan"]  # sorted keys
    store.write_yaml(tmp_path / "c.yaml", {"z": 1, "a": [2, 3]})
    assert (tmp_path / "c.yaml").read_text().startswith("z: 1")  # order kept
    assert yaml.safe_load((tmp_path / "c.yaml").read_text()) == {"z": 1, "a": [2, 3]}
    state = {"step": 7, "w": torch.arange(6.0).reshape(2, 3)}
    store.save_torch(tmp_path / "ckpt" / "last.pt", state)
    assert (store.checksum_path(tmp_path / "ckpt" / "last.pt").read_text().strip()
            == hashlib.sha256((tmp_path / "ckpt" / "last.pt").read_bytes()).hexdigest())
    got = store.load_torch(tmp_path / "ckpt" / "last.pt")
    assert got["step"] == 7 and torch.equal(got["w"], state["w"])
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("text, words", [
    ("", "is empty; the file is damaged"),
    ('{"method": "ssn", "dat', "is not valid JSON (half-written or damaged"),
    ("[1, 2]", "holds a JSON list, expected an object"),
    ('{"method": "ssn", "dataset": "lidc", "profile": "quick"}', "lacks the key 'seed'; the file is damaged"),
    ('{"method": "ssn", "dataset": "lidc", "profile": "quick", "seed": "0"}', "'seed' is str '0', expected int"),
    ('{"method": "ssn", "dataset": "lidc", "profile": "quick", "seed": true}', "'seed' is bool True, expected int"),
])
def test_damaged_run_files_are_one_sentence_naming_the_file(tmp_path, text, words):
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(UserError) as e:
        store.read_run_info(tmp_path)
    assert str(e.value).startswith(f"run file {tmp_path / 'run.json'}") and words in str(e.value)


def test_run_info_metrics_and_finished_hash(tmp_path):
    assert store.finished_hash(tmp_path) is None and not store.is_done(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"method": "ssn", "dataset": "lidc", "profile": "quick",
                                                    "seed": 1, "config_hash": "abc"}))
    assert store.is_done(tmp_path) and store.finished_hash(tmp_path) == "abc"
    assert store.read_run_info(tmp_path)["seed"] == 1
    (tmp_path / "metrics.json").write_text('{"GED_16": 0.25, "n_images": 3}')
    assert store.read_metrics(tmp_path) == {"GED_16": 0.25, "n_images": 3}
    (tmp_path / "metrics.json").write_text('{"GED_16": "0.25"}')
    with pytest.raises(UserError, match="'GED_16' is str '0.25', expected a number"):
        store.read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_bytes(b'{"GED_16": \xff}')
    with pytest.raises(UserError, match="is not UTF-8 text; the file is damaged"):
        store.read_metrics(tmp_path)
    (tmp_path / "run.json").write_text('{"method": "ssn"}')
    with pytest.raises(UserError, match="lacks the key 'config_hash'"):
        store.finished_hash(tmp_path)


def test_output_places_that_cannot_be_written_are_refused_before_anything_is_written(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(UserError, match=r"^--results .*a_file: is a file, expected a folder$"):
        store.check_output_dir(f, "--results")
    with pytest.raises(UserError, match=r"a_file is a file, so the folder cannot be created there$"):
        store.check_output_dir(f / "sub" / "dir", "--results")
    assert store.check_output_dir(tmp_path / "new" / "dir", "--results") == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()  # checked, not created
    with pytest.raises(UserError, match=r"^--out .*: is a folder, expected a file name$"):
        store.check_output_file(tmp_path, "--out")
    with pytest.raises(UserError, match=r"the folder .*missing does not exist$"):
        store.check_output_file(tmp_path / "missing" / "t.md", "--out")
    with pytest.raises(UserError, match=r"a_file is a file, not a folder$"):
        store.check_output_file(f / "t.md", "--out")
    assert store.check_output_file(tmp_path / "t.md", "--out") == tmp_path / "t.md"


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left on the device"),
    (errno.EROFS, "the folder is not writable"),
    (errno.ENOTDIR, "a part of the path is a file, not a folder"),
])
def test_write_failures_say_what_they_mean(tmp_path, code, words):
    err = OSError(code, os.strerror(code))
    assert store.write_problem(err).startswith(words)
    failed = store.WriteFailed(tmp_path / "m.json", err)
    assert isinstance(failed, UserError) and str(failed) == f"cannot write {tmp_path / 'm.json'}: " + \
        store.write_problem(err)


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    store.write_json(path, {"v": 1})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "replace", full)
    with pytest.raises(store.WriteFailed, match="no space left on the device"):
        store.write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1} and not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
def test_written_files_get_the_mode_open_would_give(tmp_path, monkeypatch):
    # a new file: 0o666 less the umask (tempfile's 0o600 would hide pages and tables from other users)
    monkeypatch.setattr(store, "_UMASK", 0o022)
    store.atomic_write_text(tmp_path / "index.html", "<p>x</p>")
    assert (tmp_path / "index.html").stat().st_mode & 0o777 == 0o644
    monkeypatch.setattr(store, "_UMASK", 0o077)
    store.atomic_write_text(tmp_path / "private.csv", "a")
    assert (tmp_path / "private.csv").stat().st_mode & 0o777 == 0o600
    # a file replaced keeps its own mode
    (tmp_path / "index.html").chmod(0o640)
    store.atomic_write_text(tmp_path / "index.html", "<p>y</p>")
    assert (tmp_path / "index.html").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "index.html").read_text() == "<p>y</p>"


def test_clean_temporaries_removes_only_the_writers_leftovers(tmp_path):
    (tmp_path / "ckpt").mkdir()
    left = [tmp_path / "ckpt" / ".last.pt.k2j4.tmp", tmp_path / ".metrics.json.abc.tmp"]
    kept = [tmp_path / "ckpt" / "last.pt", tmp_path / "notes.tmp", tmp_path / "metrics.json"]
    for p in left + kept:
        p.write_text("x")
    assert sorted(store.clean_temporaries(tmp_path)) == sorted(left)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in left)
    assert store.clean_temporaries(tmp_path / "absent") == []


# ----------------------------------------------------------------------------------------------------
# the run identity
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, label, folder", [
    (RunSpec("ssn", "synthetic"), "ssn", "runs/synthetic/ssn/quick/seed-0"),
    (RunSpec("atfm", "lidc", 2, "paper", "act_gtr", protocol="atfm-paper"), "atfm-act_gtr",
     "runs/lidc-atfm-paper/atfm-act_gtr/paper/seed-2"),
    (RunSpec("prob_unet", "isic3", 1, "smoke", tag="lr3e-4"), "prob_unet+lr3e-4", "runs/isic3/prob_unet+lr3e-4/smoke/seed-1"),
    (RunSpec("c_ssn", "isic3", 0, "smoke", "a-b", tag="x=1,y-2"), "c_ssn-a-b+x=1,y-2",
     "runs/isic3/c_ssn-a-b+x=1,y-2/smoke/seed-0"),
])
def test_label_path_and_parse_round_trip(spec, label, folder):
    assert spec.label == label
    assert spec.path("res") == Path("res") / folder
    assert RunSpec.parse_label(label) == (spec.method, spec.variant, spec.tag)


def test_prepare_names_the_folder_of_the_spec_with_the_resolved_protocol(tmp_path):
    # a protocol equal to the dataset's default is left out of the folder name, as before
    res, folder = prepare(RunSpec("ssn", "synthetic", 3, "smoke", "flips", results=tmp_path, tag="t1"))
    assert folder == RunSpec("ssn", "synthetic", 3, "smoke", "flips", tag="t1").path(tmp_path)
    assert not any(tmp_path.iterdir())
