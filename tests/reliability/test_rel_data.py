"""`amisbench data prepare` and the prepared-data reader on hostile or broken input: one sentence, exit 2,
nothing left at --out (no partial folder either); a killed prepare's partial folder is removed by the next one."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import data_formats as F  # tests/fixtures, put on sys.path by tests/conftest.py
from rel_helpers import assert_refused, call, snapshot


def _prepare(capsys, kind, src, out):
    return call(capsys, "data", "prepare", kind, "--from", src, "--out", out, "--quiet")


def _nested_pickle(depth: int) -> bytes:
    """``{"deep": [[[...]]]}`` nested ``depth`` lists deep, written opcode by opcode (pickle.dumps itself
    recurses): PROTO 2, EMPTY_DICT, the key, ``depth`` EMPTY_LISTs, ``depth - 1`` APPENDs, SETITEM, STOP."""
    return b"\x80\x02}" + b"X\x04\x00\x00\x00deep" + b"]" * depth + b"a" * (depth - 1) + b"s."


def _entries_with(key_change=None, value_change=None):
    entries = F.make_lidc_entries(n_scans=3, slices=2, size=8)
    first = next(iter(entries))
    if value_change:
        value_change(entries[first])
    if key_change:
        entries = {key_change if k == first else k: v for k, v in entries.items()}
    return entries


def _nan_image(entry):
    entry["image"][2, 3] = np.nan


def _src_pickle(tmp_path, **kw):
    return F.write_lidc_pickle(tmp_path / "data_lidc.pickle", _entries_with(**kw))


def _src_png_bomb(tmp_path):
    from PIL import Image

    root = tmp_path / "png"
    F.write_png_tree(root, patients={"train": ["P1"], "val": ["P2"], "test": ["P3"]}, slices=1, readers=2)
    Image.new("1", (9000, 8000)).save(root / "train" / "images" / "P1" / "z-100.0_c0.png")  # 72 MP, ~10 kB
    return root


def _src_png_bad_patient(tmp_path):
    root = tmp_path / "png"
    F.write_png_tree(root, patients={"train": ["P1"], "val": ["P2"], "test": ["P3"]}, slices=1, readers=2)
    for sub in ("images", "gt"):
        (root / "train" / sub / "P1").rename(root / "train" / sub / "P\\1")
    return root


def _src_hdf5_nan(tmp_path):
    import h5py

    path = tmp_path / "data_lidc.hdf5"
    F.write_lidc_hdf5(path, size=8)
    with h5py.File(path, "r+") as f:
        im = f["val/images"][()]
        im[1, 4, 4] = np.nan
        f["val/images"][...] = im
    return path


SOURCE_CASES = {  # name -> (source builder, key words)
    "deeply nested pickle": (lambda t: _write(t / "deep.pickle", _nested_pickle(20_000)),
                             ["entry 'deep' must be a dict with 'image' and 'masks', found list"]),
    "a container that holds itself": (lambda t: _write(t / "cyc.pickle", b"\x80\x02]q\x00h\x00a."),
                                      ["holds a list or dict that contains itself"]),
    "id with a newline": (lambda t: _src_pickle(t, key_change="scan\n_slice0"),
                          ["the id 'scan\\n_slice0' holds the control character U+000A"]),
    "id with a path separator": (lambda t: _src_pickle(t, key_change="../../etc"),
                                 ["the id '../../etc' holds a path separator"]),
    "NaN in a pickle image": (lambda t: _src_pickle(t, value_change=_nan_image), ["the image holds NaN (1 values)"]),
    "NaN in an HDF5 image": (_src_hdf5_nan, ["val/images[0:2] holds NaN (1 values)"]),
    "PNG decompression bomb": (_src_png_bomb, ["9000x8000 = 72,000,000 pixels", "above the limit of 67,108,864 "
                                               "pixels", "decompression bomb"]),
    "PNG patient folder with a backslash": (_src_png_bad_patient, ["the id 'P\\\\1' holds a path separator"]),
}


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_hostile_or_broken_sources_are_one_sentence(tmp_path, capsys, case):
    build, words = SOURCE_CASES[case]
    src = build(tmp_path)
    out = tmp_path / "prepared"
    before = snapshot(tmp_path)
    rc, stdout, err = _prepare(capsys, "lidc", src, out)
    assert_refused(rc, err, words)
    assert snapshot(tmp_path) == before  # no --out, no partial folder


@pytest.mark.parametrize("case, words", [
    ("read-only", ["--out", "cannot write there", "not writable", "Read-only file system"]),
    ("full", ["--out", "cannot write the prepared data", "no space left on the device", "nothing was left"]),
])
def test_an_out_that_cannot_be_written_is_one_sentence(tmp_path, capsys, monkeypatch, case, words):
    src = _src_pickle(tmp_path)
    out = tmp_path / "prepared"
    if case == "read-only":  # tests run as root, whom permissions do not stop: the file system refuses
        real = os.mkdir

        def mkdir(path, *a, **kw):
            if ".partial-" in str(path):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, *a, **kw)

        monkeypatch.setattr(os, "mkdir", mkdir)
    else:
        def fallocate(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", fallocate)
    before = snapshot(tmp_path)
    rc, stdout, err = _prepare(capsys, "lidc", src, out)
    assert_refused(rc, err, words)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------------
# the reader: every file it opens is listed in the manifest and verified
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from amisbench.datasets._prepare import prepare

    t = tmp_path_factory.mktemp("prep")
    src = F.write_lidc_pickle(t / "data_lidc.pickle", F.make_lidc_entries(n_scans=6, slices=2, size=16))
    return prepare("lidc", src, t / "prepared", show_progress=False)


@pytest.mark.parametrize("drop, words", [
    (lambda files: {}, ["does not list images.npy, masks.npy, meta.csv", "cannot be verified"]),
    (lambda files: {k: v for k, v in files.items() if k != "masks.npy"}, ["does not list masks.npy"]),
    (lambda files: {k: v for k, v in files.items() if k != "splits/clean/train.txt"},
     ["does not list splits/clean/train.txt", "the split cannot be verified"]),
    (lambda files: {k: {"bytes": v["bytes"]} for k, v in files.items()}, ["'files' must map each file to its "
                                                                          "bytes and sha256"]),
])
def test_a_manifest_cannot_switch_the_checksums_off(prepared, tmp_path, capsys, drop, words):
    import shutil

    root = tmp_path / "prepared"
    shutil.copytree(prepared, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = drop(manifest["files"])
    (root / "manifest.json").write_text(json.dumps(manifest))
    res = tmp_path / "res"
    rc, out, err = call(capsys, "run", "--method", "ssn", "--dataset", "lidc", "--profile", "smoke", "--quiet",
                        "--data-root", root, "--results", res)
    assert_refused(rc, err, [str(root / "manifest.json"), *words])
    assert not res.exists()


# ----------------------------------------------------------------------------------------------------
# kill -9 during prepare
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_during_prepare_leaves_a_partial_folder_that_the_next_prepare_removes(tmp_path):
    src = tmp_path / "png"
    F.write_png_tree(src, patients={"train": [f"P{i}" for i in range(16)], "val": ["V1"], "test": ["T1"]},
                     slices=4, readers=4)
    out = tmp_path / "prepared"
    cmd = [sys.executable, "-P", "-m", "amisbench.cli", "data", "prepare", "lidc", "--from", str(src), "--out",
           str(out), "--quiet"]
    for attempt in range(5):  # the kill must land while the partial folder exists; retry if it ended first
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        partial = []
        while time.time() < deadline and proc.poll() is None and not partial:
            partial = [p for p in tmp_path.iterdir() if p.name.startswith(".prepared.partial-")]
            time.sleep(0.005)
        if proc.poll() is None and partial:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        proc.wait()
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    else:
        pytest.fail("prepare ended before it could be killed five times; give it more images")
    assert partial[0].is_dir() and not out.exists()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared")] == []
