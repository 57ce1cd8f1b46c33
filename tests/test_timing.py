"""The Table 3 timing protocol: warm-up, synchronise before every clock read, median/IQR, NFE, records."""

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from amisbench import cli
from amisbench.report import timing
from amisbench.api import Method
from amisbench.errors import UserError
from amisbench.registry import METHODS
from amisbench.runner import run


@dataclass
class SlowConfig:
    steps: int = 4
    width: int = 2


class SlowFake(Method):
    """A fake sampler that costs `steps` network evaluations per sample plus one fixed pass (timing test)."""

    Config = SlowConfig
    config_layers = {"profiles": {"smoke": {"train": {"main": {"steps": 2}}}}}
    calls: list = []

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.net = nn.Conv2d(spec.channels, cfg.width, 1)

    def loss(self, stage, images, masks):
        return self.net(images).pow(2).mean(), {}

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        SlowFake.calls.append(("sample", n))
        u = torch.rand((images.shape[0], n, *images.shape[-2:]), generator=generator, device=images.device)
        return u < 0.5

    def nfe(self, n):
        return 1 + n * self.cfg.steps


@pytest.fixture
def slowfake():
    METHODS.register("slowfake", SlowFake)
    SlowFake.calls = []
    yield SlowFake
    METHODS.unregister("slowfake")


def test_protocol_order_median_iqr_nfe_and_record(tmp_path, monkeypatch, slowfake):
    events = []
    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0, 30.0, 37.0])  # durations 1, 3, 2, 7

    def clock():
        events.append("clock")
        return next(ticks)

    monkeypatch.setattr(timing, "_clock", clock)
    monkeypatch.setattr(timing, "_sync", lambda dev: events.append("sync"))
    orig = SlowFake.sample

    def sample(self, *a, **k):
        events.append("sample")
        return orig(self, *a, **k)

    monkeypatch.setattr(SlowFake, "sample", sample)
    rec = timing.time_method("slowfake", "synthetic", samples=10, images=4, profile="smoke", untrained=True,
                             warmup=2, results=tmp_path, inference={"slowfake": ["method.steps=7"]})
    # two warm-up calls, then per image: sync, clock, sample, sync, clock
    assert events[:3] == ["sample", "sample", "sync"]
    assert events[3:] == ["sync", "clock", "sample", "sync", "clock"] * 4
    assert rec["times_s"] == [1.0, 3.0, 2.0, 7.0]
    assert rec["median_s"] == 2.5 and rec["iqr_s"] == pytest.approx(np.percentile([1, 3, 2, 7], 75)
                                                                      - np.percentile([1, 3, 2, 7], 25))
    assert rec["min_s"] == 1.0 and rec["max_s"] == 7.0
    # the table's inference setting reached the model: 1 fixed + 7 per sample
    assert (rec["nfe"], rec["nfe_fixed"], rec["nfe_per_sample"]) == (71, 1, 7)
    assert rec["nfe_label"] == "1 + 7/sample" and rec["sets"] == ["method.steps=7"]
    assert rec["device"] == "cpu" and rec["dtype"] == "float32" and rec["torch"] == torch.__version__
    assert rec["images"] == 4 and rec["samples"] == 10 and rec["warmup"] == 2 and rec["trained"] is False
    saved = json.loads((tmp_path / "timing" / "cpu" / "synthetic__slowfake.json").read_text())
    assert saved["median_s"] == 2.5 and saved["nfe"] == 71 and saved["peak_memory_bytes"] > 0


def test_nfe_parts_and_labels():
    class M:
        def __init__(self, f):
            self.nfe = f

    assert timing.nfe_parts(M(lambda n: 1 + 25 * n), 100) == (1, 25, 2501)
    assert timing.nfe_parts(M(lambda n: 250 * n), 100) == (0, 250, 25000)
    assert timing.nfe_parts(M(lambda n: 1), 100) == (1, 0, 1)
    assert timing.nfe_label(1, 25) == "1 + 25/sample" and timing.nfe_label(0, 250) == "250/sample"
    assert timing.nfe_label(1, 0) == "1"


def test_table3_settings_come_from_the_table_definition():
    assert timing.inference_settings("atfm") == ["method.steps=25"]
    assert timing.inference_settings("ccdm") == ["method.steps=250"]
    assert timing.inference_settings("ssn") == []


def test_trained_run_and_clear_errors(tmp_path):
    with pytest.raises(UserError, match=r"no finished run of ssn on synthetic .*amisbench run --method ssn "
                                        r"--dataset synthetic --profile smoke --seed 0.*--untrained"):
        timing.time_method("ssn", "synthetic", profile="smoke", results=tmp_path, images=1, samples=2)
    folder = run("ssn", "synthetic", profile="smoke", results=tmp_path, quiet=True)
    rec = timing.time_method("ssn", "synthetic", profile="smoke", results=tmp_path, images=2, samples=5)
    assert rec["trained"] is True and rec["run_dir"] == str(folder) and rec["nfe"] == 1
    assert rec["nfe_label"] == "1" and len(rec["times_s"]) == 2
    # a setting that changes the network cannot be applied to trained weights
    with pytest.raises(UserError, match="change the network of ssn"):
        timing.time_method("ssn", "synthetic", profile="smoke", results=tmp_path, images=1, samples=2,
                           sets=["method.rank=2"])


