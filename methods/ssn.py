"""SSN: Stochastic Segmentation Networks (Monteiro et al., MICCAI 2020).

Original code: github.com/biomedia-mira/stochastic_segmentation_networks. A U-Net (the PHiSeg/SSN LIDC
backbone, widths 32/64/128/192) feeds a low-rank Gaussian head over per-pixel logits,
z ~ N(mu, P P^T + diag(d)) with rank r = 10 and d = exp(.) + eps; training maximises the Monte Carlo
likelihood -log (1/M) sum_j p(y | z_j) over M = 20 antithetic logit samples, with one reader drawn at random
per image per step. Sampling is one network pass per image, then n draws of the Gaussian.

Deviations: a single logit per pixel (Bernoulli) instead of two softmax classes, which is the same model
for binary masks; the loss is divided by the number of pixels so that learning rates transfer across
image sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from amisbench.api import DataSpec, Method
from amisbench.nn import LowRankHead, UNet, UNetConfig, mc_log_likelihood
from amisbench.registry import register_method
from ._blocks import pick_reader


@dataclass
class SSNConfig:
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(widths=(32, 64, 128, 192)))
    rank: int = 10
    mc_samples: int = 20
    antithetic: bool = True
    eps: float = 1e-5
    likelihood: Literal["logmeanexp", "mean_nll"] = "logmeanexp"


@register_method("ssn")
class SSN(Method):
    """Stochastic Segmentation Network: U-Net + low-rank Gaussian over logits (Monteiro et al. 2020)."""

    Config = SSNConfig
    stages = ("main",)

    def __init__(self, cfg: SSNConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        self.unet = UNet(spec.channels, 0, cfg.unet)
        self.head = LowRankHead(self.unet.features, cfg.rank, cfg.eps)

    def distribution(self, images: Tensor):
        return self.head(self.unet(images))

    def loss(self, stage, images, masks):
        dist = self.distribution(images)
        y = pick_reader(masks).flatten(1)
        z = dist.rsample(self.cfg.mc_samples, antithetic=self.cfg.antithetic)
        ll = mc_log_likelihood(z, y, self.cfg.likelihood)
        loss = -ll.mean() / y.shape[1]
        return loss, {"nll_per_px": float(loss.detach())}

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        b, _, h, w = images.shape
        z = self.distribution(images).rsample(n, generator=generator)  # (n,B,D)
        return (z > 0).reshape(n, b, h, w).transpose(0, 1).contiguous()

    def nfe(self, n: int) -> int:
        return 1
