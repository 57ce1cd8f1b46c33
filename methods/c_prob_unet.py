"""c-Prob. U-Net: the Prob. U-Net conditioned on the reader's labelling style (Zepf et al., ICLR 2023,
"That Label's got Style: Handling Label Style Bias for Uncertain Image Segmentation"), as released.

Original code: github.com/kilianzepf/conditioned_uncertain_segmentation (``models/c_prob_unet.py``,
``models/unet.py``, ``train_c-prob_unet.py``, ``utils/utils.py``; files cited below are in that repo).

Model (``models/c_prob_unet.py``, ``Style_ProbabilisticUnet``): a U-Net (``models/unet.py``: widths
32/64/128/192, three 3x3 conv + ReLU per block, no normalisation, average pooling, bilinear up) on the image
*alone*; the one-hot style of the reader slot, tiled over the image, enters only the prior ([image, style])
and the posterior ([image, style, reader mask]) encoders (two 3x3 conv + ReLU per block, same widths,
spatial mean, 1x1 conv to the mean and log standard deviation of a 6-d axis-aligned Gaussian). ``fcomb``:
four 1x1 convs (``no_convs_fcomb=4``: three with ReLU on [features, z tiled], then one to a single logit).

Training (``train_c-prob_unet.py``, ``elbo``): one (image, reader, style) triple per item -- here one random
reader slot per image and step -- and loss = sum over the batch and pixels of BCE-with-logits(f_comb(f,
z_q), y) + beta * mean_b KL(q(z | x, s, y) || p(z | x, s)) + 1e-5 * (sum of the L2 norms, not squared, of
every parameter tensor of the posterior, the prior and fcomb's hidden layers), beta = 10. AdamW, lr 1e-4,
weight decay 0, batch 6, 200 epochs of (image, style) pairs = 600 passes over the images
(``configs/methods/c_prob_unet.yaml``).

Sampling: one U-Net pass per image; per style used one prior pass and, per sample, z ~ p(z | x, s) and
f_comb; mask = logit > 0 (sigmoid > 0.5, ``--test_treshold 0.5``). ``style: mix`` gives sample i style
i mod A; ``style: <int>`` one style for all. ``nfe(n)`` = styles used (the U-Net and the first prior pass
count as one, as for the Prob. U-Net).

What a style is per dataset:

- ISIC3: the slots are the f / m / p annotation styles of the Zepf et al. subset (fixed per slot);
- LIDC: the slot is the reader position in the file, which is *not* the same radiologist across images, so
  the "style" there is only a slot index (the ATFM paper's use of the c-models carries little meaning there);
- synthetic: the reader slot order is arbitrary, the style carries no information (fine for a smoke-level
  comparison, said here so nobody reads a style effect into it).

Initialisation as released: encoders He-normal with N(0, 0.001) biases, their 1x1 heads with N(0, 1)
biases; fcomb orthogonal with N(0, 0.001) biases; the U-Net PyTorch's default.

Deviations: augmentation is the ISIC3 dataset's default (flips, +-15 deg rotation, scale 0.9-1.1: the
release's ``symmetric_augmentation`` without its small shear and shift); the upsampling interpolates with
``align_corners=False`` (the release: True); the reader mask
enters the posterior as exact {0, 1}; A = the dataset's reader slots (the release fixes 3); biases are
normal, not truncated normal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amisbench.api import DataSpec, Method, at_least
from amisbench.nn import UNet, UNetConfig
from amisbench.registry import register_method

from ._blocks import check_chunk, chunks, kl_diag_gaussians
from ._style import Style, StyleConditioned, with_style
from .prob_unet import AxisAlignedConvGaussian


@dataclass
class CProbUNetConfig:
    # train_c-prob_unet.py: --num_filters 32 64 128 192; models/unet.py: 3 convs per block, no norm
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        widths=(32, 64, 128, 192), convs_per_block=3, norm="none", down="avg", up="bilinear"))
    encoder_widths: tuple[int, ...] = ()  # prior / posterior; empty: the U-Net's widths (as released)
    encoder_convs: int = 2  # models/c_prob_unet.py: self.no_convs_per_block = 2
    latent_dim: int = 6  # train_c-prob_unet.py: --latentdim 6
    fcomb_convs: int = 4  # train_c-prob_unet.py: no_convs_fcomb=4 (the last one gives the logit)
    beta: float = 10.0  # train_c-prob_unet.py: --beta 10
    l2_weight: float = 1e-5  # train_c-prob_unet.py: loss = -elbo + 1e-5 * reg_loss
    style: Style = "mix"  # sampling: uniform mixture of styles, or one style index
    sample_chunk: int = 64  # most samples per f_comb batch and image (0: all at once); memory only

    def __post_init__(self) -> None:
        check_chunk(self.sample_chunk)
        at_least(self, latent_dim=1, encoder_convs=1, fcomb_convs=2)


class Fcomb(nn.Module):
    """``convs - 1`` x (1x1 conv + ReLU) on [features, z tiled], then a 1x1 conv to one logit."""

    def __init__(self, features: int, latent: int, convs: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(convs - 1):
            layers += [nn.Conv2d(features + latent if i == 0 else features, features, 1), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.last_layer = nn.Conv2d(features, 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                nn.init.orthogonal_(m.weight)
                nn.init.normal_(m.bias, 0.0, 1e-3)

    def forward(self, feats: Tensor, z: Tensor) -> Tensor:
        """Logits (B,m,H,W) of latents z (B,m,L) on features (B,F,H,W)."""
        b, m = z.shape[:2]
        h, w = feats.shape[-2:]
        x = torch.cat([feats[:, None].expand(-1, m, -1, -1, -1),
                       z[..., None, None].expand(-1, -1, -1, h, w)], dim=2).flatten(0, 1)
        return self.last_layer(self.layers(x))[:, 0].unflatten(0, (b, m))


def _release_encoder_init(enc: AxisAlignedConvGaussian) -> None:
    for m in enc.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.normal_(m.bias, 0.0, 1.0 if m is enc.head else 1e-3)


@register_method("c_prob_unet")
class CProbUNet(StyleConditioned, Method):
    """c-Prob. U-Net: Prob. U-Net whose prior and posterior see a one-hot reader style (Zepf et al. 2023)."""

    Config = CProbUNetConfig
    stages = ("main",)

    def __init__(self, cfg: CProbUNetConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        self._check_style(cfg, spec.readers)
        enc = tuple(cfg.encoder_widths) or tuple(cfg.unet.widths)
        c, a = spec.channels, spec.readers
        self.unet = UNet(c, 0, cfg.unet)
        self.prior = AxisAlignedConvGaussian(c + a, enc, cfg.encoder_convs, cfg.latent_dim)
        self.posterior = AxisAlignedConvGaussian(c + a + 1, enc, cfg.encoder_convs, cfg.latent_dim)
        for e in (self.prior, self.posterior):
            _release_encoder_init(e)
        self.fcomb = Fcomb(self.unet.features, cfg.latent_dim, cfg.fcomb_convs)

    def styled_loss(self, images, styles, y):
        styled = with_style(images, styles, self.styles)
        mu_q, sigma_q = self.posterior(torch.cat([styled, y], dim=1))
        mu_p, sigma_p = self.prior(styled)
        z = mu_q + sigma_q * torch.randn_like(mu_q)
        logits = self.fcomb(self.unet(images), z[:, None])[:, 0]
        rec = F.binary_cross_entropy_with_logits(logits, y[:, 0], reduction="sum")
        kl = kl_diag_gaussians(mu_q, sigma_q, mu_p, sigma_p).mean()
        reg = sum(p.norm(2) for mod in (self.posterior, self.prior, self.fcomb.layers) for p in mod.parameters())
        loss = rec + self.cfg.beta * kl + self.cfg.l2_weight * reg
        return loss, {"bce_per_px": float(rec.detach()) / y.numel(), "kl": float(kl.detach())}

    def sample_state(self, images):
        return self.unet(images)

    def styled_sample(self, images, feats, styles, n, generator):
        b, _, h, w = images.shape
        mu, sigma = self.prior(with_style(images, styles, self.styles))
        eps = torch.randn((b, n, self.cfg.latent_dim), generator=generator, device=images.device, dtype=mu.dtype)
        z = mu[:, None] + sigma[:, None] * eps  # all noise drawn up front: chunking changes nothing
        out = torch.empty((b, n, h, w), dtype=torch.bool, device=images.device)
        for s0, s1 in chunks(n, self.cfg.sample_chunk):
            out[:, s0:s1] = self.fcomb(feats, z[:, s0:s1]) > 0
        return out

    def nfe(self, n: int) -> int:
        return self.styles_used(n)
