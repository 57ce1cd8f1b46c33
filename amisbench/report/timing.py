"""Time sampling the Table 3 way: wall time to draw 100 samples of one test image, per method.

Protocol (timm's ``benchmark.py`` is the model: warm-up, synchronise, median): the model of a finished run
(``results/runs/...``, seed 0 by default; ``--untrained`` builds a freshly initialised one instead, which
costs the same) is put in eval mode on the device; ``--warmup`` untimed calls draw the full ``--samples``
for the first image; then for each of ``--images`` test images the device is synchronised, the clock read,
``model.sample(image, samples)`` called, the device synchronised again and the clock read. The table
reports the median over images and the interquartile range, the network evaluations (``model.nfe``, split
into a fixed part and a part per sample: ATFM is 1 GTR pass + 25 per sample), the peak memory, and the
device, dtype, batch/chunk size and torch version next to every figure.

Each method samples with the paper's inference settings (the ``inference`` entry of Table 3 in
``configs/tables.yaml``: e.g. ``method.steps=25`` for ATFM) on top of the profile's networks, unless
``--profile-settings`` keeps the profile's. Results: ``results/timing/<device>/<dataset>__<method>.json``
(written atomically), which ``amisbench table --table 3`` reads.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import UserError
from ..store import TIMING, run_label

if TYPE_CHECKING:
    import torch


# indirections so that tests can check the order of synchronisation and clock reads
_clock: Callable[[], float] = time.perf_counter
_timed_here = 0  # methods timed in this process so far (CPU peak memory is per process)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # pragma: no cover - no MPS in CI
        torch.mps.synchronize()


def device_tag(device: torch.device) -> str:
    """Folder name of a device under results/timing: ``cpu`` or ``cuda-<name>`` (e.g. cuda-NVIDIA-H100...)."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")
    return device.type


def device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def nfe_parts(model: Any, n: int) -> tuple[float, float, int]:
    """Network evaluations for ``n`` samples split as fixed + per sample (assumes nfe is affine in n).

    Returns:
        (fixed, per_sample, total for n).
    """
    a, b = int(model.nfe(n)), int(model.nfe(2 * n))
    per = (b - a) / n
    return a - per * n, per, a


def nfe_label(fixed: float, per: float) -> str:
    f, p = f"{fixed:g}", f"{per:g}"
    if per and fixed:
        return f"{f} + {p}/sample"
    if per:
        return f"{p}/sample"
    return f


def table_inference() -> dict[str, list[str]]:
    """The Table 3 sampler settings per method (configs/tables.yaml, ``inference`` of the timing table)."""
    from .definitions import load_definitions

    for d in load_definitions().values():
        if d.kind == "timing":
            return {m: list(v) for m, v in d.inference.items()}
    return {}


def inference_settings(method: str) -> list[str]:
    """The Table 3 sampler settings of ``method``."""
    return table_inference().get(method, [])


def _build(method: str, dataset: str, *, profile: str, variant: str | None, seed: int, sets: list[str],
           user_sets: list[str], device: torch.device, untrained: bool, results: Path | str | None,
           protocol: str | None, data_root: str | None):
    """The model (eval mode, on ``device``), its evaluation dataset, and the run folder (None if untrained)."""
    from ..factory import build_method, load_trained
    from ..registry import DATASETS
    from ..runner import RunSpec, prepare
    from ..store import is_done

    if untrained:
        res, _ = prepare(RunSpec(method, dataset, seed, profile, variant, [*sets, *user_sets], str(device),
                                 results, False, data_root, protocol))
        ds = DATASETS.get(dataset)(res.cfg.dataset, res.cfg.eval.split)
        return build_method(res, ds.spec, device=device, seed=seed, sampling=True), ds, None
    spec = RunSpec(method, dataset, seed, profile, variant, None, str(device), results, False, data_root, protocol)
    _, folder = prepare(spec)
    if not is_done(folder):
        label = method + (f" --variant {variant}" if variant else "")
        raise UserError(f"no finished run of {spec.label} on {dataset} (profile {profile}, seed {seed}) at "
                        f"{folder}; train it with `amisbench run --method {label} --dataset {dataset} --profile "
                        f"{profile} --seed {seed}` or pass --untrained to time a freshly initialised model")
    trained, ds, res = load_trained(folder, str(device))
    return with_settings(trained, res, [*sets, *user_sets], device), ds, folder


