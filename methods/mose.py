"""MoSE: Modeling Multimodal Aleatoric Uncertainty in Segmentation with Mixture of Stochastic Experts
(Gao, Chen, Zhang & He, ICLR 2023).

Original code: github.com/gaozhitong/MoSE-AUSeg.

Model. A U-Net gives features ``f`` of the image. A prior encoder (Prob. U-Net style: VGG blocks, spatial mean)
gives, for each of K experts (4 in the paper), the mean and standard deviation of a diagonal Gaussian over a
latent z_k, and a gating head gives the expert weights pi = softmax(.) per image. A Prob. U-Net ``f_comb``
(1x1 convs on [f, z tiled]) decodes a latent sample into per-pixel logits. One forward pass draws S samples
per expert: K*S predictions with weights pi_k / S.

Training loss: the optimal-transport distance between the weighted prediction set {(p_i, pi_k(i) / S)} and the
readers {(y_j, 1 / A)} with the IoU-based cost C_ij = 1 - softIoU(p_i, y_j), p_i = sigmoid(logits_i) (the
paper's Eq. 5 with the generalised energy distance's d = 1 - IoU relaxed to probabilities). The plan is
solved on the detached cost, exactly (a small linear programme per image, ``ot_solver: exact``) or by
log-domain Sinkhorn (``ot_solver: sinkhorn``). The gradient flows through the cost (d OT / d C = plan P*)
and through the weights (d OT / d a = the dual potential f*, envelope theorem):
``loss = <P*, C> + <f*, a> - <f*, a>.detach()``, whose value is the OT distance.

Sampling: n samples per image, expert of sample i chosen by ``eval_weights``: ``uniform`` (the default of
the suite's evaluator: expert i mod K, every expert equally often) or ``gate`` (drawn from pi with the
generator). :meth:`MoSE.weighted_samples` returns K*S samples with their weights, as the paper evaluates.

Scale: the OT cost is already per image and in [0, 1], so no division by the number of pixels is needed.

Deviations / assumptions: the suite's U-Net; MoSE's LIDC latent size and S are not given in the ATFM paper:
latent 6 per expert and S = 4 at paper scale are our assumptions (Prob. U-Net's latent, a small sample set).
``eval_weights: uniform`` (default) makes every expert equally frequent in the n samples, as the suite's
evaluator scores unweighted sample sets; the paper's weighted evaluation is :meth:`MoSE.weighted_samples`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amisbench.api import DataSpec, Method
from amisbench.nn import UNet, UNetConfig
from amisbench.registry import register_method

from ._blocks import check_chunk, chunks, he_init
from .prob_unet import AxisAlignedConvGaussian


@dataclass
class MoSEConfig:
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        widths=(32, 64, 128, 192), convs_per_block=3, norm="none", down="avg", up="bilinear"))
    encoder_widths: tuple[int, ...] = ()  # prior encoder; empty: the U-Net's widths
    encoder_convs: int = 3
    experts: int = 4  # K (paper: 4)
    latent_dim: int = 6  # per expert (assumption: Prob. U-Net's latent)
    samples_per_expert: int = 4  # S in training (assumption)
    fcomb_convs: int = 3
    ot_solver: Literal["exact", "sinkhorn"] = "exact"
    sinkhorn_eps: float = 0.01
    sinkhorn_iters: int = 100
    iou_eps: float = 1.0  # smoothing of the soft IoU (two empty masks: IoU 1)
    eval_weights: Literal["uniform", "gate"] = "uniform"
    sample_chunk: int = 1024  # most (image, sample) pairs per f_comb batch (0: all at once); memory only


# ---------------------------------------------------------------------------------------------------
# Optimal transport between weighted sets
# ---------------------------------------------------------------------------------------------------

def soft_iou_cost(probs: Tensor, masks: Tensor, eps: float = 1.0) -> Tensor:
    """C_ij = 1 - softIoU(p_i, y_j): probs (B,N,H,W), masks (B,A,H,W) -> (B,N,A)."""
    p = probs.flatten(2)
    y = masks.to(p.dtype).flatten(2)
    inter = torch.einsum("bnd,bad->bna", p, y)
    union = p.sum(-1)[:, :, None] + y.sum(-1)[:, None, :] - inter
    return 1.0 - (inter + eps) / (union + eps)


def ot_exact(cost: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact optimal transport of one image: plan (N,A) and the source dual potential f (N,).

    Solves min <P, C> s.t. P 1 = a, P^T 1 = b, P >= 0 as a linear programme (HiGHS). f is the marginal of
    the row constraints, the derivative of the optimal value with respect to a.
    """
    from scipy.optimize import linprog

    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    a_eq = np.vstack([rows, cols])
    b_eq = np.concatenate([a, b])
    # the constraints are redundant by one (sum a = sum b): rescale b to the exact sum of a
    b_eq[n:] *= a.sum() / b.sum()
    res = linprog(cost.reshape(-1), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"optimal transport LP failed: {res.message}")
    return res.x.reshape(n, m), np.asarray(res.eqlin.marginals[:n])


