"""Pieces shared by the diffusion baselines (CCDM, CIMD, Analog Bits): the OpenAI-style denoiser U-Net of
this suite, the linear schedule, the Gaussian skip posterior, the strided sampling grid and the +-1 mask code.

Private module (leading underscore): the registry does not scan it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from amisbench.nn import UNetConfig


def diffusion_unet() -> UNetConfig:
    """The denoiser at paper scale (128 px): CCDM's ``unet_openai`` with base_channels 32, channel_mult
    (1,1,2,3,4), num_res_blocks 2 (-> 4 convs per level and side), attention at the two coarsest levels, group
    norm, SiLU; CIMD and Analog Bits use it too (an assumption: the ATFM paper does not give their networks)."""
    return UNetConfig(widths=(32, 32, 64, 96, 128), convs_per_block=4, norm="group", groups=32, down="conv",
                      up="bilinear", activation="silu", attention_levels=(3, 4), attention_heads=4)


def time_dim(cfg_time_dim: int, unet: UNetConfig) -> int:
    """Width of the time embedding: the configured one, or 4 x the base width (OpenAI's time_embed_dim)."""
    return cfg_time_dim or 4 * unet.widths[0]


def linear_alpha_bar(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """abar_t for t = 0..T (float64), abar_0 = 1, from the linear beta schedule of Ho et al. (2020).

    The betas are scaled by 1000 / T as in improved diffusion, so that other T keep the same endpoints of
    the signal-to-noise ratio.
    """
    scale = 1000.0 / steps
    betas = torch.linspace(beta_start * scale, beta_end * scale, steps, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])


def gaussian_posterior(x0: Tensor, xt: Tensor, abar_t: Tensor, abar_s: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_s | x_t, x_0) for s < t under q(x_t | x_0) = N(sqrt(abar_t) x_0, 1 - abar_t).

    With alpha_{t|s} = abar_t / abar_s and beta_{t|s} = 1 - alpha_{t|s} (Ho et al. 2020, Eq. 7, for a skip
    from t to s):
    mean = sqrt(abar_s) beta_{t|s} / (1 - abar_t) x_0 + sqrt(alpha_{t|s}) (1 - abar_s) / (1 - abar_t) x_t,
    var = (1 - abar_s) / (1 - abar_t) beta_{t|s}.

    Args:
        x0, xt: (N,...) tensors.
        abar_t, abar_s: (N,) float64.

    Returns:
        mean (N,...) and variance (N,1,...,1) in the dtype of ``xt``.
    """
    shape = (-1,) + (1,) * (xt.ndim - 1)
    a_ts = abar_t / abar_s
    b_ts = 1.0 - a_ts
    c0 = (abar_s.sqrt() * b_ts / (1.0 - abar_t)).to(xt.dtype).view(shape)
    ct = (a_ts.sqrt() * (1.0 - abar_s) / (1.0 - abar_t)).to(xt.dtype).view(shape)
    var = ((1.0 - abar_s) / (1.0 - abar_t) * b_ts).to(xt.dtype).view(shape)
    return c0 * x0 + ct * xt, var


def strided_times(steps: int, sample_steps: int) -> list[int]:
    """Decreasing times T = t_0 > ... > t_S = 0 of ``sample_steps`` evenly spaced steps (0 or >= T: all)."""
    if not sample_steps or sample_steps >= steps:
        return list(range(steps, -1, -1))
    grid = {int(math.floor(steps * (1 - i / sample_steps) + 0.5)) for i in range(sample_steps + 1)}
    return sorted(grid, reverse=True)


def mask_to_pm1(y: Tensor) -> Tensor:
    """{0,1} -> {-1,+1} (the analog-bit / CIMD encoding of a binary mask)."""
    return 2.0 * y - 1.0
