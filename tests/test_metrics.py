"""Tests of amisbench.metrics: reference vectors, a naive re-implementation, invariants, input checks."""

from __future__ import annotations

import dataclasses
import doctest
import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from amisbench import metrics
from amisbench.metrics import (
    METRICS,
    TABLE_METRICS,
    MetricInfo,
    ged,
    hm_iou,
    mdm,
    metric_info,
    pairwise_dice,
    pairwise_iou,
    table_metrics,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
VECTORS = SHARED / "metrics" / "metric_vectors.npz"
TOL = 1e-6  # the acceptance tolerance against the published evaluation code

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    database=None,  # write nothing into the repository
    # the function-scoped fixture below only picks the counting path: the same for every example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(autouse=True, params=["c", "torch"])
def counts_path(request, monkeypatch):
    """Every test here runs on both ways of counting: the C extension (``amisbench/_counts.c``, CPU) and
    the torch/numpy code (CUDA, and CPUs where pip found no C compiler)."""
    if request.param == "c" and metrics._C is None:
        pytest.skip("the C extension was not built here (no C compiler at install)")
    monkeypatch.setattr(metrics, "_C_COUNTS", request.param == "c")
    return request.param


# --------------------------------------------------------------------------------------------------
# Reference vectors
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tests run many tiny products; extra threads only add start-up latency on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load_vectors() -> dict[str, dict[str, np.ndarray]] | None:
    if not VECTORS.exists():
        return None
    with np.load(VECTORS, allow_pickle=False) as data:
        keys = list(data.keys())
        names = (
            [str(n) for n in data["case_names"]]
            if "case_names" in keys
            else sorted({k.split("__")[0] for k in keys if "__" in k})
        )
        return {n: {k.split("__", 1)[1]: data[k] for k in keys if k.startswith(n + "__")} for n in names}


CASES = _load_vectors()
CASE_NAMES = sorted(CASES) if CASES else ["<missing>"]


def _case(name: str) -> dict[str, np.ndarray]:
    if CASES is None:
        if SHARED.exists():
            pytest.fail(f"{VECTORS} is missing although {SHARED} exists")
        pytest.skip(f"{SHARED} not found (the reference vectors live beside the repository)")
    return CASES[name]


BACKENDS = {
    "numpy_bool": lambda x: x,
    "numpy_uint8": lambda x: x.astype(np.uint8),
    "torch_bool": lambda x: torch.from_numpy(x),
    "torch_int64": lambda x: torch.from_numpy(x).long(),
    "torch_float32": lambda x: torch.from_numpy(x).float(),
}


def _close(value, expected, tol=TOL) -> bool:
    value, expected = float(value), float(expected)
    if math.isnan(expected):
        return math.isnan(value)
    return abs(value - expected) <= tol


def _check_case(vec, s, y, index=None):
    """Compare every reference value of one case with the functions applied to s, y."""

    def pick(v):
        return v if index is None else v[index]

    g, cross, sdiv, rdiv = ged(s, y, return_terms=True)
    assert _close(pick(g), vec["ged"])
    for got, want in zip((cross, sdiv, rdiv), vec["ged_terms"]):
        assert _close(pick(got), want)
    assert _close(pick(ged(s, y, empty_iou=0.0)), vec["ged_empty_iou0"])
    assert _close(pick(ged(s, y, unbiased=True)), vec["ged_unbiased"])
    assert _close(pick(hm_iou(s, y)), vec["hm_iou"])
    assert _close(pick(mdm(s, y)), vec["mdm"])


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", CASE_NAMES)
def test_reference_vectors_single(name, backend):
    vec = _case(name)
    conv = BACKENDS[backend]
    s, y = conv(vec["samples"]), conv(vec["gts"])
    assert isinstance(ged(s, y), float)
    _check_case(vec, s, y)


def _variants(samples: np.ndarray, gts: np.ndarray):
    """Transforms that leave every metric unchanged: flips, transpose, reordering of both sets."""
    rng = np.random.default_rng(0)
    yield samples, gts
    yield samples[:, ::-1], gts[:, ::-1]
    yield samples[:, :, ::-1], gts[:, :, ::-1]
    yield samples[rng.permutation(len(samples))], gts[rng.permutation(len(gts))]
    if samples.shape[1] == samples.shape[2]:
        yield samples.transpose(0, 2, 1), gts.transpose(0, 2, 1)


@pytest.mark.parametrize("backend", ["numpy_bool", "torch_bool", "torch_int64"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_reference_vectors_batched(name, backend):
    vec = _case(name)
    pairs = list(_variants(vec["samples"], vec["gts"]))
    conv = BACKENDS[backend]
    s = conv(np.ascontiguousarray(np.stack([p[0] for p in pairs])))
    y = conv(np.ascontiguousarray(np.stack([p[1] for p in pairs])))
    out = ged(s, y)
    if backend.startswith("numpy"):
        assert isinstance(out, np.ndarray) and out.dtype == np.float64
    else:
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert tuple(out.shape) == (len(pairs),)
    for b in range(len(pairs)):
        _check_case(vec, s, y, index=b)


def test_reference_vectors_mixed_batch():
    """Cases of equal shapes scored together in one batch, in both orders."""
    if CASES is None:
        _case("<missing>")
    groups: dict[tuple, list[str]] = {}
    for name, vec in CASES.items():
        groups.setdefault((vec["samples"].shape, vec["gts"].shape), []).append(name)
    batched = [names for names in groups.values() if len(names) > 1]
    assert batched, "expected some reference cases to share a shape"
    for names in batched:
        for order in (names, names[::-1]):
            s = torch.from_numpy(np.stack([CASES[n]["samples"] for n in order]))
            y = torch.from_numpy(np.stack([CASES[n]["gts"] for n in order]))
            for b, n in enumerate(order):
                _check_case(CASES[n], s, y, index=b)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_reference_vectors_table_metrics(name):
    vec = _case(name)
    s = torch.from_numpy(vec["samples"])[None].repeat(2, 1, 1, 1)
    y = torch.from_numpy(vec["gts"])[None].repeat(2, 1, 1, 1)
    n = s.shape[1]
    out = table_metrics(s, y, ns=(n,), hm_n=n, mdm_n=n)
    assert set(out) == {f"GED_{n}", f"HMIoU_{n}", f"MDM_{n}", f"diversity_{n}"}
    for b in range(2):
        assert _close(out[f"GED_{n}"][b], vec["ged"])
        assert _close(out[f"diversity_{n}"][b], vec["ged_terms"][1])
        assert _close(out[f"HMIoU_{n}"][b], vec["hm_iou"])
        assert _close(out[f"MDM_{n}"][b], vec["mdm"])
    unb = table_metrics(s, y, ns=(n,), hm_n=None, mdm_n=None, unbiased=True)
    assert _close(unb[f"GED_{n}"][0], vec["ged_unbiased"])
    e0 = table_metrics(s, y, ns=(n,), hm_n=None, mdm_n=None, empty_iou=0.0)
    assert _close(e0[f"GED_{n}"][1], vec["ged_empty_iou0"])


# --------------------------------------------------------------------------------------------------
# A deliberately naive implementation: one pair at a time, sets repeated explicitly
# --------------------------------------------------------------------------------------------------


def naive_iou(a, b, empty=1.0):
    union = np.logical_or(a, b).sum()
    return empty if union == 0 else np.logical_and(a, b).sum() / union


def naive_dice(a, b, empty=1.0):
    total = a.sum() + b.sum()
    return empty if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def naive_ged(samples, gts, empty=1.0, unbiased=False):
    def mean_d(xs, ys, skip_self):
        ds = [1.0 - naive_iou(x, y, empty) for i, x in enumerate(xs) for j, y in enumerate(ys)
              if not (skip_self and i == j)]
        return float(np.mean(ds)) if ds else math.nan

    cross = mean_d(samples, gts, False)
    sdiv = mean_d(samples, samples, unbiased)
    rdiv = mean_d(gts, gts, unbiased)
    return 2 * cross - sdiv - rdiv, cross, sdiv, rdiv


def naive_hm_iou(samples, gts, empty=1.0):
    n, m = len(samples), len(gts)
    size = n * m // math.gcd(n, m)
    rep_s = [samples[k % n] for k in range(size)]
    rep_y = [gts[k % m] for k in range(size)]
    mat = np.array([[naive_iou(a, b, empty) for b in rep_y] for a in rep_s])
    if size <= 7:  # small enough to try every one-to-one matching
        best = max(mat[np.arange(size), list(p)].sum() for p in itertools.permutations(range(size)))
        return best / size
    rows, cols = linear_sum_assignment(1.0 - mat)
    return mat[rows, cols].mean()


def naive_mdm(samples, gts, empty=1.0):
    return float(np.mean([max(naive_dice(s, y, empty) for s in samples) for y in gts]))


def random_sets(seed, n, m, h, w, density, empty_frac, batch=1):
    """Random masks (batch, n, h, w), (batch, m, h, w); some forced empty, some duplicated."""
    rng = np.random.default_rng(seed)
    s = rng.random((batch, n, h, w)) < density
    y = rng.random((batch, m, h, w)) < density
    s[rng.random((batch, n)) < empty_frac] = False
    y[rng.random((batch, m)) < empty_frac] = False
    if n > 1 and rng.random() < 0.3:
        s[:, 1] = s[:, 0]  # duplicated sample
    if rng.random() < 0.2:
        y[:, 0] = s[:, 0]  # a sample equal to a reader
    return s, y


set_sizes = st.tuples(st.integers(1, 12), st.integers(1, 6)) | st.sampled_from(
    [(6, 4), (32, 3), (3, 4), (4, 4), (2, 5), (10, 4), (5, 3), (1, 1)]
)


@pytest.mark.slow
@PROPERTY
@given(
    sizes=set_sizes,
    hw=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    density=st.sampled_from([0.05, 0.3, 0.6, 0.95]),
    empty_frac=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
@example(sizes=(6, 4), hw=(5, 5), density=0.3, empty_frac=0.25, seed=1)
@example(sizes=(32, 3), hw=(4, 4), density=0.3, empty_frac=0.25, seed=2)
@example(sizes=(2, 4), hw=(6, 3), density=0.6, empty_frac=0.5, seed=3)
@example(sizes=(4, 4), hw=(3, 3), density=0.05, empty_frac=1.0, seed=4)
def test_matches_naive(sizes, hw, density, empty_frac, seed):
    n, m = sizes
    s_b, y_b = random_sets(seed, n, m, *hw, density, empty_frac, batch=2)
    for b in range(2):
        s, y = s_b[b], y_b[b]
        want = naive_ged(s, y)
        got = ged(s, y, return_terms=True)
        assert np.allclose(got, want, rtol=0, atol=1e-12)
        assert got[0] >= -1e-12  # GED >= 0 with the default conventions
        assert ged(s, y, empty_iou=0.0) == pytest.approx(naive_ged(s, y, empty=0.0)[0], abs=1e-12)
        want_unb = naive_ged(s, y, unbiased=True)[0]
        assert _close(ged(s, y, unbiased=True), want_unb, 1e-12)
        assert hm_iou(s, y) == pytest.approx(naive_hm_iou(s, y), abs=1e-12)
        assert hm_iou(s, y, empty_iou=0.0) == pytest.approx(naive_hm_iou(s, y, 0.0), abs=1e-12)
        assert mdm(s, y) == pytest.approx(naive_mdm(s, y), abs=1e-12)
        assert mdm(s, y, empty_dice=0.0) == pytest.approx(naive_mdm(s, y, 0.0), abs=1e-12)
        iou = pairwise_iou(s, y)
        dice = pairwise_dice(s, y)
        assert iou.shape == dice.shape == (n, m)
        assert np.allclose(iou, [[naive_iou(a, c) for c in y] for a in s], rtol=0, atol=1e-15)
        assert np.allclose(dice, [[naive_dice(a, c) for c in y] for a in s], rtol=0, atol=1e-15)
    # The batch, as torch tensors, gives the per-image values.
    ts, ty = torch.from_numpy(s_b), torch.from_numpy(y_b)
    for fn in (ged, hm_iou, mdm):
        batched = fn(ts, ty)
        assert batched.dtype == torch.float64 and batched.shape == (2,)
        for b in range(2):
            assert float(batched[b]) == pytest.approx(fn(s_b[b], y_b[b]), abs=1e-12)


@settings(max_examples=60, deadline=None, database=None)
@given(
    sizes=set_sizes,
    hw=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    density=st.sampled_from([0.05, 0.3, 0.6]),
    empty_frac=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_invariants(sizes, hw, density, empty_frac, seed):
    n, m = sizes
    s, y = random_sets(seed, n, m, *hw, density, empty_frac)
    s, y = s[0], y[0]
    # A set against itself: GED 0 (with either empty convention), HM-IoU and MDM 1.
    assert ged(s, s) == pytest.approx(0.0, abs=1e-12)
    assert ged(s, s, empty_iou=0.0) == pytest.approx(0.0, abs=1e-12)
    assert hm_iou(s, s) == pytest.approx(1.0, abs=1e-12)
    assert mdm(s, s) == pytest.approx(1.0, abs=1e-12)
    assert ged(s, y) >= -1e-12
    # Order of samples and of readers does not matter.
    rng = np.random.default_rng(seed)
    ps, py = s[rng.permutation(n)], y[rng.permutation(m)]
    for fn in (ged, hm_iou, mdm):
        assert fn(ps, py) == pytest.approx(fn(s, y), abs=1e-12)
    assert ged(ps, py, unbiased=True) == pytest.approx(ged(s, y, unbiased=True), abs=1e-12, nan_ok=True)
    # Ranges.
    assert 0.0 <= hm_iou(s, y) <= 1.0 and 0.0 <= mdm(s, y) <= 1.0 and ged(s, y) <= 2.0


def test_ged_is_symmetric():
    s, y = random_sets(7, 6, 4, 9, 9, 0.3, 0.25)
    assert ged(s[0], y[0]) == pytest.approx(ged(y[0], s[0]), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Input types, return types, options
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [np.bool_, np.uint8, np.int8, np.int32, np.int64, np.uint16, np.float32, np.float64]
)
def test_numpy_dtypes(dtype):
    s, y = random_sets(11, 5, 3, 6, 6, 0.4, 0.25)
    ref = ged(s[0], y[0])
    assert ged(s[0].astype(dtype), y[0].astype(dtype)) == pytest.approx(ref, abs=1e-15)
    out = hm_iou(s.astype(dtype), y.astype(dtype))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (1,)


@pytest.mark.parametrize(
    "dtype", [torch.bool, torch.uint8, torch.int16, torch.int64, torch.float16, torch.float64]
)
def test_torch_dtypes(dtype):
    s, y = random_sets(12, 5, 3, 6, 6, 0.4, 0.25)
    ts, ty = torch.from_numpy(s).to(dtype), torch.from_numpy(y).to(dtype)
    for fn in (ged, hm_iou, mdm):
        out = fn(ts, ty)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == (1,)
        assert float(out[0]) == pytest.approx(fn(s[0], y[0]), abs=1e-15)
        assert isinstance(fn(ts[0], ty[0]), float)


def test_return_terms_types():
    s, y = random_sets(13, 4, 4, 5, 5, 0.4, 0.25, batch=3)
    terms = ged(s, y, return_terms=True)
    assert isinstance(terms, tuple) and len(terms) == 4
    assert all(isinstance(t, np.ndarray) and t.shape == (3,) for t in terms)
    assert np.allclose(terms[0], 2 * terms[1] - terms[2] - terms[3])
    tterms = ged(torch.from_numpy(s), torch.from_numpy(y), return_terms=True)
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tterms)
    single = ged(s[0], y[0], return_terms=True)
    assert all(isinstance(t, float) for t in single)


def test_mixed_numpy_and_torch_gives_torch():
    s, y = random_sets(14, 4, 3, 5, 5, 0.4, 0.0, batch=2)
    out = mdm(s, torch.from_numpy(y))
    assert isinstance(out, torch.Tensor)
    assert np.allclose(out.numpy(), mdm(s, y))


def test_non_contiguous_inputs():
    s, y = random_sets(15, 6, 4, 8, 8, 0.4, 0.25, batch=2)
    flipped = s[:, :, ::-1, ::2], y[:, :, ::-1, ::2]
    want = ged(np.ascontiguousarray(flipped[0]), np.ascontiguousarray(flipped[1]))
    assert np.allclose(ged(*flipped), want)
    ts, ty = torch.from_numpy(s).transpose(-1, -2), torch.from_numpy(y).transpose(-1, -2)
    assert np.allclose(ged(ts, ty).numpy(), ged(s.transpose(0, 1, 3, 2), y.transpose(0, 1, 3, 2)))


def test_empty_batch_and_empty_images():
    """A batch of no images gives empty results; images of no pixels count as all-empty masks."""
    s, y = torch.zeros(0, 5, 8, 8, dtype=torch.bool), torch.zeros(0, 2, 8, 8, dtype=torch.bool)
    for fn in (ged, hm_iou, mdm):
        assert fn(s, y).shape == (0,)
    assert all(v.shape == (0,) for v in table_metrics(s, y, ns=(5,), hm_n=5, mdm_n=5).values())
    s, y = torch.zeros(2, 5, 0, 8, dtype=torch.bool), torch.zeros(2, 2, 0, 8, dtype=torch.bool)
    assert ged(s, y).tolist() == [0.0, 0.0] and hm_iou(s, y).tolist() == [1.0, 1.0]
    assert mdm(s, y, empty_dice=0.0).tolist() == [0.0, 0.0]


def test_read_only_arrays_without_warning():
    s, y = random_sets(18, 5, 3, 6, 6, 0.4, 0.25)
    s.flags.writeable = False
    y.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ged(s, y).shape == (1,)


def test_pairwise_leading_dims_and_empty_option():
    a = np.zeros((2, 3, 1, 4, 4), dtype=bool)
    a[0, 0, 0, :2] = True
    b = np.zeros((2, 3, 2, 4, 4), dtype=bool)
    b[..., 0, :, :] = True
    iou = pairwise_iou(a, b)
    assert iou.shape == (2, 3, 1, 2) and iou.dtype == np.float64
    assert iou[0, 0, 0, 0] == 0.5 and iou[0, 0, 0, 1] == 0.0 and iou[1, 2, 0, 1] == 1.0
    assert pairwise_iou(a, b, empty_iou=0.0)[1, 2, 0, 1] == 0.0
    assert pairwise_dice(a, b, empty_dice=0.25)[1, 2, 0, 1] == 0.25
    t = pairwise_dice(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.shape == (2, 3, 1, 2)


def test_unbiased_needs_two_members():
    s, y = random_sets(16, 1, 3, 5, 5, 0.4, 0.0)
    assert math.isnan(ged(s[0], y[0], unbiased=True))
    assert not math.isnan(ged(s[0], y[0]))


@pytest.mark.parametrize("amx", [True, False])
def test_float64_count_path_and_groups(monkeypatch, amx):
    """Force the float64 sums (used beyond 2**24 pixels), one image per group and either product dtype
    (one int8 product per image as on AMX CPUs, float32 chunks elsewhere): the same numbers."""
    monkeypatch.setattr(metrics, "_C_COUNTS", False)  # the paths of CUDA and of a build without C
    s, y = random_sets(17, 10, 4, 12, 12, 0.3, 0.25, batch=5)
    ts, ty = torch.from_numpy(s), torch.from_numpy(y)
    want = table_metrics(ts, ty, ns=(4, 10), hm_n=10, mdm_n=6)
    want_pair = pairwise_iou(s, y)
    monkeypatch.setattr(metrics, "_HAS_AMX", amx)
    monkeypatch.setattr(metrics, "_FLOAT32_EXACT_PIXELS", 10)
    monkeypatch.setattr(metrics, "_GROUP_BYTES", {False: 1, True: 1})
    monkeypatch.setattr(metrics, "_FORMULA_GROUP_BYTES", 1)
    assert metrics._matmul_dtype(144) == torch.float64
    got = table_metrics(ts, ty, ns=(4, 10), hm_n=10, mdm_n=6)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert np.array_equal(pairwise_iou(s, y), want_pair)


@pytest.mark.parametrize("amx, numpy_copies", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("hw", [(5, 100), (40, 300), (3, 257), (64, 17), (1, 1), (200, 3)])
def test_counts_on_windows_are_exact(monkeypatch, amx, numpy_copies, hw):
    """The counts come from each image's window of set pixels: one int8 product per image (AMX CPUs; a
    one-pixel window is padded to two columns) or chunks of whole rows of <= 256 pixels (elsewhere):
    windows wider than a chunk (counted whole), images too short for whole-row chunks (the last chunk
    takes the rest), one-pixel and very tall windows give the integer counts of a plain loop; with numpy's
    copies (CPU) and with torch's (the CUDA code path)."""
    monkeypatch.setattr(metrics, "_C_COUNTS", False)  # the paths of CUDA and of a build without C
    monkeypatch.setattr(metrics, "_HAS_AMX", amx)
    monkeypatch.setattr(metrics, "_NUMPY_COPIES", numpy_copies)
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    s = rng.random((3, 5, *hw)) < 0.4
    y = rng.random((3, 2, *hw)) < 0.4
    s[1] = False  # image 1: the samples are empty, the window is the readers'
    y[2] = False
    s[2, :, :, : hw[1] // 2] = False  # image 2: a window in the right half only
    gram = metrics._gram([torch.from_numpy(s), torch.from_numpy(y)])
    flat = np.concatenate([s, y], axis=1).reshape(3, 7, -1).astype(np.int64)
    assert gram.dtype == torch.float64 and np.array_equal(gram.numpy(), flat @ flat.transpose(0, 2, 1))
    cross, area_s, area_y = metrics._cross_counts(torch.from_numpy(s), torch.from_numpy(y))
    assert np.array_equal(cross.numpy(), (flat[:, :5] @ flat[:, 5:].transpose(0, 2, 1)))
    assert np.array_equal(torch.cat([area_s, area_y], 1).numpy(), flat.sum(-1))
    none = metrics._gram([torch.zeros(2, 3, *hw, dtype=torch.bool)])
    assert none.shape == (2, 3, 3) and not none.any()


@pytest.mark.parametrize("fill", ["empty", "full"])
def test_constant_pixels_and_padding_are_exact(fill):
    """Pixels equal in all masks are left out of the product: check images that differ a lot in how
    many such pixels they have (padding of a narrow image lands on full pixels in the 'full' case)."""
    rng = np.random.default_rng(31)
    s = np.full((3, 6, 16, 16), fill == "full")
    y = np.full((3, 4, 16, 16), fill == "full")
    s[0, :, :6, :6] = rng.random((6, 6, 6)) < 0.5  # image 0: 36 varying pixels
    y[0, :, :6, :6] = rng.random((4, 6, 6)) < 0.5
    s[1, 0, 3, 3] = fill != "full"  # image 1: one varying pixel
    s[2] = rng.random((6, 16, 16)) < 0.5  # image 2: nearly every pixel varies
    s[2, 0] = False
    y[2, 1] = True
    for b in range(3):
        want_iou = [[naive_iou(a, c) for c in y[b]] for a in s[b]]
        assert np.allclose(pairwise_iou(s[b], y[b]), want_iou, rtol=0, atol=1e-15)
        assert ged(s, y)[b] == pytest.approx(naive_ged(s[b], y[b])[0], abs=1e-12)
    assert np.allclose(pairwise_iou(s, y), [pairwise_iou(s[b], y[b]) for b in range(3)], rtol=0, atol=0)
    want_dice = [pairwise_dice(s[b], y[b]) for b in range(2)]
    assert np.allclose(pairwise_dice(s[:2], y[:2]), want_dice, rtol=0, atol=0)


def test_matmul_dtype_threshold():
    assert metrics._matmul_dtype(128 * 128) == torch.float32
    assert metrics._matmul_dtype(2**24) == torch.float32
    assert metrics._matmul_dtype(2**24 + 1) == torch.float64


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

S4 = np.zeros((4, 8, 8), dtype=bool)
Y3 = np.zeros((3, 8, 8), dtype=bool)


def _bad(**kw):
    base = {"samples": S4, "gts": Y3}
    base.update(kw)
    return base


BAD_INPUTS = {
    "samples_2d": (_bad(samples=np.zeros((8, 8), bool)), ["samples", "(n, H, W)"]),
    "gts_5d": (_bad(gts=np.zeros((1, 1, 3, 8, 8), bool)), ["gts", "(m, H, W)"]),
    "hw_mismatch": (_bad(gts=np.zeros((3, 8, 9), bool)), ["samples", "gts", "same B, H, W"]),
    "batch_mismatch": (
        _bad(samples=np.zeros((2, 4, 8, 8), bool), gts=np.zeros((3, 3, 8, 8), bool)),
        ["samples", "gts", "(B, n, H, W)"],
    ),
    "ndim_mismatch": (_bad(samples=np.zeros((2, 4, 8, 8), bool)), ["samples", "gts", "(B, n, H, W)"]),
    "no_samples": (_bad(samples=np.zeros((0, 8, 8), bool)), ["samples", "empty", "n >= 1"]),
    "no_gts": (
        _bad(gts=np.zeros((2, 0, 8, 8), bool), samples=np.zeros((2, 4, 8, 8), bool)),
        ["gts", "m >= 1"],
    ),
    "int_not_binary": (_bad(samples=np.full((4, 8, 8), 2, np.int64)), ["samples", "0 and 1"]),
    "torch_int_not_binary": (_bad(gts=torch.full((3, 8, 8), -1)), ["gts", "0 and 1"]),
    "float_nan": (_bad(gts=np.full((3, 8, 8), np.nan)), ["gts", "NaN"]),
    "torch_float_nan": (_bad(samples=torch.full((4, 8, 8), float("nan"))), ["samples", "NaN"]),
    "float_probabilities": (_bad(samples=np.full((4, 8, 8), 0.5)), ["samples", "0 and 1"]),
    "strings": (_bad(samples=np.array([["a"]])), ["samples", "binary"]),
}


@pytest.mark.parametrize("fn", [ged, hm_iou, mdm], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(fn, case):
    kwargs, words = BAD_INPUTS[case]
    with pytest.raises(ValueError) as err:
        fn(kwargs["samples"], kwargs["gts"])
    for word in words:
        assert word in str(err.value), str(err.value)


def test_bad_options_and_pairwise_shapes():
    with pytest.raises(ValueError, match="empty_iou"):
        ged(S4, Y3, empty_iou=2.0)
    with pytest.raises(ValueError, match="empty_dice"):
        mdm(S4, Y3, empty_dice=-0.1)
    with pytest.raises(ValueError, match=r"a has shape .* b has shape"):
        pairwise_iou(S4, np.zeros((3, 8, 7), bool))
    with pytest.raises(ValueError, match=r"b: expected shape \(\.\.\., m, H, W\)"):
        pairwise_dice(S4, np.zeros((8, 8), bool))
    with pytest.raises(ValueError, match="samples: expected a batch of shape"):
        table_metrics(torch.from_numpy(S4), torch.from_numpy(Y3))
    with pytest.raises(ValueError, match="ns"):
        table_metrics(torch.from_numpy(S4)[None], torch.from_numpy(Y3)[None], ns=(0,))
    with pytest.raises(ValueError, match="NaN"):
        table_metrics(torch.full((1, 4, 8, 8), float("nan")), torch.from_numpy(Y3)[None])


# --------------------------------------------------------------------------------------------------
# table_metrics
# --------------------------------------------------------------------------------------------------


def test_table_metrics_matches_functions_on_prefixes():
    s, y = random_sets(21, 40, 3, 10, 10, 0.3, 0.2, batch=4)
    ts, ty = torch.from_numpy(s), torch.from_numpy(y)
    out = table_metrics(ts, ty, ns=(4, 16, 32, 64), hm_n=32, mdm_n=16)
    assert set(out) == {"GED_4", "GED_16", "GED_32", "HMIoU_32", "MDM_16", "diversity_32"}
    for key, value in out.items():
        assert value.dtype == torch.float64 and value.shape == (4,)
    for n in (4, 16, 32):
        assert torch.allclose(out[f"GED_{n}"], ged(ts[:, :n], ty), rtol=0, atol=1e-12)
    assert torch.allclose(out["diversity_32"], ged(ts[:, :32], ty, return_terms=True)[2], rtol=0, atol=1e-12)
    assert torch.allclose(out["HMIoU_32"], hm_iou(ts[:, :32], ty), rtol=0, atol=1e-12)
    assert torch.allclose(out["MDM_16"], mdm(ts[:, :16], ty), rtol=0, atol=1e-12)
    unb = table_metrics(ts, ty, ns=(16,), hm_n=None, mdm_n=None, unbiased=True)
    assert set(unb) == {"GED_16", "diversity_16"}
    assert torch.allclose(unb["GED_16"], ged(ts[:, :16], ty, unbiased=True), rtol=0, atol=1e-12)
    # numpy input is accepted; the result is still torch
    assert torch.allclose(table_metrics(s, y, ns=(4,))["GED_4"], out["GED_4"])


def test_table_metrics_default_keys():
    s, y = random_sets(22, 100, 4, 6, 6, 0.3, 0.2, batch=2)
    out = table_metrics(torch.from_numpy(s), torch.from_numpy(y))
    assert set(out) == set(TABLE_METRICS) | {"diversity_100"}
    assert all(key in METRICS for key in out)
    small = table_metrics(torch.from_numpy(s[:, :20]), torch.from_numpy(y))
    assert set(small) == {"GED_16", "diversity_16"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    s, y = random_sets(23, 100, 4, 32, 32, 0.3, 0.2, batch=6)
    ts, ty = torch.from_numpy(s), torch.from_numpy(y)
    cpu = table_metrics(ts, ty)
    gpu = table_metrics(ts.cuda(), ty.cuda())
    for key in cpu:
        assert gpu[key].device.type == "cuda" and gpu[key].dtype == torch.float64
        assert torch.allclose(gpu[key].cpu(), cpu[key], rtol=0, atol=1e-12)
    for fn in (ged, hm_iou, mdm):
        got = fn(ts[:, :32].cuda(), ty.cuda())
        assert got.device.type == "cuda"
        assert torch.allclose(got.cpu(), fn(ts[:, :32], ty), rtol=0, atol=1e-12)
    assert isinstance(ged(ts[0].cuda(), ty[0].cuda()), float)
    with pytest.raises(ValueError, match="one device"):
        ged(ts.cuda(), ty)


# --------------------------------------------------------------------------------------------------
# Metadata and docs
# --------------------------------------------------------------------------------------------------


def test_metadata():
    for key in (*TABLE_METRICS, "GED_true_100", "diversity_100"):
        info = METRICS[key]
        assert isinstance(info, MetricInfo) and info.name == key and info.description
        assert metric_info(key) is info
    assert [METRICS[k].higher_is_better for k in TABLE_METRICS] == [False, False, False, True, True]
    assert [METRICS[k].n for k in TABLE_METRICS] == [16, 32, 100, 32, 32]
    assert METRICS["GED_true_100"].higher_is_better is False
    assert METRICS["diversity_100"].higher_is_better is None
    assert METRICS["GED_16"].range == (0.0, 2.0) and METRICS["MDM_32"].range == (0.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        METRICS["GED_16"].n = 3  # type: ignore[misc]


def test_metric_info_parses_other_n():
    info = metric_info("GED_64")
    assert info == MetricInfo("GED_64", False, (0.0, 2.0), 64, info.description)
    assert "64" in info.description
    assert metric_info("HMIoU_100").higher_is_better is True
    assert metric_info("MDM_8").n == 8
    assert metric_info("GED_true_16").higher_is_better is False
    assert metric_info("diversity_32").higher_is_better is None


@pytest.mark.parametrize("key", ["FOO_16", "GED", "GED_", "GED_x", "GED_0", "hm_iou_32", "", "MDM-32"])
def test_metric_info_unknown(key):
    with pytest.raises(ValueError, match="GED, GED_true, HMIoU, MDM, diversity"):
        metric_info(key)


def test_docstring_examples():
    result = doctest.testmod(metrics, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted >= 10 and result.failed == 0
    for fn in (pairwise_iou, pairwise_dice, ged, hm_iou, mdm, table_metrics, metric_info):
        assert "Example:" in fn.__doc__ and ">>>" in fn.__doc__
