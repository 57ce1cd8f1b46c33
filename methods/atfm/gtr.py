"""Gaussian Truncation Representation (GTR): the truncation distribution of ATFM.

A U-Net backbone f_theta feeds 1x1 convolutions g_phi, h_psi that give an explicit Gaussian over the
per-pixel logits (paper Eq. 4), ``X_Ttrunc ~ N(mu, P P^T + diag(d))`` with P of rank 10 and
d = exp(.) + eps (Theorem 1's ``Sigma = D D^T + L``). It is trained with L_Prior (paper Eq. 5) on one
reader drawn at random per image per step.

Backbone as released (``models/GTR.py`` + ``models/unet.py`` of PerceptionComputingLab/ATFM at eeaa1b4,
the Prob. U-Net PyTorch U-Net): widths 32/64/128/192, blocks of three 3x3 conv + ReLU without
normalisation, AvgPool2d(2, ceil_mode=True) down, bilinear x2 up with ``align_corners=True``, 32 output
channels at full resolution; three 1x1 heads (mean, log diagonal, rank-10 factor); eps = 1e-5 added to
the diagonal twice, as the release does (``eps_twice``). 2,260,524 parameters for one input channel,
2,261,100 for RGB. The backbone is the suite's :class:`~amisbench.nn.UNet` configured so; the head is the
low-rank head SSN also uses.

L_Prior: the paper writes the Monte Carlo estimate of ``-log int p(Y|X) p(X|image) dX`` as the mean of
per-sample negative log-likelihoods (Eq. 5, second line); the released code, like SSN, uses the
log-mean-exp ``-log (1/M) sum_j p(Y | X_j)``, which is the consistent estimator of the first line. The
default is the log-mean-exp (``likelihood: logmeanexp``); ``likelihood: mean_nll`` gives the literal
Eq. 5. M = 20 samples, drawn antithetically (10 and their mirror images about the mean), as in SSN and the
release. The loss is divided by the number of pixels so that learning rates carry across image sizes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from amisbench.nn import LowRankGaussian, LowRankHead, UNet, UNetConfig, mc_log_likelihood


def release_backbone(widths: tuple[int, ...] = (32, 64, 128, 192)) -> UNetConfig:
    """The GTR release's U-Net as a :class:`UNetConfig` (3 conv + ReLU, no norm, avg-pool, bilinear corners)."""
    return UNetConfig(widths=tuple(widths), convs_per_block=3, norm="none", down="avg", up="bilinear",
                      align_corners=True, activation="relu")


class GTR(nn.Module):
    """U-Net + low-rank Gaussian head over the logit map.

    Args:
        in_channels: image channels C.
        unet: backbone architecture.
        rank: rank r of the covariance factor P.
        eps: floor added to the diagonal d = exp(.) + eps.
        channels_last: NHWC weights and activations (the same model; faster convolutions).
        eps_twice: add eps a second time (the release).
    """

    def __init__(self, in_channels: int, unet: UNetConfig, rank: int = 10, eps: float = 1e-5,
                 channels_last: bool = False, eps_twice: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.unet = UNet(in_channels, 0, unet)
        self.head = LowRankHead(self.unet.features, rank, eps, eps_twice=eps_twice)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> LowRankGaussian:
        """(B,C,H,W) float -> the Gaussian over the B x (H*W) logits."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.unet(images))

    def gaussian(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean, cov_diag, cov_factor)`` of shapes (B,H*W), (B,H*W), (B,H*W,rank), the release's tensors."""
        d = self(images)
        return d.mean, d.cov_diag, d.cov_factor

    def prior_loss(self, images: Tensor, target: Tensor, *, mc_samples: int = 20, antithetic: bool = True,
                   likelihood: Literal["logmeanexp", "mean_nll"] = "logmeanexp") -> Tensor:
        """L_Prior per pixel, averaged over the batch.

        Args:
            images: (B,C,H,W) float.
            target: (B,H,W) one reader's mask in {0,1}.
            mc_samples: M, the Monte Carlo samples per image.
            antithetic: draw M/2 samples and their mirror images about the mean.
            likelihood: ``logmeanexp`` (release, SSN) or ``mean_nll`` (the paper's literal Eq. 5).

        Returns:
            scalar loss.
        """
        dist = self(images)
        y = target.flatten(1)
        z = dist.rsample(mc_samples, antithetic=antithetic)  # (M,B,D), global RNG
        ll = mc_log_likelihood(z, y, likelihood)  # (B,)
        return -ll.mean() / y.shape[1]
