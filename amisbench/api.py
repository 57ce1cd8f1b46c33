"""The contracts between the parts: what a dataset yields and what a method plugin provides.

A method is math: it never owns loops, optimizers, devices, files or progress bars. The runner
(:mod:`amisbench.runner`) drives every method the same way, which keeps checkpointing, resume, the NaN
guard and the training budget identical across methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Protocol, TypedDict, runtime_checkable

import torch
from torch import Tensor, nn

from .errors import UserError


@dataclass(frozen=True)
class DataSpec:
    """Shape of one dataset's samples.

    Attributes:
        channels: image channels C.
        height: image height H in pixels.
        width: image width W in pixels.
        readers: reader masks per image A.
        name: registry name of the dataset.
    """

    channels: int
    height: int
    width: int
    readers: int
    name: str = ""


class Sample(TypedDict):
    """What every dataset adapter yields for one index.

    ``image`` float32 (C,H,W); ``masks`` uint8 (A,H,W) in {0,1}, one per reader (an empty mask is real
    data: a reader who saw no lesion); ``id`` a stable string; ``group`` the unit a split must not cut
    (patient or image id).
    """

    image: Tensor
    masks: Tensor
    id: str
    group: str


@runtime_checkable
class Dataset(Protocol):
    """A dataset adapter: ``DatasetCls(cfg, split)``, registered with ``@register_dataset``."""

    spec: DataSpec

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


class Method(nn.Module):
    """Base class of method plugins (small on purpose: the defaults a plugin would write anyway).

    Subclasses set ``Config`` (a dataclass whose defaults are the paper's settings), ``stages``, and
    implement :meth:`loss` and :meth:`sample`. ``__init__(cfg, spec)`` builds the networks.

    Class attributes:
        Config: the method's config dataclass.
        stages: training stages in order; each is trained to its own budget by the runner.
        wants_context: when True, the evaluator passes ``context`` (dataset and sample ids) to
            :meth:`sample`; only oracle-style reference methods need it.
    """

    Config: ClassVar[type]
    stages: ClassVar[tuple[str, ...]] = ("main",)
    wants_context: ClassVar[bool] = False

    def __init__(self, cfg: Any, spec: DataSpec):
        super().__init__()
        self.cfg = cfg
        self.spec = spec

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        """Parameters trained in ``stage`` (default: all)."""
        return self.parameters()

    def loss(self, stage: str, images: Tensor, masks: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Training loss of one batch.

        Args:
            stage: one of :attr:`stages`.
            images: float32 (B,C,H,W).
            masks: float32 (B,A,H,W) in {0,1}, all readers of each image.

        Returns:
            A scalar loss tensor and a dict of floats to log.
        """
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, images: Tensor, n: int, *, generator: torch.Generator | None = None,
               context: Any = None) -> Tensor:
        """Draw ``n`` masks per image: (B,C,H,W) float32 -> (B,n,H,W) bool, batched over images and samples."""
        raise NotImplementedError

    def nfe(self, n: int) -> int:
        """Network evaluations needed to draw ``n`` samples of one image."""
        return 1

    def on_stage_start(self, stage: str) -> None:
        """Hook called by the runner before a stage trains (e.g. to freeze the previous stage's network)."""

    def compile_targets(self) -> list[str]:
        """Names of the submodules that ``eval.compile`` / ``timing --compile`` wrap with ``torch.compile``:
        the networks :meth:`sample` calls as modules. Default: every direct child module with parameters
        (override when sampling calls deeper modules or methods other than ``forward``)."""
        containers = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
        return [name for name, m in self.named_children()
                if not isinstance(m, containers) and any(True for _ in m.parameters())]


def compile_networks(model: Method, mode: str = "default") -> list[str]:
    """Compile ``model.compile_targets()`` in place (``nn.Module.compile``); returns their names.

    Compilation happens at the first call of each target, so time it as warm-up. Results agree with eager
    execution up to floating-point reassociation.
    """
    names = list(model.compile_targets())
    for name in names:
        model.get_submodule(name).compile(mode=mode)
    return names


def check_config(key: str, ok: bool, expected: str, value: Any) -> None:
    """One rule of a method's config, checked in its ``Config.__post_init__``: unless ``ok``, a
    :class:`~amisbench.errors.UserError` ``method.<key>: expected <expected>, got <value>``.

    The resolver calls ``__post_init__`` again once every layer and ``--set`` is applied, so a bad value is
    refused before anything runs (``amisbench run`` and ``amisbench grid`` alike)."""
    if not ok:
        raise UserError(f"method.{key}: expected {expected}, got {value!r}")


def at_least(cfg: Any, **minimum: int) -> None:
    """:func:`check_config` that each ``method.<key>`` of ``cfg`` is at least ``minimum[key]``."""
    for key, low in minimum.items():
        value = getattr(cfg, key)
        check_config(key, value >= low, f"at least {low}", value)


@dataclass
class SampleContext:
    """Extra information for methods with ``wants_context`` (reference rows such as ``oracle``)."""

    dataset: Any
    indices: list[int]
    ids: list[str]
