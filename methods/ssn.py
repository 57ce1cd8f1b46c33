"""SSN: Stochastic Segmentation Networks (Monteiro et al., MICCAI 2020).

Original code: github.com/biomedia-mira/stochastic_segmentation_networks; its LIDC experiment lives in the
PHiSeg-code fork MiguelMonteiro/PHiSeg-code (``phiseg/experiments/proposed_4annot.py``, network
``likelihoods.proposed`` in ``phiseg/model_zoo/likelihoods.py``): a 7-level U-Net with BatchNorm (widths
32/64/128/192/192/192/192, three 3x3 convs per level and side, no conv bias, average pooling, bilinear up, the
decoder of level k at the width of level k + 1, then three 1x1 conv + BN + ReLU to 32 channels) feeds a
low-rank Gaussian head over per-pixel logits,
z ~ N(mu, P P^T + diag(d)) with rank r = 10 and d = exp(.) + eps; training maximises the Monte Carlo
likelihood -log (1/M) sum_j p(y | z_j) over M = 20 antithetic logit samples, with one reader drawn at random
per image per step. Sampling is one network pass per image, then n draws of the Gaussian.

Deviations: a single logit per pixel (Bernoulli) instead of two softmax classes, which is the same model
for binary masks (396 head parameters fewer); the loss is divided by the number of pixels so that learning
rates transfer across image sizes; PyTorch BatchNorm (eps 1e-5, momentum 0.1) instead of TF's (eps 1e-3,
decay 0.99).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from amisbench.api import DataSpec, Method, at_least, check_config
from amisbench.nn import LowRankHead, UNet, UNetConfig, mc_log_likelihood
from amisbench.registry import register_method
from ._blocks import pick_reader


@dataclass
class SSNConfig:
    # likelihoods.proposed: n0 = 32, num_channels [n0, 2n0, 4n0, 6n0, 6n0, 6n0, 6n0], 3 conv2D per level and
    # side, batch_norm without bias (add_bias=False), averagepool2D, bilinear_upsample2D, decoder level jj at
    # num_channels[ii] (ii = 7 - jj - 1), recomb_0..2 (1x1, n0)
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        widths=(32, 64, 128, 192, 192, 192, 192), convs_per_block=3, norm="batch", conv_bias=False, down="avg",
        up="bilinear", decoder_widths=(64, 128, 192, 192, 192, 192), recomb=3))
    rank: int = 10
    mc_samples: int = 20
    antithetic: bool = True
    eps: float = 1e-5
    likelihood: Literal["logmeanexp", "mean_nll"] = "logmeanexp"

    def __post_init__(self) -> None:
        at_least(self, rank=1, mc_samples=1)
        check_config("eps", self.eps > 0, "a positive number", self.eps)
        check_config("mc_samples", not (self.antithetic and self.mc_samples % 2),
                     "an even number (antithetic sampling draws pairs)", self.mc_samples)


@register_method("ssn")
class SSN(Method):
    """Stochastic Segmentation Network: U-Net + low-rank Gaussian over logits (Monteiro et al. 2020).

    A sample is one draw of the logits' Gaussian: foreground where the drawn logit is positive.
    """

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
