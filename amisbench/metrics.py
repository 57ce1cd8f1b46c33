"""Sample-set metrics of ambiguous segmentation: GED, HM-IoU and MDM, batched over images.

A method draws ``n`` binary masks for an image; ``m`` readers marked it. Every metric compares the two
sets and gives one number per image. The conventions are the ones of the published LIDC/ISIC evaluations
(MoSE, CCDM, PHiSeg, SSN, ATFM), written down in ``shared/metrics/README.md``:

* ``IoU(a, b) = |a & b| / |a | b|`` and ``Dice(a, b) = 2 |a & b| / (|a| + |b|)``; both are 1 for two
  empty masks (``empty_iou`` / ``empty_dice`` change that).
* GED uses ``d = 1 - IoU`` and means over all *ordered* pairs, self-pairs included (``unbiased=True``
  drops the self-pairs from the two diversity terms).
* HM-IoU repeats both sets to ``lcm(n, m)`` members and solves the one-to-one matching exactly.
* MDM is the mean over readers of the best Dice over samples.

How it is computed: all masks of a batch are flattened to ``(B, k, H*W)`` and every pairwise
intersection is one batched matrix product (exact integer counts: float32 while ``H*W <= 2**24``, float64
beyond), so there is no Python loop over pairs; areas are the diagonal of the same product. Pixels with
the same value in every mask of an image are left out of the product and added back as a constant
(exact; for lesion masks that is most of the image). IoU/Dice are formed from the counts in float64.
The Hungarian matching of HM-IoU runs in SciPy, one call per image on the small ``lcm(n, m)``-tiled IoU
matrix. Everything else stays on the input's device (CPU or CUDA).

Inputs are numpy arrays or torch tensors, bool or 0/1 integers (0/1 floats are accepted too), one image
``(n, H, W)`` vs ``(m, H, W)`` or a batch ``(B, n, H, W)`` vs ``(B, m, H, W)``. A single image gives a
Python ``float``; a batch gives a float64 array of shape ``(B,)`` (numpy in) or a float64 tensor on the
input's device (torch in). Bad input raises ``ValueError`` naming the argument and the expected form.

:func:`table_metrics` is the evaluator's fast path: one product per batch for the full draw of ``N``
samples, sliced for the prefixes the tables report (GED at n = 16, 32, 100, HM-IoU and MDM at n = 32).
:data:`METRICS` and :func:`metric_info` carry the metadata (direction, range, n) tables use for bold-best.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "MetricInfo",
    "METRICS",
    "TABLE_METRICS",
    "metric_info",
    "pairwise_iou",
    "pairwise_dice",
    "ged",
    "hm_iou",
    "mdm",
    "table_metrics",
]

# float32 sums of 0/1 products are exact while every partial sum is <= 2**24 (the float32 mantissa).
_FLOAT32_EXACT_PIXELS = 2**24
# Budget for the float copy of one chunk of images; bounds memory whatever the batch size.
_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 1024 * 2**20}


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    """What a table needs to know about a metric column.

    Attributes:
        name: The column key, e.g. ``"GED_16"``.
        higher_is_better: ``True``/``False`` for the direction bold-best follows; ``None`` for
            descriptive columns (diversity) that have no better direction.
        range: The ``(low, high)`` values the metric can take with the default conventions.
        n: Number of samples per image the value is reported at (``None`` if not applicable).
        description: One sentence for captions and ``--help``.
    """

    name: str
    higher_is_better: bool | None
    range: tuple[float, float]
    n: int | None
    description: str


# prefix -> (higher_is_better, range, description template)
_PREFIXES: dict[str, tuple[bool | None, tuple[float, float], str]] = {
    "GED": (
        False,
        (0.0, 2.0),
        "Generalised energy distance (d = 1 - IoU) between {n} samples and the readers; lower is better.",
    ),
    "GED_true": (
        False,
        (0.0, 2.0),
        "GED between {n} samples and {n} draws of the true reader distribution (synthetic data only); "
        "lower is better.",
    ),
    "HMIoU": (
        True,
        (0.0, 1.0),
        "Hungarian-matched IoU of {n} samples and the readers, both repeated to lcm(n, m); higher is better.",
    ),
    "MDM": (
        True,
        (0.0, 1.0),
        "Maximum Dice matching: mean over readers of the best Dice over {n} samples; higher is better.",
    ),
    "diversity": (
        None,
        (0.0, 1.0),
        "Sample diversity E[1 - IoU(S, S')] over {n} samples, self-pairs included; no better direction.",
    ),
}
_KEY_RE = re.compile(r"^(?P<prefix>[A-Za-z_]+?)_(?P<n>[0-9]+)$")


def _make_info(prefix: str, n: int) -> MetricInfo:
    hib, rng, text = _PREFIXES[prefix]
    return MetricInfo(f"{prefix}_{n}", hib, rng, n, text.format(n=n))


#: The five columns of the LIDC/ISIC tables, in table order.
TABLE_METRICS: tuple[str, ...] = ("GED_16", "GED_32", "GED_100", "HMIoU_32", "MDM_32")

#: Metadata of every metric column the suite writes.
METRICS: dict[str, MetricInfo] = {
    key: _make_info(key.rsplit("_", 1)[0], int(key.rsplit("_", 1)[1]))
    for key in (*TABLE_METRICS, "GED_true_100", "diversity_100")
}


def metric_info(key: str) -> MetricInfo:
    """Metadata of a metric column, also for sample counts not in :data:`METRICS`.

    Args:
        key: ``"<prefix>_<n>"`` with prefix one of ``GED``, ``GED_true``, ``HMIoU``, ``MDM``,
            ``diversity`` (e.g. ``"GED_64"``); the prefix decides direction and range.

    Returns:
        The :class:`MetricInfo` of that column.

    Raises:
        ValueError: If the key does not have that form (the message lists the known prefixes).

    Example:
        >>> metric_info("GED_64").higher_is_better
        False
        >>> metric_info("HMIoU_32").range
        (0.0, 1.0)
    """
    if key in METRICS:
        return METRICS[key]
    match = _KEY_RE.match(key) if isinstance(key, str) else None
    if match is None or match["prefix"] not in _PREFIXES or int(match["n"]) < 1:
        raise ValueError(
            f"unknown metric {key!r}; expected '<prefix>_<n>' with n >= 1 and prefix one of: "
            f"{', '.join(_PREFIXES)} (e.g. 'GED_16', 'HMIoU_32')"
        )
    return _make_info(match["prefix"], int(match["n"]))


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------


def _binary_tensor(x: Any, name: str) -> torch.Tensor:
    """Validate a mask array/tensor and return it as a bool tensor (no copy for bool input)."""
    if isinstance(x, torch.Tensor):
        t = x
        if t.dtype == torch.bool:
            return t
        if t.is_complex():
            raise ValueError(f"{name}: expected binary masks (bool or 0/1 integers), got dtype {t.dtype}")
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            raise ValueError(f"{name}: contains NaN; expected binary masks (bool or 0/1 values)")
        if bool(((t != 0) & (t != 1)).any()):
            raise ValueError(
                f"{name}: contains values other than 0 and 1; expected binary masks (bool or 0/1 values)"
            )
        return t != 0
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # e.g. a read-only memory map: torch would warn; we only read it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(arr)
        return torch.from_numpy(arr)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name}: expected binary masks (bool or 0/1 integers), got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name}: contains NaN; expected binary masks (bool or 0/1 values)")
    if ((arr != 0) & (arr != 1)).any():
        raise ValueError(
            f"{name}: contains values other than 0 and 1; expected binary masks (bool or 0/1 values)"
        )
    return torch.from_numpy(np.ascontiguousarray(arr != 0))


def _common_device(a: Any, b: Any, names: tuple[str, str]) -> torch.device | None:
    """The torch device of the inputs (``None`` if neither is a tensor); refuses mixed devices."""
    devs = [x.device for x in (a, b) if isinstance(x, torch.Tensor)]
    if len(devs) == 2 and devs[0] != devs[1]:
        raise ValueError(f"{names[0]} is on {devs[0]} but {names[1]} is on {devs[1]}; put both on one device")
    return devs[0] if devs else None


def _check_real(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value}")
    return value


@dataclass
class _Pair:
    samples: torch.Tensor  # (B, n, P) bool
    gts: torch.Tensor  # (B, m, P) bool
    batched: bool
    device: torch.device | None  # None: numpy in, numpy out

    def out(self, values: torch.Tensor) -> Any:
        """(B,) float64 -> float (one image) or array/tensor following the input type."""
        if not self.batched:
            return float(values[0])
        if self.device is None:
            return values.detach().cpu().numpy()
        return values.to(self.device)


def _set_form(letter: str) -> str:
    return f"({letter}, H, W) or (B, {letter}, H, W) with {letter} >= 1"


def _prepare(samples: Any, gts: Any, *, names: tuple[str, str] = ("samples", "gts")) -> _Pair:
    """Validate a (samples, gts) pair and flatten both to (B, k, H*W) bool tensors on one device."""
    device = _common_device(samples, gts, names)
    s = _binary_tensor(samples, names[0])
    y = _binary_tensor(gts, names[1])
    for t, name, letter in ((s, names[0], "n"), (y, names[1], "m")):
        if t.ndim not in (3, 4):
            raise ValueError(f"{name}: expected shape {_set_form(letter)}, got {tuple(t.shape)}")
        if t.shape[-3] == 0:
            raise ValueError(
                f"{name}: empty set (shape {tuple(t.shape)}); expected shape {_set_form(letter)}"
            )
    if s.ndim != y.ndim:
        raise ValueError(
            f"{names[0]} has shape {tuple(s.shape)} but {names[1]} has shape {tuple(y.shape)}; expected "
            f"(n, H, W) with (m, H, W), or (B, n, H, W) with (B, m, H, W)"
        )
    if s.shape[-2:] != y.shape[-2:] or (s.ndim == 4 and s.shape[0] != y.shape[0]):
        lead = "(B, n, H, W) with (B, m, H, W)" if s.ndim == 4 else "(n, H, W) with (m, H, W)"
        raise ValueError(
            f"{names[0]} has shape {tuple(s.shape)} but {names[1]} has shape {tuple(y.shape)}; expected "
            f"{lead} (same B, H, W)"
        )
    if device is not None:
        s, y = s.to(device), y.to(device)
    batched = s.ndim == 4
    if not batched:
        s, y = s.unsqueeze(0), y.unsqueeze(0)
    return _Pair(s.flatten(-2), y.flatten(-2), batched, device)


# --------------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------------


def _matmul_dtype(pixels: int) -> torch.dtype:
    """float32 counts are exact up to 2**24 pixels; beyond that use float64 (exact to 2**53)."""
    return torch.float32 if pixels <= _FLOAT32_EXACT_PIXELS else torch.float64


def _chunk_size(k: int, pixels: int, dtype: torch.dtype, device: torch.device) -> int:
    budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    per_image = max(1, k * pixels * torch.empty((), dtype=dtype).element_size())
    return max(1, budget // per_image)


class _Buffer:
    """One growing float buffer reused across chunks (fresh large allocations page-fault every time)."""

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None

    def view(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        need = math.prod(shape)
        if self.flat is None or self.flat.numel() < need or self.flat.dtype != dtype:
            self.flat = torch.empty(need, dtype=dtype, device=device)
        return self.flat[:need].view(shape)


def _packed_floats(chunk: Sequence[torch.Tensor], buffer: _Buffer) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate bool chunks ``(b, k_i, P)`` into one float ``(b, K, W)`` tensor of informative pixels.

    A pixel with the same value in every mask of an image adds the same amount (0 or 1) to every count,
    so it need not enter the product: each image keeps only the pixels where its masks differ (moved to
    the front by a stable sort), padded to the widest image of the chunk with pixels that are zeroed,
    and the number of pixels set in every mask is returned to be added back. Segmentation masks cover a
    small part of the image and samples agree on most of their area, so the product usually shrinks
    several times; the counts stay exact.

    Returns:
        ``x`` float ``(b, K, W)`` and ``full`` float64 ``(b,)`` such that
        ``|u & v| = x[u] . x[v] + full`` for any two masks ``u, v`` of one image.
    """
    bsz, pixels = chunk[0].shape[0], chunk[0].shape[-1]
    total = sum(c.shape[1] for c in chunk)
    device = chunk[0].device
    # uint8 min/max over the set axis: far faster on CPU than bool any()/all() over a non-inner axis.
    lo = chunk[0].view(torch.uint8).amin(dim=1)
    hi = chunk[0].view(torch.uint8).amax(dim=1)
    for c in chunk[1:]:
        lo = torch.minimum(lo, c.view(torch.uint8).amin(dim=1))
        hi = torch.maximum(hi, c.view(torch.uint8).amax(dim=1))
    kind = hi + 1 - 2 * lo  # per pixel: 2 = masks differ, 1 = empty in all, 0 = set in all
    varying = torch.count_nonzero(kind == 2, dim=-1)
    width = int(varying.max()) if bsz and pixels else 0
    if width >= 0.75 * pixels:  # little to gain: use every pixel as it is
        out = buffer.view((bsz, total, pixels), _matmul_dtype(pixels), device)
        offset = 0
        for c in chunk:
            out[:, offset : offset + c.shape[1]].copy_(c)
            offset += c.shape[1]
        return out, torch.zeros(bsz, dtype=torch.float64, device=device)
    full = torch.count_nonzero(lo, dim=-1)
    index = torch.argsort(kind, dim=-1, descending=True, stable=True)[:, None, :width]
    out = buffer.view((bsz, total, width), _matmul_dtype(width), device)
    offset = 0
    for c in chunk:
        # uint8 gather with a broadcast (stride-0) index: several times faster on CPU than a bool
        # gather or take_along_dim.
        picked = torch.gather(c.view(torch.uint8), 2, index.expand(-1, c.shape[1], -1))
        out[:, offset : offset + c.shape[1]].copy_(picked)
        offset += c.shape[1]
    # Padding lands on empty pixels unless an image has too few of them: then zero the padding.
    if bool((width - varying > pixels - varying - full).any()):
        keep = torch.arange(width, device=device)[None, :] < varying[:, None]
        out.mul_(keep[:, None, :].to(out.dtype))
    return out, full.to(torch.float64)


