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

How it is computed: every pairwise intersection is an exact integer count. A pixel outside the smallest
rectangle (window) holding the set pixels of an image's masks is empty in all of them, so each image is
counted on its window only (for lesion masks a small part of the image).

* On CPU, where pip built the C extension (``amisbench/_counts.c``; any C compiler): per image, one read of
  its masks packs them to bits and ORs them into the union that gives the window; each mask's window becomes
  one dense bit string, and each pair is counted as the popcount of the AND of two strings (AVX-512
  ``VPOPCNTQ`` on CPUs that have it, eight pairs a vector; plain C elsewhere). The GED sums of every prefix
  of the samples, and the HM-IoU matching, are formed in C too (below).
* Without it (no compiler at install) on CPUs with AMX tiles, the window of each image is copied as int8
  ``(K, pixels)`` and one int8 product with int32 sums (``torch._int_mm``) counts all its pairs, exactly up
  to 2**31 pixels.
* Elsewhere (CUDA, other CPUs) the window is cut into chunks of whole rows of at most 256 pixels, the
  chunks of a group of images go through one batched float32 product, and the chunk counts are summed per
  image (exact in float32 up to 2**24 pixels, in float64 beyond).

Areas are the diagonal of the same counts. IoU/Dice are formed from the counts in float64; the prefixes of
:func:`table_metrics` are sub-blocks of one count. The Hungarian matching of HM-IoU repeats both sets to
``lcm(n, m)`` members; in C it is solved as the equivalent transportation problem (each sample sends
``L/n`` units, each reader takes ``L/m``) by successive shortest paths over the readers, otherwise by SciPy
on the tiled matrix, one call per image; both are exact up to float rounding. The C path and the other
paths agree to 1e-12 (their float64 sums run in different orders). Everything else stays on the input's
device (CPU or CUDA).

Inputs are numpy arrays or torch tensors, bool or 0/1 integers (0/1 floats are accepted too), one image
``(n, H, W)`` vs ``(m, H, W)`` or a batch ``(B, n, H, W)`` vs ``(B, m, H, W)``. A single image gives a
Python ``float``; a batch gives a float64 array of shape ``(B,)`` (numpy in) or a float64 tensor on the
input's device (torch in). Bad input raises ``ValueError`` naming the argument and the expected form.

:func:`table_metrics` is the evaluator's fast path: one count of the full draw of ``N`` samples per
image (:class:`Counts`), sliced for the prefixes the tables report (GED at n = 16, 32, 100, HM-IoU and MDM
at n = 32) and for every other metric of :mod:`amisbench.metric_registry`, where each metric registers its
function with its metadata (direction, range, n; :data:`METRICS`, :func:`metric_info`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from . import metric_registry as _registry
from .metric_registry import METRICS, MetricInfo, metric_info

__all__ = [
    "Counts",
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
# int32 sums of 0/1 products are exact up to 2**31 - 1 pixels.
_INT32_EXACT_PIXELS = 2**31 - 1
# Pixels per chunk of a window in the batched float32 product (CUDA, CPUs without AMX).
_CHUNK_PIXELS = 2**8
# AMX tiles: int8 products with int32 sums, about ten times faster than float32 ones on such a CPU.
def _int8_products_work() -> bool:
    """AMX tiles and a CPU ``torch._int_mm`` (a private torch function) that gives exact counts on a probe;
    anything else (an older torch, another build) keeps the float32 path."""
    if not getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return False
    try:
        x = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1]] * 16, dtype=torch.int8)  # 32 x 4
        got = torch._int_mm(x, x.T)
        return bool(torch.equal(got, (x.int() @ x.int().T)))
    except (AttributeError, RuntimeError, TypeError):
        return False


_HAS_AMX = _int8_products_work()
try:  # the C counts (amisbench/_counts.c), built with the package where pip found a C compiler
    from . import _counts as _C
except ImportError:  # installed without a compiler: the torch/numpy code below gives the same numbers
    _C = None
# CPU: counts, GED sums and assignments in C when it was built (tests switch it off for the other paths)
_C_COUNTS = _C is not None
# CPU: copy windows and OR masks with numpy (tests switch it off to run the CUDA code path on CPU).
_NUMPY_COPIES = True
# Bytes of window chunks counted per product (CPU: about the L2 cache; CUDA: large batches).
_GROUP_BYTES = {False: 2**20, True: 256 * 2**20}
# Bytes of float64 count matrices per group of images the metric formulas run on (CPU): about the L2
# cache of two cores; fewer, larger groups spend less on per-call overhead than they lose to cache misses.
_FORMULA_GROUP_BYTES = 2**22


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


