"""Benchmark: the five table metrics on LIDC-shaped data, vectorised vs a per-pair numpy/scipy loop.

200 images of 128x128, n = 100 samples, m = 4 readers; GED_16, GED_32, GED_100 on prefixes of the
100 samples, HM-IoU_32 and MDM_32. ``amisbench.metrics.table_metrics`` (one batched matrix product of
intersection counts per chunk of images) runs next to a loop that scores one image, one metric and one
pair at a time (all ordered pairs, as the published evaluation scripts do), with the same Hungarian call.

Run the full benchmark with::

    python -m pytest tests/test_metrics_benchmark.py --benchmark-only

The speed-up is printed (``-s``) and stored as ``extra_info`` (``--benchmark-json``). Without
``--benchmark-only`` (an ordinary test run) the data shrinks to a few images so the suite stays quick;
``AMISBENCH_BENCH_IMAGES=<k>`` sets the number of images explicitly, ``AMISBENCH_BENCH_THREADS`` the torch
threads (default 1). Nothing here asserts on wall-clock time: the tests assert that both implementations
give the same numbers.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from amisbench.metrics import table_metrics

N_SAMPLES, N_READERS, SIZE = 100, 4, 128
KEYS = ("GED_16", "GED_32", "GED_100", "HMIoU_32", "MDM_32")
_TIMES: dict[str, float] = {}


def _n_images(config) -> int:
    if os.environ.get("AMISBENCH_BENCH_IMAGES"):
        return int(os.environ["AMISBENCH_BENCH_IMAGES"])
    return 200 if config.getoption("benchmark_only", default=False) else 6


def lidc_like(n_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nodule-like masks: jittered ellipses around an image-specific centre, some readers/samples empty."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    samples = np.empty((n_images, N_SAMPLES, SIZE, SIZE), dtype=bool)
    gts = np.empty((n_images, N_READERS, SIZE, SIZE), dtype=bool)
    for b in range(n_images):
        centre = rng.uniform(40, 88, size=2)
        radius = rng.uniform(4, 20)
        for out, k, empty_p in ((samples, N_SAMPLES, 0.15), (gts, N_READERS, 0.25)):
            cy, cx = (centre[:, None] + rng.normal(0, radius / 6, size=(2, k))).astype(np.float32)
            ry, rx = (radius * rng.uniform(0.7, 1.3, size=(2, k))).astype(np.float32)
            dy = (yy - cy[:, None, None]) / ry[:, None, None]
            dx = (xx - cx[:, None, None]) / rx[:, None, None]
            out[b] = dy**2 + dx**2 <= 1.0
            out[b, rng.random(k) < empty_p] = False
    return samples, gts


# ----- the per-image, per-pair reference loop ------------------------------------------------------


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def _loop_ged(s: np.ndarray, y: np.ndarray) -> float:
    cross = np.mean([1.0 - _iou(a, b) for a in s for b in y])
    sdiv = np.mean([1.0 - _iou(a, b) for a in s for b in s])
    rdiv = np.mean([1.0 - _iou(a, b) for a in y for b in y])
    return 2.0 * cross - sdiv - rdiv


def _loop_hm_iou(s: np.ndarray, y: np.ndarray) -> float:
    n, m = len(s), len(y)
    size = n * m // math.gcd(n, m)
    mat = np.array([[_iou(a, b) for b in y] for a in s])
    tiled = np.tile(mat, (size // n, size // m))
    rows, cols = linear_sum_assignment(1.0 - tiled)
    return float(tiled[rows, cols].mean())


def _loop_mdm(s: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([max(_dice(a, b) for a in s) for b in y]))


def loop_table_metrics(samples: np.ndarray, gts: np.ndarray) -> dict[str, np.ndarray]:
    out = {key: np.empty(len(samples)) for key in KEYS}
    for b, (s, y) in enumerate(zip(samples, gts)):
        for n in (16, 32, 100):
            out[f"GED_{n}"][b] = _loop_ged(s[:n], y)
        out["HMIoU_32"][b] = _loop_hm_iou(s[:32], y)
        out["MDM_32"][b] = _loop_mdm(s[:32], y)
    return out


# ----- benchmarks ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _torch_threads():
    """One torch thread by default: the loop is single-threaded too, and on a shared 2-core machine
    a second thread mostly waits for a core. ``AMISBENCH_BENCH_THREADS=2`` uses both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("AMISBENCH_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(request):
    return lidc_like(_n_images(request.config))


@pytest.fixture(scope="module")
def vectorised(data):
    return table_metrics(torch.from_numpy(data[0]), torch.from_numpy(data[1]))


def _min_seconds(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else float(stats.stats.min)


def _describe(benchmark, data) -> None:
    benchmark.extra_info.update(
        images=int(data[0].shape[0]),
        samples=N_SAMPLES,
        readers=N_READERS,
        size=SIZE,
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
    )


@pytest.mark.benchmark(group="table-metrics-lidc")
def test_bench_table_metrics_vectorised(benchmark, data, vectorised):
    samples, gts = torch.from_numpy(data[0]), torch.from_numpy(data[1])
    _describe(benchmark, data)
    result = benchmark.pedantic(table_metrics, args=(samples, gts), rounds=3, iterations=1, warmup_rounds=1)
    assert set(KEYS) <= set(result)
    for key in KEYS:
        assert result[key].shape == (samples.shape[0],) and result[key].dtype == torch.float64
        assert torch.equal(result[key], vectorised[key])
    seconds = _min_seconds(benchmark)
    if seconds is not None:
        _TIMES["vectorised"] = seconds


@pytest.mark.benchmark(group="table-metrics-lidc")
def test_bench_table_metrics_loop(benchmark, data, vectorised):
    _describe(benchmark, data)
    result = benchmark.pedantic(loop_table_metrics, args=data, rounds=1, iterations=1)
    for key in KEYS:
        np.testing.assert_allclose(vectorised[key].numpy(), result[key], rtol=0, atol=1e-9, err_msg=key)
    seconds = _min_seconds(benchmark)
    if seconds is not None and "vectorised" in _TIMES:
        ratio = seconds / _TIMES["vectorised"]
        benchmark.extra_info.update(vectorised_s=_TIMES["vectorised"], loop_s=seconds, speedup=ratio)
        print(
            f"\n{data[0].shape[0]} images: vectorised {_TIMES['vectorised']:.3f} s, loop {seconds:.3f} s, "
            f"speed-up {ratio:.1f}x (torch threads: {torch.get_num_threads()})"
        )
