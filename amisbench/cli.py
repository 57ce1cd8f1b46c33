"""The ``amisbench`` command: argument parsing and printing only; the work happens in the library."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import os
import sys
import warnings
from pathlib import Path

from .errors import RunFailed, UserError
from .options import add_results_option, read_flag_file
from .registry import PluginWarning

#: subcommands whose parser and handler live in their own module (``configure_parser(p)``, ``command(args)``,
#: ``CLI_HELP``), so that the table, timing, figures and grid tools grow without edits here.
COMMAND_MODULES = {"table": "amisbench.report.tables", "timing": "amisbench.report.timing", "figures": "amisbench.report.figures", "grid": "amisbench.grid",
                   "report": "amisbench.report.page"}

EPILOG = "Exit codes: 0 success, 2 usage or input error, 1 a run that failed. Docs: README.md."


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``amisbench run: error: ...``) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> Parser:
    from .config import PROFILES

    ap = Parser(prog="amisbench", description="amisbench: a benchmark suite for ambiguous medical image "
                "segmentation (ATFM and baselines on shared data, splits, backbones and metrics).", epilog=EPILOG)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    p = sub.add_parser("run", help="train and evaluate a method on a dataset over one or more seeds",
                       description="Train every stage of METHOD on DATASET, evaluate GED_16/32/100, HM-IoU_32, "
                       "MDM_32 on prefixes of 100 samples per test image, and write "
                       "results/runs/<dataset>/<method>[-<variant>][+<tag>]/<profile>/seed-<k>/. A finished run "
                       "is skipped; a killed run resumes from ckpt/last.pt (checked against ckpt/last.pt.sha256). "
                       "A run folder is locked while a command uses it: a second command on it exits 2 naming the "
                       "first. Settings may come from a --config file (the command line wins); --print-config shows "
                       "the resolved config and exits.",
                       epilog=EPILOG)
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="a YAML file with the keys of these flags (method, dataset, seed or seeds, variant, "
                   "profile, protocol, data_root, device, results, tag) and set: (a list of KEY=VALUE or a "
                   "mapping); flags on the command line win, set entries add up")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config, each value with where it came from, and exit")
    p.add_argument("--tag", default=None, metavar="NAME",
                   help="run into <method>[-<variant>]+NAME/ so that a changed setting sits beside the other runs "
                   "(tables show it as its own row, or take it with --tag NAME)")
    p.add_argument("--method", default=None, help="registered method name (see `amisbench methods`)")
    p.add_argument("--dataset", default=None, help="registered dataset name (see `amisbench datasets`)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1")
    seeds.add_argument("--seed", type=int, default=None, help="run this one seed (default 0)")
    p.add_argument("--variant", default=None, help="named variant of the method (e.g. atfm: act_gtr)")
    p.add_argument("--profile", default=None, choices=PROFILES, help="scale: smoke, quick (default), paper")
    p.add_argument("--protocol", default=None, help="split protocol of a real dataset (e.g. clean, atfm-paper)")
    p.add_argument("--data-root", default=None, help="prepared dataset folder (sets dataset.root)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or auto")
    add_results_option(p)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.main.steps=100 --set method.rank=5")
    p.add_argument("--force", action="store_true", help="delete and rerun finished or partial runs")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores free now: usable cores minus the cores other "
                   "processes keep busy over a quarter of a second, at least 1, so that a busy machine is not "
                   "oversubscribed)")
    p.add_argument("--no-estimate", dest="estimate", action="store_false",
                   help="skip the timed warm-up that prints the expected training and evaluation time first "
                        "(it runs once per command, before the first seed that trains)")

    for name, modname in COMMAND_MODULES.items():  # table, timing, figures, grid: each module owns its flags
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.CLI_HELP, description=(mod.__doc__ or "").strip().split("\n\n")[0],
                           epilog=EPILOG)
        mod.configure_parser(p)
        COMMANDS[name] = mod.command

    p = sub.add_parser("methods", help="list registered methods, their variants and one-line descriptions",
                       description="List every registered method (built in or from an installed plugin) with "
                       "its description and named variants (--variant V of amisbench run).", epilog=EPILOG)
    p.add_argument("--verbose", action="store_true",
                   help="also build each method at --profile (default paper) for a --size px image "
                   "and print its parameter count and NFE for 100 samples")
    p.add_argument("--profile", default="paper", choices=PROFILES,
                   help="with --verbose: scale of the networks built (default paper)")
    p.add_argument("--dataset", default="lidc", help="with --verbose: dataset whose settings apply (default lidc)")
    p.add_argument("--size", type=int, default=128, help="with --verbose: image height and width in px (default 128)")
    p.add_argument("--channels", type=int, default=1, help="with --verbose: image channels (default 1)")
    sub.add_parser("datasets", help="list registered dataset adapters with one-line descriptions",
                   description="List every registered dataset adapter (built in or from an installed plugin) "
                   "with its description.", epilog=EPILOG)

    p = sub.add_parser("grid-task", help="run job INDEX of a jobs file written by `amisbench grid --launcher slurm`",
                       description="Read job INDEX (1-based, the Slurm array task id) of JOBS_FILE, a JSON list of "
                       "`amisbench run` argument lists written by `amisbench grid`, check it, and run it. The "
                       "jobs are data: nothing in them reaches a shell.", epilog=EPILOG)
    p.add_argument("jobs_file", type=Path, metavar="JOBS_FILE", help="jobs.json written by `amisbench grid`")
    p.add_argument("index", metavar="INDEX", help="which job, from 1 (e.g. $SLURM_ARRAY_TASK_ID)")

    p = sub.add_parser("data", help="prepare real datasets from the files you have",
                       description="Convert the LIDC-IDRI or ISIC3 files you have (or a plugin dataset's) into "
                       "the layout the dataset adapters read (amisbench data prepare --help).", epilog=EPILOG)
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=Parser, metavar="ACTION")
    q = dsub.add_parser("prepare", help="convert LIDC-IDRI or ISIC3 files once into the safe, memory-mappable "
                        "layout the adapters read", description="Convert LIDC-IDRI or ISIC3 files (or those of "
                        "any registered dataset whose adapter has a prepare step) once into memory-mappable "
                        "arrays, split lists and a checksummed manifest (see README, Datasets).", epilog=EPILOG)
    q.add_argument("kind", metavar="NAME", choices=Preparable(),
                   help="which dataset the files are: %(choices)s")
    q.add_argument("--from", dest="src", required=True, type=Path,
                   help="lidc: data_lidc.pickle, a folder of *.pickle parts, an HDF5 file or the PNG crop tree; "
                   "isic3: the isic256_3_style folder; a plugin dataset: what its prepare reads")
    q.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    q.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


class Preparable:
    """The choices of ``amisbench data prepare``: the registered datasets whose adapter has a ``prepare``,
    looked up when argparse first checks or lists them, so that building the parser imports no dataset."""

    def _names(self) -> list[str]:
        from amisbench.datasets._prepare import preparable

        return preparable()

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


RUN_FILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "method": str, "dataset": str, "seed": int, "seeds": int, "variant": str, "profile": str, "protocol": str,
    "data_root": str, "device": str, "results": str, "tag": str, "set": (list, dict)}
RUN_DEFAULTS = {"profile": "quick", "device": "cpu"}


def _file_sets(value: list | dict, path: Path) -> list[str]:
    """``set:`` of a run file as KEY=VALUE items: a list of such strings, or a (nested or dotted) mapping."""
    import json

    from .config import flat

    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise UserError(f"run file {path}: 'set' should be a list of KEY=VALUE strings or a mapping")
        return list(value)
    return [f"{k}={json.dumps(v)}" for k, v in flat(value).items()]  # JSON is YAML: --set reads it back


def run_options(a: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    """The settings of ``amisbench run`` from the flags, then ``--config FILE``, then the defaults, and where
    each came from (``--flag``, the file, ``default``)."""
    from .config import PROFILES

    f = read_flag_file(a.config, RUN_FILE_KEYS, "run") if a.config is not None else {}
    here = str(a.config)
    if "seed" in f and "seeds" in f:
        raise UserError(f"run file {here}: give 'seed' or 'seeds', not both")
    opts: dict = {}
    origin: dict[str, str] = {}
    for key in ("method", "dataset", "variant", "profile", "protocol", "data_root", "device", "results", "tag"):
        flag = getattr(a, key)
        if flag is not None:
            opts[key], origin[key] = flag, "--" + key.replace("_", "-")
        elif key in f:
            opts[key], origin[key] = f[key], here
        else:
            opts[key], origin[key] = RUN_DEFAULTS.get(key), "default"
    if a.seeds is not None or a.seed is not None:
        opts["seeds"], origin["seeds"] = ((list(range(a.seeds)), "--seeds") if a.seeds is not None
                                          else ([a.seed], "--seed"))
    elif "seeds" in f or "seed" in f:
        opts["seeds"], origin["seeds"] = (list(range(f["seeds"])) if "seeds" in f else [f["seed"]]), here
    else:
        opts["seeds"], origin["seeds"] = [0], "default"
    if not opts["seeds"]:
        n = a.seeds if a.seeds is not None else f["seeds"]
        raise UserError(("--seeds" if a.seeds is not None else f"run file {here}: seeds") + f" {n}: expected a "
                        "positive number of seeds")
    for key in ("method", "dataset"):
        if not opts[key]:
            raise UserError(f"give --{key}" + (f" (or {key}: in {here})" if a.config is not None else ""))
    if opts["profile"] not in PROFILES:
        raise UserError(f"run file {here}: profile '{opts['profile']}': expected one of {', '.join(PROFILES)}")
    file_sets = _file_sets(f["set"], a.config) if "set" in f else []
    opts["sets"] = [*file_sets, *a.sets]
    opts["set_labels"] = [f"{here} set:"] * len(file_sets) + ["--set"] * len(a.sets)
    if opts["results"] is not None:
        opts["results"] = Path(opts["results"])
    return opts, origin


def print_config(res, folders: list[Path], opts: dict, origin: dict[str, str], out=None) -> None:
    """The resolved config as YAML-readable ``key: value  # source`` lines (run settings, then every value)."""
    import yaml

    from .config import flat

    def val(v) -> str:
        return yaml.safe_dump([v], default_flow_style=True, width=10**6).strip()[1:-1]

    run = {k: opts[k] for k in ("method", "dataset", "variant", "profile", "protocol", "data_root", "device",
                                "results", "tag", "seeds")}
    if run["results"] is None:
        from .store import default_results

        run["results"] = default_results()
        origin = {**origin, "results": "$AMISBENCH_RESULTS" if os.environ.get("AMISBENCH_RESULTS") else "default"}
    run["results"] = str(run["results"])
    lines = [f"# amisbench run: the resolved config of {res.method} on {res.dataset} (profile {res.profile}); "
             f"config hash {res.hash()}", "# run folder(s): " + ", ".join(map(str, folders)), "run:"]
    rows = [(f"  {k}: {val(v)}", origin[k]) for k, v in run.items()]
    lines += _aligned(rows)
    lines.append("config:")
    plain = res.plain()
    tree = {k: plain[k] for k in ("method", "dataset", "train", "eval")}
    lines += _aligned([(f"  {k}: {val(v)}", res.origins.get(k, "defaults")) for k, v in flat(tree).items()])
    print("\n".join(lines), file=out or sys.stdout)


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(t) for t, _ in rows), default=0)
    return [f"{t:<{width}}  # {src}" for t, src in rows]


