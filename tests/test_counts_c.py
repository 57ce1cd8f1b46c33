"""Tests of the C part of the metrics (``amisbench/_counts.c``): every kernel against plain integer products,
the assignment against SciPy, the prefix sums against direct sums, both counting paths against each other, and
the package without the extension.

The counts must be exact integers whatever the shape: windows that touch the image's edges (the slack words
after a string), rows wider than 64 pixels (several pieces a row), sizes that are not multiples of 8 or 64,
one-pixel images, blocks of 8 masks that are only partly used, empty images.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from amisbench import metrics

C = metrics._C
needs_c = pytest.mark.skipif(C is None, reason="the C extension was not built here (no C compiler at install)")

SHAPES = [(5, 100), (40, 300), (3, 257), (64, 17), (1, 1), (200, 3), (128, 128), (7, 64), (1, 65), (9, 129)]
SPLITS = [(1, 0), (3, 2), (8, 0), (9, 4), (100, 4), (16, 1)]


def _counts(*sets: np.ndarray) -> np.ndarray:
    flat = np.concatenate(sets, axis=1).reshape(sets[0].shape[0], sum(s.shape[1] for s in sets), -1)
    flat = flat.astype(np.int64)
    return (flat @ flat.transpose(0, 2, 1)).astype(np.float64)


def _masks(rng: np.random.Generator, bsz: int, k: int, hw: tuple[int, int]) -> np.ndarray:
    """Masks of mixed kinds: dense noise, a blob away from the edges, a window in the last rows and columns,
    an empty image."""
    x = np.zeros((bsz, k, *hw), dtype=bool)
    h, w = hw
    x[0] = rng.random((k, h, w)) < 0.4
    if bsz > 1:
        x[1, :, h // 3:max(h // 3 + 1, 2 * h // 3), w // 4:max(w // 4 + 1, 3 * w // 4)] = rng.random(
            (k, max(1, 2 * h // 3 - h // 3), max(1, 3 * w // 4 - w // 4))) < 0.6
    if bsz > 2:
        x[2, :, h - 1:, w - 1:] = rng.random((k, 1, 1)) < 0.7  # the last pixel only
    return x  # image 3 (if any) stays empty


@needs_c
@pytest.mark.parametrize("kernel", C.kernels() if C is not None else [])
@pytest.mark.parametrize("ka, kb", SPLITS)
@pytest.mark.parametrize("hw", SHAPES)
def test_every_kernel_counts_exactly(kernel, ka, kb, hw):
    rng = np.random.default_rng(hw[0] * 7919 + hw[1] * 31 + ka * 3 + kb)
    a, b = _masks(rng, 4, ka, hw), _masks(rng, 4, kb, hw)
    out = np.full((4, ka + kb, ka + kb), -1.0)
    C.gram(a, b, 4, ka, kb, *hw, out, kernel)
    want = _counts(a, b)
    assert np.array_equal(out, want), (kernel, hw, ka, kb)
    assert not out[3].any()  # the empty image


@needs_c
def test_kernels_are_the_ones_this_cpu_runs():
    names = C.kernels()
    assert names[0] == "generic" and C.kernel() in names
    assert C.kernel() == names[-1]  # the default is the fastest available
    with pytest.raises(ValueError, match="kernel avx9000 is not available"):
        C.gram(np.zeros((1, 1, 2, 2), bool), np.zeros((1, 0, 2, 2), bool), 1, 1, 0, 2, 2, np.empty((1, 1, 1)),
               "avx9000")


@needs_c
def test_any_nonzero_byte_counts_as_set():
    rng = np.random.default_rng(5)
    values = np.array([0, 1, 2, 128, 255, 16], dtype=np.uint8)
    raw = values[rng.integers(0, len(values), (2, 6, 11, 70))]
    for kernel in C.kernels():
        out = np.empty((2, 6, 6))
        C.gram(raw, raw[:, :0], 2, 6, 0, 11, 70, out, kernel)
        assert np.array_equal(out, _counts(raw != 0)), kernel


@needs_c
def test_buffers_are_checked():
    a = np.zeros((2, 3, 4, 4), bool)
    with pytest.raises(ValueError, match="out: expected a C-contiguous buffer of at least 144 bytes, got 96"):
        C.gram(a, a[:, :0], 2, 3, 0, 4, 4, np.empty((2, 3, 2)))
    with pytest.raises(ValueError, match=r"a: expected masks of shape \(2, 3, 4, 4\), one byte a pixel"):
        C.gram(a[:1], a[:, :0], 2, 3, 0, 4, 4, np.empty((2, 3, 3)))
    with pytest.raises(ValueError, match=r"b: expected masks of shape \(2, 1, 4, 4\).*rows contiguous"):
        C.gram(a, a[:, :1, :, ::2], 2, 3, 1, 4, 4, np.empty((2, 4, 4)))
    with pytest.raises(ValueError, match="one byte a pixel"):
        C.gram(a.astype(np.int16), a[:, :0], 2, 3, 0, 4, 4, np.empty((2, 3, 3)))
    with pytest.raises(ValueError, match="expected B >= 0, ka >= 1"):
        C.gram(a, a, 2, 0, 3, 4, 4, np.empty((2, 3, 3)))
    with pytest.raises(TypeError):
        C.gram(a, a, 2, 3, 3, 4, 4, b"read-only")
    with pytest.raises(ValueError, match="the GED sums need readers"):
        C.gram(a, a[:, :0], 2, 3, 0, 4, 4, np.empty((2, 3, 3)), "auto", (1.0,))
    with pytest.raises(TypeError, match=r"sums must be \(empty, cross, self, blank, reader\)"):
        C.gram(a, a, 2, 3, 3, 4, 4, np.empty((2, 6, 6)), "auto", (1.0, np.empty((2, 3))))
    with pytest.raises(ValueError, match="reader: expected a C-contiguous buffer of at least 16 bytes"):
        C.gram(a, a, 2, 3, 3, 4, 4, np.empty((2, 6, 6)), "auto",
               (1.0, np.empty((2, 3)), np.empty((2, 3)), np.empty((2, 3)), np.empty(1)))


@needs_c
@pytest.mark.parametrize("kernel", C.kernels() if C is not None else [])
def test_strided_sets_are_read_in_place(kernel):
    """A prefix of the samples, every other image, masks in reverse order: strides between masks and images
    are followed, not copied (rows stay contiguous)."""
    rng = np.random.default_rng(8)
    s = rng.random((6, 30, 13, 70)) < 0.3
    y = rng.random((6, 4, 13, 70)) < 0.3
    for a, b in [(s[:, :16], y), (s[::2], y[::2]), (s[:, ::-1], y[:, 1:3]), (s[1:4, 3:9], y[1:4, :0])]:
        bsz, ka, kb = a.shape[0], a.shape[1], b.shape[1]
        out = np.empty((bsz, ka + kb, ka + kb))
        C.gram(a, b, bsz, ka, kb, 13, 70, out, kernel)
        assert np.array_equal(out, _counts(a, b))


def _tiled_best(values: np.ndarray) -> float:
    n, m = values.shape
    size = n * m // math.gcd(n, m)
    tiled = np.tile(values, (size // n, size // m))
    rows, cols = linear_sum_assignment(-tiled)
    return float(tiled[rows, cols].mean())


@needs_c
def test_assignment_matches_scipy_with_ties_and_uneven_sets():
    """The transportation form of the tiled matching against SciPy on the tiling: random values, few
    distinct values (many ties), ratios of small integers (as IoUs are), 0/1 values; n < m, n > m, n not a
    multiple of m."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for trial in range(3000):
        n, m = int(rng.integers(1, 40)), int(rng.integers(1, 7))
        kind = trial % 4
        if kind == 0:
            v = rng.random((n, m))
        elif kind == 1:
            v = rng.integers(0, 4, (n, m)) / 4.0
        elif kind == 2:
            v = rng.integers(1, 300, (n, m)) / rng.integers(300, 400, (n, m))
        else:
            v = (rng.random((n, m)) < 0.3).astype(np.float64)
        out = np.empty(1)
        C.assignment_mean(np.ascontiguousarray(v), 1, n, m, out)
        worst = max(worst, abs(out[0] - _tiled_best(v)))
    assert worst < 1e-12


