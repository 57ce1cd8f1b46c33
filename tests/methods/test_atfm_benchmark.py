"""Benchmark: ATFM's batched sampler vs the release's loop that draws one sample at a time.

100 samples for each of 8 images with the ``quick`` ATFM on ``synthetic`` (64 px). ``ATFM.sample`` runs
one GTR pass and then the Euler steps for all 800 samples as one batched tensor (in chunks of
``sample_chunk``); ``ATFM.sample_loop`` (``sampler: release_loop``) draws them one at a time after one
GTR pass per image, each sample with its own Euler steps, as the released code's evaluation loop does. The weights are untrained: the work per sample does not depend on them.

Run the full benchmark with::

    python -m pytest tests/methods/test_atfm_benchmark.py --benchmark-only -s

The speed-up is printed (``-s``) and stored as ``extra_info`` (``--benchmark-json``). Without
``--benchmark-only`` (an ordinary test run) the problem shrinks to 2 images x 10 samples so the suite
stays quick; ``AMISBENCH_BENCH_THREADS`` sets the torch threads (default: torch's). Nothing here asserts on
wall-clock time: the tests assert the shapes and types of both samplers and the reproducibility of
the batched one (the loop's is tested in tests/methods/test_atfm.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from amisbench.config import resolve
from amisbench.methods.atfm import ATFM

_TIMES: dict[str, float] = {}


def _full(config) -> bool:
    return bool(config.getoption("benchmark_only", default=False))


@pytest.fixture(autouse=True, scope="module")
def _torch_threads():
    before = torch.get_num_threads()
    if os.environ.get("AMISBENCH_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["AMISBENCH_BENCH_THREADS"]))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(request):
    full = _full(request.config)
    res = resolve("atfm", "synthetic", "quick")
    cfg = res.cfg.method
    size = res.cfg.dataset.size
    if not full:
        cfg.steps = 2
    torch.manual_seed(0)
    from amisbench.api import DataSpec

    model = ATFM(cfg, DataSpec(1, size, size, 4)).eval()
    b, n = (8, 100) if full else (2, 10)
    images = torch.randn(b, 1, size, size, generator=torch.Generator().manual_seed(1))
    return model, images, n


def _describe(benchmark, model, images, n) -> None:
    benchmark.extra_info.update(images=int(images.shape[0]), samples=n, size=int(images.shape[-1]),
                                steps=model.cfg.steps, sample_chunk=model.cfg.sample_chunk,
                                torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count())


def _bench(benchmark, setup, sampler: str, rounds: int, warmup: int):
    """Benchmark ``model.<sampler>`` on the setup's images; returns its output, a rerun function and the
    fastest round in seconds (None when benchmarks are disabled)."""
    model, images, n = setup
    _describe(benchmark, model, images, n)
    run = lambda: getattr(model, sampler)(images, n, generator=torch.Generator().manual_seed(0))  # noqa: E731
    out = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert out.dtype == torch.bool and out.shape == (images.shape[0], n, *images.shape[-2:])
    stats = getattr(benchmark, "stats", None)
    return out, run, None if stats is None else float(stats.stats.min)


@pytest.mark.slow
@pytest.mark.benchmark(group="atfm-sampling")
def test_bench_sample_batched(benchmark, setup):
    out, run, s = _bench(benchmark, setup, "sample", rounds=3, warmup=1)
    assert torch.equal(out, run())
    if s is not None:
        _TIMES["batched"] = s


@pytest.mark.slow
@pytest.mark.benchmark(group="atfm-sampling")
def test_bench_sample_release_loop(benchmark, setup):
    model, images, n = setup
    _, _, s = _bench(benchmark, setup, "sample_loop", rounds=1, warmup=0)
    if s is not None and "batched" in _TIMES:
        ratio = s / _TIMES["batched"]
        benchmark.extra_info.update(batched_s=_TIMES["batched"], loop_s=s, speedup=ratio)
        print(f"\n{images.shape[0]} images x {n} samples, {model.cfg.steps} Euler steps: batched "
              f"{_TIMES['batched']:.2f} s, release loop {s:.2f} s, speed-up {ratio:.1f}x "
              f"(torch threads: {torch.get_num_threads()})")
