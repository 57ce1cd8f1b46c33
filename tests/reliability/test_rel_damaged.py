"""Damaged run folders: every command that reads run.json / metrics.json names the file and what is wrong;
a checkpoint is verified against its checksum and checked for what it must hold before a run resumes."""

from __future__ import annotations

import json

import pytest
import torch

from amisbench import store
from rel_helpers import RUN_FOLDER, SMOKE_RUN, assert_refused, call, snapshot

DAMAGE = {  # name -> (bytes written, key words)
    "empty": (b"", ["is empty"]),
    "half-written": (b'{"method": "ssn", "dataset": "synth', ["is not valid JSON", "half-written"]),
    "a list": (b"[1, 2, 3]", ["holds a JSON list, expected an object"]),
    "not text": (b"\xff\xfe\x00\x81junk", ["is not UTF-8 text"]),
}
RUN_JSON_TYPED = (b'{"method": "ssn", "dataset": "synthetic", "profile": "smoke", "seed": "zero", '
                  b'"config_hash": "x"}', ["'seed' is str 'zero', expected int"])
COMMANDS = {
    "table": ["table", "--dataset", "synthetic"],
    "rerun": SMOKE_RUN,
    "timing": ["timing", "--method", "ssn", "--dataset", "synthetic", "--profile", "smoke", "--images", "1",
               "--samples", "2"],
    "figures": ["figures", "--dataset", "synthetic", "--kind", "samples"],
}


def _case(results, capsys, command, name, data, words):
    path = results / RUN_FOLDER / name
    path.write_bytes(data)
    before = snapshot(results)
    rc, out, err = call(capsys, *COMMANDS[command], "--results", results)
    assert_refused(rc, err, [str(path), *words])
    assert snapshot(results) == before


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("damage", [*DAMAGE, "wrong-typed"])
def test_a_damaged_run_json_is_named_by_every_command(results_copy, capsys, command, damage):
    data, words = DAMAGE[damage] if damage in DAMAGE else RUN_JSON_TYPED
    if command == "rerun" and damage == "wrong-typed":  # rerun reads only the config hash of a finished run
        data, words = b'{"config_hash": 5}', ["'config_hash' is int 5, expected str"]
    _case(results_copy, capsys, command, "run.json", data, words)


@pytest.mark.parametrize("command", ["table", "figures"])
@pytest.mark.parametrize("damage", ["empty", "half-written", "a list", "wrong-typed"])
def test_a_damaged_metrics_json_is_named(results_copy, capsys, command, damage):
    data, words = DAMAGE[damage] if damage in DAMAGE else (b'{"GED_16": "high"}', ["'GED_16' is str 'high', "
                                                                                       "expected a number"])
    _case(results_copy, capsys, command, "metrics.json", data, words)


# ----------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------

def _unfinished(results):
    """The finished run turned back into one that resumes from ckpt/last.pt (at the end of training)."""
    folder = results / RUN_FOLDER
    for name in ("run.json", "metrics.json", "per_image.csv"):
        (folder / name).unlink()
    return folder / "ckpt" / "last.pt"


def _flip_a_bit(ckpt):
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x10
    ckpt.write_bytes(bytes(data))


def _rewrite(ckpt, change):
    state = torch.load(ckpt, weights_only=True)
    store.save_torch(ckpt, change(state))  # a valid checksum: the contents are what is wrong


def _wrong_shape(state):
    key = next(k for k, v in state["model"].items() if v.ndim >= 1)
    state["model"][key] = torch.zeros(3, 1, 7)
    return state


CKPT_CASES = {
    "a flipped bit": (_flip_a_bit, ["does not match its checksum", "damaged or was replaced", "--force"]),
    "no checksum file": (lambda c: store.checksum_path(c).unlink(), ["has no checksum file last.pt.sha256"]),
    "a list": (lambda c: store.save_torch(c, [1, 2, 3]), ["holds a list, expected the runner's dict"]),
    "keys missing": (lambda c: _rewrite(c, lambda s: {k: v for k, v in s.items() if k not in ("model", "rng")}),
                     ["lacks model, rng"]),
    "wrong shapes": (lambda c: _rewrite(c, _wrong_shape), ["does not fit this model", "size mismatch"]),
    "model keys missing": (lambda c: _rewrite(c, lambda s: {**s, "model": {}}),
                           ["does not fit this model", "Missing key"]),
    "not a checkpoint": (lambda c: store.atomic_write_bytes(c, b"garbage") or store.atomic_write_text(
        store.checksum_path(c), __import__("hashlib").sha256(b"garbage").hexdigest() + "\n"),
        ["cannot be read"]),
}


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_a_bad_checkpoint_is_refused_before_resuming(results_copy, capsys, case):
    ckpt = _unfinished(results_copy)
    damage, words = CKPT_CASES[case]
    damage(ckpt)
    before = snapshot(results_copy)
    rc, out, err = call(capsys, *SMOKE_RUN, "--results", results_copy)
    assert_refused(rc, err, [f"checkpoint {ckpt}", *words])
    assert snapshot(results_copy) == before


def test_a_bad_checkpoint_of_a_finished_run_is_named_by_timing(results_copy, capsys):
    ckpt = results_copy / RUN_FOLDER / "ckpt" / "last.pt"
    _flip_a_bit(ckpt)
    rc, out, err = call(capsys, *COMMANDS["timing"], "--results", results_copy)
    assert_refused(rc, err, [f"checkpoint {ckpt}", "does not match its checksum"])


def test_a_checkpoint_written_twice_keeps_one_checksum_and_resumes(tmp_path):
    ckpt = tmp_path / "ckpt" / "best.pt"  # any checkpoint name is covered, e.g. best.pt of checkpoint selection
    store.save_torch(ckpt, {"a": torch.ones(2)})
    store.save_torch(ckpt, {"a": torch.zeros(2)})
    assert len(store.checksum_path(ckpt).read_text().split()) == 1
    assert torch.equal(store.load_torch(ckpt)["a"], torch.zeros(2))
    _flip_a_bit(ckpt)
    with pytest.raises(store.CheckpointError, match="does not match its checksum"):
        store.load_torch(ckpt)


def test_a_checkpoint_save_killed_between_its_two_renames_stays_verifiable(tmp_path, monkeypatch):
    """The checksum file is renamed first, the checkpoint second: a save killed in between (twice in a row
    here) leaves the previous checkpoint, whose hash is still listed."""
    ckpt = tmp_path / "ckpt" / "last.pt"
    store.save_torch(ckpt, {"step": 1})
    real = store.atomic_write_bytes

    def killed(path, data):
        if path == ckpt:
            raise KeyboardInterrupt  # stands in for kill -9 after the checksum file was written
        return real(path, data)

    monkeypatch.setattr(store, "atomic_write_bytes", killed)
    for step in (2, 3):
        with pytest.raises(KeyboardInterrupt):
            store.save_torch(ckpt, {"step": step})
    monkeypatch.setattr(store, "atomic_write_bytes", real)
    assert store.load_torch(ckpt) == {"step": 1}
    store.save_torch(ckpt, {"step": 4})
    assert store.load_torch(ckpt) == {"step": 4} and len(store.checksum_path(ckpt).read_text().split()) == 1
