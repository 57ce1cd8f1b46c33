"""Output paths that cannot be written (a file, a read-only place, a full disk): one sentence, exit 2, before
the work; a disk that fills during a run keeps the last checkpoint and says so."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple

import pytest

from amisbench import store
from rel_helpers import RUN_FOLDER, SMOKE_RUN, assert_refused, call, snapshot


def _readonly(monkeypatch, root):
    """Tests run as root, whom permissions do not stop: report ``root`` and below as not writable."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(root)) else
                        real(p, mode, **kw))


def _full(monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - 4096, 4096))


@pytest.mark.parametrize("case, words", [
    ("file", ["--results", "is a file, expected a folder"]),
    ("under-a-file", ["--results", "is a file, so the folder cannot be created there"]),
    ("read-only", ["--results", "is not writable"]),
    ("full", ["--results", "the disk is full", "MiB free"]),
])
def test_results_that_cannot_be_written_are_refused_before_training(tmp_path, capsys, monkeypatch, case, words):
    res = tmp_path / "res"
    if case == "file":
        res.write_text("not a folder")
    elif case == "under-a-file":
        (tmp_path / "f").write_text("x")
        res = tmp_path / "f" / "res"
    elif case == "read-only":
        res.mkdir()
        _readonly(monkeypatch, res)
    else:
        _full(monkeypatch)
    before = snapshot(tmp_path)
    rc, out, err = call(capsys, *SMOKE_RUN, "--results", res, "--seeds", "2")
    assert_refused(rc, err, words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case, words", [
    ("folder", ["--out", "is a folder, expected a file name"]),
    ("read-only", ["--out", "is not writable"]),
    ("missing-folder", ["--out", "does not exist"]),
])
def test_table_out_that_cannot_be_written_is_refused_before_printing(finished_results, tmp_path, capsys,
                                                                     monkeypatch, case, words):
    out_path = tmp_path / "t.md"
    if case == "folder":
        out_path.mkdir()
    elif case == "read-only":
        _readonly(monkeypatch, tmp_path)
    else:
        out_path = tmp_path / "no" / "t.md"
    before = snapshot(tmp_path)
    rc, out, err = call(capsys, "table", "--dataset", "synthetic", "--results", finished_results, "--out", out_path)
    assert_refused(rc, err, words)
    assert out == ""  # refused before the table was printed
    assert snapshot(tmp_path) == before


def test_table_out_write_failure_mid_way_is_one_sentence(finished_results, tmp_path, capsys, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    rc, out, err = call(capsys, "table", "--dataset", "synthetic", "--results", finished_results, "--out",
                        tmp_path / "t.md")
    assert_refused(rc, err, ["cannot write", "t.md", "no space left on the device"])
    assert list(tmp_path.iterdir()) == []  # no temporary left


def test_full_disk_during_a_run_keeps_the_last_checkpoint_and_says_so(tmp_path, capsys, monkeypatch):
    """A patched writer fails the second checkpoint with ENOSPC; the first stays readable (its checksum
    passes), nothing half-written is left, and rerunning the same command resumes and finishes."""
    res = tmp_path / "res"
    argv = [*SMOKE_RUN, "--results", res, "--set", "train.main.steps=6", "--set", "train.main.ckpt_every=2"]
    real_fsync = os.fsync
    seen = []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".last.pt." in name and ".sha256" not in name:
            seen.append(name)
            if len(seen) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc, out, err = call(capsys, *argv)
    folder = res / RUN_FOLDER
    ckpt = folder / "ckpt" / "last.pt"
    assert_refused(rc, err, ["cannot write", "last.pt", "no space left on the device",
                             f"the last checkpoint {ckpt} is intact", "rerun the same command to resume"])
    assert store.load_torch(ckpt)["step"] == 2
    assert not list(folder.rglob("*.tmp")) and not (folder / "run.json").exists()
    monkeypatch.setattr(os, "fsync", real_fsync)
    rc, out, err = call(capsys, *argv)  # the same command
    assert rc == 0, err
    assert (folder / "run.json").is_file()


def test_a_write_killed_mid_way_leaves_a_temporary_that_the_next_run_removes(results_copy, capsys):
    ckpt_dir = results_copy / RUN_FOLDER / "ckpt"
    leftovers = [ckpt_dir / ".last.pt.k2j4x9.tmp", ckpt_dir.parent / ".metrics.json.a1b2.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a file")
    rc, out, err = call(capsys, *SMOKE_RUN, "--results", results_copy)
    assert rc == 0, err
    assert not any(p.exists() for p in leftovers)
