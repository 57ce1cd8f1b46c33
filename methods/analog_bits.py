"""Analog Bits: Generating Discrete Data using Diffusion Models with Self-Conditioning (Chen, Zhang & Hinton,
ICLR 2023), applied to segmentation masks as in the ATFM paper's tables.

Model. The binary mask is one analog bit per pixel, x_0 = ``bit_scale`` * (2 y - 1) in {-1, +1}. Continuous-time
Gaussian diffusion x_t = sqrt(gamma(t)) x_0 + sqrt(1 - gamma(t)) eps, t ~ U(0, 1), with the cosine schedule
gamma(t) = cos(pi t / 2)^2 (the paper's default). A time-conditioned U-Net on [x_t, previous x_0 estimate,
image] predicts x_0 and is trained with the MSE to x_0 (the paper's Algorithm 1).

Self-conditioning (paper Sec. 3): in training, with probability ``self_cond_prob`` (0.5) per batch, a first
pass with a zero estimate gives x_0 estimate, which is detached and fed to the second pass whose output is
trained; otherwise the estimate slot is zero. In sampling every step feeds the previous step's estimate.

Sampling (paper Algorithm 2): ``sample_steps`` steps from t = 1 to 0, x_1 ~ N(0, I), DDIM updates (or
ancestral DDPM updates, ``sampler: ddpm``) with the optional asymmetric time difference ``time_difference``
(paper Sec. 3, "asymmetric time intervals"; 0 = off), threshold of the last estimate at 0.
``nfe(n) = n * sample_steps`` (Table 3: 250 steps).

Deviations: the suite's U-Net (no OpenAI U-Net); the image is concatenated to the input (conditional
generation, as the ATFM authors ran AB for segmentation -- their configuration is not published).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from amisbench.api import DataSpec, Method, at_least, check_config
from amisbench.nn import UNet, UNetConfig
from amisbench.registry import register_method

from ._blocks import check_chunk, pick_reader, sample_in_chunks
from ._diffusion import diffusion_unet, gaussian_posterior, mask_to_pm1, time_dim


@dataclass
class AnalogBitsConfig:
    # Paper scale: the suite's OpenAI-style diffusion U-Net at 128 px (the one used for CCDM) -- an assumption,
    # the ATFM paper does not give the network it ran AB with.
    unet: UNetConfig = field(default_factory=diffusion_unet)
    time_dim: int = 0  # 0: 4 x base width
    bit_scale: float = 1.0  # analog bits scaled to {-b, +b} (paper: input scaling factor)
    self_cond_prob: float = 0.5  # paper Algorithm 1: self-condition half of the time
    sample_steps: int = 250  # Table 3: T = 250
    sampler: Literal["ddim", "ddpm"] = "ddim"
    time_difference: float = 0.0  # asymmetric time intervals (paper Sec. 3); 0: symmetric
    clip_x0: bool = False  # clip the x_0 estimate to [-b, b] while sampling (not in the paper's algorithm)
    time_scale: float = 1000.0  # t in [0, 1] is embedded as t * time_scale (sinusoidal features)
    sample_chunk: int = 256  # most (image, sample) chains per network batch (0: all at once); memory only

    def __post_init__(self) -> None:
        check_chunk(self.sample_chunk)
        at_least(self, sample_steps=1)
        check_config("self_cond_prob", 0.0 <= self.self_cond_prob <= 1.0, "a probability in [0, 1]",
                     self.self_cond_prob)
        check_config("bit_scale", self.bit_scale > 0, "a positive number", self.bit_scale)


def gamma_cosine(t: Tensor) -> Tensor:
    """gamma(t) = cos(pi t / 2)^2, clipped to [0, 1] (signal fraction at continuous time t in [0, 1])."""
    return torch.cos(t * (math.pi / 2)).square().clamp(0.0, 1.0)


@register_method("analog_bits")
class AnalogBits(Method):
    """Analog Bits: continuous Gaussian diffusion on +-1 mask bits with self-conditioning (Chen et al. 2023)."""

    Config = AnalogBitsConfig
    stages = ("main",)

    def __init__(self, cfg: AnalogBitsConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        self.net = UNet(2 + spec.channels, 1, cfg.unet, time_dim=time_dim(cfg.time_dim, cfg.unet))

    def predict_x0(self, xt: Tensor, x0_prev: Tensor | None, images: Tensor, t: Tensor) -> Tensor:
        """x_0 estimate from (x_t, previous estimate or None = zeros, image, t in [0, 1]): (N,1,H,W)."""
        if x0_prev is None:
            x0_prev = torch.zeros_like(xt)
        return self.net(torch.cat([xt, x0_prev, images], dim=1), t.to(xt.dtype) * self.cfg.time_scale)

    def loss(self, stage, images, masks):
        y = pick_reader(masks)[:, None]
        x0 = self.cfg.bit_scale * mask_to_pm1(y)
        b = y.shape[0]
        t = torch.rand(b, device=images.device, dtype=images.dtype)
        g = gamma_cosine(t).view(-1, 1, 1, 1)
        xt = g.sqrt() * x0 + (1 - g).sqrt() * torch.randn_like(x0)
        prev = None
        used = bool(torch.rand(()) < self.cfg.self_cond_prob)
        if used:
            with torch.no_grad():
                prev = self.predict_x0(xt, None, images, t).detach()
        pred = self.predict_x0(xt, prev, images, t)
        loss = F.mse_loss(pred, x0)
        return loss, {"mse": float(loss.detach()), "self_cond": float(used)}

    def _times(self) -> list[tuple[float, float]]:
        """(t_now, t_next) pairs of the sampler, ending with the first pair that reaches t = 0 (with a time
        difference > 0 that happens before ``sample_steps`` pairs)."""
        s = self.cfg.sample_steps
        td = self.cfg.time_difference
        out = []
        for i in range(s):
            out.append((1.0 - i / s, max(1.0 - (i + 1 + td) / s, 0.0)))
            if out[-1][1] <= 0.0:
                break
        return out

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        b, _, h, w = images.shape
        dev, dt = images.device, images.dtype
        bs = self.cfg.bit_scale

        def draw(owner: Tensor) -> Tensor:
            m, img = len(owner), images[owner]
            x = torch.randn((m, 1, h, w), generator=generator, device=dev, dtype=dt)
            x0 = torch.zeros_like(x)
            for t_now, t_next in self._times():
                tt = torch.full((m,), t_now, device=dev, dtype=dt)
                x0 = self.predict_x0(x, x0, img, tt)
                if self.cfg.clip_x0:
                    x0 = x0.clamp(-bs, bs)
                g_now = gamma_cosine(torch.tensor(t_now, dtype=torch.float64))
                g_next = gamma_cosine(torch.tensor(t_next, dtype=torch.float64))
                if t_next <= 0.0:
                    x = x0
                    break
                eps = (x - g_now.sqrt().item() * x0) / max(math.sqrt(1.0 - g_now.item()), 1e-8)
                if self.cfg.sampler == "ddim":
                    x = g_next.sqrt().item() * x0 + math.sqrt(1.0 - g_next.item()) * eps
                else:  # ancestral step: the Gaussian posterior q(x_next | x_now, x_0)
                    ab_t = g_now.expand(m).to(dev)
                    ab_s = g_next.expand(m).to(dev)
                    mean, var = gaussian_posterior(x0, x, ab_t.clamp_min(1e-12), ab_s)
                    x = mean + var.sqrt() * torch.randn((m, 1, h, w), generator=generator, device=dev, dtype=dt)
            return x0[:, 0] > 0

        return sample_in_chunks(images, n, self.cfg.sample_chunk, draw)

    def nfe(self, n: int) -> int:
        return n * len(self._times())  # one network evaluation per (t_now, t_next) pair