def ot_sinkhorn(cost: Tensor, a: Tensor, b: Tensor, eps: float, iters: int) -> tuple[Tensor, Tensor]:
    """Entropic OT (log domain), batched: cost (B,N,A), a (B,N), b (B,A) -> plan (B,N,A), potential f (B,N)."""
    la, lb = a.clamp_min(1e-30).log(), b.clamp_min(1e-30).log()
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for _ in range(iters):
        f = -eps * torch.logsumexp((g[:, None, :] - cost) / eps + lb[:, None, :], dim=2)
        g = -eps * torch.logsumexp((f[:, :, None] - cost) / eps + la[:, :, None], dim=1)
    plan = torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps + la[:, :, None] + lb[:, None, :])
    return plan, f


def ot_loss(cost: Tensor, a: Tensor, b: Tensor, solver: str = "exact", eps: float = 0.01,
            iters: int = 100) -> Tensor:
    """Optimal-transport distance per image, differentiable in ``cost`` and the source weights ``a``.

    Args:
        cost: (B,N,A) transport costs.
        a: (B,N) source weights (summing to 1 per image).
        b: (B,A) target weights (summing to 1 per image).

    Returns:
        (B,) OT values; gradients: d/dC = optimal plan, d/da = dual potential (both from the detached problem).
    """
    with torch.no_grad():
        if solver == "exact":
            c64 = cost.detach().double().cpu().numpy()
            a64 = a.detach().double().cpu().numpy()
            b64 = b.detach().double().cpu().numpy()
            plans, pots = zip(*(ot_exact(c64[i], a64[i], b64[i]) for i in range(cost.shape[0])))
            plan = torch.as_tensor(np.stack(plans), dtype=cost.dtype, device=cost.device)
            f = torch.as_tensor(np.stack(pots), dtype=cost.dtype, device=cost.device)
        else:
            plan, f = ot_sinkhorn(cost.detach(), a.detach(), b.detach(), eps, iters)
        f = f - f.mean(1, keepdim=True)  # potentials are defined up to a constant; a sums to 1 anyway
    wa = (f * a).sum(1)
    return (plan * cost).sum((1, 2)) + wa - wa.detach()


# ---------------------------------------------------------------------------------------------------
# MoSE
# ---------------------------------------------------------------------------------------------------