def run_specs(a: argparse.Namespace) -> tuple[list, dict, dict[str, str]]:
    """The runs of ``amisbench run`` (one :class:`~amisbench.store.RunSpec` per seed), with the settings and
    where each came from (:func:`run_options`)."""
    from .store import RunSpec

    o, origin = run_options(a)
    specs = [RunSpec(o["method"], o["dataset"], s, o["profile"], o["variant"], o["sets"], o["device"], o["results"],
                     a.force, o["data_root"], o["protocol"], o["tag"], o["set_labels"], estimate=a.estimate)
             for s in o["seeds"]]
    return specs, o, origin


def cmd_run(a: argparse.Namespace) -> int:
    import torch

    from .pace import default_threads, describe_threads, other_load
    from .env import pick_device
    from .progress import Reporter
    from .runner import prepare, run_spec
    from .store import is_done

    specs, o, origin = run_specs(a)
    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads {a.threads}: expected a positive number of threads")
    prepared = [prepare(spec) for spec in specs]  # validate every seed's config before anything is written
    if a.print_config:
        print_config(prepared[0][0], [folder for _, folder in prepared], o, origin)
        return 0
    pick_device(o["device"])
    busy = other_load() if a.threads is None else None
    threads = a.threads if a.threads is not None else default_threads(load=busy)
    torch.set_num_threads(threads)
    rep = Reporter(a.quiet)
    rep.line(describe_threads(threads, a.threads is not None, busy))
    failed, estimated = [], False
    for spec, (_, folder) in zip(specs, prepared):
        if estimated:  # the later seeds of one command have the same settings: one warm-up is enough
            spec = dataclasses.replace(spec, estimate=False)
        estimated = estimated or (spec.estimate and not a.quiet and (spec.force or not is_done(folder)))
        try:
            folder = run_spec(spec, rep)
            if not a.quiet:
                print(folder)
        except RunFailed as e:
            print(f"amisbench run: failed: {e}", file=sys.stderr)
            failed.append(spec.seed)
    if failed:
        print(f"amisbench run: {len(failed)} of {len(specs)} run(s) failed (seeds {failed})", file=sys.stderr)
        return 1
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    from .registry import DATASETS, METHODS

    reg = METHODS if a.command == "methods" else DATASETS
    entries = reg.entries()
    width = max((len(e.name) for e in entries), default=0)
    for e in entries:
        extra = "" if e.source == "builtin" else f"  [{e.source}]"
        if a.command == "methods":
            from .config import variants_of

            try:
                variants = variants_of(e.name)
            except UserError as err:  # a plugin with a broken config file: list it anyway
                variants, extra = [], f"{extra}  (config: {err})"
            if variants:
                extra += f"  (variants: {', '.join(variants)})"
        print(f"{e.name:<{width}}  {e.description}{extra}")
        if a.command == "methods" and a.verbose:
            print("  " + _method_details(e.name, a))
    return 0


