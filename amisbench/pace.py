"""How fast a run goes: torch threads from the cores actually free, a timed warm-up that estimates the
training and evaluation time before training starts, and durations for progress lines.

Threads: on a machine that other processes share, more torch threads than free cores do not make a run
faster; they make every process wait for a core (oversubscription: a run that needs 200 CPU-seconds can
take 800 when four processes each start two threads on two cores). :func:`default_threads` is the number
of cores this process may use (CPU affinity and the cgroup CPU quota) minus the cores the other processes
keep busy now (:func:`busy_cores`: the usable CPUs' busy time over a quarter of a second, from /proc/stat;
the one-minute load average where that is not available), at least one. The load average lags by a minute:
right after ``pip install`` it still counts the finished install, and the README's main job would start on
one thread of an idle two-core machine.

Estimate: :func:`estimate` times a few training steps of every stage that has steps left, and one
sampling call on evaluation images, on a copy of the model with the random state restored afterwards, so
the run itself is not changed by it (its numbers are those of a run without the estimate).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota if one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def load_average() -> float | None:
    """The one-minute load average (runnable processes, this one not yet among them), None if unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_times(cpus: set[int] | None, path: str = "/proc/stat") -> tuple[float, float] | None:
    """(busy, total) jiffies summed over the CPUs ``cpus`` (all if None) from /proc/stat; None if unreadable."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()) or (cpus is not None and int(name[3:]) not in cpus):
            continue
        values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return (busy, total) if total > 0 else None


def busy_cores(interval: float = 0.25) -> float | None:
    """Cores of this process's CPUs that other processes keep busy now: their busy share of the time over
    ``interval`` seconds (this process sleeps meanwhile) times the number of those CPUs; None where
    /proc/stat is not readable (not Linux)."""
    try:
        cpus: set[int] | None = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    first = _cpu_times(cpus)
    if first is None:
        return None
    time.sleep(interval)
    second = _cpu_times(cpus)
    if second is None or second[1] <= first[1]:
        return None
    n = len(cpus) if cpus is not None else (os.cpu_count() or 1)
    return n * (second[0] - first[0]) / (second[1] - first[1])


def other_load() -> float | None:
    """The cores other processes keep busy: :func:`busy_cores`, else the load average (None: unknown)."""
    busy = busy_cores()
    return busy if busy is not None else load_average()


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Torch threads for a run: the usable cores minus the cores other processes keep busy, at least 1.

    Args:
        cores: Usable cores (default :func:`usable_cores`).
        load: Cores busy with other processes (default :func:`other_load`; unknown counts as an idle machine).
    """
    cores = usable_cores() if cores is None else cores
    load = other_load() if load is None else load
    return max(1, min(cores, int(cores - (load or 0.0) + 0.5)))


