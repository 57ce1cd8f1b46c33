"""Prob. U-Net: A Probabilistic U-Net for Segmentation of Ambiguous Images (Kohl et al., NeurIPS 2018).

Original code: github.com/SimonKohl/probabilistic_unet (TensorFlow/Sonnet, ``model/probabilistic_unet.py``);
widely used PyTorch port: github.com/stefanknegt/Probabilistic-Unet-Pytorch.

Model. A U-Net (widths 32/64/128/192 on LIDC, three 3x3 conv + ReLU per block, average pooling down,
bilinear up, no normalisation) gives features ``f`` at full resolution. A *prior net* (image) and a
*posterior net* (image + one-hot reader mask shifted by -0.5) are VGG-style encoders with the same widths
whose last feature map is averaged over space and mapped by a 1x1 conv to the mean and log standard deviation
of an axis-aligned Gaussian over a latent of dimension 6. ``f_comb`` tiles a latent sample over the image,
concatenates it with ``f`` and applies three 1x1 conv + ReLU and a final 1x1 conv to the class logits
(2 classes, softmax).

Training: ``loss = CE(f_comb(f, z_q), y) + beta * KL(q(z | x, y) || p(z | x))`` with z_q a reparameterised
posterior sample, the cross-entropy summed over pixels and both terms averaged over the batch (the release's
``elbo``). An L2 penalty (weight 1e-5, ``tf.nn.l2_loss`` = sum(w^2)/2) on the weights as in the release's
training script. One reader per image is drawn at random at every step.

Two releases, one switch apart. Default (``classes = 1``, beta = 10): the PyTorch port the suite's parameter
count refers to (stefanknegt/Probabilistic-Unet-Pytorch ``probabilistic_unet.py``: ``num_classes=1``, one
logit per pixel trained with ``BCEWithLogitsLoss`` summed over pixels, the posterior sees the image and the
raw {0,1} mask, ``beta=10.0``; 4,999,449 parameters at 128x128x1). Variant ``kohl`` (``classes = 2``, beta
= 1): the authors' TensorFlow release (SimonKohl/probabilistic_unet ``model/probabilistic_unet.py`` and
``training/prob_unet_config.py``), two softmax classes, posterior input one-hot labels shifted by -0.5.

Sampling: one U-Net and one prior-net pass per image; every sample draws z ~ p(z | x) and runs only
``f_comb``. The first 1x1 conv of ``f_comb`` is linear in the concatenation ``[f, z]``, so its ``f`` part is
computed once per image and the ``z`` part once per sample (the same numbers, fewer operations).

Deviations: the losses are divided by the number of pixels (so that learning rates transfer across image
sizes; Adam is insensitive to the scale otherwise); He-normal initialisation everywhere (the port uses an
orthogonal one for ``f_comb``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amisbench.api import DataSpec, Method, at_least
from amisbench.nn import UNet, UNetConfig
from amisbench.registry import register_method

from ._blocks import check_chunk, chunks, he_init, kl_diag_gaussians, one_hot, pick_reader


@dataclass
class ProbUNetConfig:
    # Kohl et al. 2018 (LIDC) / PyTorch port ``ProbabilisticUnet(num_filters=[32, 64, 128, 192])``:
    # three convs per block, avg-pool down, bilinear up, no normalisation.
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        widths=(32, 64, 128, 192), convs_per_block=3, norm="none", down="avg", up="bilinear"))
    encoder_widths: tuple[int, ...] = ()  # prior / posterior encoders; empty: the U-Net's widths (as released)
    encoder_convs: int = 3  # convs per encoder block (release: num_convs_per_block = 3)
    latent_dim: int = 6
    fcomb_convs: int = 3  # 1x1 conv + ReLU layers before the final 1x1 logits conv (release: num_1x1_convs = 3)
    beta: float = 10.0  # KL weight: 10 in the PyTorch port (ProbabilisticUnet(beta=10.0)), 1 in Kohl's release
    l2_weight: float = 1e-5  # release: regularizarion_weight = 1e-5 on sum(w^2)/2
    classes: int = 1  # 1: one logit per pixel, BCE (the PyTorch port); 2: softmax over 2 classes (Kohl's release)
    sample_chunk: int = 1024  # most (image, sample) pairs per f_comb batch (0: all at once); memory only

    def __post_init__(self) -> None:
        check_chunk(self.sample_chunk)
        at_least(self, latent_dim=1, fcomb_convs=1, classes=1)


class AxisAlignedConvGaussian(nn.Module):
    """VGG-style encoder -> spatial mean -> 1x1 conv -> (mu, sigma) of a diagonal Gaussian (B, latent)."""

    def __init__(self, in_ch: int, widths: tuple[int, ...], convs: int, latent: int):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_ch
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.AvgPool2d(2, ceil_mode=True))
            for _ in range(convs):
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU()]
                cin = w
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, 2 * latent, 1)
        self.latent = latent

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x).mean(dim=(2, 3), keepdim=True)
        mu, log_sigma = self.head(h).flatten(1).split(self.latent, dim=1)
        return mu, log_sigma.exp()


@register_method("prob_unet")
class ProbUNet(Method):
    """Prob. U-Net: U-Net + global latent from prior/posterior conv encoders (Kohl et al. 2018)."""

    Config = ProbUNetConfig
    stages = ("main",)

    def __init__(self, cfg: ProbUNetConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        enc_widths = tuple(cfg.encoder_widths) or tuple(cfg.unet.widths)
        self.unet = UNet(spec.channels, 0, cfg.unet)
        self.prior = AxisAlignedConvGaussian(spec.channels, enc_widths, cfg.encoder_convs, cfg.latent_dim)
        self.posterior = AxisAlignedConvGaussian(spec.channels + cfg.classes, enc_widths, cfg.encoder_convs,
                                                 cfg.latent_dim)
        f = self.unet.features
        convs: list[nn.Module] = [nn.Conv2d(f + cfg.latent_dim, f, 1)]
        convs += [nn.Conv2d(f, f, 1) for _ in range(cfg.fcomb_convs - 1)]
        self.fcomb = nn.ModuleList(convs)
        self.logits = nn.Conv2d(f, cfg.classes, 1)
        he_init(self)

    # -- f_comb ---------------------------------------------------------------------------------------
    def combine(self, feats: Tensor, z: Tensor) -> Tensor:
        """Logits of every (image, sample) pair.

        Args:
            feats: (B,F,H,W) U-Net features.
            z: (B,m,L) latent samples.

        Returns:
            (B,m,K,H,W) logits.
        """
        f = feats.shape[1]
        first = self.fcomb[0]
        base = F.conv2d(feats, first.weight[:, :f], first.bias)  # (B,F,H,W): once per image
        shift = z @ first.weight[:, f:, 0, 0].T  # (B,m,F): once per sample
        b, m = z.shape[:2]
        h = F.relu(base[:, None] + shift[..., None, None]).flatten(0, 1)
        for conv in self.fcomb[1:]:
            h = F.relu(conv(h))
        return self.logits(h).unflatten(0, (b, m))

    def loss(self, stage, images, masks):
        y = pick_reader(masks)
        if self.cfg.classes == 1:  # the port feeds the raw {0,1} mask
            seg = y[:, None].to(images.dtype)
        else:  # Kohl's release feeds one-hot labels shifted by -0.5
            seg = one_hot(y, self.cfg.classes) - 0.5
        mu_q, sigma_q = self.posterior(torch.cat([images, seg], dim=1))
        mu_p, sigma_p = self.prior(images)
        z = mu_q + sigma_q * torch.randn_like(mu_q)
        logits = self.combine(self.unet(images), z[:, None])[:, 0]
        b, hw = y.shape[0], y.shape[1] * y.shape[2]
        if self.cfg.classes == 1:
            ce = F.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype), reduction="sum") / b
        else:
            ce = F.cross_entropy(logits, y.long(), reduction="sum") / b
        kl = kl_diag_gaussians(mu_q, sigma_q, mu_p, sigma_p).mean()
        l2 = 0.5 * sum(p.square().sum() for p in self.parameters())
        loss = (ce + self.cfg.beta * kl + self.cfg.l2_weight * l2) / hw
        return loss, {"ce_per_px": float(ce.detach()) / hw, "kl": float(kl.detach())}

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        b, _, h, w = images.shape
        feats = self.unet(images)
        mu, sigma = self.prior(images)
        eps = torch.randn((b, n, self.cfg.latent_dim), generator=generator, device=images.device,
                          dtype=mu.dtype)
        z = mu[:, None] + sigma[:, None] * eps  # (B,n,L): all noise drawn up front, chunking changes nothing
        out = torch.empty((b, n, h, w), dtype=torch.bool, device=images.device)
        per = max(1, self.cfg.sample_chunk // max(1, b)) if self.cfg.sample_chunk else n
        for s0, s1 in chunks(n, per):
            logits = self.combine(feats, z[:, s0:s1])
            out[:, s0:s1] = logits[:, :, 0] > 0 if self.cfg.classes == 1 else logits.argmax(2) == 1
        return out

    def nfe(self, n: int) -> int:
        return 1  # one U-Net pass per image; each sample runs only the 1x1 convs of f_comb