def with_settings(model: torch.nn.Module, res: Any, sets: list[str], device: torch.device | str
                  ) -> torch.nn.Module:
    """``model`` (of a finished run, config ``res``) rebuilt with sampler settings ``sets`` applied (e.g.
    ``method.steps=10``) and the same weights; ``model`` itself when ``sets`` is empty.

    The method is rebuilt rather than patched so that anything it derives from its config at construction
    (noise schedules, step grids) follows the new settings.
    """
    import copy
    import dataclasses

    from ..config import apply_set, parse_set, validate
    from ..factory import build_method
    from ..store import CheckpointError

    items = parse_set(sets)
    if not items:
        return model
    cfg = copy.deepcopy(res.cfg)
    apply_set(cfg, items)
    validate(cfg)
    try:
        return build_method(dataclasses.replace(res, cfg=cfg), model.spec, device=device,
                            checkpoint=model.state_dict())
    except CheckpointError:
        raise UserError(f"the settings {', '.join(sets)} change the network of {res.method}; only sampler "
                        "settings of a trained run can be changed") from None


def time_method(method: str, dataset: str, *, samples: int = 100, images: int = 10, profile: str = "quick",
                device: str = "cpu", untrained: bool = False, seed: int = 0, variant: str | None = None,
                sets: list[str] | None = None, table_settings: bool = True, warmup: int = 1,
                dtype: str = "float32", results: Path | str | None = None, protocol: str | None = None,
                data_root: str | None = None, save: bool = True,
                inference: dict[str, list[str]] | None = None, compile: bool = False) -> dict:
    """Time ``method`` on ``dataset`` by the Table 3 protocol (module docstring); returns the record.

    Args:
        inference: method -> sampler settings to apply (default: Table 3's of configs/tables.yaml).
    """
    import torch

    from ..env import git_info, pick_device
    from ..evaluate import sample_items
    from ..store import default_results

    if samples < 1 or images < 1 or warmup < 0:
        raise UserError(f"--samples {samples} --images {images} --warmup {warmup}: expected samples >= 1, "
                        "images >= 1 and warmup >= 0")
    dtypes = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(dtypes)}")
    dev = pick_device(device)
    results = Path(results) if results is not None else default_results()
    table_sets: list[str] = []
    if table_settings:
        table_sets = list(inference.get(method, [])) if inference is not None else inference_settings(method)
    model, ds, folder = _build(method, dataset, profile=profile, variant=variant, seed=seed, sets=table_sets,
                               user_sets=list(sets or []), device=dev, untrained=untrained, results=results,
                               protocol=protocol, data_root=data_root)
    k = min(images, len(ds))
    if k < images:
        print(f"amisbench timing: the {dataset} evaluation split has only {k} images", file=sys.stderr)
    batch = [ds[i]["image"][None].to(dev) for i in range(k)]
    amp = dtypes[dtype]
    compiled: list[str] = []
    if compile:
        from ..api import compile_networks

        if warmup < 1:
            raise UserError("--compile needs at least one --warmup call (compilation happens at the first call)")
        compiled = compile_networks(model)

    def draw(x: torch.Tensor, i: int) -> torch.Tensor:
        from ..seeding import generator

        g = generator(dev, "timing", seed, i)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            return sample_items(model, ds, [max(i, 0)], x, samples, generator=g)

    for w in range(warmup):
        draw(batch[0], -1 - w)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i, x in enumerate(batch):
        _sync(dev)
        t0 = _clock()
        out = draw(x, i)
        _sync(dev)
        t1 = _clock()
        times.append(t1 - t0)
        if tuple(out.shape) != (1, samples, *x.shape[-2:]):
            raise UserError(f"{method}.sample returned shape {tuple(out.shape)}; expected "
                            f"{(1, samples, *x.shape[-2:])}")
    if dev.type == "cuda":
        peak, mem_kind = int(torch.cuda.max_memory_allocated(dev)), "torch.cuda.max_memory_allocated"
    else:
        # ru_maxrss is in KiB on Linux (bytes on macOS): the whole process, imports and model loading included
        global _timed_here
        _timed_here += 1
        scale = 1 if sys.platform == "darwin" else 1024
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
        mem_kind = (PER_PROCESS if _timed_here == 1 else
                    f"peak RSS of a process that timed {_timed_here} methods (not this method's own)")
    fixed, per, total = nfe_parts(model, samples)
    arr = np.asarray(times, dtype=np.float64)
    q25, med, q75 = (float(v) for v in np.percentile(arr, [25, 50, 75]))
    label = run_label(method, variant)
    rec = {
        "method": method, "variant": variant, "label": label, "dataset": dataset, "profile": profile,
        "seed": seed, "trained": not untrained, "run_dir": str(folder) if folder else None,
        "samples": samples, "images": k, "warmup": warmup, "images_per_call": 1,
        "times_s": [float(v) for v in arr], "median_s": med, "q25_s": q25, "q75_s": q75, "iqr_s": q75 - q25,
        "min_s": float(arr.min()), "max_s": float(arr.max()), "mean_s": float(arr.mean()),
        "std_s": float(arr.std(ddof=1)) if len(arr) > 1 else math.nan,
        "nfe": total, "nfe_fixed": fixed, "nfe_per_sample": per, "nfe_label": nfe_label(fixed, per),
        "peak_memory_bytes": peak, "memory_kind": mem_kind, "pid": os.getpid(),
        "device": str(dev), "device_tag": device_tag(dev), "device_name": device_name(dev),
        "dtype": ("float32" if amp is None else f"autocast {dtype}") + (" + torch.compile" if compile else ""),
        "compiled": compiled,
        "sample_chunk": getattr(getattr(model, "cfg", None), "sample_chunk", None),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "sets": [*table_sets, *(sets or [])], "parameters": sum(p.numel() for p in model.parameters()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_info(),
    }
    if save:
        from ..store import write_json

        path = results / TIMING / rec["device_tag"] / f"{dataset}__{label}.json"
        write_json(path, rec)
        rec["path"] = str(path)
    return rec


PER_PROCESS = "peak RSS of a process that timed only this method (imports and model included)"


def time_isolated(method: str, isolate: bool, **kw: Any) -> dict:
    """:func:`time_method` in a fresh process of its own when ``isolate`` (so that the CPU peak memory, a
    per-process figure, belongs to this method alone), else here."""
    if not isolate:
        return time_method(method, **kw)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(time_method, method, **kw).result()


def _mb(b: int | None) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f} MiB"


