"""`amisbench grid`: expansion, skipping finished runs, the print / local / slurm launchers (and submitit)."""

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from amisbench import cli, grid
from amisbench.errors import UserError
from amisbench.registry import METHODS, PLUGINS_ENV
from amisbench.runner import prepare
from amisbench.store import RunSpec

PLUGINS = Path(__file__).parent / "plugins"


def test_expand_methods_variants_seeds_and_sweeps(tmp_path):
    jobs = grid.expand(["ssn", "atfm-act_gtr"], ["synthetic"], 2, profile="smoke", results=tmp_path)
    assert [(j.spec.label, j.spec.seed) for j in jobs] == [("ssn", 0), ("ssn", 1), ("atfm-act_gtr", 0), ("atfm-act_gtr", 1)]
    assert jobs[2].line() == (f"amisbench run --method atfm --dataset synthetic --seed 0 --profile smoke "
                              f"--variant act_gtr --results {tmp_path}")
    assert jobs[0].folder == tmp_path / "runs/synthetic/ssn/smoke/seed-0" and not any(j.done for j in jobs)
    sw = grid.expand(["ssn"], ["synthetic"], 1, profile="smoke", results=tmp_path, sets=["train.main.steps=2"],
                     sweeps=["method.rank=2,4"])
    assert [j.spec.results for j in sw] == [tmp_path / "sweeps" / "method.rank=2",
                                            tmp_path / "sweeps" / "method.rank=4"]
    assert sw[1].spec.sets == ["train.main.steps=2", "method.rank=4"] and sw[1].name.endswith("__method.rank=4")
    with pytest.raises(UserError, match="unknown method 'nope'"):
        grid.expand(["nope"], ["synthetic"], 1, results=tmp_path)
    with pytest.raises(UserError, match="unknown variant 'x'"):
        grid.expand(["ssn"], ["synthetic"], 1, variants=["x"], results=tmp_path)
    with pytest.raises(UserError, match="train.main.min_lr: expected a value between 0 and lr"):
        grid.expand(["ssn"], ["synthetic"], 1, results=tmp_path, sets=["train.main.min_lr=1"])


def test_a_set_scoped_to_one_method_reaches_only_its_jobs(tmp_path):
    jobs = grid.expand(["ssn", "p2sam"], ["synthetic"], 1, profile="paper", results=tmp_path,
                       sets=["eval.max_images=4", "p2sam:method.sam_checkpoint=/w/sam.pth", "ssn:method.rank=5"])
    by = {j.spec.method: j for j in jobs}
    assert by["ssn"].spec.sets == ["eval.max_images=4", "method.rank=5"]
    assert by["p2sam"].spec.sets == ["eval.max_images=4", "method.sam_checkpoint=/w/sam.pth"]
    assert "--set method.sam_checkpoint=/w/sam.pth" in by["p2sam"].line() and "sam_checkpoint" not in by["ssn"].line()
    with pytest.raises(UserError, match="--set atfm:method.steps=3: method 'atfm' is not in this grid"):
        grid.expand(["ssn"], ["synthetic"], 1, results=tmp_path, sets=["atfm:method.steps=3"])
    with pytest.raises(UserError, match="unknown key 'rank'"):  # a scoped key is still checked
        grid.expand(["ssn", "p2sam"], ["synthetic"], 1, results=tmp_path, sets=["p2sam:method.rank=3"])