def _method_details(name: str, a: argparse.Namespace) -> str:
    from .api import DataSpec
    from .config import resolve
    from .factory import build_method

    try:
        res = resolve(name, a.dataset, a.profile)
    except UserError:
        res = resolve(name, "synthetic", a.profile)
    readers = {"isic3": 3}.get(a.dataset, 4)  # reader slots: ISIC3 its 3 styles, LIDC and synthetic 4
    model = build_method(res, DataSpec(a.channels, a.size, a.size, readers, a.dataset), device="meta")
    n = sum(p.numel() for p in model.parameters())
    return (f"profile {a.profile}, {a.size}x{a.size}x{a.channels}: {n:,} parameters; stages "
            f"{', '.join(type(model).stages)}; NFE for 100 samples: {model.nfe(100)}")


def cmd_grid_task(a: argparse.Namespace) -> int:
    import shlex

    from .grid import read_job

    argv = read_job(a.jobs_file, a.index)
    print(f"amisbench grid-task: job {a.index}: {shlex.join(['amisbench', *argv])}", file=sys.stderr, flush=True)
    return main(argv)


def cmd_data(a: argparse.Namespace) -> int:
    try:
        from amisbench.datasets._prepare import prepare
    except ImportError:
        raise UserError("data preparation is not available in this installation") from None
    out = prepare(a.kind, a.src, a.out, show_progress=not a.quiet)
    print(out)
    return 0


COMMANDS = {"run": cmd_run, "methods": cmd_list, "datasets": cmd_list, "data": cmd_data, "grid-task": cmd_grid_task}


def _show_warning(show, message, category, filename, lineno, file=None, line=None):
    """Plugin warnings as one line on stderr (``amisbench: warning: ...``), the others as ``show`` does."""
    if issubclass(category, PluginWarning):
        print(f"amisbench: warning: {message}", file=sys.stderr if file is None else file)
    else:
        show(message, category, filename, lineno, file, line)


def _stdout_closed() -> int:
    """The reader of our stdout went away (``amisbench grid | head``): stop quietly, like other Unix tools."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the final flush at exit does not complain again
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a tool ended by a closed pipe


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores warnings.showwarning on the way out
        warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    ap = build_parser()
    try:
        a = ap.parse_args(argv)
        rc = COMMANDS[a.command](a)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        return _stdout_closed()
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    except UserError as e:
        prog = f"amisbench {getattr(a, 'command', '')}".strip() if "a" in locals() else "amisbench"
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:  # e.g. a method's sample returning the wrong masks under `amisbench timing`
        print(f"amisbench {a.command}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("amisbench: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