def _gram(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Intersection counts of every pair of masks in the concatenation of ``parts``.

    Args:
        parts: Bool tensors ``(B, k_i, P)`` on one device.

    Returns:
        float64 ``(B, K, K)`` with ``K = sum(k_i)``: entry ``[b, i, j]`` is ``|x_i & x_j|`` of image ``b``,
        so the diagonal holds the areas. One batched matrix product per chunk of images.
    """
    bsz, pixels = parts[0].shape[0], parts[0].shape[-1]
    total = sum(p.shape[1] for p in parts)
    device = parts[0].device
    out = torch.empty((bsz, total, total), dtype=torch.float64, device=device)
    step = _chunk_size(total, pixels, _matmul_dtype(pixels), device)
    buffer = _Buffer()
    for start in range(0, bsz, step):
        stop = min(bsz, start + step)
        x, full = _packed_floats([p[start:stop] for p in parts], buffer)
        out[start:stop] = torch.bmm(x, x.transpose(1, 2))
        out[start:stop] += full[:, None, None]
    return out


def _cross_counts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intersections ``(B, n, m)`` and areas ``(B, n)``, ``(B, m)`` (float64) of two flattened sets."""
    bsz, n, pixels = a.shape
    m = b.shape[1]
    inter = torch.empty((bsz, n, m), dtype=torch.float64, device=a.device)
    areas = torch.empty((bsz, n + m), dtype=torch.float64, device=a.device)
    step = _chunk_size(n + m, pixels, _matmul_dtype(pixels), a.device)
    buffer = _Buffer()
    for start in range(0, bsz, step):
        stop = min(bsz, start + step)
        x, full = _packed_floats([a[start:stop], b[start:stop]], buffer)
        inter[start:stop] = torch.bmm(x[:, :n], x[:, n:].transpose(1, 2))
        inter[start:stop] += full[:, None, None]
        # exact: integers below 2**24 (float32) or 2**53 (float64)
        areas[start:stop] = x.sum(dim=-1, dtype=torch.float64) + full[:, None]
    return inter, areas[:, :n], areas[:, n:]


def _iou(inter: torch.Tensor, area_a: torch.Tensor, area_b: torch.Tensor, empty: float) -> torch.Tensor:
    """IoU ``(..., n, m)`` from intersections and areas; ``empty`` where both masks are empty."""
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), empty)


