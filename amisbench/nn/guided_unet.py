"""The denoiser U-Net of OpenAI's guided diffusion (Dhariwal & Nichol 2021), at the layout that CIMD
releases (``guided_diffusion/unet.py``, ``UNetModel``), written from its description.

Layout (parameter names follow the release, so state_dict shapes can be compared one to one):
``time_embed`` (Linear(C, 4C), SiLU, Linear(4C, 4C)) on sinusoidal features of the raw step index;
``input_blocks``: a 3x3 stem conv, then per level ``num_res_blocks`` residual blocks (each followed by a
self-attention block where the downsampling factor is in ``attention_ds``) and a stride-2 3x3 conv between
levels; ``middle_block``: residual block, attention, residual block; ``output_blocks``: per level (coarsest
first) ``num_res_blocks + 1`` residual blocks on [h, skip] (attention as on the way down) and a nearest
x2 upsampling + 3x3 conv after each level but the finest; ``out``: GroupNorm(32), SiLU, zero-initialised 3x3
conv. Residual blocks: GroupNorm(32) -> SiLU -> 3x3 conv, plus a linear map of SiLU(time embedding) added
per channel (``use_scale_shift_norm = False``), GroupNorm -> SiLU -> dropout -> zero-initialised 3x3 conv,
1x1 skip conv where the width changes. Attention: GroupNorm, a 1x1 (Conv1d) qkv projection, ``num_heads``
heads of scaled dot-product attention over the pixels, a zero-initialised 1x1 (Conv1d) output projection.
Group norms are computed in float32 (the release's ``GroupNorm32``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import timestep_embedding


@dataclass
class GuidedUNetConfig:
    model_channels: int = 128  # CIMD README: --num_channels 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4)  # guided diffusion script_util.create_model at 128 px
    num_res_blocks: int = 2  # CIMD README: --num_res_blocks 2
    attention_ds: tuple[int, ...] = (8,)  # README --attention_resolutions 16 at 128 px: ds = 128 // 16
    num_heads: int = 1  # README --num_heads 1
    dropout: float = 0.0  # script_util.model_and_diffusion_defaults
    groups: int = 32  # GroupNorm32


class GroupNorm32(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        if not p.is_meta:
            nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb: int, out: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out, out, 3, padding=1)))
        self.skip_connection = nn.Identity() if ch == out else nn.Conv2d(ch, out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention: {ch} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = GroupNorm32(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = _zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        # legacy qkv order of the release (QKVAttentionLegacy): heads first, then q, k, v per head
        q, k, v = self.qkv(self.norm(flat)).reshape(b * self.heads, 3 * c // self.heads, -1).chunk(3, dim=1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = o.transpose(1, 2).reshape(b, c, -1)
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)


class _Step(nn.ModuleList):
    """One entry of input_blocks / output_blocks: layers applied in order, residual blocks get the embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class GuidedUNet(nn.Module):
    """``forward(x (B,in,H,W), t (B,) step indices) -> (B,out,H,W)``; H, W divisible by 2 ** (levels - 1)."""

    def __init__(self, in_channels: int, out_channels: int, cfg: GuidedUNetConfig | None = None):
        super().__init__()
        cfg = cfg or GuidedUNetConfig()
        self.cfg = cfg
        mc, g = cfg.model_channels, cfg.groups
        emb = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([_Step([nn.Conv2d(in_channels, mc, 3, padding=1)])])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, mult * mc, cfg.dropout, g)]
                ch = mult * mc
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, cfg.num_heads, g))
                self.input_blocks.append(_Step(layers))
                chans.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.input_blocks.append(_Step([Downsample(ch)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = _Step([ResBlock(ch, emb, ch, cfg.dropout, g), AttentionBlock(ch, cfg.num_heads, g),
                                   ResBlock(ch, emb, ch, cfg.dropout, g)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, mult * mc, cfg.dropout, g)]
                ch = mult * mc
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, cfg.num_heads, g))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(_Step(layers))
        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(), _zero(nn.Conv2d(mc, out_channels, 3, padding=1)))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        factor = 2 ** (len(self.cfg.channel_mult) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"GuidedUNet input of size {tuple(x.shape[-2:])} is not divisible by {factor}")
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
