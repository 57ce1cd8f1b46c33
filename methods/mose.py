"""MoSE: Modeling Multimodal Aleatoric Uncertainty in Segmentation with Mixture of Stochastic Experts
(Gao, Chen, Zhang & He, ICLR 2023), as released.

Original code: github.com/gaozhitong/MoSE-AUSeg (``models/MoSE.py``, ``utils/OTloss.py``,
``experiments/lidc_proposed.py``, ``engine.py``, ``models/backbone/``; files cited below are in that repo).

Model (``models/MoSE.py``):

- Backbone: a 7-level U-Net (widths 32/64/128/192/192/192/192, three 3x3 conv + BatchNorm(eps 1e-3,
  momentum 0.01) + ReLU per block, average pooling down, bilinear up), giving the bottleneck ``u_g`` and the
  full-resolution features ``u_d``.
- Experts: K = 4 *image-independent* Gaussians over a latent of dimension 1, learnt parameters ``mu``
  (K, L) (initialised 0, 1, U(0,1), U(0,1): the release's ``mu_init``) and ``log_sigma`` (K, L)
  (initialised log 1/8); sigma = exp(log_sigma) + 1e-8.
- Gate: spatial mean of ``u_g`` -> Linear-ReLU-Linear-ReLU-Linear (no bias) -> softmax: weights pi (B, K).
- Noise injector: (u_d + W_r z + b_r) * (W_s z + b_s + 1e-5), a 1x1 conv to 32 + L channels, then three
  1x1 conv + BatchNorm + ReLU to 32 channels and a 1x1 conv to 2 class logits (softmax).

Training (``utils/OTloss.py``): each image gets S = 4 latent draws per expert, N = K S predictions with
weights pi_k / S. Cost C_ij = 1 - (sum p_i y_j + 1) / (sum p_i + sum y_j - sum p_i y_j + 1) on the
foreground probability (soft IoU, smoothing 1). The coupling P (no gradient) moves each reader's mass 1/M to
the predictions: greedily with a per-prediction capacity gamma (readers in order of their best cost, each to
its cheapest predictions first; ``coupling: greedy``, the release), or as the exact linear programme of
the same constraints (``coupling: exact``). loss = sum_ij P_ij C_ij + beta * KL(P 1 || pi / S) with the KL
of ``F.kl_div`` (mean over the B N entries), gamma0 = 1/2, beta = 1 (``experiments/lidc_proposed.py``).
gamma switches to 1 (every reader to its nearest prediction) once the cumulative mean training loss has
not improved for more than ``gamma_patience`` epochs (the release's ``m_scheduler``); an epoch is
``gamma_epoch_steps`` optimiser steps here (0: gamma stays gamma0), since a method does not see epochs.

Sampling: n samples per image; the expert of each sample is drawn from the gate pi (``eval_weights:
gate``, the release's ``get_latent_codes_sampling``) or cycles through the experts (``uniform``, option).
:meth:`MoSE.weighted_samples` gives the release's weighted set (K S samples with weights pi_k / S).

Deviations: the release evaluates (and keeps the best-validation-GED checkpoint) on its weighted set; the
suite scores n unweighted samples (and selects its best-validation-GED checkpoint on those). The training
protocol is the runner's, set in ``configs/methods/mose.yaml``: Adam with weight decay 1e-5, the release's
ReduceLROnPlateau (factor 1/2, patience 10 epochs, min 1e-5) on the cumulative mean training loss
(``plateau_metric: train_loss_cumulative``), flip / rotate augmentation, best-validation-GED checkpoint.
Reproducing the release's initialisation: the backbone's He-normal weights use normal, not truncated
normal, biases (std 0.001).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amisbench.api import DataSpec, Method, at_least, check_config
from amisbench.errors import UserError
from amisbench.nn import UNet, UNetConfig
from amisbench.registry import register_method

from ._blocks import check_chunk, chunks, he_init


@dataclass
class MoSEConfig:
    # lidc_proposed.py: num_filters=[32, 64, 128, 192, 192, 192, 192]; backbone/unet.py: 3 convs + BN per block
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        widths=(32, 64, 128, 192, 192, 192, 192), convs_per_block=3, norm="batch", down="avg", up="bilinear"))
    experts: int = 4  # lidc_proposed.py: num_expert = 4
    latent_dim: int = 1  # lidc_proposed.py: latent_dim = 1
    samples_per_expert: int = 4  # lidc_proposed.py: sample_per_mode = 4
    fcomb_depth: int = 3  # MoSE.py: Conv2DSequence(..., kernel=1, depth=3)
    gamma0: float = 0.5  # lidc_proposed.py: OT_loss(gamma0=1/2)
    beta: float = 1.0  # lidc_proposed.py: OT_loss(beta=1)
    gamma_after: float = 1.0  # lidc_proposed.py: gamma_scheduler_options updated_values [1]
    gamma_patience: int = 10  # lidc_proposed.py: gamma_scheduler_options patience 10 (epochs)
    gamma_epoch_steps: int = 0  # optimiser steps per epoch for the gamma switch (0: gamma stays gamma0)
    coupling: Literal["greedy", "exact"] = "greedy"
    iou_eps: float = 1.0  # OTloss.py: (intersection + 1) / (union + 1)
    eval_weights: Literal["gate", "uniform"] = "gate"
    sample_chunk: int = 256  # most (image, sample) pairs per injector batch (0: all at once); memory only

    def __post_init__(self) -> None:
        check_chunk(self.sample_chunk)
        at_least(self, experts=1, latent_dim=1, samples_per_expert=1, fcomb_depth=1)
        for key in ("gamma0", "gamma_after"):
            check_config(key, 0 < getattr(self, key) <= 1, "a value in (0, 1]", getattr(self, key))


# ---------------------------------------------------------------------------------------------------
# The OT loss
# ---------------------------------------------------------------------------------------------------

def soft_iou_cost(probs: Tensor, masks: Tensor, eps: float = 1.0) -> Tensor:
    """C_ij = 1 - softIoU(p_i, y_j): probs (B,N,H,W), masks (B,A,H,W) -> (B,N,A)."""
    p = probs.flatten(2)
    y = masks.to(p.dtype).flatten(2)
    inter = torch.einsum("bnd,bad->bna", p, y)
    union = p.sum(-1)[:, :, None] + y.sum(-1)[:, None, :] - inter
    return 1.0 - (inter + eps) / (union + eps)


def greedy_coupling(cost: np.ndarray, gamma: float) -> np.ndarray:
    """The release's coupling of one image: cost (N,M) -> plan (N,M), column sums 1/M, row sums <= gamma.

    gamma >= 1: each reader's mass to its cheapest prediction. Otherwise readers in increasing order of their
    cheapest cost, each filling its predictions in increasing cost up to the capacity gamma of a prediction.
    """
    n, m = cost.shape
    plan = np.zeros((n, m))
    if gamma >= 1:
        plan[cost.argmin(0), np.arange(m)] = 1.0 / m
        return plan
    if gamma * n < 1 - 1e-12:
        raise UserError(f"method.gamma0: {n} predictions of capacity {gamma} cannot take the readers' mass 1")
    left = np.full(m, 1.0 / m)
    for i in np.argsort(cost.min(0), kind="stable"):
        for j in np.argsort(cost[:, i], kind="stable"):
            room = gamma - plan[j].sum()
            if room > 1e-12:
                plan[j, i] = min(room, left[i])
                left[i] -= plan[j, i]
                if left[i] <= 1e-12:
                    break
    return plan


def exact_coupling(cost: np.ndarray, gamma: float) -> np.ndarray:
    """min <P, C> s.t. column sums 1/M, row sums <= gamma, P >= 0 (linear programme, HiGHS)."""
    from scipy.optimize import linprog

    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    res = linprog(cost.reshape(-1), A_ub=rows, b_ub=np.full(n, gamma), A_eq=cols, b_eq=np.full(m, 1.0 / m),
                  bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"MoSE coupling LP failed: {res.message}")
    return res.x.reshape(n, m)


def ot_loss(cost: Tensor, weights: Tensor, gamma: float, beta: float, coupling: str = "greedy"):
    """The release's OT loss of a batch: (seg, kl) with loss = seg + beta * kl.

    Args:
        cost: (B,N,M) costs, differentiable.
        weights: (B,N) prediction weights pi_k / S, differentiable (summing to 1 per image).

    Returns:
        loss, seg = mean_b sum_ij P_ij C_ij, kl = ``F.kl_div(log(w + 1e-8), P 1)`` (mean over B N entries).
    """
    solve = greedy_coupling if coupling == "greedy" else exact_coupling
    c64 = cost.detach().double().cpu().numpy()
    plan = torch.as_tensor(np.stack([solve(c, gamma) for c in c64]), dtype=cost.dtype, device=cost.device)
    seg = (plan * cost).sum((1, 2)).mean()
    kl = F.kl_div(torch.log(weights + 1e-8), plan.sum(-1), reduction="none").mean()  # the release's "mean"
    return seg + beta * kl, seg, kl


# ---------------------------------------------------------------------------------------------------
# MoSE
# ---------------------------------------------------------------------------------------------------

class Gating(nn.Module):
    def __init__(self, width: int, experts: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                nn.Linear(width, experts, bias=False))

    def forward(self, bottleneck: Tensor) -> Tensor:
        return torch.softmax(self.fc(bottleneck.mean(dim=(2, 3))), dim=-1).float()


class NoiseInjector(nn.Module):
    """(u + W_r z) * (W_s z + 1e-5) -> 1x1 conv to ``out`` channels, for latents z (B,m,L) on u (B,F,H,W)."""

    def __init__(self, features: int, latent: int, out: int):
        super().__init__()
        self.residual = nn.Linear(latent, features)
        self.scale = nn.Linear(latent, features)
        self.last_layer = nn.Conv2d(features, out, 1)
        for lin in (self.residual, self.scale):
            if not lin.weight.is_meta:
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, feats: Tensor, z: Tensor) -> Tensor:
        r = self.residual(z)[..., None, None]
        s = self.scale(z)[..., None, None]
        x = ((feats[:, None] + r) * (s + 1e-5)).flatten(0, 1)
        # channels-last: the 1x1 convs and batch norms of many narrow maps run ~3x faster on CPU (same values)
        return self.last_layer(x.contiguous(memory_format=torch.channels_last))


@register_method("mose")
class MoSE(Method):
    """MoSE: K image-independent Gaussian experts + a gate, OT loss with an IoU cost (Gao et al. 2023)."""

    Config = MoSEConfig
    stages = ("main",)

    def __init__(self, cfg: MoSEConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        k, lat = cfg.experts, cfg.latent_dim
        self.mu = nn.Parameter(self._mu_init(k, lat))
        self.log_sigma = nn.Parameter(torch.full((k, lat), math.log(1 / 8)))
        self.backbone = UNet(spec.channels, 0, cfg.unet)
        he_init(self.backbone)
        f = self.backbone.features
        self.gating = Gating(cfg.unet.widths[-1], k)
        self.fuse = NoiseInjector(f, lat, f + lat)
        layers: list[nn.Module] = []
        for i in range(cfg.fcomb_depth):
            layers += [nn.Conv2d(f + lat if i == 0 else f, f, 1), nn.BatchNorm2d(f), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.last_layer = nn.Conv2d(f, 2, 1)
        for m in self.modules():  # backbone/unet.py, model_utils.Conv2D: BatchNorm2d(eps=1e-3, momentum=0.01)
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.01
        self.gamma = cfg.gamma0
        self._plateau = {"sum": 0.0, "count": 0, "best": math.inf, "bad": 0, "switched": False}

    @staticmethod
    def _mu_init(k: int, lat: int) -> Tensor:
        """The release's ``mu_init``: uniform draws, the first 2^L experts set to the corners of {0,1}^L."""
        mu = torch.rand((k, lat))  # global torch RNG: seeded by the runner
        c = min(k, 2 ** lat)
        if not mu.is_meta:
            for i in range(lat):
                mu[:c, i] = torch.tensor(((2 ** (lat - 1 - i) * [0] + 2 ** (lat - 1 - i) * [1]) * 2 ** i)[:c],
                                         dtype=mu.dtype)
        return mu

    # the gamma switch lives in the checkpoint (extra state), so a resumed run switches at the same step
    def get_extra_state(self):
        return {"gamma": self.gamma, **self._plateau}

    def set_extra_state(self, state):
        self.gamma = float(state["gamma"])
        self._plateau = {key: state[key] for key in ("sum", "count", "best", "bad", "switched")}

    def _track_gamma(self, loss: float) -> None:
        """The release's m_scheduler on the cumulative mean training loss, checked once per epoch."""
        st = self._plateau
        st["sum"] += loss
        st["count"] += 1
        e = self.cfg.gamma_epoch_steps
        if not e or st["switched"] or st["count"] % e:
            return
        metric = st["sum"] / st["count"]
        if metric < st["best"]:
            st["best"], st["bad"] = metric, 0
        else:
            st["bad"] += 1
        if st["bad"] > self.cfg.gamma_patience:
            self.gamma = self.cfg.gamma_after
            st["switched"] = True

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Bottleneck (B,F_L,h,w) and full-resolution features (B,F,H,W) of the backbone."""
        seen: list[Tensor] = []
        hook = self.backbone.down_blocks[-1].register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            feats = self.backbone(images)
        finally:
            hook.remove()
        return seen[-1], feats

    def logits(self, feats: Tensor, z: Tensor) -> Tensor:
        """Class logits (B,m,2,H,W) of latents z (B,m,L)."""
        out = self.last_layer(self.layers(self.fuse(feats, z)))
        return out.unflatten(0, z.shape[:2])

    def sigma(self) -> Tensor:
        return self.log_sigma.exp() + 1e-8

    def loss(self, stage, images, masks):
        k, s, lat = self.cfg.experts, self.cfg.samples_per_expert, self.cfg.latent_dim
        b = images.shape[0]
        bottleneck, feats = self.features(images)
        pi = self.gating(bottleneck)
        eps = torch.randn((b, k, s, lat), device=images.device, dtype=feats.dtype)
        z = (self.mu[None, :, None] + self.sigma()[None, :, None] * eps).flatten(1, 2)  # expert-major (B,K*S,L)
        weights = (pi / s).repeat_interleave(s, dim=1)
        probs = torch.softmax(self.logits(feats, z).float(), dim=2)[:, :, 1]
        cost = soft_iou_cost(probs, masks, self.cfg.iou_eps)
        loss, seg, kl = ot_loss(cost, weights, self.gamma, self.cfg.beta, self.cfg.coupling)
        if self.training:
            self._track_gamma(float(loss.detach()))
        ent = -(pi * pi.clamp_min(1e-12).log()).sum(1).mean()
        return loss, {"seg": float(seg.detach()), "kl": float(kl.detach()), "gamma": self.gamma,
                      "gate_entropy": float(ent.detach())}

    def _draw(self, feats: Tensor, experts: Tensor, generator) -> Tensor:
        """Masks (B,n,H,W) bool for expert indices (B,n)."""
        b, n = experts.shape
        eps = torch.randn((b, n, self.cfg.latent_dim), generator=generator, device=feats.device, dtype=feats.dtype)
        z = self.mu[experts].to(feats.dtype) + self.sigma()[experts].to(feats.dtype) * eps
        out = torch.empty((b, n, *feats.shape[-2:]), dtype=torch.bool, device=feats.device)
        per = max(1, self.cfg.sample_chunk // max(1, b)) if self.cfg.sample_chunk else n
        for s0, s1 in chunks(n, per):
            lg = self.logits(feats, z[:, s0:s1])
            out[:, s0:s1] = lg[:, :, 1] > lg[:, :, 0]
        return out

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        b, k = images.shape[0], self.cfg.experts
        bottleneck, feats = self.features(images)
        if self.cfg.eval_weights == "uniform":
            experts = (torch.arange(n, device=images.device) % k)[None].expand(b, -1)
        else:
            pi = self.gating(bottleneck)
            experts = torch.multinomial(pi, n, replacement=True, generator=generator)
        return self._draw(feats, experts.contiguous(), generator)

    @torch.no_grad()
    def weighted_samples(self, images: Tensor, samples_per_expert: int, *,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The release's weighted sample set: masks (B,K*S,H,W) bool and weights (B,K*S) = pi_k / S."""
        b, k, s = images.shape[0], self.cfg.experts, samples_per_expert
        bottleneck, feats = self.features(images)
        pi = self.gating(bottleneck)
        experts = torch.arange(k, device=images.device).repeat_interleave(s)[None].expand(b, -1)
        return self._draw(feats, experts.contiguous(), generator), (pi / s).repeat_interleave(s, dim=1)

    def nfe(self, n: int) -> int:
        return 1  # one backbone pass per image; each sample runs only the injector's 1x1 convs