# The metrics, their functions and metadata are registered in amisbench.metric_registry (torch-free, so that
# tables read the metadata without loading torch); table_metrics computes every registered metric from Counts.

#: The five columns of the LIDC/ISIC tables, in table order.
TABLE_METRICS: tuple[str, ...] = ("GED_16", "GED_32", "GED_100", "HMIoU_32", "MDM_32")


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
    samples: torch.Tensor  # (B, n, H, W) bool
    gts: torch.Tensor  # (B, m, H, W) bool
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
    """Validate a (samples, gts) pair and return both as (B, k, H, W) bool tensors on one device."""
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
    return _Pair(s, y, batched, device)


# --------------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------------


def _matmul_dtype(pixels: int) -> torch.dtype:
    """float32 counts are exact up to 2**24 pixels; beyond that use float64 (exact to 2**53)."""
    return torch.float32 if pixels <= _FLOAT32_EXACT_PIXELS else torch.float64


def _numpy_path(device: torch.device) -> bool:
    """Copies and the union of the masks through numpy (CPU): its strided loops are about twice as fast
    as torch's on short rows. The torch code does the same on any device (CUDA)."""
    return device.type == "cpu" and _NUMPY_COPIES


def _int8_products(device: torch.device, pixels: int) -> bool:
    """Count each image's window in one int8 product (:func:`_gram_int8`) on CPUs with AMX tiles;
    float32 chunks elsewhere (CUDA, other CPUs)."""
    return _numpy_path(device) and _HAS_AMX and pixels <= _INT32_EXACT_PIXELS


