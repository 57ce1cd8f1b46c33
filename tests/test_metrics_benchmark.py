"""Benchmark: the public metric functions on LIDC-shaped data against a per-image numpy reference.

40 images of 128x128, n = 100 samples, m = 4 readers (the evaluator's shape): ``ged`` at n = 16, 32 and
100 (prefixes of the draw), ``hm_iou`` and ``mdm`` at n = 32, and ``table_metrics`` (all five table
columns from one draw). The reference, written here, scores one image at a time with all its pairs in
one matrix product (numpy float32 counts, exact below 2**24 pixels), in the conventions of
``shared/metrics`` (IoU and Dice of two empty masks are 1, GED over all ordered pairs, HM-IoU on the
lcm(n, m) tiling solved by SciPy); its ``table_metrics`` shares one product of the N + m masks between
the prefixes, as a careful per-image script would.

Run the full benchmark with::

    python -m pytest tests/test_metrics_benchmark.py --benchmark-only -s

Each test prints the ratio ``reference / ours`` of the fastest of a few alternating rounds, by CPU time
of the process (a shared machine distorts it far less than wall time) and by wall time, beside the
target, and the ceiling any exact method has on this machine: the reference's time over the time of one read
of the input masks (every pixel may be set, so each must be read once); the figures are stored as
``extra_info`` (``--benchmark-json``). Without ``--benchmark-only`` the data shrinks to a few images so the
suite stays quick; ``AMISBENCH_BENCH_IMAGES=<k>`` sets the number of images, ``AMISBENCH_BENCH_THREADS`` the torch
threads (default 1, like the reference, whose numpy BLAS is held to one thread while the file runs).
Nothing asserts on wall-clock time: the tests
assert that ours and the reference give the same numbers.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from amisbench.metrics import ged, hm_iou, mdm, table_metrics

N_SAMPLES, N_READERS, SIZE = 100, 4, 128
GED_NS, HM_N, MDM_N = (16, 32, 100), 32, 32
KEYS = ("GED_16", "GED_32", "GED_100", "HMIoU_32", "MDM_32")
REF_ROUNDS = 3


def _n_images(config) -> int:
    if os.environ.get("AMISBENCH_BENCH_IMAGES"):
        return int(os.environ["AMISBENCH_BENCH_IMAGES"])
    return 40 if config.getoption("benchmark_only", default=False) else 4


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


# ----- the per-image numpy reference: one image at a time, all its pairs in one product ----------------


def _counts(*sets: np.ndarray) -> np.ndarray:
    """Intersection counts of every pair of masks of one image (float64 (K, K)); areas on the diagonal."""
    x = np.concatenate(sets).reshape(sum(len(s) for s in sets), -1).astype(np.float32)
    return (x @ x.T).astype(np.float64)


def _ratio(inter: np.ndarray, a: np.ndarray, b: np.ndarray, *, dice: bool) -> np.ndarray:
    total = a[:, None] + b[None, :]
    den = total if dice else total - inter
    return np.where(den > 0, (2.0 if dice else 1.0) * inter / np.maximum(den, 1.0), 1.0)


def _ref_ged(c: np.ndarray, n: int) -> float:
    area = np.diag(c)
    d = 1.0 - _ratio(c, area, area, dice=False)
    return float(2.0 * d[:n, n:].mean() - d[:n, :n].mean() - d[n:, n:].mean())


def _ref_hm(c: np.ndarray, n: int) -> float:
    area = np.diag(c)
    iou = _ratio(c[:n, n:], area[:n], area[n:], dice=False)
    m = iou.shape[1]
    size = n * m // math.gcd(n, m)
    tiled = np.tile(iou, (size // n, size // m))
    rows, cols = linear_sum_assignment(1.0 - tiled)
    return float(tiled[rows, cols].mean())


def _ref_mdm(c: np.ndarray, n: int) -> float:
    area = np.diag(c)
    return float(_ratio(c[:n, n:], area[:n], area[n:], dice=True).max(axis=0).mean())


def ref_ged(samples: np.ndarray, gts: np.ndarray) -> np.ndarray:
    return np.array([_ref_ged(_counts(s, y), len(s)) for s, y in zip(samples, gts)])


def ref_hm_iou(samples: np.ndarray, gts: np.ndarray) -> np.ndarray:
    return np.array([_ref_hm(_counts(s, y), len(s)) for s, y in zip(samples, gts)])


def ref_mdm(samples: np.ndarray, gts: np.ndarray) -> np.ndarray:
    return np.array([_ref_mdm(_counts(s, y), len(s)) for s, y in zip(samples, gts)])


def ref_table_metrics(samples: np.ndarray, gts: np.ndarray) -> dict[str, np.ndarray]:
    out = {key: np.empty(len(samples)) for key in KEYS}
    big_n, m = samples.shape[1], gts.shape[1]

    def prefix(c: np.ndarray, n: int) -> np.ndarray:  # the counts of the first n samples and the readers
        idx = np.r_[0:n, big_n:big_n + m]
        return c[np.ix_(idx, idx)]

    for b, (s, y) in enumerate(zip(samples, gts)):
        c = _counts(s, y)
        for n in GED_NS:
            out[f"GED_{n}"][b] = _ref_ged(prefix(c, n), n)
        out[f"HMIoU_{HM_N}"][b] = _ref_hm(prefix(c, HM_N), HM_N)
        out[f"MDM_{MDM_N}"][b] = _ref_mdm(prefix(c, MDM_N), MDM_N)
    return out


# ----- benchmarks ----------------------------------------------------------------------------------

# name -> (ours on torch tensors, the reference on numpy arrays, target ratio)
CASES = {
    "ged_16": (lambda s, y: ged(s[:, :16], y), lambda s, y: ref_ged(s[:, :16], y), 5.0),
    "ged_32": (lambda s, y: ged(s[:, :32], y), lambda s, y: ref_ged(s[:, :32], y), 5.0),
    "ged_100": (lambda s, y: ged(s, y), ref_ged, 5.0),
    "hm_iou_32": (lambda s, y: hm_iou(s[:, :HM_N], y), lambda s, y: ref_hm_iou(s[:, :HM_N], y), 5.0),
    "mdm_32": (lambda s, y: mdm(s[:, :MDM_N], y), lambda s, y: ref_mdm(s[:, :MDM_N], y), 5.0),
    "table_metrics": (lambda s, y: table_metrics(s, y, ns=GED_NS, hm_n=HM_N, mdm_n=MDM_N),
                      ref_table_metrics, 20.0),
}


def _numpy_blas():
    """``(get, set)`` of the thread count of the OpenBLAS numpy's wheel loads (``numpy.libs``), or ``None``.

    numpy's BLAS starts one thread per core: the reference's products would run on two threads, and
    their spin-waits count as CPU time of this process (on a busy machine several times the work).
    """
    import ctypes
    import glob

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)  # already loaded by numpy: the same library
        except OSError:
            continue
        for suffix in ("64_", "_64_", ""):
            get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None) or getattr(
                lib, f"openblas_get_num_threads{suffix}", None)
            put = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None) or getattr(
                lib, f"openblas_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                return get, put
    return None


def blas_threads() -> str:
    """numpy's BLAS threads as printed beside the ratios ('unknown' for a BLAS we cannot ask)."""
    blas = _numpy_blas()
    return "unknown" if blas is None else str(blas[0]())


