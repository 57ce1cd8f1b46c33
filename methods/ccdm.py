"""CCDM: Stochastic Segmentation with Conditional Categorical Diffusion Models (Zbinden et al., ICCV 2023).

Original code: github.com/LarsDoorenbos/ccdm-stochastic-segmentation (``ddpm/models/diffusion_denoising.py``,
``ddpm/trainer.py``, ``params.yml``).

Forward process on the one-hot mask x (K = 2 classes), multinomial diffusion (Hoogeboom et al. 2021):
q(x_t | x_0) = Cat(abar_t x_0 + (1 - abar_t) / K), abar on the cosine schedule (Nichol & Dhariwal 2021,
s = 0.008), T = 250 steps, reaching the uniform distribution at t = T. The network (a time-conditioned U-Net
on the concatenation [x_t, image], softmax output) predicts the clean mask p(x_0 | x_t, image). The reverse
step is the forward posterior averaged over that prediction,
p(x_{t-1} | x_t) = sum_c p(x_0 = c | x_t) q(x_{t-1} | x_t, x_0 = c), with
q(x_{t-1} | x_t, x_0) proportional to (alpha_t x_t + (1 - alpha_t) / K) * (abar_{t-1} x_0 + (1 - abar_{t-1}) / K).
Training minimises KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) at a uniformly drawn t in 1..T, summed over
pixels and averaged over the batch (at t = 1 this is the cross-entropy of the x_0 prediction). Sampling starts
from uniform noise and draws T - 1 ancestral steps; the last step (t = 1 -> 0) is the release's
``evaluation_vote_strategy`` (``ddpm/models/diffusion_denoising.py``, ``params_eval.yml``): ``confidence``
keeps the class probabilities p(x_0 | x_1) (``prob_sample``), ``majority`` their one-hot argmax
(``max_prob_sample``), ``sample`` a draw. With ``votes`` = V > 1 chains per returned sample
(``evaluation/eval_cdm.py`` ``predict_multiple``), ``confidence`` averages the V probability maps and
``majority`` counts the V one-hot votes before the argmax (:func:`vote`); with one chain, ``confidence`` and
``majority`` give the same mask, since the release's evaluation takes the argmax of what the chain returns.
One reader per image per training step.

Network: the release's OpenAI U-Net (:class:`amisbench.nn.openai_unet.OpenAIUNet`, the layout of
``ddpm/models/unet_openai/unet.py``): base width 32 (params.yml ``unet_openai.base_channels``), multipliers
(1, 1, 2, 3, 4) (``unet_openai/__init__.py`` default at 128 px), two residual blocks per level
(``builder.py``: ``num_res_blocks=2``), attention at downsampling rates 8 and 16 of [32, 16, 8]
(``attention_resolutions``) with 32 channels per head, group norm (32 groups), SiLU; 5,699,138 parameters at
128x128x1 as released.

Deviations: (1) the release's cosine schedule indexes ``cumalphas`` one step off its ``betas`` and never
reaches exactly uniform noise; we use the consistent abar_t = f(t/T) / f(0), abar_T = 0, alpha_t =
abar_t / abar_{t-1}. (2) The loss is divided by the number of pixels (learning rates transfer across sizes).
(3) ``sample_steps < steps`` (off by default) samples on a strided grid with the exact skip posterior
q(x_s | x_t, x_0); the ``quick`` profile instead trains and samples a short chain (``steps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from amisbench.api import DataSpec, Method, at_least, check_config
from amisbench.nn.openai_unet import OpenAIUNet, OpenAIUNetConfig
from amisbench.registry import register_method

from ._blocks import check_chunk, chunks, one_hot, pick_reader, sample_one_hot
from ._diffusion import strided_times


@dataclass
class CCDMConfig:
    # ddpm/models/unet_openai/__init__.py at 128 px: base_channels 32 (params.yml), channel_mult (1,1,2,3,4),
    # num_res_blocks 2 (ddpm/models/builder.py), attention_resolutions [32,16,8], num_head_channels 32
    net: OpenAIUNetConfig = field(default_factory=OpenAIUNetConfig)
    steps: int = 250  # T (params.yml: time_steps)
    schedule: Literal["cosine"] = "cosine"  # params.yml: beta_schedule
    cosine_s: float = 0.008  # params.yml: beta_schedule_params.s
    sample_steps: int = 0  # 0: all T ancestral steps; fewer: strided grid with the exact skip posterior
    classes: int = 2
    # params_eval.yml evaluation_vote_strategy: "confidence"; "majority" = max_prob_sample; "sample" = a draw
    last_step: Literal["confidence", "majority", "sample"] = "confidence"
    votes: int = 1  # chains per returned sample, combined by last_step (eval_cdm.py predict_multiple, evaluations)
    sample_chunk: int = 256  # most (image, sample) chains per network batch (0: all at once); memory only
    channels_last: bool = False  # NHWC layout (speed only)

    def __post_init__(self) -> None:
        check_chunk(self.sample_chunk)
        at_least(self, steps=1, votes=1, sample_steps=0, classes=2)
        check_config("votes", self.last_step != "sample" or self.votes == 1,
                     "1 with last_step sample (more votes need last_step confidence or majority)", self.votes)


def cosine_alpha_bar(steps: int, s: float = 0.008) -> Tensor:
    """abar_t for t = 0..T (float64): f(t/T) / f(0), f(u) = cos((u + s) / (1 + s) * pi / 2)^2; abar_T = 0."""
    u = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((u + s) / (1 + s) * (math.pi / 2)) ** 2
    ab = (f / f[0]).clamp(0.0, 1.0)
    return torch.cat([ab[:-1], torch.zeros(1, dtype=torch.float64)])


def q_xt_given_x0(x0: Tensor, abar_t: Tensor) -> Tensor:
    """Probabilities of q(x_t | x_0): abar_t x_0 + (1 - abar_t) / K. x0 (N,K,H,W), abar_t (N,) -> (N,K,H,W)."""
    a = abar_t.to(x0.dtype)[:, None, None, None]
    return a * x0 + (1 - a) / x0.shape[1]


def q_posterior(xt: Tensor, x0: Tensor, abar_t: Tensor, abar_s: Tensor) -> Tensor:
    """q(x_s | x_t, x_0) for s < t, with x_0 one-hot (N,K,H,W); abar_t, abar_s (N,) float64.

    Proportional to (abar_{t|s} x_t + (1 - abar_{t|s}) / K) * (abar_s x_0 + (1 - abar_s) / K), where
    abar_{t|s} = abar_t / abar_s (for s = t - 1 this is alpha_t).
    """
    k = xt.shape[1]
    ratio = (abar_t / abar_s).to(xt.dtype)[:, None, None, None]
    a = ratio * xt + (1 - ratio) / k
    b = q_xt_given_x0(x0, abar_s)
    theta = a * b
    return theta / theta.sum(1, keepdim=True)


def p_posterior(xt: Tensor, p0: Tensor, abar_t: Tensor, abar_s: Tensor) -> Tensor:
    """sum_c p0_c q(x_s | x_t, x_0 = c): the reverse step for a predicted distribution p0 (N,K,H,W) over x_0."""
    k = xt.shape[1]
    ratio = (abar_t / abar_s).to(xt.dtype)[:, None, None, None, None]
    a = ratio * xt[:, None] + (1 - ratio) / k  # (N,1,K,H,W): q(x_t | x_s = k)
    ab = abar_s.to(xt.dtype)[:, None, None, None, None]
    eye = torch.eye(k, device=xt.device, dtype=xt.dtype)[None, :, :, None, None]  # (1,C,K,1,1): x_0 = c
    theta = a * (ab * eye + (1 - ab) / k)  # (N,C,K,H,W)
    theta = theta / theta.sum(2, keepdim=True)
    return torch.einsum("nckhw,nchw->nkhw", theta, p0)


def vote(probs: Tensor, strategy: str) -> Tensor:
    """Combine the last-step class probabilities of V chains into one label map per sample.

    Args:
        probs: (N,V,K,H,W) p(x_0 | x_1) of each chain.
        strategy: ``confidence``: argmax of the mean probability over the V chains (eval_cdm.py
            ``predict_multiple``: sum of prediction / V, then argmax); ``majority``: argmax of the count of the
            chains' own argmax classes (ties to the lower class).

    Returns:
        (N,H,W) long labels.
    """
    k = probs.shape[2]
    if strategy == "confidence":
        return probs.mean(1).argmax(1)
    if strategy == "majority":
        return one_hot(probs.argmax(2).flatten(0, 1), k, probs.dtype).unflatten(0, probs.shape[:2]).sum(1).argmax(1)
    raise ValueError(f"unknown vote strategy {strategy!r}; known: confidence, majority")


@register_method("ccdm")
class CCDM(Method):
    """CCDM: conditional categorical (multinomial) diffusion on the one-hot mask (Zbinden et al. 2023)."""

    Config = CCDMConfig
    stages = ("main",)

    def __init__(self, cfg: CCDMConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        self.net = OpenAIUNet(cfg.classes + spec.channels, cfg.classes, cfg.net)
        if cfg.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.register_buffer("abar", cosine_alpha_bar(cfg.steps, cfg.cosine_s), persistent=False)

    def predict_x0(self, xt: Tensor, images: Tensor, t: Tensor) -> Tensor:
        """p(x_0 | x_t, image): (N,K,H,W) probabilities."""
        x = torch.cat([xt, images], dim=1)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.net(x, t.to(x.dtype)), dim=1)

    def loss(self, stage, images, masks):
        y = pick_reader(masks)
        x0 = one_hot(y, self.cfg.classes, images.dtype)
        b, hw = y.shape[0], y.shape[1] * y.shape[2]
        t = torch.randint(1, self.cfg.steps + 1, (b,), device=images.device)
        ab_t, ab_s = self.abar[t], self.abar[t - 1]
        xt = sample_one_hot(q_xt_given_x0(x0, ab_t))
        p0 = self.predict_x0(xt, images, t)
        q = q_posterior(xt, x0, ab_t, ab_s)
        p = p_posterior(xt, p0, ab_t, ab_s)
        kl = torch.xlogy(q, q) - q * torch.log(p.clamp_min(1e-12))
        loss = kl.sum() / (b * hw)
        return loss, {"kl_per_px": float(loss.detach())}

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        b, _, h, w = images.shape
        k, v = self.cfg.classes, self.cfg.votes
        grid = strided_times(self.cfg.steps, self.cfg.sample_steps)
        out = torch.empty((b, n, h, w), dtype=torch.bool, device=images.device)
        flat = out.view(b * n, h, w)
        per = max(1, self.cfg.sample_chunk // v) if self.cfg.sample_chunk else b * n
        for s0, s1 in chunks(b * n, per):
            owner = (torch.arange(s0, s1, device=images.device) // n).repeat_interleave(v)  # v chains each
            img = images[owner]
            m = owner.shape[0]
            x = sample_one_hot(torch.full((m, k, h, w), 1.0 / k, device=images.device, dtype=images.dtype),
                               generator)
            for t, s in zip(grid[:-1], grid[1:]):
                tt = torch.full((m,), t, device=images.device)
                ss = torch.full((m,), s, device=images.device)
                probs = p_posterior(x, self.predict_x0(x, img, tt), self.abar[tt], self.abar[ss])
                if s == 0 and self.cfg.last_step != "sample":
                    x = probs
                else:
                    x = sample_one_hot(probs.clamp_min(0), generator)
            if self.cfg.last_step == "sample":
                flat[s0:s1] = x.argmax(1) == 1
            else:
                flat[s0:s1] = vote(x.unflatten(0, (s1 - s0, v)), self.cfg.last_step) == 1
        return out

    def nfe(self, n: int) -> int:
        return n * self.cfg.votes * (len(strided_times(self.cfg.steps, self.cfg.sample_steps)) - 1)
