"""The OpenAI diffusion U-Net (Dhariwal & Nichol 2021, ``guided_diffusion/unet.py``, ``UNetModel``), the
denoiser of both CCDM's and CIMD's releases (each method's config sets its width and attention layout).

Layout and parameter names follow that file so that a state_dict has the release's shapes: ``time_embed``
(Linear, SiLU, Linear to 4 x base), ``input_blocks`` (a 3x3 stem, then per level ``num_res_blocks`` residual
blocks, attention where the downsampling rate is in ``attention_resolutions``, and a strided 3x3 conv between
levels), ``middle_block`` (residual, attention, residual), ``output_blocks`` (per level ``num_res_blocks + 1``
residual blocks on the concatenated skip, attention as above, nearest upsampling + 3x3 conv between levels) and
``out`` (norm, SiLU, zero-initialised 3x3 conv). A residual block is norm, SiLU, 3x3 conv; plus a linear map of
the time embedding; norm, SiLU, dropout, zero-initialised 3x3 conv; plus a skip (1x1 conv where the width
changes). Attention is the "legacy" QKV order (per head [q, k, v]) on 1-D convolutions. Group norms are
computed in float32 (the release's ``GroupNorm32``; gcd(groups, width) groups so that small widths build).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import timestep_embedding


@dataclass
class OpenAIUNetConfig:
    base_channels: int = 32
    channel_mult: tuple[float, ...] = (1, 1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # downsampling rates (1 = full resolution)
    num_head_channels: int = 32  # -1: use num_heads
    num_heads: int = 1
    dropout: float = 0.0
    groups: int = 32  # GroupNorm groups (gcd with the width)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (also under autocast), with gcd(groups, ch) groups."""

    def __init__(self, groups: int, ch: int):
        super().__init__(math.gcd(groups, ch), ch)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        if not p.is_meta:
            nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, emb: int, cout: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(GroupNorm32(groups, cout), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None].to(x.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = _zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))  # (B, 3C, T), per head [q, k, v] (QKVAttentionLegacy)
        q, k, v = qkv.reshape(b * self.heads, 3 * c // self.heads, -1).chunk(3, dim=1)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = h.transpose(1, 2).reshape(b, c, -1)
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Step(nn.ModuleList):
    """A sequence of layers that pass the time embedding to the residual blocks (TimestepEmbedSequential)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock, Downsample, Upsample)) else layer(x)
        return x


class OpenAIUNet(nn.Module):
    """``forward(x (B,Cin,H,W), t (B,)) -> (B,Cout,H,W)``; H and W divisible by 2 ** (levels - 1)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: OpenAIUNetConfig | None = None):
        super().__init__()
        cfg = cfg or OpenAIUNetConfig()
        self.cfg = cfg
        mc = cfg.base_channels
        emb = 4 * mc
        g = cfg.groups

        def heads(ch: int) -> int:
            return ch // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads

        def attn(ch: int) -> AttentionBlock:
            if cfg.num_head_channels > 0 and ch % cfg.num_head_channels:
                raise ValueError(f"attention width {ch} is not divisible by num_head_channels {cfg.num_head_channels}")
            return AttentionBlock(ch, heads(ch), g)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        ch = input_ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        chans = [ch]
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, int(mult * mc), cfg.dropout, g)]
                ch = int(mult * mc)
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(Step(layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Step([Downsample(ch)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = Step([ResBlock(ch, emb, ch, cfg.dropout, g), attn(ch), ResBlock(ch, emb, ch, cfg.dropout, g)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, int(mc * mult), cfg.dropout, g)]
                ch = int(mc * mult)
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Step(layers))
        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(),
                                 _zero(nn.Conv2d(input_ch, out_channels, 3, padding=1)))
        self.levels = len(cfg.channel_mult)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        factor = 2 ** (self.levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"OpenAIUNet input of size {tuple(x.shape[-2:])} is not divisible by {factor}")
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