def test_finished_runs_are_skipped_only_with_the_same_config(tmp_path, capsys):
    res, folder = prepare(RunSpec("ssn", "synthetic", 1, "smoke", results=tmp_path))
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": "done", "config_hash": res.hash()}))
    argv = ["grid", "--method", "ssn", "--dataset", "synthetic", "--seeds", "3", "--profile", "smoke",
            "--results", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert [shlex.split(ln)[shlex.split(ln).index("--seed") + 1] for ln in lines] == ["0", "2"]
    assert "3 job(s), 1 finished (skipped), 2 to run" in out.err
    # another config in the same folder is not "finished": its job runs (and the runner explains)
    (folder / "run.json").write_text(json.dumps({"status": "done", "config_hash": "other"}))
    assert cli.main(argv) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


RECORDER = """import json, os, sys
from amisbench.grid import read_job
assert sys.argv[1] == "grid-task", sys.argv
open(os.environ["RECORD"], "w").write(json.dumps(read_job(sys.argv[2], sys.argv[3])))
"""


def test_slurm_script_is_valid_bash_and_runs_job_k(tmp_path, capsys, monkeypatch):
    out = tmp_path / "grid"
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    monkeypatch.setattr(grid, "local_prefix", lambda: [sys.executable, str(recorder)])
    rc = cli.main(["grid", "--method", "ssn", "--dataset", "synthetic", "--seeds", "3", "--profile", "smoke",
                   "--results", str(tmp_path / "res dir"), "--set", "method.unet.widths=[4, 8]",
                   "--launcher", "slurm", "--out", str(out), "--max-parallel", "2", "--gpus-per-job", "1",
                   "--sbatch=--time=01:00:00"])
    script = capsys.readouterr().out
    assert rc == 0 and script == (out / "grid.sbatch").read_text()
    assert "#SBATCH --array=1-3%2" in script and "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH --time=01:00:00" in script
    assert "eval" not in script and "jobs.txt" not in script
    check = subprocess.run(["bash", "-n", str(out / "grid.sbatch")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    doc = json.loads((out / "jobs.json").read_text())
    assert doc["format"] == grid.JOBS_FORMAT and len(doc["jobs"]) == 3
    assert [j[j.index("--seed") + 1] for j in doc["jobs"]] == ["0", "1", "2"]
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "RECORD": str(tmp_path / "args.json"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(["bash", str(out / "grid.sbatch")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    args = json.loads((tmp_path / "args.json").read_text())
    assert args == doc["jobs"][1] and args[args.index("--seed") + 1] == "1"
    assert "method.unet.widths=[4, 8]" in args


def test_grid_task_reads_one_checked_job(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setitem(cli.COMMANDS, "run", lambda a: ran.append((a.method, a.seed)) or 0)
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"format": grid.JOBS_FORMAT, "jobs": [
        ["run", "--method", "ssn", "--dataset", "synthetic", "--seed", "0"],
        ["run", "--method", "unet", "--dataset", "synthetic", "--seed", "7"],
        ["table"],
        ["run", "--method", "ssn\ntouch /tmp/x", "--dataset", "synthetic"]]}))
    assert cli.main(["grid-task", str(jobs), "2"]) == 0 and ran == [("unet", 7)]
    for index, words in (("5", "no job 5 (the file holds jobs 1-4)"), ("x", "expected a whole number"),
                         ("3", "not an `amisbench run` argument list"), ("4", "control character U+000A")):
        assert cli.main(["grid-task", str(jobs), index]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    jobs.write_text("ssn; touch /tmp/x")
    assert cli.main(["grid-task", str(jobs), "1"]) == 2
    assert "not a jobs file written by `amisbench grid`" in capsys.readouterr().err
    assert ran == [("unet", 7)]


@pytest.mark.slow
def test_slurm_injection_through_a_grid_value_runs_nothing(tmp_path, capsys):
    """A grid value holding a newline once became its own line of jobs.txt and ran as a shell command."""
    marker = tmp_path / "pwned"
    spec = tmp_path / "evil.yaml"
    spec.write_text(yaml.safe_dump({"method": "ssn", "dataset": "synthetic", "profile": "smoke",
                                    "set": [f"ssn:method.rank=4'\ntouch {marker} #"]}))
    out = tmp_path / "grid"
    rc = cli.main(["grid", "--grid", str(spec), "--results", str(tmp_path / "res"), "--launcher", "slurm",
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "control character U+000A" in err and "Traceback" not in err
    assert not out.exists() and not marker.exists()
    # a jobs file edited by hand with shell syntax in its values: the real script and `grid-task` run no shell
    out.mkdir()
    script = grid.slurm_script(out / "jobs.json", 2, log_dir=out / "logs", workdir=tmp_path)
    (out / "grid.sbatch").write_text(script)
    (out / "jobs.json").write_text(json.dumps({"format": grid.JOBS_FORMAT, "jobs": [
        ["run", "--method", f"ssn; touch {marker}; #", "--dataset", "synthetic", "--results", str(tmp_path / "r")],
        ["run", "--method", f"$(touch {marker})", "--dataset", "`touch {marker}`", "--results",
         str(tmp_path / "r")]]}))
    for task in ("1", "2"):
        done = subprocess.run(["bash", str(out / "grid.sbatch")], capture_output=True, text=True,
                              env={**os.environ, "SLURM_ARRAY_TASK_ID": task})
        assert done.returncode == 2, done.stderr
        assert "unknown method" in done.stderr.lower() or "error" in done.stderr
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_local_failures_are_listed_with_a_nonzero_exit(tmp_path, capsys):
    jobs = grid.expand(["ssn"], ["synthetic"], 3, profile="smoke", results=tmp_path)
    # a stand-in command that fails for seed 1 only
    code = "import sys; sys.exit(3 if sys.argv[sys.argv.index('--seed') + 1] == '1' else 0)"
    done = grid.run_local(jobs, workers=2, log_dir=tmp_path / "logs", prefix=[sys.executable, "-c", code])
    assert sorted((j.spec.seed, rc) for j, rc, _ in done) == [(0, 0), (1, 3), (2, 0)]
    assert grid._summary(done, skipped=0) == 1
    err = capsys.readouterr().err
    assert "2 run(s) done, 0 skipped (finished), 1 failed" in err
    assert "failed: amisbench run --method ssn --dataset synthetic --seed 1" in err and "exit 3" in err
    assert (tmp_path / "logs" / "synthetic__ssn__smoke__seed-1.log").read_text().startswith("$ amisbench run")


def _tiny_site(tmp_path: Path) -> Path:
    """A folder that makes the test plugin `tiny` an installed entry point for child processes."""
    site = tmp_path / "site"
    info = site / "amisbench_tiny-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: amisbench-tiny\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[amisbench.methods]\ntiny = amisbench_tiny_plugin:TinyMethod\n")
    return site


@pytest.mark.slow
def test_local_grid_killed_and_rerun_skips_finished_and_resumes(tmp_path, capsys):
    """A 2-method x 2-seed smoke grid with 2 workers; killed (whole process group) after the first run
    finished; the same command again skips the finished runs and completes the rest."""
    site = _tiny_site(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(PLUGINS)]),
           PLUGINS_ENV: "amisbench,amisbench-tiny"}  # the project's own entry points and this test's plugin
    res = tmp_path / "res"
    cmd = [sys.executable, "-P", "-m", "amisbench.cli", "grid", "--method", "ssn,tiny", "--dataset", "synthetic",
           "--seeds", "2", "--profile", "smoke", "--launcher", "local", "--workers", "2", "--results", str(res)]
    folders = [res / "runs/synthetic" / m / "smoke" / f"seed-{s}" for m in ("ssn", "tiny") for s in (0, 1)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any((f / "run.json").exists() for f in folders):
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()
    os.killpg(proc.pid, signal.SIGKILL)  # the grid and every job it started
    proc.wait()
    proc.stderr.close()
    finished = [f for f in folders if (f / "run.json").exists()]
    assert 1 <= len(finished) < 4
    stamps = {f: (f / "run.json").stat().st_mtime_ns for f in finished}
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"4 job(s), {len(finished)} finished (skipped), {4 - len(finished)} to run" in again.stderr
    assert f"{4 - len(finished)} run(s) done" in again.stderr and "0 failed" in again.stderr
    assert all((f / "run.json").is_file() for f in folders)
    assert all((f / "run.json").stat().st_mtime_ns == t for f, t in stamps.items())
    info = json.loads((folders[2] / "run.json").read_text())
    assert info["method"] == "tiny" and info["seed"] == 0
    # nothing left to do (checked in this process, with the plugin registered by hand)
    sys.path.insert(0, str(PLUGINS))
    try:
        from amisbench_tiny_plugin import TinyMethod

        METHODS.register("tiny", TinyMethod)
        assert cli.main(cmd[4:-6] + ["--launcher", "local", "--results", str(res)]) == 0
        assert "4 finished (skipped), 0 to run" in capsys.readouterr().err
    finally:
        METHODS.unregister("tiny")
        sys.path.remove(str(PLUGINS))


def test_submitit_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)
    rc = cli.main(["grid", "--method", "ssn", "--dataset", "synthetic", "--profile", "smoke", "--results",
                   str(tmp_path), "--launcher", "submitit"])
    assert rc == 2 and "needs the submitit package: pip install submitit" in capsys.readouterr().err


@pytest.mark.slow
def test_submitit_local_executor(tmp_path, capsys):
    pytest.importorskip("submitit")
    jobs = grid.expand(["ssn"], ["synthetic"], 2, profile="smoke", results=tmp_path)
    code = ("import sys, pathlib; s = sys.argv[sys.argv.index('--seed') + 1]; "
            f"pathlib.Path({str(tmp_path)!r}, 'ran-' + s).write_text(' '.join(sys.argv[1:])); sys.exit(int(s) * 5)")
    done = grid.run_submitit(jobs, folder=tmp_path / "submitit", cluster="local", timeout_min=5,
                             prefix=[sys.executable, "-c", code])
    assert sorted((j.spec.seed, rc) for j, rc, _ in done) == [(0, 0), (1, 5)]
    assert (tmp_path / "ran-0").read_text().startswith("run --method ssn --dataset synthetic --seed 0")
    assert grid._summary(done, 0) == 1


def test_grid_of_a_table_uses_its_implemented_rows_and_dataset(capsys):
    methods, datasets = grid.table_grid("4", None, None)
    assert methods == ["atfm-act_gtr", "atfm-sfm_no_lsf", "atfm-sfm", "atfm-atfm_no_lsf", "atfm"]
    assert datasets == ["lidc"]
    methods, datasets = grid.table_grid("1", None, "synthetic")
    rows = ["prob_unet", "phiseg", "ssn", "mose", "p2sam", "cimd", "analog_bits", "ccdm", "atfm"]
    assert methods == [m for m in rows if m in METHODS] and "ssn" in methods and datasets == ["synthetic"]
    missing = [m for m in rows if m not in METHODS]  # other methods may be added any time
    err = capsys.readouterr().err
    assert (f"not implemented, left out: {', '.join(missing)}" in err) if missing else err == ""
    assert cli.main(["grid", "--table", "4", "--dataset", "synthetic", "--profile", "smoke", "--seeds", "2"]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 10 and "--variant act_gtr" in lines[0] and "--variant" not in lines[-1]
    assert cli.main(["grid", "--table", "3"]) == 2
    assert "built by `amisbench timing`" in capsys.readouterr().err
    assert cli.main(["grid", "--dataset", "synthetic"]) == 2


def test_grid_definitions_from_yaml(tmp_path, capsys):
    # a shipped definition: Table 1's implemented rows, paper profile, 5 seeds; the command line wins
    assert cli.main(["grid", "--grid", "table1_paper", "--dataset", "synthetic", "--seeds", "2",
                     "--results", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * len([m for m in ["prob_unet", "phiseg", "ssn", "mose", "p2sam", "cimd", "analog_bits",
                                               "ccdm", "atfm"] if m in METHODS])
    assert all("--profile paper" in ln and "--dataset synthetic" in ln for ln in lines)
    p2sam = [ln for ln in lines if "--method p2sam" in ln]
    assert p2sam and all("--set method.sam_checkpoint=sam_vit_b_01ec64.pth" in ln for ln in p2sam)
    # a user file: lists for methods, set entries add up with the command line's
    f = tmp_path / "mine.yaml"
    f.write_text("method: [ssn, atfm-act_gtr]\ndataset: synthetic\nprofile: smoke\nseeds: 1\n"
                 "set: ['train.default.steps=2']\n")
    assert cli.main(["grid", "--grid", str(f), "--set", "eval.max_images=2", "--results", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"amisbench run --method ssn --dataset synthetic --seed 0 --profile smoke --results {tmp_path} "
                     "--set train.default.steps=2 --set eval.max_images=2",
                     f"amisbench run --method atfm --dataset synthetic --seed 0 --profile smoke --variant act_gtr "
                     f"--results {tmp_path} --set train.default.steps=2 --set eval.max_images=2"]


@pytest.mark.parametrize("text, message", [
    ("method: ssn\ndataset: synthetic\nseed: 3\n", "unknown key 'seed'; known: description, method"),
    ("method: ssn\ndataset: synthetic\nseeds: three\n", "'seeds' should be int, got str"),
    ("method: ssn\nset: train.main.steps=2\n", "'set' should be list, got str"),
    ("method: [ssn\n", "is not valid YAML at line"),
    ("- ssn\n", "expected a mapping of keys"),
])
def test_bad_grid_files_get_one_sentence(tmp_path, capsys, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert cli.main(["grid", "--grid", str(f), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(f) in err and len(err.strip().splitlines()) == 1


def test_unknown_grid_name_lists_the_shipped_ones(tmp_path, capsys):
    assert cli.main(["grid", "--grid", "nope", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--grid nope: no such file and no configs/grids/nope.yaml; known: quick_synthetic, reference, table1_paper" in err


def test_a_job_is_its_run_spec_rendered_once_and_parsed_back_the_same(tmp_path):
    """The argument list of a job, read by ``amisbench run``'s parser, is the job's RunSpec again (a data
    folder named like YAML stays a folder name; it never becomes a --set string)."""
    jobs = grid.expand(["ssn-flips"], ["lidc"], 2, profile="smoke", results=tmp_path, protocol="atfm-paper",
                       data_root="lidc: v2", sets=["train.main.steps=2"], sweeps=["method.rank=2,4"])
    assert len(jobs) == 4
    for job in jobs:
        argv = job.args()
        assert "--data-root" in argv and not any(a.startswith("dataset.") for a in argv)
        specs, _, _ = cli.run_specs(cli.build_parser().parse_args(argv))
        assert specs == [dataclasses.replace(job.spec, set_labels=["--set"] * len(job.spec.sets))]
        assert job.folder == job.spec.path(job.spec.results)


def test_a_grid_with_a_bad_method_value_launches_nothing(tmp_path, capsys):
    """The method's config rules run for every job while the grid expands: exit 2, one sentence, no jobs file,
    no log, no run folder (here with the slurm launcher, which would write jobs.json and grid.sbatch)."""
    rc = cli.main(["grid", "--method", "ssn,atfm", "--dataset", "synthetic", "--profile", "smoke", "--launcher", "slurm",
                   "--set", "atfm:method.mc_samples=3", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert rc == 2 and err == ("amisbench grid: error: method.mc_samples: expected an even number (antithetic sampling "
                               "draws pairs), got 3\n")
    assert not any(tmp_path.iterdir())
