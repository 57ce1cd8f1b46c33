"""The metric registry: each metric is one :func:`register_metric` call that gives its function and its
metadata together (direction, range, the sample counts it is reported at, a description, a display name).

Everything that needs to know the metrics reads this registry: :func:`amisbench.metrics.table_metrics`
(and so the evaluator) computes every registered metric that has a function, the tables take their column
order (:func:`default_columns`) and their bold-best direction (:func:`metric_info`) from it, checkpoint
selection its direction, and the figures their axis titles (:func:`axis_label`). A new metric is one
registration, here or in a plugin::

    register_metric("MyIoU", higher_is_better=True, range=(0.0, 1.0), n=(32,),
                    description="Mean IoU of {n} samples with the readers; higher is better.",
                    compute=lambda c, n: c.iou_sy[:, :n].mean(dim=(-2, -1)))

``compute(counts, n)`` gets the pairwise counts of one draw (:class:`amisbench.metrics.Counts`: IoU
matrices of samples and readers, intersections and areas, computed once per batch) and a sample count, and
returns one value per image. This module does not import torch: tables read it without loading models.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator


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


@dataclass(frozen=True)
class MetricSpec:
    """One registered metric (a column family ``<prefix>_<n>``).

    Attributes:
        prefix: The column key without ``_<n>`` (``"GED"``).
        higher_is_better: Direction of bold-best and checkpoint selection (None: no better direction).
        range: ``(low, high)`` of the values.
        n: The sample counts the evaluator reports it at by default, in table order.
        description: One sentence, ``{n}`` filled in with the column's sample count.
        label: Display name in figure titles (``"HM-IoU"``); the prefix if not given.
        compute: ``compute(counts, n) -> values (B,)`` from the pairwise counts of one draw; None for a
            metric the evaluator scores by other means (``GED_true`` needs draws of the true distribution).
    """

    prefix: str
    higher_is_better: bool | None
    range: tuple[float, float]
    n: tuple[int, ...]
    description: str
    label: str
    compute: Callable[[Any, int], Any] | None = None

    def info(self, n: int) -> MetricInfo:
        return MetricInfo(f"{self.prefix}_{n}", self.higher_is_better, self.range, n, self.description.format(n=n))


_SPECS: dict[str, MetricSpec] = {}
_INFOS: dict[str, MetricInfo] = {}  # one MetricInfo object per column key (``metric_info(k) is METRICS[k]``)
_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z_]*$")


def register_metric(prefix: str, *, higher_is_better: bool | None, range: tuple[float, float],
                    n: tuple[int, ...] | list[int], description: str, label: str | None = None,
                    compute: Callable[[Any, int], Any] | None = None) -> MetricSpec:
    """Register the metric ``prefix`` (columns ``<prefix>_<n>``) with its function and metadata.

    Raises:
        ValueError: A prefix that is not letters and underscores, already registered, or sample counts
            that are not positive integers.
    """
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix) or prefix.endswith("_"):
        raise ValueError(f"metric prefix {prefix!r}: expected letters and underscores, e.g. 'GED' or 'GED_true'")
    if prefix in _SPECS:
        raise ValueError(f"metric '{prefix}' is registered already; unregister_metric('{prefix}') first")
    ns = tuple(n)
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ns):
        raise ValueError(f"metric '{prefix}': n should be positive integer sample counts, got {n!r}")
    spec = MetricSpec(prefix, higher_is_better, (float(range[0]), float(range[1])), ns, description,
                      label or prefix, compute)
    _SPECS[prefix] = spec
    _INFOS.clear()
    return spec


def unregister_metric(prefix: str) -> None:
    _SPECS.pop(prefix, None)
    _INFOS.clear()


def specs() -> list[MetricSpec]:
    """Every registered metric, in registration (= table column) order."""
    return list(_SPECS.values())


def spec(prefix: str) -> MetricSpec:
    if prefix not in _SPECS:
        raise ValueError(f"unknown metric {prefix!r}; known: {known()}")
    return _SPECS[prefix]


def known() -> str:
    return ", ".join(sorted(_SPECS))


def split_key(key: str) -> tuple[MetricSpec, int]:
    """``"GED_true_100"`` -> (the spec of ``GED_true``, 100); ValueError for a key of no registered metric."""
    prefix, _, n = key.rpartition("_") if isinstance(key, str) else ("", "", "")
    if prefix not in _SPECS or not (n.isascii() and n.isdigit()) or int(n) < 1:
        raise ValueError(f"unknown metric {key!r}; expected '<prefix>_<n>' with n >= 1 and prefix one of: "
                         f"{known()} (e.g. 'GED_16', 'HMIoU_32')")
    return _SPECS[prefix], int(n)


def metric_info(key: str) -> MetricInfo:
    """Metadata of a metric column, also for sample counts the evaluator does not report by default.

    Args:
        key: ``"<prefix>_<n>"`` with a registered prefix (``GED``, ``GED_true``, ``HMIoU``, ``MDM``,
            ``diversity``, or a plugin's), e.g. ``"GED_64"``; the prefix decides direction and range.

    Returns:
        The :class:`MetricInfo` of that column (the same object for the same key).

    Raises:
        ValueError: If the key does not have that form (the message lists the known prefixes).

    Example:
        >>> metric_info("GED_64").higher_is_better
        False
        >>> metric_info("HMIoU_32").range
        (0.0, 1.0)
    """
    if key not in _INFOS:
        s, n = split_key(key)
        _INFOS[key] = s.info(n)
    return _INFOS[key]


def default_columns() -> list[str]:
    """Every registered metric at its default sample counts, in table order (``GED_16`` ... ``diversity_100``)."""
    return [f"{s.prefix}_{n}" for s in _SPECS.values() for n in s.n]


def column_order(present: list[str] | set[str]) -> list[str]:
    """The metric columns ``present`` in table order: the registered ones first, then the others sorted."""
    order = default_columns()
    return [k for k in order if k in present] + sorted(set(present) - set(order))


def direction(key: str) -> bool | None:
    """higher_is_better of a column; None for a column of no registered metric (e.g. a timing column)."""
    try:
        return metric_info(key).higher_is_better
    except ValueError:
        return None


def axis_label(key: str) -> str:
    """A figure title for a metric column: ``HM-IoU$_{32}$ (higher is better)``."""
    s, n = split_key(key)
    better = {True: " (higher is better)", False: " (lower is better)", None: ""}[s.higher_is_better]
    return f"{s.label}$_{{{n}}}$" + better


class _Columns(Mapping):
    """:data:`METRICS`: column key -> :class:`MetricInfo` of every registered metric at its default counts."""

    def __getitem__(self, key: str) -> MetricInfo:
        if key not in default_columns():
            raise KeyError(key)
        return metric_info(key)

    def __iter__(self) -> Iterator[str]:
        return iter(default_columns())

    def __len__(self) -> int:
        return len(default_columns())


METRICS: Mapping[str, MetricInfo] = _Columns()


# ----------------------------------------------------------------------------------------------------
# the suite's metrics (conventions: shared/metrics/README.md; kernels: amisbench.metrics.Counts)
# ----------------------------------------------------------------------------------------------------

register_metric(
    "GED", higher_is_better=False, range=(0.0, 2.0), n=(16, 32, 100),
    description="Generalised energy distance (d = 1 - IoU) between {n} samples and the readers; lower is better.",
    compute=lambda c, n: c.ged(n))
register_metric(
    "HMIoU", higher_is_better=True, range=(0.0, 1.0), n=(32,), label="HM-IoU",
    description="Hungarian-matched IoU of {n} samples and the readers, both repeated to lcm(n, m); higher is "
    "better.",
    compute=lambda c, n: c.hm_iou(n))
register_metric(
    "MDM", higher_is_better=True, range=(0.0, 1.0), n=(32,),
    description="Maximum Dice matching: mean over readers of the best Dice over {n} samples; higher is better.",
    compute=lambda c, n: c.mdm(n))
register_metric(  # scored by the evaluator against draws of the true reader distribution (synthetic data)
    "GED_true", higher_is_better=False, range=(0.0, 2.0), n=(100,),
    description="GED between {n} samples and {n} draws of the true reader distribution (synthetic data only); "
    "lower is better.")
register_metric(
    "diversity", higher_is_better=None, range=(0.0, 1.0), n=(100,),
    description="Sample diversity E[1 - IoU(S, S')] over {n} samples, self-pairs included; no better direction.",
    compute=lambda c, n: c.diversity(n))