@needs_c
def test_assignment_batches_images():
    rng = np.random.default_rng(1)
    v = rng.random((6, 32, 4))
    out = np.empty(6)
    C.assignment_mean(v, 6, 32, 4, out)
    assert np.allclose(out, [_tiled_best(x) for x in v], rtol=0, atol=1e-12)


def _iou(c: np.ndarray, empty: float) -> np.ndarray:
    area = np.diagonal(c)
    union = area[:, None] + area[None, :] - c
    return np.where(union > 0, c / np.maximum(union, 1.0), empty)


@needs_c
@pytest.mark.parametrize("empty", [1.0, 0.0, 0.3])
def test_prefix_sums_match_direct_sums(empty):
    rng = np.random.default_rng(int(empty * 10))
    s = rng.random((3, 21, 9, 9)) < 0.3
    s[:, [2, 5, 6]] = False  # empty samples
    y = rng.random((3, 4, 9, 9)) < 0.3
    y[1, 2] = False  # an empty reader
    counts = _counts(s, y)
    big_n, m = 21, 4
    cross, own, blank = (np.empty((3, big_n)) for _ in range(3))
    reader = np.empty(3)
    C.prefix_sums(counts, 3, big_n, m, empty, cross, own, blank, reader)
    # the same sums formed by gram with the counts, per image while they are in cache
    sums = (*(np.empty((3, big_n)) for _ in range(3)), np.empty(3))
    out = np.empty((3, big_n + m, big_n + m))
    C.gram(s, y, 3, big_n, m, 9, 9, out, "auto", (empty, *sums))
    assert np.array_equal(out, counts)
    for got, want in zip(sums, (cross, own, blank, reader)):
        assert np.array_equal(got, want)
    for b in range(3):
        iou = _iou(counts[b], empty)
        assert reader[b] == pytest.approx(iou[big_n:, big_n:].sum(), abs=1e-12)
        for n in range(1, big_n + 1):
            assert cross[b, n - 1] == pytest.approx(iou[:n, big_n:].sum(), abs=1e-12)
            assert own[b, n - 1] == pytest.approx(iou[:n, :n].sum(), abs=1e-12)
            assert blank[b, n - 1] == (np.diagonal(counts[b])[:n] == 0).sum()