@pytest.mark.slow
def test_cli_prints_the_table_and_the_ratio_note(tmp_path, capsys, slowfake):
    rc = cli.main(["timing", "--method", "ssn,slowfake", "--dataset", "synthetic", "--profile", "smoke",
                   "--untrained", "--images", "2", "--samples", "5", "--results", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = [ln for ln in out.out.splitlines() if ln.startswith("| ssn") or ln.startswith("| slowfake")]
    assert len(rows) == 2 and "| 21 (1 + 4/sample) |" in rows[1] and "| 1 (1) |" in rows[0]
    assert "slowfake / ssn: measured time ratio" in out.out and "NFE ratio 21" in out.out
    assert (tmp_path / "timing" / "cpu" / "synthetic__ssn.json").is_file()
    assert cli.main(["timing", "--method", "ssn", "--dataset", "synthetic", "--samples", "0", "--untrained",
                     "--results", str(tmp_path)]) == 2
    assert "expected samples >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_release_loop_times_both_samplers_in_one_command(tmp_path, capsys, monkeypatch):
    """ATFM's release loop is its `sampler: release_loop`; the ratio and Table 3's seconds are printed, and
    only our sampler's record is written."""
    seen, medians = [], []
    real = timing.time_method

    def spy(method, dataset, **kw):
        seen.append((method, list(kw["sets"]), kw["save"] if "save" in kw else True))
        rec = real(method, dataset, **kw)
        medians.append(rec["median_s"])
        return rec

    monkeypatch.setattr(timing, "time_method", spy)
    rc = cli.main(["timing", "--method", "atfm", "--dataset", "synthetic", "--profile", "smoke", "--untrained",
                   "--images", "1", "--samples", "2", "--compare", "release_loop", "--results", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert seen == [("atfm", [], True), ("atfm", ["method.sampler=release_loop"], False)]
    row = next(ln for ln in out.out.splitlines() if ln.startswith("| atfm |") and "release_loop" in ln)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"{medians[1] / medians[0]:.1f}x" and cells[2] == f"{medians[1]:.3f}"
    assert cells[5] == f"{timing.paper_seconds()['atfm']:g}" == "113"
    assert [p.name for p in (tmp_path / "timing" / "cpu").iterdir()] == ["synthetic__atfm.json"]


def test_release_loop_settings():
    assert timing.release_loop_settings("atfm", "synthetic", "smoke") == (["method.sampler=release_loop"],
                                                                          "the release's loop")
    assert timing.release_loop_settings("ccdm", "synthetic", "smoke")[0] == ["method.sample_chunk=1"]
    with pytest.raises(UserError, match="ssn has no release-loop switch"):
        timing.release_loop_settings("ssn", "synthetic", "smoke")


@pytest.mark.slow
def test_train_steps_per_second_of_every_stage(capsys):
    assert cli.main(["timing", "--method", "atfm", "--dataset", "synthetic", "--profile", "smoke", "--train",
                     "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| atfm |")]
    assert [r.split("|")[2].strip() for r in rows] == ["gtr", "sfm"]
    assert all(float(r.split("|")[4]) > 0 and r.split("|")[5].strip() == "–" for r in rows)  # no bf16 on CPU
    recs = timing.time_training("ssn", "synthetic", profile="smoke", steps=2)
    assert [(r["stage"], r["dtype"], r["batch_size"]) for r in recs] == [("main", "float32", recs[0]["batch_size"])]
    assert recs[0]["steps_per_s"] == pytest.approx(1 / recs[0]["step_s"])
    with pytest.raises(UserError, match="--steps 0"):
        timing.time_training("ssn", "synthetic", profile="smoke", steps=0)


def test_a_method_returning_bad_samples_fails_timing_with_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(METHODS.get("ssn"), "sample", lambda self, images, n, **kw: torch.zeros(len(images), n, 2, 2))
    rc = cli.main(["timing", "--method", "ssn", "--dataset", "synthetic", "--profile", "smoke", "--untrained",
                   "--images", "1", "--samples", "2", "--warmup", "0", "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and err == ("amisbench timing: failed: SSN.sample returned torch.float32 (1, 2, 2, 2); expected "
                               "torch.bool (1, 2, 32, 32)\n")
    assert not (tmp_path / "timing").exists()


# ---------------------------------------------------------------------------------------------------
# `amisbench timing` on CPU: the peak memory of each method is its own (one process per method).
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cpu_peak_memory_is_per_method(tmp_path, capsys):
    assert cli.main(["timing", "--method", "ssn,unet", "--dataset", "synthetic", "--profile", "smoke", "--untrained",
                     "--samples", "2", "--images", "1", "--warmup", "0", "--results", str(tmp_path)]) == 0
    recs = [json.loads((tmp_path / "timing" / "cpu" / f"synthetic__{m}.json").read_text()) for m in ("ssn", "unet")]
    assert len({r["pid"] for r in recs} | {os.getpid()}) == 3  # two processes, neither this one
    assert all(r["memory_kind"] == timing.PER_PROCESS and r["peak_memory_bytes"] > 0 for r in recs)
    assert capsys.readouterr().out.count(timing.PER_PROCESS) == 2  # the report says what the column measures
    # timed one after the other in one process (the Python API), the second record says it is not its own
    kw = dict(samples=2, images=1, warmup=0, profile="smoke", untrained=True, results=tmp_path, save=False)
    first, second = timing.time_method("ssn", "synthetic", **kw), timing.time_method("unet", "synthetic", **kw)
    assert "not this method's own" in second["memory_kind"] and first["pid"] == second["pid"] == os.getpid()