class _Buffer:
    """One growing buffer reused across groups of images (fresh allocations page-fault every time)."""

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None

    def view(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        need = math.prod(shape)
        if self.flat is None or self.flat.numel() < need or self.flat.dtype != dtype:
            self.flat = torch.empty(need, dtype=dtype, device=device)
        return self.flat[:need].view(shape)


def _word_map(p: torch.Tensor) -> np.ndarray | None:
    """``(B, H*W/8)`` uint64: the OR of all masks of each image as 64-bit words (8 pixels a word), read in
    one pass with numpy; ``None`` where the layout does not allow it (not CPU, rows not contiguous, or
    ``H*W`` not a multiple of 8)."""
    bsz, k, height, width = p.shape
    if not (_numpy_path(p.device) and (height * width) % 8 == 0 and p.stride(-1) == 1
            and p.stride(-2) == width):
        return None
    words = p.numpy().reshape(bsz, k, height * width).view(np.uint64)
    return np.bitwise_or.reduce(words, axis=1)


def _windows(parts: Sequence[torch.Tensor]) -> list[tuple[int, int, int, int] | None]:
    """Per image the smallest rectangle ``(r0, r1, c0, c1)`` holding every set pixel of its masks (None if
    they are all empty). A pixel outside it is empty in every mask and adds nothing to any count.

    On CPU the masks are OR-ed as 64-bit words in numpy (one read of the input at memory speed); the
    occupied rows and columns come from that small word map (columns from the bytes of the OR of its
    rows). Elsewhere (CUDA) the same with a torch uint8 maximum over the masks.
    """
    bsz, _, height, width = parts[0].shape
    maps = [_word_map(p) for p in parts]
    if all(m is not None for m in maps):
        union = maps[0]  # a fresh array: OR the others into it
        for m in maps[1:]:
            np.bitwise_or(union, m, out=union)
        if width % 8 == 0:  # each image row is whole words
            grid = union.reshape(bsz, height, width // 8)
            rows = np.bitwise_or.reduce(grid, axis=2) != 0  # (B, H); faster than a bool any
            cols = np.bitwise_or.reduce(grid, axis=1).view(np.uint8) != 0  # (B, W)
        else:
            grid = union.view(np.uint8).reshape(bsz, height, width)
            rows, cols = grid.any(axis=2), grid.any(axis=1)
    else:
        grid = parts[0].view(torch.uint8).amax(dim=1)
        for p in parts[1:]:
            grid = torch.maximum(grid, p.view(torch.uint8).amax(dim=1))
        rows, cols = (grid.amax(dim=2) != 0).cpu().numpy(), (grid.amax(dim=1) != 0).cpu().numpy()
    found = rows.any(axis=1)
    r0, r1 = rows.argmax(axis=1), height - rows[:, ::-1].argmax(axis=1)
    c0, c1 = cols.argmax(axis=1), width - cols[:, ::-1].argmax(axis=1)
    box = np.stack([r0, r1, c0, c1], axis=1).tolist()
    return [tuple(v) if f else None for v, f in zip(box, found.tolist())]


@dataclass
class _Chunks:
    """Where the window of one image goes: ``count`` chunks from ``slot`` on, ``rows`` window rows in
    each, copied from the image rows ``start``... (``whole`` chunks of whole rows, then the rest)."""

    slot: int
    count: int
    rows: int
    start: int
    whole: int


def _plan(box: tuple[int, int, int, int], height: int, slot: int) -> _Chunks:
    """Chunks of ``t = 256 // w`` window rows for a window of width ``w <= 256``.

    Rows beyond the window are taken from the image where they exist (they are empty in every mask), so
    that usually every chunk is a block of whole image rows: one strided copy per mask set.
    """
    r0, r1, c0, c1 = box
    h, w = r1 - r0, c1 - c0
    t = _CHUNK_PIXELS // w
    n = -(-h // t)
    t = -(-h // n)  # the same number of chunks, rows spread evenly
    start = min(r0, height - n * t)
    if start < 0:  # the image is too short for n * t rows: the last chunk takes the rest of the window
        return _Chunks(slot, n, t, r0, h // t)
    return _Chunks(slot, n, t, start, n)


def _fill(x: Any, sources: Sequence[Any], b: int, box: tuple[int, int, int, int], plan: _Chunks) -> None:
    """Copy the window of image ``b`` into its chunks ``x[slot:slot + count]`` (zero-padded).

    ``x`` and ``sources`` (the parts as uint8 ``(B, k, H, W)``) are numpy arrays on CPU, where numpy's
    strided copies of short rows run about twice as fast as torch's, or torch tensors; the code is the same.
    """
    r0, r1, c0, c1 = box
    w, t = c1 - c0, plan.rows
    dst_all = x[plan.slot:plan.slot + plan.count]
    if t * w < x.shape[-1]:
        dst_all[:, :, t * w:] = 0
    if plan.whole < plan.count:
        dst_all[plan.whole:] = 0
    offset, first, end = 0, plan.start, plan.start + plan.whole * t
    for p in sources:
        k = p.shape[1]
        src = p[b, :, :, c0:c1]
        dst = dst_all[:, offset:offset + k, :t * w].reshape(plan.count, k, t, w)  # a view: splits the last axis
        dst[:plan.whole] = src[:, first:end].reshape(k, plan.whole, t, w).swapaxes(0, 1)
        if plan.whole < plan.count:
            dst[plan.whole, :, :r1 - end] = src[:, end:r1]
        offset += k


def _gram_int8(parts: Sequence[torch.Tensor], boxes: list[tuple[int, int, int, int] | None]) -> torch.Tensor:
    """:func:`_gram` on a CPU with AMX tiles: per image, its window copied as int8 ``(K, pixels)``
    (numpy's strided copy of the bool masks viewed as int8, the same bytes) and one int8 product with
    exact int32 sums, written as float64 into the result."""
    bsz, total = parts[0].shape[0], sum(p.shape[1] for p in parts)
    counts = torch.empty((bsz, total, total), dtype=torch.float64)
    product = torch.empty((total, total), dtype=torch.int32)
    # at least 2 columns: torch._int_mm gives wrong sums for an inner dimension of 1
    widths = [max(2, (b[1] - b[0]) * (b[3] - b[2])) for b in boxes if b is not None]
    buffer = torch.empty(total * max(widths, default=2), dtype=torch.int8)
    staging = buffer.numpy()
    sources = [p.numpy().view(np.int8) for p in parts]
    for b, box in enumerate(boxes):
        if box is None:
            counts[b] = 0
            continue
        r0, r1, c0, c1 = box
        pixels = (r1 - r0) * (c1 - c0)
        width = max(2, pixels)
        flat = staging[:total * width].reshape(total, width)
        window = flat[:, :pixels].reshape(total, r1 - r0, c1 - c0)
        offset = 0
        for p in sources:
            window[offset:offset + p.shape[1]] = p[b, :, r0:r1, c0:c1]
            offset += p.shape[1]
        if width > pixels:
            flat[:, pixels:] = 0
        x = buffer[:total * width].view(total, width)
        counts[b] = torch._int_mm(x, x.T, out=product)
    return counts


def _c_counts(device: torch.device) -> bool:
    """Count with the C extension: CPU tensors, and the extension was built."""
    return device.type == "cpu" and _C_COUNTS


_Sums = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _gram_c(parts: Sequence[torch.Tensor], sums_empty: float | None = None) -> Any:
    """:func:`_gram` in C (``amisbench/_counts.c``): per image one read of its masks packs them to bits and
    finds the window of their set pixels; each pair is counted as the popcount of the AND of two windows laid
    out as dense bit strings (AVX-512 where the CPU has it). Integer counts, the same as the other paths.

    With ``sums_empty`` (parts = samples, readers) it also forms the GED sums of every sample prefix with that
    IoU of two empty masks (:func:`_ged_terms_c`), each image's right after its counts, and returns
    ``(counts, (cross, self, blank, reader))``."""
    bsz, ka, height, width = parts[0].shape
    # any strides between masks and images (a prefix of the samples is read in place); rows must be whole
    arrays = [p.numpy() for p in parts]
    arrays = [x if (height <= 1 or x.strides[2] == width) and (width <= 1 or x.strides[3] == 1)
              else np.ascontiguousarray(x) for x in arrays]
    a = arrays[0]
    b = arrays[1] if len(arrays) > 1 else a[:, :0]
    total = ka + b.shape[1]
    out = np.empty((bsz, total, total), dtype=np.float64)
    sums = None if sums_empty is None else (*(np.empty((bsz, ka)) for _ in range(3)), np.empty(bsz))
    if bsz and height * width:
        _C.gram(a, b, bsz, ka, b.shape[1], height, width, out, "auto",
                None if sums is None else (sums_empty, *sums))
        return torch.from_numpy(out) if sums is None else (torch.from_numpy(out), sums)
    out.fill(0.0)
    if sums is None:
        return torch.from_numpy(out)
    _C.prefix_sums(out, bsz, ka, b.shape[1], sums_empty, *sums)  # zero-pixel images: all masks empty
    return torch.from_numpy(out), sums


def _gram(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact intersection counts of every pair of masks of each image, on the window of its set pixels.

    On CPU with the C extension built, :func:`_gram_c`. Otherwise, on CPUs with AMX tiles one int8 product
    per image (:func:`_gram_int8`). Elsewhere each image's
    window is cut into chunks of whole rows of at most 256 pixels, laid out ``(chunks, K, 256)`` for a
    group of images, and one batched float32 product counts every chunk; the chunk counts summed per
    image are the exact counts (float64 sums beyond 2**24 pixels). A window wider than 256 pixels is
    counted on its own.

    Args:
        parts: Bool tensors ``(B, k_i, H, W)`` on one device; their masks are concatenated (``K = sum k_i``).

    Returns:
        float64 ``(B, K, K)``: entry ``[b, i, j]`` is ``|x_i & x_j|`` of image ``b``; the diagonal holds the
        areas.
    """
    bsz, height = parts[0].shape[0], parts[0].shape[-2]
    total = sum(p.shape[1] for p in parts)
    device = parts[0].device
    if _c_counts(device) and len(parts) <= 2:
        return _gram_c(parts)
    boxes = _windows(parts) if bsz and parts[0][0, 0].numel() else [None] * bsz
    if _int8_products(device, height * parts[0].shape[-1]):
        return _gram_int8(parts, boxes)
    # per-chunk counts are <= 256; their sum per image is exact in float32 up to 2**24 pixels
    acc = _matmul_dtype(parts[0][0, 0].numel()) if bsz else torch.float64
    inter = torch.zeros((bsz, total, total), dtype=acc, device=device)
    dtype = torch.float32
    # images go through in groups of about _GROUP_BYTES of chunks, so the chunks stay in cache
    group = max(1, _GROUP_BYTES[device.type == "cuda"] // (total * _CHUNK_PIXELS * dtype.itemsize))
    buffer, staging = _Buffer(), _Buffer()
    on_cpu = _numpy_path(device)
    sources = [p.numpy().view(np.uint8) if on_cpu else p.view(torch.uint8) for p in parts]
    pending: list[tuple[int, _Chunks]] = []

    def flush() -> None:
        used = sum(plan.count for _, plan in pending)
        x = buffer.view((used, total, _CHUNK_PIXELS), dtype, device)
        # CPU: fill uint8 chunks with numpy, then convert them in one pass
        fill = staging.view(x.shape, torch.uint8, device).numpy() if on_cpu else x
        for b, plan in pending:
            _fill(fill, sources, b, boxes[b], plan)
        if on_cpu:
            x.copy_(torch.from_numpy(fill))
        owner = torch.tensor([b for b, plan in pending for _ in range(plan.count)], device=device)
        inter.index_add_(0, owner, torch.matmul(x, x.transpose(1, 2)).to(acc))
        pending.clear()

    slot = 0
    for b, box in enumerate(boxes):
        if box is None or box[3] - box[2] > _CHUNK_PIXELS:
            continue
        plan = _plan(box, height, slot)
        if pending and slot + plan.count > group:
            flush()
            slot = 0
            plan = _plan(box, height, 0)
        pending.append((b, plan))
        slot += plan.count
    if pending:
        flush()
    inter = inter.double()
    for b, box in enumerate(boxes):  # windows wider than a chunk: one product of the whole window
        if box is None or box[3] - box[2] <= _CHUNK_PIXELS:
            continue
        r0, r1, c0, c1 = box
        xb = torch.cat([p[b, :, r0:r1, c0:c1].reshape(p.shape[1], -1) for p in parts])
        xb = xb.to(_matmul_dtype(xb.shape[1]))
        inter[b] = xb @ xb.T
    return inter


def _cross_counts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intersections ``(B, n, m)`` and areas ``(B, n)``, ``(B, m)`` (float64) of two sets ``(B, k, H, W)``:
    blocks of the Gram matrix of both (on AMX CPUs a whole int8 Gram costs less than a strided
    cross product)."""
    n = a.shape[1]
    gram = _gram([a, b])
    areas = torch.diagonal(gram, dim1=-2, dim2=-1)
    return gram[:, :n, n:], areas[:, :n], areas[:, n:]


def _iou(inter: torch.Tensor, area_a: torch.Tensor, area_b: torch.Tensor, empty: float) -> torch.Tensor:
    """IoU ``(..., n, m)`` from intersections and areas; ``empty`` where both masks are empty."""
    if inter.device.type == "cpu":  # numpy: the same float64 operations, without torch's per-call cost
        i, a, b = inter.numpy(), area_a.numpy(), area_b.numpy()
        union = a[..., :, None] + b[..., None, :] - i
        return torch.from_numpy(np.where(union > 0, i / np.maximum(union, 1.0), empty))
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), empty)


def _dice(inter: torch.Tensor, area_a: torch.Tensor, area_b: torch.Tensor, empty: float) -> torch.Tensor:
    """Dice ``(..., n, m)`` from intersections and areas; ``empty`` where both masks are empty."""
    if inter.device.type == "cpu":
        i, a, b = inter.numpy(), area_a.numpy(), area_b.numpy()
        total = a[..., :, None] + b[..., None, :]
        return torch.from_numpy(np.where(total > 0, 2.0 * i / np.maximum(total, 1.0), empty))
    total = area_a[..., :, None] + area_b[..., None, :]
    return torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), empty)


def _ged_terms(
    counts: torch.Tensor, big_n: int, ns: Sequence[int], empty: float, unbiased: bool, sums: _Sums | None = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GED and its three expectations ``(B,)`` at the first ``n`` samples, for each ``n`` in ``ns``.

    ``counts`` ``(B, N + m, N + m)`` are the counts of ``N`` samples then ``m`` readers. The IoU of every
    pair is formed once, with 0 for two empty masks; each expectation is then a block sum of it plus
    ``empty`` times the number of pairs of two empty masks in the block (the first ``n`` samples hold
    ``e_n`` empty masks: ``e_n**2`` such sample pairs, ``e_n * e_y`` cross pairs). A non-empty mask has
    IoU exactly 1 with itself, so without self-pairs (``unbiased``) the diagonal removes
    ``e_n (1 - empty)`` from the summed distances. On CPU with the C extension (or given ``sums`` of the
    counting pass, formed with the same ``empty``) the same terms come from :func:`_ged_terms_c`.

    Returns:
        ``{n: (ged, cross, sample_div, reader_div)}``.
    """
    m = counts.shape[-1] - big_n
    if sums is not None or _c_counts(counts.device):  # C: the prefix sums (given, from the counting pass)
        return _ged_terms_c(counts, big_n, ns, empty, unbiased, sums)
    area = torch.diagonal(counts, dim1=-2, dim2=-1)
    union = area[:, :, None] + area[:, None, :]
    union.sub_(counts).clamp_(min=1.0)
    iou = torch.div(counts, union, out=union)  # 0 where both masks are empty
    blank = (area == 0).to(counts.dtype)
    blank_s = torch.cumsum(blank[:, :big_n], dim=1)  # empty masks among the first n samples
    blank_y = blank[:, big_n:].sum(dim=1)

    reader_div = _mean_distance(iou[:, big_n:, big_n:].sum(dim=(1, 2)) + empty * blank_y**2, m, blank_y, empty,
                                unbiased)
    out = {}
    for n in ns:
        e = blank_s[:, n - 1]
        cross = 1.0 - (iou[:, :n, big_n:].sum(dim=(1, 2)) + empty * e * blank_y) / (n * m)
        sample_div = _mean_distance(iou[:, :n, :n].sum(dim=(1, 2)) + empty * e * e, n, e, empty, unbiased)
        out[n] = (2.0 * cross - sample_div - reader_div, cross, sample_div, reader_div)
    return out


def _mean_distance(iou_sum: Any, k: int, blanks: Any, empty: float, unbiased: bool) -> Any:
    """Mean ``1 - IoU`` over the ordered pairs of ``k`` masks from the sum of their IoUs (self-pairs and
    pairs of two empty masks included); ``unbiased`` drops the self-pairs (``blanks`` of the ``k`` masks
    are empty, with IoU ``empty`` with themselves; the others have IoU 1)."""
    if not unbiased:
        return 1.0 - iou_sum / (k * k)
    if k < 2:
        return iou_sum * math.nan
    return (k * k - iou_sum - blanks * (1.0 - empty)) / (k * (k - 1))


def _ged_terms_c(
    counts: torch.Tensor, big_n: int, ns: Sequence[int], empty: float, unbiased: bool, sums: _Sums | None = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`_ged_terms` from the IoU sums of every prefix of the samples, formed in C in one pass over
    the counts (``prefix_sums`` in ``amisbench/_counts.c``), or given (``sums``, from :func:`_gram_c` with
    the same ``empty``)."""
    c = np.ascontiguousarray(counts.numpy())
    bsz, m = c.shape[0], c.shape[-1] - big_n
    if sums is None:
        sums = (*(np.empty((bsz, big_n)) for _ in range(3)), np.empty(bsz))
        if bsz:
            _C.prefix_sums(c, bsz, big_n, m, empty, *sums)
    cross, own, blank, reader = sums
    blank_y = (np.diagonal(c, axis1=1, axis2=2)[:, big_n:] == 0).sum(axis=1)
    reader_div = _mean_distance(reader, m, blank_y, empty, unbiased)
    out = {}
    for n in ns:
        e = blank[:, n - 1]
        cross_n = 1.0 - cross[:, n - 1] / (n * m)
        sample_div = _mean_distance(own[:, n - 1], n, e, empty, unbiased)
        terms = (2.0 * cross_n - sample_div - reader_div, cross_n, sample_div, reader_div)
        out[n] = tuple(torch.from_numpy(np.asarray(v, dtype=np.float64)) for v in terms)
    return out


# --------------------------------------------------------------------------------------------------
# Metric kernels on IoU/Dice matrices (B, n, m)
# --------------------------------------------------------------------------------------------------


def _in_groups(fn: Callable[[torch.Tensor, torch.Tensor], Any], pair: _Pair) -> Any:
    """``fn(samples, gts)`` on groups of images, results concatenated along the batch axis.

    On CPU a group holds as many images as keep their ``(n + m) x (n + m)`` float64 matrices (counts,
    IoU and the temporaries of the metric formulas) within about the L2 cache: elementwise work on a
    whole batch at once would stream every temporary through memory. On CUDA: one group.
    """
    bsz = pair.samples.shape[0]
    k = pair.samples.shape[1] + pair.gts.shape[1]
    step = bsz if pair.samples.device.type == "cuda" else max(1, _FORMULA_GROUP_BYTES // (k * k * 8))
    if step >= bsz:
        return fn(pair.samples, pair.gts)
    parts = [fn(pair.samples[i:i + step], pair.gts[i:i + step]) for i in range(0, bsz, step)]
    if isinstance(parts[0], dict):
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(v) for v in zip(*parts))
    return torch.cat(parts)


def _hungarian_mean(iou: torch.Tensor) -> torch.Tensor:
    """HM-IoU ``(B,)`` from IoU matrices ``(B, n, m)``: the best matching of the ``lcm(n, m)`` tiling, in C
    (a transportation problem over the readers) where the extension was built, else one SciPy assignment per
    image on the tiled matrix."""
    values = iou.detach().cpu().numpy()
    bsz, n, m = values.shape
    if _C_COUNTS:  # the same matching in C, without tiling in memory (amisbench/_counts.c)
        out = np.empty(bsz)
        if bsz:
            _C.assignment_mean(np.ascontiguousarray(values, dtype=np.float64), bsz, n, m, out)
        return torch.from_numpy(out).to(iou.device)
    size = n * m // math.gcd(n, m)
    # Repeating sample i and reader j to lcm(n, m) members = tiling the n x m IoU matrix.
    tiled = np.tile(values, (1, size // n, size // m))
    cost = 1.0 - tiled
    cols = np.empty((bsz, size), dtype=np.intp)
    for b in range(bsz):
        cols[b] = linear_sum_assignment(cost[b])[1]  # rows: 0..size-1 in order (a square matrix)
    out = np.take_along_axis(tiled, cols[:, :, None], axis=2)[:, :, 0].mean(axis=1)
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
    inter, area_a, area_b = _cross_counts(ta.reshape(-1, *ta.shape[-3:]), tb.reshape(-1, *tb.shape[-3:]))
    mat = (_iou if kind == "iou" else _dice)(inter, area_a, area_b, empty).reshape(*lead, n, m)
    return mat.cpu().numpy() if device is None else mat


def pairwise_iou(a: Any, b: Any, *, empty_iou: float = 1.0) -> Any:
    """IoU of every mask of ``a`` with every mask of ``b``.

    ``IoU(a_i, b_j) = |a_i & b_j| / |a_i | b_j|``, and ``empty_iou`` when both masks are empty.
    Intersections are exact counts (module docstring).

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
    Inputs, output and errors as in :func:`pairwise_iou`.

    Args:
        a: Binary masks ``(..., n, H, W)``.
        b: Binary masks ``(..., m, H, W)``.
        empty_dice: Dice of two empty masks (the field's convention is 1).

    Returns:
        float64 ``(..., n, m)`` Dice coefficients (numpy or torch, following the input).

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

    def terms(s: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _ged_terms(_gram([s, y]), n, (n,), empty, unbiased)[n]

    values = _in_groups(terms, pair)
    return tuple(pair.out(v) for v in values) if return_terms else pair.out(values[0])


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
        >>> from numpy import zeros
        >>> y = zeros((2, 4, 4), dtype=bool); y[0, :2] = True; y[1, :, :2] = True
        >>> hm_iou(y, y)
        1.0
        >>> round(hm_iou(y[:1], y), 4)   # L = 2: the one sample is matched to both readers
        0.6667
    """
    empty = _check_real(empty_iou, "empty_iou")
    pair = _prepare(samples, gts)
    return pair.out(_in_groups(lambda s, y: _hungarian_mean(_iou(*_cross_counts(s, y), empty)), pair))


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
    return pair.out(_in_groups(lambda s, y: _mdm_from_dice(_dice(*_cross_counts(s, y), empty)), pair))


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

    The intersections of all ``N + m`` masks of each image are counted once; the metrics at
    ``n`` samples use the first ``n`` samples of the draw (prefixes), exactly as :func:`ged`,
    :func:`hm_iou` and :func:`mdm` on ``samples[:, :n]`` would:

    * ``GED_<n>`` for each ``n`` in ``ns`` with ``n <= N``;
    * ``diversity_<n>`` = ``E[d(S, S')]`` at the largest of those ``n`` (the GED sample term);
    * ``HMIoU_<hm_n>`` and ``MDM_<mdm_n>`` if ``hm_n`` / ``mdm_n`` is not None and ``<= N``;
    * every other metric of :mod:`amisbench.metric_registry` with a function, at its registered ``n``.

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
    kept = sorted({int(n) for n in ns if n <= big_n})
    counts: dict[str, Sequence[int]] = {s.prefix: s.n for s in _registry.specs()}
    counts.update(GED=kept, HMIoU=() if hm_n is None else (hm_n,), MDM=() if mdm_n is None else (mdm_n,),
                  diversity=kept[-1:])
    plan = [(s, int(n)) for s in _registry.specs() if s.compute is not None for n in counts[s.prefix]
            if n <= big_n]

    def columns(s: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        c = Counts(s, y, empty_iou=empty_i, empty_dice=empty_d, unbiased=unbiased, ged_ns=kept)
        return {f"{spec.prefix}_{n}": spec.compute(c, n) for spec, n in plan}

    return _in_groups(columns, pair)


class Counts:
    """The pairwise counts of one draw for a group of images, computed once (one batched product of the
    ``N + m`` masks); each registered metric's ``compute(counts, n)`` reads them on the first ``n`` samples.
    Everything else is formed on first use, so a metric pays only for what it reads; the GED terms of every
    ``n`` in ``ged_ns`` come from one IoU pass (:func:`_ged_terms`).

    Attributes:
        counts: ``(B, N+m, N+m)`` intersection counts, samples first; the areas are its diagonal.
        area_s, area_y: ``(B, N)`` sample and ``(B, m)`` reader areas.
        iou_ss, iou_sy, iou_yy: float64 IoU of samples x samples, samples x readers, readers x readers.
        n_samples: ``N``.
        empty_iou, empty_dice, unbiased: the conventions of the call (see :func:`table_metrics`).
    """

    def __init__(self, s: torch.Tensor, y: torch.Tensor, *, empty_iou: float, empty_dice: float,
                 unbiased: bool, ged_ns: Sequence[int] = ()) -> None:
        big_n = self.n_samples = s.shape[1]
        self._sums: _Sums | None = None  # C: the GED sums of every prefix, formed with the counts
        if _c_counts(s.device):
            self.counts, self._sums = _gram_c([s, y], empty_iou)
        else:
            self.counts = _gram([s, y])  # (B, N+m, N+m)
        area = torch.diagonal(self.counts, dim1=-2, dim2=-1)
        self.area_s, self.area_y = area[:, :big_n], area[:, big_n:]
        self.empty_iou, self.empty_dice, self.unbiased = empty_iou, empty_dice, unbiased
        self._ged_ns = tuple(ged_ns)
        self._cache: dict[Any, Any] = {}

    def _once(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def iou_ss(self) -> torch.Tensor:
        n = self.n_samples
        return self._once("ss", lambda: _iou(self.counts[:, :n, :n], self.area_s, self.area_s, self.empty_iou))

    @property
    def iou_sy(self) -> torch.Tensor:
        n = self.n_samples
        return self._once("sy", lambda: _iou(self.counts[:, :n, n:], self.area_s, self.area_y, self.empty_iou))

    @property
    def iou_yy(self) -> torch.Tensor:
        n = self.n_samples
        return self._once("yy", lambda: _iou(self.counts[:, n:, n:], self.area_y, self.area_y, self.empty_iou))

    def ged_terms(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ged, cross, sample_div, reader_div)`` at the first ``n`` samples."""
        ns = self._ged_ns if n in self._ged_ns else (n,)
        terms = self._once(("ged", ns), lambda: _ged_terms(self.counts, self.n_samples, ns, self.empty_iou,
                                                           self.unbiased, self._sums))
        return terms[n]

    def ged(self, n: int) -> torch.Tensor:
        return self.ged_terms(n)[0]

    def diversity(self, n: int) -> torch.Tensor:
        """``E[d(S, S')]`` over the first ``n`` samples (the GED sample term)."""
        return self.ged_terms(n)[2]

    def hm_iou(self, n: int) -> torch.Tensor:
        big_n = self.n_samples
        return _hungarian_mean(_iou(self.counts[:, :n, big_n:], self.area_s[:, :n], self.area_y, self.empty_iou))

    def mdm(self, n: int) -> torch.Tensor:
        big_n = self.n_samples
        return _mdm_from_dice(_dice(self.counts[:, :n, big_n:], self.area_s[:, :n], self.area_y, self.empty_dice))