def report(recs: list[dict]) -> str:
    """A markdown table of timing records with the setup next to every figure, and the ratios to the first
    method (measured time against network evaluations)."""
    head = ("| method | NFE for n samples | median s (IQR) | min–max s | peak memory | device | dtype | "
            "per call | chunk | torch | model |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in recs:
        lines.append(
            f"| {r['label']} | {r['nfe']} ({r['nfe_label']}) | {r['median_s']:.3f} ({r['iqr_s']:.3f}) | "
            f"{r['min_s']:.3f}–{r['max_s']:.3f} | {_mb(r['peak_memory_bytes'])} ({r['memory_kind']}) | "
            f"{r['device_name']} | {r['dtype']} | 1 image x {r['samples']} samples | {r['sample_chunk'] or '–'} | "
            f"{r['torch']} | {'trained' if r['trained'] else 'untrained'} |")
    lines.append("")
    lines.append(f"_median over {recs[0]['images']} test images of the wall time of one call drawing "
                 f"{recs[0]['samples']} samples (after {recs[0]['warmup']} warm-up call(s), device synchronised "
                 f"before each clock read); profile {recs[0]['profile']}, dataset {recs[0]['dataset']}_")
    if len(recs) > 1:
        ref = recs[0]
        for r in recs[1:]:
            t = r["median_s"] / ref["median_s"] if ref["median_s"] > 0 else float("nan")
            n = r["nfe"] / ref["nfe"] if ref["nfe"] else float("nan")
            lines.append(f"_{r['label']} / {ref['label']}: measured time ratio {t:.3g}, NFE ratio {n:.3g}_")
    for r in recs:
        if r.get("sets"):
            lines.append(f"_{r['label']} sampled with {' '.join(r['sets'])}_")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# --compare release_loop: our sampler and the release's one-at-a-time loop, in one command
# ----------------------------------------------------------------------------------------------------

#: How a release draws its samples, where the method has a switch for it: ATFM's release test script runs
#: one GTR pass per image, then the Euler steps of one sample at a time (``sampler: release_loop``).
RELEASE_LOOP: dict[str, list[str]] = {"atfm": ["method.sampler=release_loop"]}


def release_loop_settings(method: str, dataset: str, profile: str, variant: str | None = None) -> tuple[list[str], str]:
    """The sampler settings that draw like the release (``RELEASE_LOOP``), or, for a method that samples in
    chunks, one sample per network call (``method.sample_chunk=1``); with a label saying which."""
    from ..config import resolve

    if method in RELEASE_LOOP:
        return list(RELEASE_LOOP[method]), "the release's loop"
    if hasattr(resolve(method, dataset, profile, variant).cfg.method, "sample_chunk"):
        return ["method.sample_chunk=1"], "one sample per call"
    raise UserError(f"--compare release_loop: {method} has no release-loop switch (method.sampler) and no "
                    "method.sample_chunk to draw one sample at a time")


def paper_seconds() -> dict[str, float]:
    """Table 3's seconds for 100 samples of one LIDC image (the paper's RTX 3090), per method."""
    from .definitions import paper_numbers

    rows = (paper_numbers().get("table3_timing_lidc") or {}).get("rows") or {}
    return {m: float(r["seconds_100_samples"]) for m, r in rows.items() if "seconds_100_samples" in r}


def compare_report(pairs: list[tuple[dict, dict, str]]) -> str:
    """Our sampler beside the release's loop on the same device and dtype, with Table 3's seconds."""
    paper = paper_seconds()
    lines = ["| method | ours median s | release loop median s | loop / ours | release loop as | "
             "Table 3 s (paper, RTX 3090) | Table 3 / ours | device | dtype |", "|" + "---|" * 9]
    for ours, loop, how in pairs:
        ratio = loop["median_s"] / ours["median_s"] if ours["median_s"] > 0 else float("nan")
        p = paper.get(ours["method"])
        paper_s, paper_ratio = ("–", "–") if p is None else (f"{p:g}", f"{p / ours['median_s']:.0f}x")
        extra = " ".join(loop["sets"][len(ours["sets"]):])
        lines.append(f"| {ours['label']} | {ours['median_s']:.3f} | {loop['median_s']:.3f} | {ratio:.1f}x | {how} "
                     f"({extra}) | {paper_s} | {paper_ratio} | {ours['device_name']} | {ours['dtype']} |")
    lines.append(f"_both timed in this command by the Table 3 protocol (median over {pairs[0][0]['images']} images, "
                 f"{pairs[0][0]['samples']} samples each); torch {pairs[0][0]['torch']}_")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# --train: training steps per second of each stage, with and without bf16 autocast
# ----------------------------------------------------------------------------------------------------

def time_training(method: str, dataset: str, *, profile: str = "quick", device: str = "cpu", steps: int = 5,
                  variant: str | None = None, sets: list[str] | None = None, seed: int = 0,
                  data_root: str | None = None, protocol: str | None = None) -> list[dict]:
    """Seconds per training step of every stage of ``method`` (untrained weights, the runner's step: batch,
    loss, backward, optimizer), in float32 and, on CUDA, under bfloat16 autocast (``train.<stage>.amp``).

    Returns:
        One record per stage and dtype: method, stage, batch_size, dtype, step_s, steps_per_s, device, torch.
    """
    import copy

    import torch

    from ..env import pick_device
    from ..factory import build_method
    from ..pace import estimate
    from ..registry import DATASETS
    from ..runner import RunSpec, prepare, stage_steps, warmup_step

    if steps < 1:
        raise UserError(f"--steps {steps}: expected at least one timed step per stage")
    dev = pick_device(device)
    res, _ = prepare(RunSpec(method, dataset, seed, profile, variant, list(sets or []), str(dev), None, False,
                             data_root, protocol))
    train_ds = DATASETS.get(dataset)(res.cfg.dataset, "train")
    model = build_method(res, train_ds.spec, device=dev, seed=seed)
    stages = list(type(model).stages)
    left = {s: stage_steps(sc, len(train_ds), f"train.{s}") for s, sc in res.cfg.train.items()}
    out = []
    for amp in ([False, True] if dev.type == "cuda" else [False]):
        cfg = copy.deepcopy(res.cfg)
        for sc in cfg.train.values():
            sc.amp = amp
        est = estimate(model, stages, left, train_step=warmup_step(cfg, train_ds, dev, seed, left),
                       eval_call=None, eval_images=0, eval_batch=1, device=dev, warmup_steps=steps,
                       budget_s=float("inf"))
        for stage, sec in est.step_s.items():
            out.append({"method": method, "label": run_label(method, variant), "stage": stage,
                        "batch_size": cfg.train[stage].batch_size, "dtype": "autocast bfloat16" if amp else "float32",
                        "step_s": sec, "steps_per_s": 1.0 / sec if sec > 0 else float("inf"), "steps": steps,
                        "stage_steps": left[stage], "profile": profile, "device_name": device_name(dev),
                        "torch": torch.__version__,
                        "parameters": sum(p.numel() for p in model.parameters())})
    return out


def train_report(recs: list[dict]) -> str:
    lines = ["| method | stage | batch | steps/s float32 | steps/s bf16 autocast | bf16 / fp32 | stage steps | "
             "stage time fp32 | device | torch |", "|" + "---|" * 10]
    from ..pace import duration

    keyed = {(r["label"], r["stage"], r["dtype"]): r for r in recs}
    for r in recs:
        if r["dtype"] != "float32":
            continue
        bf = keyed.get((r["label"], r["stage"], "autocast bfloat16"))
        bf_s, bf_ratio = ("–", "–") if bf is None else (f"{bf['steps_per_s']:.2f}",
                                                        f"{bf['steps_per_s'] / r['steps_per_s']:.2f}x")
        lines.append(f"| {r['label']} | {r['stage']} | {r['batch_size']} | {r['steps_per_s']:.2f} | {bf_s} | "
                     f"{bf_ratio} | {r['stage_steps']} | {duration(r['stage_steps'] * r['step_s'])} | "
                     f"{r['device_name']} | {r['torch']} |")
    lines.append(f"_median of {recs[0]['steps']} timed steps per stage after one untimed step, untrained weights, "
                 f"profile {recs[0]['profile']}; bf16 autocast only on CUDA (the runner ignores it on CPU)_")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

CLI_HELP = "time drawing 100 samples per image (Table 3 protocol) and write results/timing/"


def configure_parser(p) -> None:
    from ..options import add_results_option
    from ..config import PROFILES

    p.add_argument("--method", required=True, help="method name(s), comma-separated (e.g. atfm,ccdm)")
    p.add_argument("--dataset", required=True, help="dataset whose test images to sample")
    p.add_argument("--samples", type=int, default=100, help="samples per image (default 100)")
    p.add_argument("--images", type=int, default=10, help="test images to time, K (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls (default 1)")
    p.add_argument("--profile", default="quick", choices=PROFILES, help="scale of the networks (default quick)")
    p.add_argument("--variant", default=None, help="variant of every method given")
    p.add_argument("--seed", type=int, default=0, help="seed of the trained run to time (default 0)")
    p.add_argument("--untrained", action="store_true", help="time a freshly initialised model (no run needed)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="float32 (default) or autocast to a lower precision")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the method's networks first (compiled during the warm-up calls)")
    p.add_argument("--profile-settings", action="store_true",
                   help="sample with the profile's settings instead of the paper's (Table 3 of configs/tables.yaml)")
    p.add_argument("--protocol", default=None, help="split protocol of a real dataset")
    p.add_argument("--data-root", default=None, help="prepared dataset folder (sets dataset.root)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sampler setting, e.g. --set method.sample_chunk=100")
    p.add_argument("--compare", choices=["release_loop"], default=None,
                   help="also time the release's way of sampling (ATFM: one sample at a time after one GTR pass "
                   "per image; methods with method.sample_chunk: one sample per call) on the same device and "
                   "dtype, and print the ratio beside Table 3's seconds")
    p.add_argument("--train", action="store_true",
                   help="time training instead: steps per second of each stage (float32 and, on CUDA, bf16 "
                   "autocast) of an untrained model; --steps timed steps per stage")
    p.add_argument("--steps", type=int, default=5, help="with --train: timed steps per stage (default 5)")
    add_results_option(p)


def command(a) -> int:
    from ..env import pick_device

    methods = [m.strip() for m in a.method.split(",") if m.strip()]
    if not methods:
        raise UserError("--method: expected one or more method names, e.g. atfm,ccdm")
    from ..registry import DATASETS, METHODS

    for m in methods:  # every name before timing anything
        METHODS.get(m)
    DATASETS.get(a.dataset)
    if a.train:
        recs = []
        for m in methods:
            recs += time_training(m, a.dataset, profile=a.profile, device=a.device, steps=a.steps, variant=a.variant,
                                  sets=a.sets, seed=a.seed, data_root=a.data_root, protocol=a.protocol)
        sys.stdout.write(train_report(recs))
        return 0
    loops = {m: release_loop_settings(m, a.dataset, a.profile, a.variant) for m in methods} if a.compare else {}
    recs, pairs = [], []
    inference = table_inference()  # read configs/tables.yaml once for all methods
    # CPU memory is measured per process: with several methods, each is timed in a process of its own (if a
    # fresh process can find it: not a method registered by hand at run time)
    isolate = len(methods) > 1 and pick_device(a.device).type == "cpu"
    for m in methods:
        kw = dict(dataset=a.dataset, samples=a.samples, images=a.images, profile=a.profile, device=a.device,
                  untrained=a.untrained, seed=a.seed, variant=a.variant, table_settings=not a.profile_settings,
                  warmup=a.warmup, dtype=a.dtype, compile=a.compile, results=a.results, protocol=a.protocol,
                  data_root=a.data_root, inference=inference)
        own = isolate and METHODS.findable(m)
        rec = time_isolated(m, own, sets=a.sets, **kw)
        print(f"{m}: median {rec['median_s']:.3f} s for {a.samples} samples -> {rec['path']}", file=sys.stderr)
        recs.append(rec)
        if m in loops:
            loop = time_isolated(m, own, sets=[*a.sets, *loops[m][0]], save=False, **kw)
            print(f"{m} ({loops[m][1]}): median {loop['median_s']:.3f} s for {a.samples} samples", file=sys.stderr)
            pairs.append((rec, loop, loops[m][1]))
    sys.stdout.write(report(recs))
    if pairs:
        sys.stdout.write("\n" + compare_report(pairs))
    return 0
