"""A configurable U-Net, the backbone every method shares.

Widths, depth (one level per width), convolutions per block, normalisation, down- and up-sampling are
config values. With ``time_dim > 0`` every block is conditioned on a time embedding (sinusoidal features,
then an MLP) through a per-block scale and shift of its normalised activations (FiLM, as in DDPM-style
U-Nets); ``attention_levels`` adds self-attention blocks at those levels (0 = full resolution), typically
the lowest resolution only. The same class serves SSN/GTR (no time) and diffusion baselines (with time);
the ATFM ST-Net has the release's own layout (``methods/atfm/st_net.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class UNetConfig:
    widths: tuple[int, ...] = (32, 64, 128, 192)
    convs_per_block: int = 2
    norm: Literal["batch", "group", "instance", "none"] = "batch"
    groups: int = 8  # for group norm
    down: Literal["max", "avg", "conv"] = "max"
    up: Literal["bilinear", "transpose"] = "bilinear"
    align_corners: bool = False  # of the bilinear up-sampling (True in the Prob. U-Net / ATFM GTR releases)
    activation: Literal["relu", "silu", "leaky_relu"] = "relu"
    dropout: float = 0.0
    attention_levels: tuple[int, ...] = ()
    attention_heads: int = 4
    conv_bias: bool = True  # False: no bias in convolutions followed by a norm (the TF releases with BatchNorm)
    # output width of the decoder block at each level 0..depth-2 (empty: ``widths``, the usual U-Net); the
    # PHiSeg-code likelihoods decode level k at the width of level k + 1: (64, 128, 192, 192, 192, 192)
    decoder_widths: tuple[int, ...] = ()
    recomb: int = 0  # 1x1 conv + norm + activation layers to widths[0] after the decoder (PHiSeg-code: 3)


def make_norm(kind: str, ch: int, groups: int = 8) -> nn.Module:
    """Batch, group (gcd(groups, ch) groups), instance (affine) or no normalisation of ``ch`` channels."""
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        g = math.gcd(groups, ch)
        return nn.GroupNorm(g, ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    return nn.Identity()


def _act(kind: str) -> nn.Module:
    return {"relu": nn.ReLU, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}[kind]()


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of continuous or integer times ``t`` (B,) -> (B, dim) (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ConvBlock(nn.Module):
    """``convs_per_block`` x (conv 3x3, norm, [FiLM from time], activation)."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, time_dim: int = 0):
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(cfg.convs_per_block):
            self.convs.append(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1,
                                        bias=cfg.conv_bias or cfg.norm == "none"))
            self.norms.append(make_norm(cfg.norm, cout, cfg.groups))
        self.act = _act(cfg.activation)
        self.drop = nn.Dropout2d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.film = nn.Linear(time_dim, 2 * cout) if time_dim > 0 else None
        self.skip = nn.Conv2d(cin, cout, 1) if (time_dim > 0 and cin != cout) else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h))
            if i == 0 and self.film is not None and temb is not None:
                scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
                h = h * (1 + scale) + shift
            h = self.act(h)
        h = self.drop(h)
        if self.film is not None:  # residual path for the time-conditioned (ST-Net / diffusion) variant
            h = h + (self.skip(x) if self.skip is not None else x)
        return h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(groups, ch), ch)
        self.heads = heads if ch % heads == 0 else 1
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(o.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """U-Net with ``len(widths)`` levels.

    Args:
        in_channels: input channels.
        out_channels: output channels of the final 1x1 conv (0: no head; :meth:`forward` returns features).
        cfg: architecture.
        time_dim: width of the time embedding; 0 builds an unconditioned U-Net.

    Shapes: ``forward(x (B,Cin,H,W), t (B,) or None) -> (B,out,H,W)``; H and W must be divisible by
    ``2 ** (len(widths) - 1)``.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig | None = None, time_dim: int = 0):
        super().__init__()
        cfg = cfg or UNetConfig()
        self.cfg = cfg
        self.time_dim = time_dim
        w = list(cfg.widths)
        dec = list(cfg.decoder_widths) or w[:-1]
        if len(dec) != len(w) - 1:
            raise ValueError(f"decoder_widths: expected {len(w) - 1} widths (one per level above the bottom), "
                             f"got {len(dec)}")
        self.features = w[0] if cfg.recomb else dec[0] if dec else w[0]
        if time_dim > 0:
            self.time_mlp = nn.Sequential(nn.Linear(w[0], time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.down_blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.down_attn = nn.ModuleDict()
        cin = in_channels
        for i, ch in enumerate(w):
            self.down_blocks.append(ConvBlock(cin, ch, cfg, time_dim))
            if i in cfg.attention_levels:
                self.down_attn[str(i)] = Attention(ch, cfg.attention_heads, cfg.groups)
            if i < len(w) - 1:
                if cfg.down == "max":
                    self.downs.append(nn.MaxPool2d(2))
                elif cfg.down == "avg":
                    self.downs.append(nn.AvgPool2d(2, ceil_mode=True))  # ceil_mode as the Prob. U-Net U-Net
                else:
                    self.downs.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            cin = ch
        self.ups = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleDict()
        below = w[-1]  # width of what comes up from the level below
        for i in range(len(w) - 2, -1, -1):
            if cfg.up == "transpose":
                self.ups.append(nn.ConvTranspose2d(below, below, 2, stride=2))
            else:
                self.ups.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=cfg.align_corners))
            self.up_blocks.append(ConvBlock(below + w[i], dec[i], cfg, time_dim))
            if i in cfg.attention_levels:
                self.up_attn[str(i)] = Attention(dec[i], cfg.attention_heads, cfg.groups)
            below = dec[i]
        self.recomb = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(below if j == 0 else w[0], w[0], 1, bias=cfg.conv_bias or cfg.norm == "none"),
                          make_norm(cfg.norm, w[0], cfg.groups), _act(cfg.activation)) for j in range(cfg.recomb)])
        self.head = nn.Conv2d(self.features, out_channels, 1) if out_channels > 0 else None

    def forward(self, x: Tensor, t: Tensor | None = None, *, return_features: bool = False):
        factor = 2 ** (len(self.cfg.widths) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"UNet input of size {tuple(x.shape[-2:])} is not divisible by {factor}")
        temb = None
        if self.time_dim > 0:
            if t is None:
                raise ValueError("this UNet is time-conditioned: pass t of shape (B,)")
            temb = self.time_mlp(timestep_embedding(t, self.cfg.widths[0]))
        skips = []
        h = x
        for i, block in enumerate(self.down_blocks):
            h = block(h, temb)
            if str(i) in self.down_attn:
                h = self.down_attn[str(i)](h)
            if i < len(self.down_blocks) - 1:
                skips.append(h)
                h = self.downs[i](h)
        for j, (up, block) in enumerate(zip(self.ups, self.up_blocks)):
            level = len(self.cfg.widths) - 2 - j
            h = block(torch.cat([up(h), skips.pop()], dim=1), temb)
            if str(level) in self.up_attn:
                h = self.up_attn[str(level)](h)
        h = self.recomb(h)
        if self.head is None or return_features:
            return h if self.head is None else (self.head(h), h)
        return self.head(h)