def test_c_and_torch_paths_agree(monkeypatch):
    """table_metrics and the public functions with the C counts and without them (the path of CUDA and of
    an install without a compiler): the same numbers up to the order of float64 sums."""
    rng = np.random.default_rng(11)
    s = rng.random((5, 40, 24, 70)) < 0.25
    s[:, :, :, :10] = False
    s[0, :7] = False
    y = rng.random((5, 3, 24, 70)) < 0.25
    y[2, 1] = False
    ts, ty = torch.from_numpy(s), torch.from_numpy(y)

    def everything():
        out = {k: v.numpy() for k, v in metrics.table_metrics(ts, ty, ns=(4, 16, 40), hm_n=16, mdm_n=8).items()}
        out["ged_unbiased"] = metrics.ged(s, y, unbiased=True, empty_iou=0.0)
        out["hm"] = metrics.hm_iou(s[:, :12], y)
        out["mdm"] = metrics.mdm(s, y, empty_dice=0.5)
        out["iou"] = metrics.pairwise_iou(s, y)
        out["dice"] = metrics.pairwise_dice(s, y)
        return out

    with_c = everything()
    monkeypatch.setattr(metrics, "_C_COUNTS", False)
    without = everything()
    assert set(with_c) == set(without)
    for key in with_c:
        np.testing.assert_allclose(with_c[key], without[key], rtol=0, atol=1e-12, err_msg=key)


_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "amisbench._counts":
            raise ImportError("no C extension (test)")
        return None
sys.meta_path.insert(0, Block())
import numpy as np
from amisbench import metrics
assert metrics._C is None and not metrics._C_COUNTS
s = np.zeros((2, 4, 4), dtype=bool); s[0, :2] = True; s[1, :, :2] = True
print(repr(metrics.ged(s, s[:1])), repr(metrics.hm_iou(s[:1], s)), repr(metrics.mdm(s, s)))
"""


def test_metrics_work_without_the_extension():
    """An install where pip found no C compiler has no ``amisbench._counts``: the metrics import and give
    the same numbers from the torch/numpy code."""
    done = subprocess.run([sys.executable, "-c", _BLOCK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = [float(v) for v in done.stdout.split()]
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0], abs=1e-12)


def test_extension_is_built_where_a_compiler_exists():
    """``optional=True`` in setup.py lets pip install without a compiler; where one and the Python headers
    are present, a failed build would only show as a slow metric, so it is checked here."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not (shutil.which(compiler) and headers.exists()):
        pytest.skip(f"no C compiler ({compiler}) or Python headers here: the extension is optional")
    assert C is not None, "a C compiler and Python.h are here, but amisbench._counts was not built"


@pytest.mark.slow
@needs_c
def test_portable_build_counts_exactly(tmp_path):
    """The extension built without any x86 code (-DAMIS_PORTABLE: what an ARM machine compiles) has only the
    plain C kernels and gives the same counts, sums and matchings."""
    import importlib.util

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = tmp_path / f"_counts{suffix}"
    source = Path(metrics.__file__).with_name("_counts.c")
    built = subprocess.run([compiler, "-O2", "-std=c99", "-DAMIS_PORTABLE", "-shared", "-fPIC",
                            f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(target)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    spec = importlib.util.spec_from_file_location("amisbench._counts", target)
    portable = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(portable)
    assert portable.kernels() == ["generic"] and portable.kernel() == "generic"
    rng = np.random.default_rng(3)
    for hw in [(9, 129), (128, 128), (3, 257)]:
        a, b = _masks(rng, 4, 11, hw), _masks(rng, 4, 3, hw)
        out, want = np.empty((4, 14, 14)), np.empty((4, 14, 14))
        portable.gram(a, b, 4, 11, 3, *hw, out)
        C.gram(a, b, 4, 11, 3, *hw, want)
        assert np.array_equal(out, want)
        sums, sums_c = [(*(np.empty((4, 11)) for _ in range(3)), np.empty(4)) for _ in range(2)]
        portable.prefix_sums(want, 4, 11, 3, 1.0, *sums)
        C.prefix_sums(want, 4, 11, 3, 1.0, *sums_c)
        for got, ref in zip(sums, sums_c):
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    v = rng.random((5, 12, 4))
    got, ref = np.empty(5), np.empty(5)
    portable.assignment_mean(v, 5, 12, 4, got)
    C.assignment_mean(v, 5, 12, 4, ref)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
