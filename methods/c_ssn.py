"""c-SSN: the Stochastic Segmentation Network conditioned on the reader's labelling style (Zepf et al., ICLR
2023, "That Label's got Style"), as released.

Original code: github.com/kilianzepf/conditioned_uncertain_segmentation (``models/c_ssn.py``,
``models/unet.py``, ``train_c-ssn.py``, ``utils/utils.py``; files cited below are in that repo).

Model (``models/c_ssn.py``, ``StyleStochasticUnet``): its own U-Net (``models/unet.py``: widths
32/64/128/192, three 3x3 conv + ReLU per block, no normalisation, average pooling down, bilinear up) on the
image alone; the one-hot style of the reader slot, tiled over the image, goes through a 1x1 conv
``style_encoder`` (A -> 32) and is concatenated with the U-Net features; a 1x1 conv ``end_encoder``
(64 -> 32) feeds the low-rank Gaussian head over per-pixel logits (rank 10; ``mean_l``, ``log_cov_diag_l``,
``cov_factor_l``; diagonal exp(.) + 1e-5, plus 1e-5 again: ``epsilon: 2e-5``).

Training (``train_c-ssn.py``, ``utils.StochasticSegmentationNetworkLossMCIntegral``): one (image, reader,
style) triple per item -- here one random reader slot per image and step -- and the loss
-mean_b [logsumexp_j log p(y | z_j) - log M] over M = 20 antithetic logit samples, summed over pixels (not
divided by their number). AdamW, lr 1e-4, weight decay 1e-4, batch 6, 200
epochs of (image, style) pairs = 600 passes over the images (``configs/methods/c_ssn.yaml``).

Sampling: ``style: mix`` gives sample i style i mod A (every style n / A samples), ``style: <int>`` one style
for all (the release samples one given style). The U-Net runs once per image; each style used adds only
1x1 convs: ``nfe(n) = 1``.

What a style means per dataset: see :mod:`amisbench.methods.c_prob_unet`.

Deviations: augmentation is the ISIC3 dataset's default (flips, +-15 deg rotation, scale 0.9-1.1: the
release's ``symmetric_augmentation`` without its small shear and shift); the upsampling interpolates with
``align_corners=False`` (the release: True), through the
suite's U-Net; A = the dataset's reader slots (the release fixes 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from amisbench.api import DataSpec, Method, at_least, check_config
from amisbench.nn import LowRankHead, UNet, UNetConfig, mc_log_likelihood
from amisbench.registry import register_method

from ._style import Style, StyleConditioned, style_maps


@dataclass
class CSSNConfig:
    # models/c_ssn.py builds Unet(num_filters=[32, 64, 128, 192]); models/unet.py: 3 convs, no norm, avg, bilinear
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        widths=(32, 64, 128, 192), convs_per_block=3, norm="none", down="avg", up="bilinear"))
    rank: int = 10  # train_c-ssn.py: --rank 10
    mc_samples: int = 20  # train_c-ssn.py: StochasticSegmentationNetworkLossMCIntegral(num_mc_samples=20)
    eps: float = 2e-5  # models/c_ssn.py: exp(.) + epsilon, then + epsilon again (epsilon = 1e-5)
    per_pixel: bool = False  # divide the loss by the pixels (the release does not)
    style: Style = "mix"  # sampling: uniform mixture of styles, or one style index

    def __post_init__(self) -> None:
        at_least(self, rank=1, mc_samples=1)
        check_config("eps", self.eps > 0, "a positive number", self.eps)
        check_config("mc_samples", self.mc_samples % 2 == 0, "an even number (its samples are antithetic pairs)",
                     self.mc_samples)


@register_method("c_ssn")
class CSSN(StyleConditioned, Method):
    """c-SSN: U-Net features + a 1x1-embedded reader style -> low-rank Gaussian logits (Zepf et al. 2023)."""

    Config = CSSNConfig
    stages = ("main",)

    def __init__(self, cfg: CSSNConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        self._check_style(cfg, spec.readers)
        self.unet = UNet(spec.channels, 0, cfg.unet)
        f = self.unet.features
        self.style_encoder = nn.Conv2d(spec.readers, f, 1)
        self.end_encoder = nn.Conv2d(2 * f, f, 1)
        self.head = LowRankHead(f, cfg.rank, cfg.eps)

    def distribution(self, feats: Tensor, styles: Tensor):
        emb = self.style_encoder(style_maps(styles, self.styles, feats))
        return self.head(self.end_encoder(torch.cat([feats, emb], dim=1)))

    def styled_loss(self, images, styles, y):
        dist = self.distribution(self.unet(images), styles)
        target = y.flatten(1)
        z = dist.rsample(self.cfg.mc_samples, antithetic=True)
        nll = -mc_log_likelihood(z, target).mean()
        loss = nll / target.shape[1] if self.cfg.per_pixel else nll
        return loss, {"nll_per_px": float(nll.detach()) / target.shape[1]}

    def sample_state(self, images):
        return self.unet(images)

    def styled_sample(self, images, feats, styles, n, generator):
        b, _, h, w = images.shape
        z = self.distribution(feats, styles).rsample(n, generator=generator)  # (n,B,D)
        return (z > 0).reshape(n, b, h, w).transpose(0, 1)

    def nfe(self, n: int) -> int:
        return 1