def _dice(inter: torch.Tensor, area_a: torch.Tensor, area_b: torch.Tensor, empty: float) -> torch.Tensor:
    """Dice ``(..., n, m)`` from intersections and areas; ``empty`` where both masks are empty."""
    total = area_a[..., :, None] + area_b[..., None, :]
    return torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), empty)


def _mean_distance(iou: torch.Tensor, *, exclude_diagonal: bool) -> torch.Tensor:
    """Mean of ``1 - IoU`` over the last two axes ``(B, k, k) -> (B,)``; NaN if no pair is left."""
    dist = 1.0 - iou
    k = dist.shape[-1]
    if not exclude_diagonal:
        return dist.mean(dim=(-2, -1))
    if k < 2:
        return torch.full(dist.shape[:-2], math.nan, dtype=dist.dtype, device=dist.device)
    off = dist.sum(dim=(-2, -1)) - torch.diagonal(dist, dim1=-2, dim2=-1).sum(-1)
    return off / (k * (k - 1))


# --------------------------------------------------------------------------------------------------
# Metric kernels on IoU/Dice matrices (B, n, m)
# --------------------------------------------------------------------------------------------------


def _hungarian_mean(iou: torch.Tensor) -> torch.Tensor:
    """HM-IoU ``(B,)`` from IoU matrices ``(B, n, m)``: one SciPy assignment per image on the tiling."""
    values = iou.detach().cpu().numpy()
    _, n, m = values.shape
    size = n * m // math.gcd(n, m)
    out = np.empty(values.shape[0], dtype=np.float64)
    for b, mat in enumerate(values):
        # Repeating sample i and reader j to lcm(n, m) members = tiling the n x m IoU matrix.
        tiled = np.tile(mat, (size // n, size // m))
        rows, cols = linear_sum_assignment(1.0 - tiled)
        out[b] = tiled[rows, cols].mean()
    return torch.from_numpy(out).to(iou.device)


def _mdm_from_dice(dice: torch.Tensor) -> torch.Tensor:
    """MDM ``(B,)`` from Dice matrices ``(B, n, m)``: best sample per reader, mean over readers."""
    return dice.amax(dim=-2).mean(dim=-1)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def _pairwise(a: Any, b: Any, empty: float, kind: str) -> Any:
    device = _common_device(a, b, ("a", "b"))
    ta = _binary_tensor(a, "a")
    tb = _binary_tensor(b, "b")
    for t, name, letter in ((ta, "a", "n"), (tb, "b", "m")):
        if t.ndim < 3:
            raise ValueError(f"{name}: expected shape (..., {letter}, H, W), got {tuple(t.shape)}")
    if ta.shape[:-3] != tb.shape[:-3] or ta.shape[-2:] != tb.shape[-2:]:
        raise ValueError(
            f"a has shape {tuple(ta.shape)} but b has shape {tuple(tb.shape)}; expected (..., n, H, W) "
            f"with (..., m, H, W) (same leading dims, H and W)"
        )
    if device is not None:
        ta, tb = ta.to(device), tb.to(device)
    lead = ta.shape[:-3]
    n, m = ta.shape[-3], tb.shape[-3]
    fa = ta.reshape(-1, n, ta.shape[-2] * ta.shape[-1])
    fb = tb.reshape(-1, m, tb.shape[-2] * tb.shape[-1])
    inter, area_a, area_b = _cross_counts(fa, fb)
    mat = (_iou if kind == "iou" else _dice)(inter, area_a, area_b, empty).reshape(*lead, n, m)
    return mat.cpu().numpy() if device is None else mat


def pairwise_iou(a: Any, b: Any, *, empty_iou: float = 1.0) -> Any:
    """IoU of every mask of ``a`` with every mask of ``b``.

    ``IoU(a_i, b_j) = |a_i & b_j| / |a_i | b_j|``, and ``empty_iou`` when both masks are empty.
    Intersections are one exact batched matrix product.

    Args:
        a: Binary masks ``(..., n, H, W)`` (bool or 0/1), numpy or torch.
        b: Binary masks ``(..., m, H, W)`` with the same leading dims, H and W.
        empty_iou: IoU of two empty masks (the field's convention is 1).

    Returns:
        float64 ``(..., n, m)``: a numpy array for numpy input, a tensor on the input's device for torch.

    Raises:
        ValueError: On mismatched shapes or non-binary values.

    Example:
        >>> import numpy as np
        >>> a = np.zeros((2, 2, 2), dtype=bool); a[0, 0] = True   # a[0]: top row, a[1]: empty
        >>> b = np.ones((1, 2, 2), dtype=bool)
        >>> pairwise_iou(a, b)
        array([[0.5],
               [0. ]])
        >>> pairwise_iou(a[1:], a[1:], empty_iou=0.0)
        array([[0.]])
    """
    return _pairwise(a, b, _check_real(empty_iou, "empty_iou"), "iou")


def pairwise_dice(a: Any, b: Any, *, empty_dice: float = 1.0) -> Any:
    """Dice coefficient of every mask of ``a`` with every mask of ``b``.

    ``Dice(a_i, b_j) = 2 |a_i & b_j| / (|a_i| + |b_j|)``, and ``empty_dice`` when both masks are empty.

    Args:
        a: Binary masks ``(..., n, H, W)`` (bool or 0/1), numpy or torch.
        b: Binary masks ``(..., m, H, W)`` with the same leading dims, H and W.
        empty_dice: Dice of two empty masks (the field's convention is 1).

    Returns:
        float64 ``(..., n, m)``: a numpy array for numpy input, a tensor on the input's device for torch.

    Raises:
        ValueError: On mismatched shapes or non-binary values.

    Example:
        >>> import torch
        >>> a = torch.zeros(2, 2, 2, dtype=torch.bool); a[0, 0] = True
        >>> pairwise_dice(a, torch.ones(1, 2, 2, dtype=torch.bool))
        tensor([[0.6667],
                [0.0000]], dtype=torch.float64)
    """
    return _pairwise(a, b, _check_real(empty_dice, "empty_dice"), "dice")


def ged(
    samples: Any,
    gts: Any,
    *,
    empty_iou: float = 1.0,
    unbiased: bool = False,
    return_terms: bool = False,
) -> Any:
    """Generalised energy distance between predicted masks and reader masks (lower is better).

    ``GED = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]`` with ``d = 1 - IoU`` and IoU(empty, empty) =
    ``empty_iou``. The expectations are means over all ordered pairs: ``n*m`` cross pairs, ``n**2``
    sample pairs and ``m**2`` reader pairs, self-pairs included. With ``unbiased=True`` the two
    diversity terms exclude self-pairs (``n(n-1)`` and ``m(m-1)`` pairs; NaN when n < 2 or m < 2).

    Args:
        samples: Predicted masks ``(n, H, W)`` or ``(B, n, H, W)``, bool or 0/1, numpy or torch.
        gts: Reader masks ``(m, H, W)`` or ``(B, m, H, W)``.
        empty_iou: IoU of two empty masks (1 in the published evaluations; some repos use 0).
        unbiased: Drop self-pairs from the diversity terms.
        return_terms: Also return the three expectations.

    Returns:
        GED per image: a float for one image, float64 ``(B,)`` for a batch (numpy array or tensor on
        the input's device, following the input). With ``return_terms=True`` a tuple
        ``(ged, cross, sample_div, reader_div)`` of that type, where ``cross = E[d(S, Y)]``,
        ``sample_div = E[d(S, S')]`` and ``reader_div = E[d(Y, Y')]``.

    Raises:
        ValueError: On mismatched shapes, empty sets or non-binary values.

    Example:
        >>> import numpy as np
        >>> s = np.zeros((2, 4, 4), dtype=bool); s[0, :2] = True; s[1, :, :2] = True
        >>> ged(s, s)
        0.0
        >>> y = s[:1]
        >>> [round(v, 4) for v in ged(s, y, return_terms=True)]
        [0.3333, 0.3333, 0.3333, 0.0]
    """
    empty = _check_real(empty_iou, "empty_iou")
    pair = _prepare(samples, gts)
    n = pair.samples.shape[1]
    counts = _gram([pair.samples, pair.gts])
    area = torch.diagonal(counts, dim1=-2, dim2=-1)
    iou = _iou(counts, area, area, empty)
    cross = (1.0 - iou[:, :n, n:]).mean(dim=(-2, -1))
    sample_div = _mean_distance(iou[:, :n, :n], exclude_diagonal=unbiased)
    reader_div = _mean_distance(iou[:, n:, n:], exclude_diagonal=unbiased)
    value = 2.0 * cross - sample_div - reader_div
    if return_terms:
        return tuple(pair.out(v) for v in (value, cross, sample_div, reader_div))
    return pair.out(value)


def hm_iou(samples: Any, gts: Any, *, empty_iou: float = 1.0) -> Any:
    """Hungarian-matched IoU between predicted masks and reader masks (higher is better).

    Both sets are repeated to ``L = lcm(n, m)`` members (sample ``i`` appears ``L/n`` times, reader
    ``j`` ``L/m`` times) and matched one to one by the assignment ``pi`` minimising the total cost
    ``1 - IoU``: ``HM-IoU = (1/L) sum_k IoU(S_k, Y_pi(k))``, IoU(empty, empty) = ``empty_iou``.
    Solved exactly with ``scipy.optimize.linear_sum_assignment``, once per image.

    Args:
        samples: Predicted masks ``(n, H, W)`` or ``(B, n, H, W)``, bool or 0/1, numpy or torch.
        gts: Reader masks ``(m, H, W)`` or ``(B, m, H, W)``.
        empty_iou: IoU of two empty masks.

    Returns:
        HM-IoU per image: a float for one image, float64 ``(B,)`` for a batch (numpy array or tensor on
        the input's device, following the input).

    Raises:
        ValueError: On mismatched shapes, empty sets or non-binary values.

    Example:
        >>> import numpy as np
        >>> y = np.zeros((2, 4, 4), dtype=bool); y[0, :2] = True; y[1, :, :2] = True
        >>> hm_iou(y, y)
        1.0
        >>> round(hm_iou(y[:1], y), 4)   # L = 2: the one sample is matched to both readers
        0.6667
    """
    empty = _check_real(empty_iou, "empty_iou")
    pair = _prepare(samples, gts)
    inter, area_s, area_y = _cross_counts(pair.samples, pair.gts)
    return pair.out(_hungarian_mean(_iou(inter, area_s, area_y, empty)))


def mdm(samples: Any, gts: Any, *, empty_dice: float = 1.0) -> Any:
    """Maximum Dice matching between predicted masks and reader masks (higher is better).

    ``MDM = (1/m) sum_j max_i Dice(S_i, Y_j)``: each reader is credited with the best-matching sample.
    Dice(empty, empty) = ``empty_dice``.

    Args:
        samples: Predicted masks ``(n, H, W)`` or ``(B, n, H, W)``, bool or 0/1, numpy or torch.
        gts: Reader masks ``(m, H, W)`` or ``(B, m, H, W)``.
        empty_dice: Dice of two empty masks.

    Returns:
        MDM per image: a float for one image, float64 ``(B,)`` for a batch (numpy array or tensor on
        the input's device, following the input).

    Raises:
        ValueError: On mismatched shapes, empty sets or non-binary values.

    Example:
        >>> import torch
        >>> y = torch.zeros(2, 4, 4, dtype=torch.bool); y[0, :2] = True; y[1, :, :2] = True
        >>> mdm(y, y)
        1.0
        >>> mdm(y[None, :1], y[None])      # a batch of one image
        tensor([0.7500], dtype=torch.float64)
    """
    empty = _check_real(empty_dice, "empty_dice")
    pair = _prepare(samples, gts)
    inter, area_s, area_y = _cross_counts(pair.samples, pair.gts)
    return pair.out(_mdm_from_dice(_dice(inter, area_s, area_y, empty)))


def table_metrics(
    samples: Any,
    gts: Any,
    *,
    ns: Sequence[int] = (16, 32, 100),
    hm_n: int | None = 32,
    mdm_n: int | None = 32,
    empty_iou: float = 1.0,
    empty_dice: float = 1.0,
    unbiased: bool = False,
) -> dict[str, torch.Tensor]:
    """All table metrics of a batch from one draw, computing the pairwise counts once.

    The intersections of all ``N + m`` masks of each image are one batched matrix product; the metrics at
    ``n`` samples use the first ``n`` samples of the draw (prefixes), exactly as :func:`ged`,
    :func:`hm_iou` and :func:`mdm` on ``samples[:, :n]`` would:

    * ``GED_<n>`` for each ``n`` in ``ns`` with ``n <= N``;
    * ``diversity_<n>`` = ``E[d(S, S')]`` at the largest of those ``n`` (the GED sample term);
    * ``HMIoU_<hm_n>`` and ``MDM_<mdm_n>`` if ``hm_n`` / ``mdm_n`` is not None and ``<= N``.

    Keys whose ``n`` exceeds ``N`` are left out.

    Args:
        samples: Predicted masks ``(B, N, H, W)``, bool (or 0/1), torch (numpy is accepted too).
        gts: Reader masks ``(B, m, H, W)``.
        ns: Sample counts GED is reported at.
        hm_n: Sample count of HM-IoU (None: skip).
        mdm_n: Sample count of MDM (None: skip).
        empty_iou: IoU of two empty masks (GED, HM-IoU, diversity).
        empty_dice: Dice of two empty masks (MDM).
        unbiased: GED/diversity without self-pairs, as in :func:`ged`.

    Returns:
        ``{key: float64 tensor (B,)}`` on the input's device.

    Raises:
        ValueError: On shapes other than ``(B, N, H, W)`` / ``(B, m, H, W)``, empty sets, non-binary
            values or non-positive sample counts.

    Example:
        >>> import torch
        >>> y = torch.zeros(1, 2, 4, 4, dtype=torch.bool); y[0, 0, :2] = True; y[0, 1, :, :2] = True
        >>> out = table_metrics(y.repeat(1, 2, 1, 1), y, ns=(2, 4), hm_n=4, mdm_n=2)
        >>> sorted(out)
        ['GED_2', 'GED_4', 'HMIoU_4', 'MDM_2', 'diversity_4']
        >>> float(out["GED_4"]), float(out["HMIoU_4"]), float(out["MDM_2"])
        (0.0, 1.0, 1.0)
    """
    empty_i = _check_real(empty_iou, "empty_iou")
    empty_d = _check_real(empty_dice, "empty_dice")
    for t, name in ((samples, "samples"), (gts, "gts")):
        if getattr(t, "ndim", None) != 4:
            letter = "N" if name == "samples" else "m"
            raise ValueError(
                f"{name}: expected a batch of shape (B, {letter}, H, W), got {tuple(np.shape(t))}"
            )
    for value, name in [(n, "ns") for n in ns] + [(hm_n, "hm_n"), (mdm_n, "mdm_n")]:
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name}: expected positive integer sample counts, got {value!r}")
    pair = _prepare(samples, gts)
    big_n = pair.samples.shape[1]
    device = pair.samples.device

    counts = _gram([pair.samples, pair.gts])  # (B, N+m, N+m)
    area = torch.diagonal(counts, dim1=-2, dim2=-1)
    area_s, area_y = area[:, :big_n], area[:, big_n:]
    iou_ss = _iou(counts[:, :big_n, :big_n], area_s, area_s, empty_i)
    iou_sy = _iou(counts[:, :big_n, big_n:], area_s, area_y, empty_i)
    iou_yy = _iou(counts[:, big_n:, big_n:], area_y, area_y, empty_i)

    out: dict[str, torch.Tensor] = {}
    reader_div = _mean_distance(iou_yy, exclude_diagonal=unbiased)
    kept = sorted({int(n) for n in ns if n <= big_n})
    sample_div = None
    for n in kept:
        cross = (1.0 - iou_sy[:, :n]).mean(dim=(-2, -1))
        sample_div = _mean_distance(iou_ss[:, :n, :n], exclude_diagonal=unbiased)
        out[f"GED_{n}"] = 2.0 * cross - sample_div - reader_div
    if hm_n is not None and hm_n <= big_n:
        out[f"HMIoU_{hm_n}"] = _hungarian_mean(iou_sy[:, :hm_n]).to(device)
    if mdm_n is not None and mdm_n <= big_n:
        dice = _dice(counts[:, :mdm_n, big_n:], area_s[:, :mdm_n], area_y, empty_d)
        out[f"MDM_{mdm_n}"] = _mdm_from_dice(dice)
    if kept:
        out[f"diversity_{kept[-1]}"] = sample_div
    return out
