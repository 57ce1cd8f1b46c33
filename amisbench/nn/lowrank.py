"""Low-rank Gaussian distribution over per-pixel logits (Monteiro et al., Stochastic Segmentation
Networks, MICCAI 2020) and the Monte Carlo likelihood that SSN and ATFM's GTR train with.

logits z ~ N(mu, P P^T + diag(d)) over the D = H*W pixels of one image, with P of rank r and
d = exp(.) + eps. A single logit per pixel (Bernoulli with sigmoid) is the binary case of the softmax
formulation in the SSN paper.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LowRankGaussian:
    """N(mean, cov_factor cov_factor^T + diag(cov_diag)) batched over images.

    Args:
        mean: (B,D).
        cov_factor: (B,D,r).
        cov_diag: (B,D), positive.
    """

    def __init__(self, mean: Tensor, cov_factor: Tensor, cov_diag: Tensor):
        self.mean = mean
        self.cov_factor = cov_factor
        self.cov_diag = cov_diag

    @property
    def rank(self) -> int:
        return self.cov_factor.shape[-1]

    def rsample(self, m: int, *, generator: torch.Generator | None = None, antithetic: bool = False) -> Tensor:
        """Reparameterised draws (m,B,D). With ``antithetic`` (m even), draws m/2 and their mirror images
        about the mean (2 mu - z), which halves the variance of the Monte Carlo loss (SSN, Sec. 2)."""
        if antithetic and m % 2:
            raise ValueError(f"antithetic sampling needs an even number of samples, got {m}")
        k = m // 2 if antithetic else m
        b, d = self.mean.shape
        dev, dt = self.mean.device, self.mean.dtype
        eps_r = torch.randn((k, b, self.rank), generator=generator, device=dev, dtype=dt)
        eps_d = torch.randn((k, b, d), generator=generator, device=dev, dtype=dt)
        dev_ = torch.einsum("bdr,kbr->kbd", self.cov_factor, eps_r) + self.cov_diag.sqrt() * eps_d
        if antithetic:
            return torch.cat([self.mean + dev_, self.mean - dev_], dim=0)
        return self.mean + dev_

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density of z (...,B,D) -> (...,B), through the Woodbury identity (no dense D x D matrix)."""
        dist = torch.distributions.LowRankMultivariateNormal(self.mean, self.cov_factor, self.cov_diag,
                                                             validate_args=False)
        return dist.log_prob(z)

    def covariance(self) -> Tensor:
        """Dense covariance (B,D,D); for tests on small D only."""
        return self.cov_factor @ self.cov_factor.transpose(-1, -2) + torch.diag_embed(self.cov_diag)


class LowRankHead(nn.Module):
    """1x1 convolutions from U-Net features (B,F,H,W) to a :class:`LowRankGaussian` over (H*W) logits.

    ``cov_diag = exp(log_diag) + eps``; with ``eps_twice`` eps is added a second time to the flattened
    diagonal, as the ATFM release's GTR does (``models/GTR.py``).
    """

    def __init__(self, in_features: int, rank: int = 10, eps: float = 1e-5, *, eps_twice: bool = False):
        super().__init__()
        self.rank = rank
        self.eps = eps
        self.eps_twice = eps_twice
        self.mean = nn.Conv2d(in_features, 1, 1)
        self.log_diag = nn.Conv2d(in_features, 1, 1)
        self.factor = nn.Conv2d(in_features, rank, 1)

    def forward(self, features: Tensor) -> LowRankGaussian:
        mean = self.mean(features).flatten(1)
        cov_diag = self.log_diag(features).exp().flatten(1) + self.eps
        if self.eps_twice:
            cov_diag = cov_diag + self.eps
        cov_factor = self.factor(features).flatten(2).transpose(1, 2)  # (B,D,r)
        return LowRankGaussian(mean, cov_factor, cov_diag)


def mc_log_likelihood(logit_samples: Tensor, target: Tensor,
                      mode: Literal["logmeanexp", "mean_nll"] = "logmeanexp") -> Tensor:
    """Monte Carlo log-likelihood of binary targets under sampled logits, per image.

    ``logmeanexp``: log (1/M) sum_j p(y | z_j) (SSN's loss, Monteiro et al. 2020, Eq. 7).
    ``mean_nll``:   (1/M) sum_j log p(y | z_j) (the ATFM paper's literal Eq. 5).

    Args:
        logit_samples: (M,B,D) logits.
        target: (B,D) in {0,1}.

    Returns:
        (B,) log-likelihood summed over pixels.
    """
    y = target.to(logit_samples.dtype).expand_as(logit_samples)
    ll = -F.binary_cross_entropy_with_logits(logit_samples, y, reduction="none").sum(-1)  # (M,B)
    if mode == "mean_nll":
        return ll.mean(0)
    return torch.logsumexp(ll, dim=0) - math.log(logit_samples.shape[0])