def describe_threads(threads: int, chosen: bool, busy: float | None = None) -> str:
    """One line for the run's output: the threads and what they were chosen from (``busy``: the cores other
    processes kept busy when they were chosen)."""
    load = load_average()
    why = "set by --threads" if chosen else "the cores free now"
    now = "" if busy is None else f"{busy:.1f} busy now, "
    return (f"torch threads: {threads} ({why}; {usable_cores()} usable cores, {now}load average "
            f"{'unknown' if load is None else f'{load:.1f}'})")


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m`` or ``3d04h`` (``?`` for an unknown or infinite duration)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Pace:
    """Steps per second since :meth:`start`, and the time left to ``total`` steps (for progress lines)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.t0 = clock()
        self.done0 = 0

    def start(self, done: int = 0) -> None:
        self.t0, self.done0 = self.clock(), done

    def eta(self, done: int, total: int) -> float | None:
        """Seconds left at the rate since :meth:`start`; None before the first step."""
        elapsed, steps = self.clock() - self.t0, done - self.done0
        if steps <= 0 or elapsed <= 0:
            return None
        return (total - done) * elapsed / steps


@dataclass
class Estimate:
    """The outcome of :func:`estimate`: seconds per training step of each stage and of evaluation."""

    steps: dict[str, int]  # steps left per stage
    step_s: dict[str, float] = field(default_factory=dict)  # seconds per step, per timed stage
    eval_images: int = 0
    eval_s: float | None = None  # the whole evaluation
    timed_images: int = 0
    timed_samples: int = 0

    @property
    def train_s(self) -> float:
        return sum(self.steps[s] * self.step_s.get(s, 0.0) for s in self.steps)

    def lines(self, n_samples: int) -> list[str]:
        parts = [f"{s}: {n} steps x {duration(self.step_s[s]) if self.step_s[s] >= 1 else f'{self.step_s[s]:.3f}s'}"
                 for s, n in self.steps.items() if n and s in self.step_s]
        out = [f"estimate: training {duration(self.train_s)}" + (f" ({'; '.join(parts)})" if parts else "")]
        if self.eval_s is not None:
            out.append(f"estimate: evaluation {duration(self.eval_s)} ({self.eval_images} images x {n_samples} "
                       f"samples, timed on {self.timed_images} image(s) x {self.timed_samples}); total about "
                       f"{duration(self.train_s + self.eval_s)}")
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate(model: torch.nn.Module, stages: list[str], steps_left: dict[str, int], *,
             train_step: Callable[[torch.nn.Module, str, int], None],
             eval_call: Callable[[torch.nn.Module, int, int], None] | None, eval_images: int, eval_batch: int,
             eval_samples: int = 100, device: torch.device, warmup_steps: int = 3, budget_s: float = 2.0
             ) -> Estimate:
    """Time training steps and one evaluation batch on a copy of ``model``; the random state is restored.

    Args:
        stages: The method's stages in order (every stage is prepared on the copy, timed or not, so that a
            later stage sees the networks it trains on).
        steps_left: Steps still to train per stage; stages with none are not timed.
        train_step: ``train_step(model, stage, k)`` runs training step ``k`` of ``stage`` (``k = -1``: set
            the stage up, e.g. build its optimizer; not timed).
        eval_call: ``eval_call(model, k, n)`` draws ``n`` samples of ``k`` evaluation images (None: no
            evaluation estimate). On CUDA one evaluation batch is timed as it runs (``eval_batch`` images,
            ``eval_samples`` samples); on CPU, where a batch can take minutes at paper scale, one image with
            at most 10 samples, scaled to the batch linearly (sampling costs about that on a CPU).
        eval_images: Images the evaluation scores; eval_batch: images per sampling call; eval_samples:
            samples per image.
        warmup_steps: Timed steps per stage after one untimed step (fewer if ``budget_s`` is spent).
    """
    est = Estimate(dict(steps_left), eval_images=eval_images)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        twin = copy.deepcopy(model)
        for stage in stages:
            twin.on_stage_start(stage)
            if not steps_left.get(stage):
                continue
            twin.train()
            train_step(twin, stage, -1)
            train_step(twin, stage, 0)  # untimed: first-call allocations, autotuning
            _sync(device)
            times: list[float] = []
            while len(times) < warmup_steps and sum(times) < budget_s:
                t0 = time.perf_counter()
                train_step(twin, stage, len(times) + 1)
                _sync(device)
                times.append(time.perf_counter() - t0)
            est.step_s[stage] = sorted(times)[len(times) // 2]
        if eval_call is not None and eval_images > 0:
            twin.eval()
            batch = max(1, min(eval_batch, eval_images))
            k, n = (batch, eval_samples) if device.type == "cuda" else (1, min(eval_samples, 10))
            _sync(device)
            t0 = time.perf_counter()
            eval_call(twin, k, n)
            _sync(device)
            est.timed_images, est.timed_samples = k, n
            est.eval_s = (time.perf_counter() - t0) * (batch / k) * (eval_samples / n) * math.ceil(eval_images / batch)
        del twin
    return est
