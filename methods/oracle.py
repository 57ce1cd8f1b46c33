"""Oracle ceiling: samples drawn from the true reader distribution (datasets that know it: ``synthetic``).

A reference row no paper has. It calibrates every metric from above: no method can match the true reader
distribution better than draws from it, up to sampling noise. It has no parameters and no training
(``train.main.steps = 0`` in ``configs/methods/oracle.yaml``). It needs the evaluation context: the dataset
and the split-local index of every image, and draws ``dataset.true_masks(index, n, seed)`` with one seed per
image taken from the sampling generator, so that a seeded generator reproduces the samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from amisbench.api import DataSpec, Method
from amisbench.errors import UserError
from amisbench.registry import register_method

NEEDS_TRUTH = "oracle needs a dataset with a known reader distribution (synthetic)"


@dataclass
class OracleConfig:
    pass


@register_method("oracle")
class Oracle(Method):
    """Oracle ceiling: samples from the true reader distribution (synthetic data only; reference row)."""

    Config = OracleConfig
    stages = ("main",)
    wants_context = True

    def __init__(self, cfg: OracleConfig, spec: DataSpec):
        super().__init__(cfg, spec)

    def trainable(self, stage):
        return []

    def loss(self, stage, images, masks):
        raise RuntimeError("the oracle has nothing to train (set train.main.steps = 0)")

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        dataset = getattr(context, "dataset", None)
        if dataset is None or not callable(getattr(dataset, "true_masks", None)):
            raise UserError(NEEDS_TRUTH)
        indices = list(context.indices)
        if len(indices) != images.shape[0]:
            raise ValueError(f"oracle: {len(indices)} indices in the context for {images.shape[0]} images")
        device = generator.device if generator is not None else images.device
        seeds = torch.randint(0, 2**62, (len(indices),), generator=generator, device=device).tolist()
        draws = np.stack([np.asarray(dataset.true_masks(int(i), n, int(s))) for i, s in zip(indices, seeds)])
        if draws.shape[-2:] != tuple(images.shape[-2:]):
            raise ValueError(f"oracle: true masks of size {draws.shape[-2:]} for images of size "
                             f"{tuple(images.shape[-2:])}")
        return torch.from_numpy(draws.astype(bool)).to(images.device)

    def nfe(self, n: int) -> int:
        return 1  # no network at all; the timing table needs a positive count