@register_method("mose")
class MoSE(Method):
    """MoSE: K Gaussian-latent experts + a gate, trained with an IoU-cost optimal-transport loss (Gao et al. 2023)."""

    Config = MoSEConfig
    stages = ("main",)

    def __init__(self, cfg: MoSEConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        check_chunk(cfg.sample_chunk)
        if cfg.experts < 1 or cfg.latent_dim < 1 or cfg.samples_per_expert < 1 or cfg.fcomb_convs < 1:
            raise ValueError("experts, latent_dim, samples_per_expert and fcomb_convs must be at least 1")
        enc = tuple(cfg.encoder_widths) or tuple(cfg.unet.widths)
        self.unet = UNet(spec.channels, 0, cfg.unet)
        self.prior = AxisAlignedConvGaussian(spec.channels, enc, cfg.encoder_convs, cfg.experts * cfg.latent_dim)
        self.gate = nn.Conv2d(enc[-1], cfg.experts, 1)
        f = self.unet.features
        convs: list[nn.Module] = [nn.Conv2d(f + cfg.latent_dim, f, 1)]
        convs += [nn.Conv2d(f, f, 1) for _ in range(cfg.fcomb_convs - 1)]
        self.fcomb = nn.ModuleList(convs)
        self.logits = nn.Conv2d(f, 1, 1)
        he_init(self)

    def experts_of(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-expert latent Gaussians and gate: mu, sigma (B,K,L) and weights pi (B,K)."""
        h = self.prior.encoder(images).mean(dim=(2, 3), keepdim=True)
        mu, log_sigma = self.prior.head(h).flatten(1).split(self.prior.latent, dim=1)
        k, l = self.cfg.experts, self.cfg.latent_dim
        pi = torch.softmax(self.gate(h).flatten(1), dim=1)
        return mu.view(-1, k, l), log_sigma.exp().view(-1, k, l), pi

    def combine(self, feats: Tensor, z: Tensor) -> Tensor:
        """Logits (B,m,H,W) of latents z (B,m,L) on U-Net features (B,F,H,W) (first 1x1 conv split)."""
        f = feats.shape[1]
        first = self.fcomb[0]
        base = F.conv2d(feats, first.weight[:, :f], first.bias)
        shift = z @ first.weight[:, f:, 0, 0].T
        b, m = z.shape[:2]
        h = F.relu(base[:, None] + shift[..., None, None]).flatten(0, 1)
        for conv in self.fcomb[1:]:
            h = F.relu(conv(h))
        return self.logits(h)[:, 0].unflatten(0, (b, m))

    def loss(self, stage, images, masks):
        k, s = self.cfg.experts, self.cfg.samples_per_expert
        mu, sigma, pi = self.experts_of(images)
        b = images.shape[0]
        z = mu[:, :, None] + sigma[:, :, None] * torch.randn((b, k, s, mu.shape[-1]), device=mu.device, dtype=mu.dtype)
        probs = torch.sigmoid(self.combine(self.unet(images), z.flatten(1, 2)))  # (B,K*S,H,W)
        cost = soft_iou_cost(probs, masks, self.cfg.iou_eps)
        a = (pi / s).repeat_interleave(s, dim=1)  # expert-major order, as z.flatten(1, 2)
        bw = torch.full((b, masks.shape[1]), 1.0 / masks.shape[1], device=masks.device, dtype=cost.dtype)
        ot = ot_loss(cost, a, bw, self.cfg.ot_solver, self.cfg.sinkhorn_eps, self.cfg.sinkhorn_iters)
        loss = ot.mean()
        ent = -(pi * pi.clamp_min(1e-12).log()).sum(1).mean()
        return loss, {"ot": float(loss.detach()), "gate_entropy": float(ent.detach())}

    def _draw(self, images: Tensor, gaussians: tuple[Tensor, Tensor], experts: Tensor, generator) -> Tensor:
        """Masks (B,n,H,W) bool for expert indices (B,n), given the experts' (mu, sigma) of :meth:`experts_of`."""
        b, n = experts.shape
        h, w = images.shape[-2:]
        feats = self.unet(images)
        mu, sigma = gaussians
        eps = torch.randn((b, n, self.cfg.latent_dim), generator=generator, device=images.device, dtype=mu.dtype)
        idx = experts[..., None].expand(-1, -1, self.cfg.latent_dim)
        z = mu.gather(1, idx) + sigma.gather(1, idx) * eps
        out = torch.empty((b, n, h, w), dtype=torch.bool, device=images.device)
        per = max(1, self.cfg.sample_chunk // max(1, b)) if self.cfg.sample_chunk else n
        for s0, s1 in chunks(n, per):
            out[:, s0:s1] = self.combine(feats, z[:, s0:s1]) > 0
        return out

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        b = images.shape[0]
        k = self.cfg.experts
        mu, sigma, pi = self.experts_of(images)  # one prior pass per call
        if self.cfg.eval_weights == "uniform":
            experts = (torch.arange(n, device=images.device) % k)[None].expand(b, -1)
        else:
            experts = torch.multinomial(pi, n, replacement=True, generator=generator)
        return self._draw(images, (mu, sigma), experts.contiguous(), generator)

    @torch.no_grad()
    def weighted_samples(self, images: Tensor, samples_per_expert: int, *,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The paper's weighted sample set: masks (B,K*S,H,W) bool and weights (B,K*S) = pi_k / S."""
        b, k, s = images.shape[0], self.cfg.experts, samples_per_expert
        experts = torch.arange(k, device=images.device).repeat_interleave(s)[None].expand(b, -1)
        mu, sigma, pi = self.experts_of(images)
        return self._draw(images, (mu, sigma), experts.contiguous(), generator), (pi / s).repeat_interleave(s, dim=1)

    def nfe(self, n: int) -> int:
        return 1  # one U-Net and prior pass per image; each sample runs only the 1x1 convs of f_comb
