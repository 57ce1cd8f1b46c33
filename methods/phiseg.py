"""PHiSeg: Capturing Uncertainty in Medical Image Segmentation (Baumgartner et al., MICCAI 2019).

Original code: github.com/baumgach/PHiSeg-code (TensorFlow): ``phiseg/model_zoo/{posteriors,priors,
likelihoods}.py`` (function ``phiseg``), ``phiseg/phiseg_model.py`` (losses) and
``phiseg/experiments/phiseg_7_5.py`` / ``phiseg_7_1.py`` (LIDC settings).

Model, with R resolution levels (widths ``n0 * (1, 2, 4, 6, 6, 6, 6)``, R = 7) and L latent levels
(L = 5; variant ``l1``: L = 1), d = R - L. Latent level l lives at resolution level l + d.

* Prior p(z | x) and posterior q(z | x, y) nets (same structure; the posterior also sees the one-hot mask
  shifted by -0.5): an encoder of R levels (average pooling, three conv-BN-ReLU units each), then from the
  coarsest latent level down: z_{L-1} ~ N(mu, sigma) from the features at level L-1+d (mu: 3x3 conv,
  sigma: 1x1 conv + softplus); for l < L-1, z_{l+1} is upsampled (bilinear x2, two conv units of
  ``zdim * n0`` channels), concatenated with the encoder features at level l + d, passed through two conv
  units and mapped by 1x1 convs to mu_l and sigma_l (softplus). While training, the prior is conditioned
  on the posterior's samples z_{l+1} (``generation_mode=False`` in the release); when sampling, on its own.
* Likelihood p(y | z_0..z_{L-1}) (no image input): each z_l goes through two conv units and d upsampling
  steps to resolution level l; an upstream path fuses level l+1 into level l; a 1x1 conv gives logits
  s_l at every level, resized (nearest) to full resolution. The prediction of level l is the sum
  s_l + s_{l+1} + ... + s_{L-1}; the output is the level-0 sum.

Loss (``phiseg_model.py``): sum over levels of the cross-entropy of the accumulated logits at that level
(summed over pixels, averaged over the batch; weight 1 each: ``residual_multinoulli_loss``) plus
sum_l 4^l * KL(q_l || p_l) (summed over latent pixels and channels, averaged over the batch;
``exponential_weighting = True``, ``KL_divergence_loss_weight = 1``). One reader per image per step.

Deviations: losses divided by the number of pixels (learning rates transfer across sizes; Adam is otherwise
insensitive to the scale). The release also builds upsampling convs for z_{l+1} to every finer level
(``z_ups_mat[j][l+1]`` for j < l) that no output uses; they are not built here, so our parameter count
is smaller by exactly those unused weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amisbench.api import DataSpec, Method, check_config
from amisbench.registry import register_method

from ._blocks import check_chunk, conv_unit, kl_diag_gaussians, one_hot, pick_reader, sample_in_chunks


@dataclass
class PHiSegConfig:
    # phiseg_7_5.py: n0 = 32 and num_channels = [n0, 2n0, 4n0, 6n0, 6n0, 6n0, 6n0] (model_zoo/*.py)
    widths: tuple[int, ...] = (32, 64, 128, 192, 192, 192, 192)  # one per resolution level (R = len)
    latent_levels: int = 5  # L (phiseg_7_5.py); variant l1: 1 (phiseg_7_1.py)
    zdim: int = 2  # zdim0
    z_up_channels: int = 64  # channels of the z upsampling convs: zdim0 * n0 in the release
    norm: Literal["batch", "group", "none"] = "batch"  # layer_norm = tfnorm.batch_norm
    classes: int = 2  # nlabels
    exponential_weighting: bool = True  # KL of level l weighted by 4^l
    kl_weight: float = 1.0  # KL_divergence_loss_weight
    rec_weight: float = 1.0  # residual_multinoulli_loss_weight
    kl_eps: float = 1e-10  # added to the variances in the KL, as in KL_two_gauss_with_diag_cov
    sample_chunk: int = 256  # most (image, sample) pairs per batch when sampling (0: all); memory only

    def __post_init__(self) -> None:
        check_chunk(self.sample_chunk)
        check_config("latent_levels", 1 <= self.latent_levels <= len(self.widths),
                     f"a level between 1 and len(widths) = {len(self.widths)}", self.latent_levels)


def _up() -> nn.Module:
    return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)


class _Encoder(nn.Module):
    """R levels of (average pooling, 3 conv units): the ``pre_z`` features of the prior/posterior."""

    def __init__(self, cin: int, widths: tuple[int, ...], norm: str):
        super().__init__()
        self.levels = nn.ModuleList()
        for w in widths:
            self.levels.append(nn.Sequential(conv_unit(cin, w, norm), conv_unit(w, w, norm), conv_unit(w, w, norm)))
            cin = w

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else F.avg_pool2d(x, 2))
            out.append(x)
        return out


class _Latents(nn.Module):
    """The hierarchical Gaussian part of the prior / posterior, coarsest level first."""

    def __init__(self, widths: tuple[int, ...], levels: int, zdim: int, zup: int, norm: str):
        super().__init__()
        self.L = levels
        self.d = len(widths) - levels
        top = widths[levels - 1 + self.d]
        self.top_mu = nn.Conv2d(top, zdim, 3, padding=1)
        self.top_sigma = nn.Conv2d(top, zdim, 1)
        self.ups = nn.ModuleList()
        self.inputs = nn.ModuleList()
        self.mus = nn.ModuleList()
        self.sigmas = nn.ModuleList()
        for i in range(levels - 1):
            self.ups.append(nn.Sequential(_up(), conv_unit(zdim, zup, norm), conv_unit(zup, zup, norm)))
            self.inputs.append(nn.Sequential(conv_unit(widths[i + self.d] + zup, widths[i], norm),
                                             conv_unit(widths[i], widths[i], norm)))
            self.mus.append(nn.Conv2d(widths[i], zdim, 1))
            self.sigmas.append(nn.Conv2d(widths[i], zdim, 1))

    def forward(self, pre: list[Tensor], noise, cond: list[Tensor] | None = None):
        """Means, standard deviations and samples of every level (index 0 = finest).

        Args:
            pre: encoder features, one per resolution level.
            noise: callable(level, shape) -> standard normal tensor of that shape.
            cond: samples z_{l+1} to condition level l on (the posterior's, for the prior while training);
                None: the net's own samples.
        """
        mus: list[Tensor | None] = [None] * self.L
        sigmas: list[Tensor | None] = [None] * self.L
        zs: list[Tensor | None] = [None] * self.L
        for i in reversed(range(self.L)):
            h = pre[i + self.d]
            if i == self.L - 1:
                mu, sigma = self.top_mu(h), F.softplus(self.top_sigma(h))
            else:
                zc = (cond if cond is not None else zs)[i + 1]
                h = self.inputs[i](torch.cat([h, self.ups[i](zc)], dim=1))
                mu, sigma = self.mus[i](h), F.softplus(self.sigmas[i](h))
            mus[i], sigmas[i] = mu, sigma
            zs[i] = mu + sigma * noise(i, mu.shape)
        return mus, sigmas, zs


class _Likelihood(nn.Module):
    """p(y | z_0..z_{L-1}): per-level logits s_l at resolution level l (not yet resized)."""

    def __init__(self, widths: tuple[int, ...], levels: int, zdim: int, classes: int, norm: str):
        super().__init__()
        self.L = levels
        d = len(widths) - levels
        self.post_z = nn.ModuleList()
        for i in range(levels):
            layers = [conv_unit(zdim, widths[i], norm), conv_unit(widths[i], widths[i], norm)]
            for _ in range(d):
                layers += [_up(), conv_unit(widths[i], widths[i], norm)]
            self.post_z.append(nn.Sequential(*layers))
        out_ch = [0] * levels  # channels of post_c[l]
        out_ch[levels - 1] = widths[levels - 1]
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for i in range(levels - 1):
            out_ch[i] = widths[i + d]
        for i in range(levels - 1):
            self.ups.append(nn.Sequential(_up(), conv_unit(out_ch[i + 1], widths[i], norm)))
            self.fuse.append(nn.Sequential(conv_unit(2 * widths[i], widths[i + d], norm),
                                           conv_unit(widths[i + d], widths[i + d], norm)))
        self.heads = nn.ModuleList(nn.Conv2d(out_ch[i], classes, 1) for i in range(levels))

    def forward(self, zs: list[Tensor]) -> list[Tensor]:
        post_c: list[Tensor | None] = [None] * self.L
        post_c[self.L - 1] = self.post_z[self.L - 1](zs[self.L - 1])
        for i in reversed(range(self.L - 1)):
            below = self.ups[i](post_c[i + 1])
            post_c[i] = self.fuse[i](torch.cat([self.post_z[i](zs[i]), below], dim=1))
        return [head(c) for head, c in zip(self.heads, post_c)]


@register_method("phiseg")
class PHiSeg(Method):
    """PHiSeg: hierarchical latent prior/posterior over L levels of a 7-resolution net (Baumgartner et al. 2019)."""

    Config = PHiSegConfig
    stages = ("main",)

    def __init__(self, cfg: PHiSegConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        widths = tuple(cfg.widths)
        factor = 2 ** (len(widths) - 1)
        if spec.height % factor or spec.width % factor:
            raise ValueError(f"PHiSeg with {len(widths)} resolution levels needs image sides divisible by {factor}")
        self.prior_enc = _Encoder(spec.channels, widths, cfg.norm)
        self.post_enc = _Encoder(spec.channels + cfg.classes, widths, cfg.norm)
        self.prior_z = _Latents(widths, cfg.latent_levels, cfg.zdim, cfg.z_up_channels, cfg.norm)
        self.post_z = _Latents(widths, cfg.latent_levels, cfg.zdim, cfg.z_up_channels, cfg.norm)
        self.likelihood = _Likelihood(widths, cfg.latent_levels, cfg.zdim, cfg.classes, cfg.norm)

    def latent_shapes(self, batch: int = 1) -> list[tuple[int, ...]]:
        """Shapes (B, zdim, h, w) of z_0 .. z_{L-1} for this method's image size."""
        d = len(self.cfg.widths) - self.cfg.latent_levels
        return [(batch, self.cfg.zdim, self.spec.height >> (i + d), self.spec.width >> (i + d))
                for i in range(self.cfg.latent_levels)]

    def accumulate(self, s: list[Tensor], size: tuple[int, int]) -> list[Tensor]:
        """Per-level predictions at full resolution: level l = sum of the resized s_l .. s_{L-1}."""
        out: list[Tensor | None] = [None] * len(s)
        acc = None
        for i in reversed(range(len(s))):
            up = F.interpolate(s[i], size=size, mode="nearest") if s[i].shape[-2:] != size else s[i]
            acc = up if acc is None else acc + up
            out[i] = acc
        return out

    def loss(self, stage, images, masks):
        cfg = self.cfg
        y = pick_reader(masks).long()
        b, hw = y.shape[0], y.shape[1] * y.shape[2]

        def noise(i, shape):
            return torch.randn(shape, device=images.device, dtype=images.dtype)

        mu_q, s_q, z_q = self.post_z(self.post_enc(torch.cat([images, one_hot(y, cfg.classes) - 0.5], 1)), noise)
        mu_p, s_p, _ = self.prior_z(self.prior_enc(images), noise, cond=z_q)
        preds = self.accumulate(self.likelihood(z_q), tuple(y.shape[-2:]))
        rec = [F.cross_entropy(p, y, reduction="sum") / b for p in preds]
        kls = [(4.0 ** i if cfg.exponential_weighting else 1.0)
               * kl_diag_gaussians(mu_q[i], s_q[i], mu_p[i], s_p[i], cfg.kl_eps).mean()
               for i in range(cfg.latent_levels)]
        loss = (cfg.rec_weight * sum(rec) + cfg.kl_weight * sum(kls)) / hw
        logs = {"ce_per_px": float(rec[0].detach()) / hw, "kl_weighted": float(sum(kls).detach())}
        return loss, logs

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        b, _, h, w = images.shape
        d = len(self.cfg.widths) - self.cfg.latent_levels
        pre = self.prior_enc(images)  # once per image; the latent part uses resolution levels d..R-1 only

        def noise(i, shape):
            return torch.randn(shape, generator=generator, device=images.device, dtype=images.dtype)

        def draw(owner: Tensor) -> Tensor:  # owner: the image of every (image, sample) pair of the chunk
            _, _, zs = self.prior_z([p[owner] if k >= d else None for k, p in enumerate(pre)], noise)
            return self.accumulate(self.likelihood(zs), (h, w))[0].argmax(1) == 1

        return sample_in_chunks(images, n, self.cfg.sample_chunk, draw)

    def nfe(self, n: int) -> int:
        return n  # the likelihood net (and the prior's latent part) runs once per sample