# samples each case reads (the first n of the draw) and the readers: what one read of its input covers
READS = {"ged_16": 16, "ged_32": 32, "ged_100": N_SAMPLES, "hm_iou_32": HM_N, "mdm_32": MDM_N,
         "table_metrics": N_SAMPLES}


def read_once(samples: np.ndarray, gts: np.ndarray) -> list[np.ndarray]:
    """One read of every mask byte (a numpy OR over 64-bit words, per image): a floor that no exact metric
    can go below, since every pixel may be set."""
    return [np.bitwise_or.reduce(x.reshape(*x.shape[:2], -1).view(np.uint64), axis=1) for x in (samples, gts)]


@pytest.fixture(autouse=True, scope="module")
def _torch_threads():
    """One torch thread and one numpy BLAS thread by default: the reference is single-threaded, and so is
    ours; ``AMISBENCH_BENCH_THREADS=2`` gives torch two."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("AMISBENCH_BENCH_THREADS", "1")))
    blas = _numpy_blas()
    blas_before = blas[0]() if blas else None
    if blas:
        blas[1](1)
    yield
    torch.set_num_threads(before)
    if blas:
        blas[1](blas_before)


@pytest.fixture(scope="module")
def data(request):
    return lidc_like(_n_images(request.config))


def _as_dict(value) -> dict[str, np.ndarray]:
    if isinstance(value, dict):
        return {k: np.asarray(v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in value.items()}
    return {"value": np.asarray(value.cpu().numpy() if isinstance(value, torch.Tensor) else value)}


def _fastest(fn, args, rounds: int) -> tuple[float, float, object]:
    """The fastest of ``rounds`` calls by CPU time of this process and by wall time, and the result."""
    cpu, wall, out = math.inf, math.inf, None
    for _ in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn(*args)
        cpu, wall = min(cpu, time.process_time() - c0), min(wall, time.perf_counter() - w0)
    return cpu, wall, out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.benchmark(group="metrics-lidc")
def test_bench_metric_vs_reference(benchmark, data, name):
    ours, ref, target = CASES[name]
    samples, gts = data
    ts, ty = torch.from_numpy(samples), torch.from_numpy(gts)
    got = _as_dict(benchmark.pedantic(ours, args=(ts, ty), rounds=5, iterations=1, warmup_rounds=1))
    want = _as_dict(ref(samples, gts))
    assert set(want) <= set(got)
    for key in want:
        assert got[key].dtype == np.float64 and got[key].shape == (len(samples),)
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-12, err_msg=f"{name} {key}")
    if getattr(benchmark, "stats", None) is None:  # benchmarks disabled: the values were checked
        return
    # Both timed here, alternating, by CPU time (what a shared machine does not distort much) and wall time.
    mine_cpu, mine_wall, theirs_cpu, theirs_wall = math.inf, math.inf, math.inf, math.inf
    for _ in range(REF_ROUNDS):
        c, w, _ = _fastest(ours, (ts, ty), 2)
        mine_cpu, mine_wall = min(mine_cpu, c), min(mine_wall, w)
        c, w, _ = _fastest(ref, (samples, gts), 1)
        theirs_cpu, theirs_wall = min(theirs_cpu, c), min(theirs_wall, w)
    ratio, ratio_wall = theirs_cpu / mine_cpu, theirs_wall / mine_wall
    read_cpu, _, _ = _fastest(read_once, (samples[:, :READS[name]], gts), 5)
    benchmark.extra_info.update(images=len(samples), samples=N_SAMPLES, readers=N_READERS, size=SIZE,
                                ours_cpu_s=mine_cpu, reference_cpu_s=theirs_cpu, ratio_cpu=ratio,
                                ours_wall_s=mine_wall, reference_wall_s=theirs_wall, ratio_wall=ratio_wall,
                                target=target, torch_threads=torch.get_num_threads(), blas_threads=blas_threads(),
                                cpu_count=os.cpu_count(), load_average=os.getloadavg()[0],
                                read_once_cpu_s=read_cpu, ratio_ceiling=theirs_cpu / read_cpu)
    print(f"\n{name}: CPU time ours {mine_cpu * 1e3:.1f} ms, reference {theirs_cpu * 1e3:.1f} ms, ratio "
          f"{ratio:.1f}x (target >= {target:g}x); wall {mine_wall * 1e3:.1f} / {theirs_wall * 1e3:.1f} ms = "
          f"{ratio_wall:.1f}x ({len(samples)} images of {SIZE} px, {N_SAMPLES} samples x {N_READERS} readers, "
          f"torch threads {torch.get_num_threads()}, numpy BLAS threads {blas_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}); one read of the input {read_cpu * 1e3:.1f} ms: no exact method "
          f"beats {theirs_cpu / read_cpu:.0f}x here")
