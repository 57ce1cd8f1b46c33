"""Expand a grid of runs into one idempotent ``amisbench run`` command per job and hand them to a launcher.

A run is the unit of work: it writes only its own folder, skips itself when finished, resumes from its last
checkpoint and exits non-zero on failure. So the grid needs no engine of its own:

* ``print``: the commands, one per line (``amisbench grid ... > jobs.txt``);
* ``local``: a pool of worker processes on this machine, one per entry of ``--devices 0,1`` (each job sees
  only its GPU through ``CUDA_VISIBLE_DEVICES``) or ``--workers N`` CPU workers; one log per job under
  ``<results>/logs/grid/``;
* ``slurm``: a job-array script (``sbatch --array=1-N``) whose task k runs job k of ``jobs.json``. The jobs
  are data (one JSON argument list each), never shell text: the script hands the file and the task id to
  ``amisbench grid-task``, which reads job k and runs it in-process;
* ``submitit``: the same jobs through submitit (optional: ``pip install submitit``), e.g. its local
  executor for a test or Slurm on a cluster.

The grid is method x dataset x variant x sweep value x seed. ``--sweep method.alpha=0,1e-4,1e-3`` trains
one set of runs per value, each in its own results folder ``<results>/sweeps/method.alpha=<value>/``
(a run folder is named by method, variant, profile and seed, not by every setting). Finished runs are
skipped (a finished run of another config is not: its job fails with the runner's message); failed jobs
are listed at the end and the exit code is 1.
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .store import RunSpec

LAUNCHERS = ("print", "local", "slurm", "submitit")


def run_args(spec: RunSpec, device: str | None = None) -> list[str]:
    """The arguments after ``amisbench`` that run ``spec`` (``device`` replaces its device): the one place a
    run becomes a command line. The launchers pass them as an argument list, never through a shell."""
    a = ["run", "--method", spec.method, "--dataset", spec.dataset, "--seed", str(spec.seed), "--profile",
         spec.profile]
    for flag, value in (("--variant", spec.variant), ("--protocol", spec.protocol), ("--data-root", spec.data_root)):
        if value:
            a += [flag, value]
    dev = device or spec.device
    if dev != "cpu":
        a += ["--device", dev]
    if spec.results is not None:
        a += ["--results", str(spec.results)]
    if spec.tag:
        a += ["--tag", spec.tag]
    for s in spec.sets or []:
        a += ["--set", s]
    if spec.force:
        a.append("--force")
    return a


@dataclass
class Job:
    """One run of the grid (``spec``, the data every launcher is handed) and what expansion found out."""

    spec: RunSpec
    folder: Path | None = None  # the run folder (set by :func:`expand`)
    done: bool = False  # finished with the same config
    sweep: str = ""  # the sweep value, e.g. "method.alpha=1e-3"

    @property
    def name(self) -> str:
        s = self.spec
        return f"{s.dataset_label}__{s.label}__{s.profile}__seed-{s.seed}" + (f"__{self.sweep}" if self.sweep else "")

    def args(self, device: str | None = None) -> list[str]:
        """Arguments after ``amisbench`` (:func:`run_args`)."""
        return run_args(self.spec, device)

    def line(self) -> str:
        return shlex.join(["amisbench", *self.args()])


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def refuse_control_characters(words: list[str], where: str) -> None:
    """No value that reaches a launcher may hold a control character (a newline would end a line of a jobs
    file, a carriage return or escape would hide text in a log)."""
    for w in words:
        m = _CONTROL.search(w)
        if m:
            raise UserError(f"{where}: the value {w!r} holds the control character U+{ord(m.group()):04X}; "
                            "values that reach a launcher must be printable text")


def _split_list(value: str | list | None, what: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    out = [str(v).strip() for v in items if str(v).strip()]
    if not out:
        raise UserError(f"{what}: expected a comma-separated list, got {value!r}")
    return out


def parse_sweeps(items: list[str] | None) -> list[tuple[str, list[str]]]:
    """``--sweep key=v1,v2`` items -> [(key, [v1, v2])]."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--sweep {item!r}: expected section.key=v1,v2,..., e.g. method.alpha=0,1e-4,1e-3")
        key, vals = item.split("=", 1)
        out.append((key.strip(), _split_list(vals, f"--sweep {key}")))
    return out


def sweep_folder(results: Path | str, combo: list[tuple[str, str]]) -> Path:
    """Results folder of one sweep value: ``<results>/sweeps/<key>=<value>[,<key>=<value>]``."""
    name = ",".join(f"{k}={v}" for k, v in combo)
    return Path(results) / "sweeps" / re.sub(r"[^A-Za-z0-9.=,_+-]+", "_", name)


def split_scoped_sets(sets: list[str], methods: set[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``--set`` entries for every job, and those scoped to one method (``METHOD:KEY=VALUE``)."""
    common: list[str] = []
    scoped: dict[str, list[str]] = {}
    for entry in sets:
        key = entry.split("=", 1)[0]
        if ":" not in key:
            common.append(entry)
            continue
        name, _, rest = entry.partition(":")
        if name not in methods:
            raise UserError(f"--set {entry}: method '{name}' is not in this grid ({', '.join(sorted(methods))})")
        scoped.setdefault(name, []).append(rest)
    return common, scoped


def expand(methods: list[str], datasets: list[str], seeds: int, *, profile: str = "quick",
           variants: list[str] | None = None, sets: list[str] | None = None, sweeps: list[str] | None = None,
           results: Path | str | None = None, protocol: str | None = None, data_root: str | None = None,
           device: str = "cpu") -> list[Job]:
    """Every job of the grid, validated (config resolves, run folder known) and marked ``done`` when its
    folder holds a finished run of the same config. Writes nothing.

    A method may be given as ``method-variant`` (e.g. ``atfm-act_gtr``); ``variants`` multiplies every
    method (``none`` = the default variant). A ``sets`` entry ``METHOD:KEY=VALUE`` applies to that method's
    jobs only (e.g. ``p2sam:method.sam_checkpoint=PATH`` in a Table 1 grid).
    """
    from .runner import default_results, prepare
    from .store import finished_hash, is_done

    if seeds < 1:
        raise UserError(f"--seeds {seeds}: expected a positive number of seeds")
    if not methods or not datasets:
        raise UserError("give at least one --method and one --dataset")
    root = Path(results) if results is not None else default_results()
    vlist = [None if v in ("none", "") else v for v in (variants or [None])]
    pairs = []
    for m in methods:
        base, own, _ = RunSpec.parse_label(m)
        for v in ([own] if own else vlist):
            pairs.append((base, v))
    common, scoped = split_scoped_sets(sets or [], {m for m, _ in pairs})
    sweep_axes = parse_sweeps(sweeps)
    combos = list(itertools.product(*[[(k, v) for v in vals] for k, vals in sweep_axes])) or [()]
    jobs: list[Job] = []
    by_folder: dict[Path, Job] = {}
    for ds, (m, v), combo, seed in itertools.product(datasets, pairs, combos, range(seeds)):
        extra = [f"{k}={val}" for k, val in combo]
        res_dir = sweep_folder(root, list(combo)) if combo else (Path(results) if results is not None else None)
        spec = RunSpec(m, ds, seed, profile, v, [*common, *scoped.get(m, []), *extra], device, res_dir,
                       data_root=data_root, protocol=protocol)
        job = Job(spec, sweep=res_dir.name if combo else "")
        refuse_control_characters(job.args(), f"grid job {job.name}")
        res, folder = prepare(dataclasses.replace(spec, results=res_dir or root))
        job.folder = folder
        other = by_folder.get(folder.resolve())
        if other is not None:  # one folder, one job: a repeated job is dropped, two configs are refused
            if other.args() == job.args():
                continue
            raise UserError(f"grid jobs {other.name} and {job.name} would both write the run folder {folder}; "
                            "give the sweep values names that differ in letters and digits, or drop one")
        by_folder[folder.resolve()] = job
        job.done = is_done(folder) and finished_hash(folder) == res.hash()
        jobs.append(job)
    return jobs


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------

def local_prefix() -> list[str]:
    """How this interpreter runs ``amisbench`` (independent of PATH)."""
    return [sys.executable, "-P", "-m", "amisbench.cli"]


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + s for s in lines[-n:])


def run_local(jobs: list[Job], *, workers: int = 1, devices: list[str] | None = None,
              log_dir: Path, prefix: list[str] | None = None, out=sys.stderr) -> list[tuple[Job, int, Path]]:
    """Run ``jobs`` with a pool of subprocesses; returns (job, exit code, log) of every job run.

    With ``devices`` there is one worker per entry (repeat an id to run two jobs on one GPU) and each job
    gets ``CUDA_VISIBLE_DEVICES=<id>`` and ``--device cuda``; otherwise ``workers`` CPU workers, each with
    ``OMP_NUM_THREADS`` = cores / workers unless it is set already. Ctrl-C or SIGTERM stops the running
    jobs (they resume from their checkpoints on the next call).
    """
    prefix = prefix or local_prefix()
    slots: queue.Queue = queue.Queue()
    for s in (devices or [None] * max(1, workers)):
        slots.put(s)
    n_workers = slots.qsize()
    base_env = dict(os.environ)
    if not devices:
        base_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n_workers)))
    log_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    running: set[subprocess.Popen] = set()
    lock = threading.Lock()
    # jobs of one run folder run one after the other, never at once (the runner would refuse the second)
    folder_locks = {str(j.folder): threading.Lock() for j in jobs if j.folder is not None}

    def one(job: Job) -> tuple[Job, int | None, Path, float]:
        held = folder_locks.get(str(job.folder)) if job.folder is not None else None
        if held is None:
            return one_slot(job)
        with held:
            return one_slot(job)

    def one_slot(job: Job) -> tuple[Job, int | None, Path, float]:
        log = log_dir / f"{job.name}.log"
        slot = slots.get()
        try:
            if stop.is_set():
                return job, None, log, 0.0
            env = dict(base_env)
            dev = None
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = slot
                dev = "cuda"
            t0 = time.time()
            with open(log, "w") as f:
                f.write("$ " + shlex.join(["amisbench", *job.args(dev)]) + "\n")
                f.flush()
                p = subprocess.Popen([*prefix, *job.args(dev)], stdout=f, stderr=subprocess.STDOUT, env=env)
                with lock:
                    running.add(p)
                rc = p.wait()
                with lock:
                    running.discard(p)
            return job, rc, log, time.time() - t0
        finally:
            slots.put(slot)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, on_term)
    done: list[tuple[Job, int, Path]] = []
    ex = ThreadPoolExecutor(n_workers)
    try:
        futs = [ex.submit(one, j) for j in jobs]
        for k, fut in enumerate(as_completed(futs), 1):
            job, rc, log, secs = fut.result()
            if rc is None:
                continue
            done.append((job, rc, log))
            state = "done" if rc == 0 else f"FAILED (exit {rc}), log {log}"
            print(f"[{k}/{len(jobs)}] {job.name}: {state} ({secs:.1f} s)", file=out, flush=True)
            if rc != 0:
                print(_tail(log), file=out, flush=True)
    except KeyboardInterrupt:
        stop.set()
        with lock:
            procs = list(running)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in futs:
            f.cancel()
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return done


JOBS_FORMAT = "amisbench-grid-jobs/1"


def write_jobs_file(path: Path, jobs: list[Job]) -> None:
    """The Slurm array's jobs as data: ``{"format": ..., "jobs": [[arg, ...], ...]}`` (arguments after
    ``amisbench``)."""
    import json

    from .store import atomic_write_text

    argvs = [j.args() for j in jobs]
    for j, argv in zip(jobs, argvs):
        refuse_control_characters(argv, f"grid job {j.name}")
    atomic_write_text(path, json.dumps({"format": JOBS_FORMAT, "jobs": argvs}, indent=1) + "\n")


def read_job(path: Path, index: str | int) -> list[str]:
    """Job ``index`` (1-based, as ``SLURM_ARRAY_TASK_ID``) of a jobs file, checked: a list of printable
    strings that starts with ``run``. Anything else is a :class:`UserError` naming the file."""
    import json

    try:
        k = int(str(index).strip())
    except ValueError:
        raise UserError(f"grid-task: INDEX {str(index)!r}: expected a whole number (the array task id)") from None
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read the jobs file ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a jobs file written by `amisbench grid` (invalid JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != JOBS_FORMAT or not isinstance(doc.get("jobs"), list):
        raise UserError(f"{path}: not a jobs file written by `amisbench grid` (expected format {JOBS_FORMAT})")
    jobs = doc["jobs"]
    if not 1 <= k <= len(jobs):
        raise UserError(f"{path}: no job {k} (the file holds jobs 1-{len(jobs)})")
    argv = jobs[k - 1]
    if not (isinstance(argv, list) and argv and all(isinstance(w, str) for w in argv) and argv[0] == "run"):
        raise UserError(f"{path}: job {k} is not an `amisbench run` argument list")
    refuse_control_characters(argv, f"{path}: job {k}")
    return argv


def slurm_script(jobs_file: Path, n: int, *, log_dir: Path, workdir: Path, limit: int | None = None,
                 gpus: int = 0, cpus: int | None = None, job_name: str = "amisbench",
                 options: list[str] | None = None, prefix: list[str] | None = None) -> str:
    """A bash script for ``sbatch``: an array of ``n`` tasks; task k runs job k of ``jobs_file`` through
    ``amisbench grid-task`` (the jobs are never evaluated as shell text)."""
    array = f"1-{n}" + (f"%{limit}" if limit else "")
    head = ["#!/bin/bash",
            f"# amisbench grid: {n} job(s), one `amisbench run` argument list each in {jobs_file.name}. Every run",
            "# is idempotent (a finished run is skipped, a killed one resumes), so the array can be resubmitted.",
            f"#SBATCH --job-name={job_name}",
            f"#SBATCH --array={array}",
            f"#SBATCH --output={log_dir}/%A_%a.out"]
    if gpus:
        head.append(f"#SBATCH --gres=gpu:{gpus}")
    if cpus:
        head.append(f"#SBATCH --cpus-per-task={cpus}")
    for o in options or []:
        o = o.strip()
        if _CONTROL.search(o) or not o.startswith("-"):
            raise UserError(f"--sbatch {o!r}: expected one sbatch option such as --time=24:00:00")
        head.append(f"#SBATCH {o}")
    refuse_control_characters([str(jobs_file), str(workdir), str(log_dir), job_name], "grid --launcher slurm")
    body = ["set -euo pipefail",
            f"cd {shlex.quote(str(workdir))}",
            f'exec {shlex.join(prefix or local_prefix())} grid-task {shlex.quote(str(jobs_file))} '
            '"${SLURM_ARRAY_TASK_ID:?not set: submit this script with sbatch}"']
    return "\n".join(head + [""] + body) + "\n"


def _run_argv(argv: list[str], env: dict[str, str] | None = None) -> int:
    """A submitit task: run one command, return its exit code."""
    return subprocess.run(argv, env={**os.environ, **(env or {})}).returncode


def run_submitit(jobs: list[Job], *, folder: Path, cluster: str | None = None, timeout_min: int = 60 * 24,
                 gpus: int = 0, cpus: int | None = None, parallel: int | None = None,
                 partition: str | None = None, wait: bool = True, out=sys.stderr,
                 prefix: list[str] | None = None) -> list[tuple[Job, int, Path]]:
    """Submit the jobs as one submitit job array; with ``wait``, return (job, exit code, log folder)."""
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher submitit needs the submitit package: pip install submitit") from None
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict = {"timeout_min": timeout_min}
    if gpus:
        params["gpus_per_node"] = gpus
    if cpus:
        params["cpus_per_task"] = cpus
    if ex.cluster == "slurm":
        if parallel:
            params["slurm_array_parallelism"] = parallel
        if partition:
            params["slurm_partition"] = partition
    ex.update_parameters(**params)
    prefix = prefix or local_prefix()
    argvs = [[*prefix, *j.args()] for j in jobs]
    sub = ex.map_array(_run_argv, argvs)
    for j, s in zip(jobs, sub):
        print(f"submitted {j.name}: job {s.job_id}", file=out, flush=True)
    if not wait:
        return []
    done = []
    for j, s in zip(jobs, sub):
        try:
            rc = int(s.result())
        except Exception as e:  # a task that crashed inside submitit
            print(f"{j.name}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
                  file=out)
            rc = 1
        done.append((j, rc, folder))
        print(f"{j.name}: {'done' if rc == 0 else f'FAILED (exit {rc}), logs in {folder}'}", file=out, flush=True)
    return done


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

CLI_HELP = "expand a grid of runs into `amisbench run` commands and launch them (print, local, slurm, submitit)"


def configure_parser(p) -> None:
    from .options import add_results_option
    from .config import PROFILES

    p.add_argument("--method", default=None, help="method name(s), comma-separated; method-variant allowed "
                   "(e.g. ssn,atfm,atfm-act_gtr)")
    p.add_argument("--dataset", default=None, help="dataset name(s), comma-separated")
    p.add_argument("--table", default=None, help="the runs of a table of configs/tables.yaml (1, 2, 4): its "
                   "implemented rows as methods and its dataset unless --method / --dataset say otherwise")
    p.add_argument("--grid", default=None, metavar="NAME|FILE",
                   help="a grid definition: configs/grids/NAME.yaml or a YAML file (keys as these flags: method, "
                   "dataset, table, seeds, variant, profile, protocol, data_root, device, set, sweep); flags "
                   "given on the command line win, set/sweep entries add up")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 1)")
    p.add_argument("--variant", default=None, help="variant(s) of every method, comma-separated; none = default")
    p.add_argument("--profile", default=None, choices=PROFILES, help="scale: smoke, quick (default), paper")
    p.add_argument("--protocol", default=None, help="split protocol of a real dataset")
    p.add_argument("--data-root", default=None, help="prepared dataset folder (sets dataset.root)")
    p.add_argument("--device", default=None, help="device of every run (default cpu; cuda with --gpus-per-job; "
                   "local --devices sets cuda)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every run; METHOD:KEY=VALUE in that method's runs only")
    p.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="KEY=V1,V2",
                   help="one set of runs per value, each under <results>/sweeps/KEY=V/ (e.g. method.alpha=0,1e-3)")
    p.add_argument("--launcher", default="print", choices=LAUNCHERS, help="print (default), local, slurm, submitit")
    p.add_argument("--all", action="store_true", help="also list/launch finished runs (they skip themselves)")
    g = p.add_argument_group("local")
    g.add_argument("--workers", type=int, default=1, help="CPU worker processes (default 1)")
    g.add_argument("--devices", default=None, help="GPU ids, one worker each, e.g. 0,1 (or 0,0,1,1)")
    g = p.add_argument_group("slurm and submitit")
    g.add_argument("--out", type=Path, default=None, help="folder for the jobs file, script and logs "
                   "(default <results>/grid)")
    g.add_argument("--gpus-per-job", type=int, default=0, help="GPUs per job (default 0)")
    g.add_argument("--cpus-per-job", type=int, default=None, help="CPU cores per job")
    g.add_argument("--max-parallel", type=int, default=None, help="most array tasks at once (sbatch %%K)")
    g.add_argument("--sbatch", dest="sbatch_options", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch=--time=24:00:00 --sbatch=--partition=gpu")
    g.add_argument("--submitit-cluster", default=None, choices=["local", "slurm", "debug"],
                   help="submitit executor (default: slurm if available, else local)")
    g.add_argument("--partition", default=None, help="submitit: Slurm partition")
    g.add_argument("--timeout-min", type=int, default=24 * 60, help="submitit: time limit per job in minutes")
    g.add_argument("--no-wait", action="store_true", help="submitit: submit and return")
    add_results_option(p)


def _summary(done: list[tuple[Job, int, Path]], skipped: int) -> int:
    failed = [(j, rc, log) for j, rc, log in done if rc != 0]
    ok = len(done) - len(failed)
    print(f"amisbench grid: {ok} run(s) done, {skipped} skipped (finished), {len(failed)} failed",
          file=sys.stderr)
    for j, rc, log in failed:
        print(f"  failed: {j.line()}  (exit {rc}; log {log})", file=sys.stderr)
    return 1 if failed else 0


def table_grid(table: str | None, method: str | None, dataset: str | None) -> tuple[list[str], list[str]]:
    """Methods and datasets from the flags, or from table ``table`` of configs/tables.yaml (its rows whose
    method is implemented, and its dataset)."""
    if table is None:
        if not method or not dataset:
            raise UserError("give --method and --dataset, or --table N (the runs of a table of the paper)")
        return _split_list(method, "--method"), _split_list(dataset, "--dataset")
    from .registry import METHODS
    from .report.definitions import label_method, load_definitions

    defs = load_definitions()
    if table not in defs:
        raise UserError(f"unknown table '{table}'; known: {', '.join(defs)}")
    d = defs[table]
    if d.kind != "metrics":
        raise UserError(f"table {table} is built by `amisbench timing`, not from runs; see amisbench timing --help")
    rows = [r.key for r in d.rows]
    methods = _split_list(method, "--method") if method else [k for k in rows if label_method(k) in METHODS]
    missing = [k for k in rows if label_method(k) not in METHODS]
    if missing and not method:
        print(f"amisbench grid: table {table}: not implemented, left out: {', '.join(missing)}", file=sys.stderr)
    return methods, _split_list(dataset, "--dataset") if dataset else [d.dataset]


GRID_KEYS = {"description": str, "method": (str, list), "dataset": (str, list), "table": (str, int),
             "seeds": int, "variant": (str, list), "profile": str, "protocol": str, "data_root": str,
             "device": str, "set": list, "sweep": list}
FLAG_DEFAULTS = {"seeds": 1, "profile": "quick", "device": "cpu"}


def load_grid(name_or_path: str) -> tuple[dict, Path]:
    """A grid definition: ``configs/grids/<name>.yaml`` shipped with the package, or a YAML file path.
    Values are checked by key and type; lists become the comma-separated strings the flags take."""
    from .config import packaged_config

    path = Path(name_or_path)
    if not path.is_file():
        found = packaged_config("grids", f"{name_or_path}.yaml")
        if found is None:
            known = sorted(q.stem for q in (packaged_config("tables.yaml") or Path(".")).parent.glob("grids/*.yaml"))
            raise UserError(f"--grid {name_or_path}: no such file and no configs/grids/{name_or_path}.yaml; "
                            f"known: {', '.join(known) or 'none'}")
        path = found
    from .options import read_flag_file

    data = read_flag_file(path, GRID_KEYS, "grid")
    out: dict = {}
    for key, value in data.items():
        if key in ("set", "sweep") and not all(isinstance(v, str) for v in value):
            raise UserError(f"grid file {path}: '{key}' should be a list of KEY=VALUE strings")
        out[key] = ",".join(map(str, value)) if isinstance(value, list) and key not in ("set", "sweep") else value
    return out, path


def apply_grid(a) -> None:
    """Fill the flags the command line left unset from ``--grid``, then the flag defaults."""
    if a.grid:
        g, _ = load_grid(a.grid)
        for key, attr in (("method", "method"), ("dataset", "dataset"), ("table", "table"), ("seeds", "seeds"),
                          ("variant", "variant"), ("profile", "profile"), ("protocol", "protocol"),
                          ("data_root", "data_root"), ("device", "device")):
            if key in g and getattr(a, attr) is None:
                setattr(a, attr, str(g[key]) if key == "table" else g[key])
        a.sets = [*g.get("set", []), *a.sets]
        a.sweeps = [*g.get("sweep", []), *a.sweeps]
    gpus = a.launcher in ("slurm", "submitit") and (getattr(a, "gpus_per_job", 0) or 0) > 0
    if gpus and a.device == "cpu":
        raise UserError(f"--device cpu with --gpus-per-job {a.gpus_per_job}: the jobs would run on the CPU of GPU "
                        "nodes; leave --device out (the jobs then get --device cuda) or give --device cuda:N")
    for attr, default in FLAG_DEFAULTS.items():
        if getattr(a, attr) is None:
            setattr(a, attr, "cuda" if attr == "device" and gpus else default)
    from .config import PROFILES

    if a.profile not in PROFILES:
        raise UserError(f"grid: unknown profile '{a.profile}'; known: {', '.join(PROFILES)}")


def command(a) -> int:
    from .options import results_folder

    apply_grid(a)
    results = results_folder(a)
    devices = _split_list(a.devices, "--devices") if a.devices else None
    if a.workers < 1:
        raise UserError(f"--workers {a.workers}: expected at least 1")
    methods, datasets = table_grid(a.table, a.method, a.dataset)
    jobs = expand(methods, datasets, a.seeds,
                  profile=a.profile, variants=_split_list(a.variant, "--variant") if a.variant else None,
                  sets=a.sets, sweeps=a.sweeps, results=a.results, protocol=a.protocol, data_root=a.data_root,
                  device=a.device)
    todo = jobs if a.all else [j for j in jobs if not j.done]
    skipped = len(jobs) - len(todo)
    print(f"amisbench grid: {len(jobs)} job(s), {skipped} finished (skipped), {len(todo)} to run",
          file=sys.stderr)
    if a.launcher == "print":
        for j in todo:
            print(j.line())
        return 0
    if not todo:
        return 0
    out = Path(a.out) if a.out is not None else Path(results) / "grid"
    if a.launcher == "local":
        done = run_local(todo, workers=a.workers, devices=devices, log_dir=Path(results) / "logs" / "grid")
        return _summary(done, skipped)
    if a.launcher == "slurm":
        from .store import atomic_write_text

        out = out.resolve()
        jobs_file = out / "jobs.json"
        write_jobs_file(jobs_file, todo)
        gpus = a.gpus_per_job
        script = slurm_script(jobs_file, len(todo), log_dir=out / "logs", workdir=Path.cwd(), limit=a.max_parallel,
                              gpus=gpus, cpus=a.cpus_per_job, options=a.sbatch_options)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "grid.sbatch", script)
        sys.stdout.write(script)
        print(f"amisbench grid: wrote {jobs_file} and {out / 'grid.sbatch'}; submit with: sbatch "
              f"{out / 'grid.sbatch'}", file=sys.stderr)
        return 0
    done = run_submitit(todo, folder=out / "submitit", cluster=a.submitit_cluster, timeout_min=a.timeout_min,
                        gpus=a.gpus_per_job, cpus=a.cpus_per_job, parallel=a.max_parallel,
                        partition=a.partition, wait=not a.no_wait)
    return _summary(done, skipped) if not a.no_wait else 0
