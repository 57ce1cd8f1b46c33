"""The Semantic-aware Transformation Network (ST-Net) of SFM, laid out as the ATFM release's network.

The release (PerceptionComputingLab/ATFM at eeaa1b4, ``models/Condition_Unet.py``, built in
``train_prior_LIDC.py`` / ``train_prior_ISIC.py`` as ``Unet(channels=1, dim_mults=(1, 2, 4), dim=image size,
resnet_block_groups=1)``) is a DDPM-style U-Net. In words (``../shared/reference/atfm_release/README.md``):

* input ``concat(cond, x_t)`` (the condition first), a 1x1 stem to ``dim`` channels whose output is kept
  and concatenated again before the last block;
* time: sinusoidal features of the raw flow time t in [0, 1) (``dim`` wide, frequencies
  ``exp(-log(10000) k / (dim/2 - 1))``, sines then cosines) -> Linear(dim, 4 dim) -> GELU -> Linear;
* ResNet block: two [weight-standardised 3x3 conv -> GroupNorm -> (x (scale + 1) + shift on the first,
  from SiLU -> Linear of the time embedding) -> SiLU] plus a 1x1 residual conv when the widths differ;
* encoder levels of widths (dim, dim, 2 dim) -> (dim, 2 dim, 4 dim): ResBlock, ResBlock (a skip after
  each), residual pre-norm linear attention, then pixel-unshuffle 2x2 + 1x1 conv (last level: 3x3 conv,
  no downsampling); bottleneck ResBlock, residual pre-norm full attention, ResBlock; the decoder mirrors
  it with two ResBlocks on ``concat(x, skip)``, linear attention, nearest x2 + 3x3 conv (last: 3x3 conv);
  head: ResBlock(2 dim -> dim) on ``concat(x, stem output)``, 1x1 conv to one channel.

Weight standardisation as released: the release writes ``(w - mean) / rsqrt(var + eps)``, i.e. it
*multiplies* the centred weights by the standard deviation instead of dividing by it; reproduced here so
that the release's trained weights give the release's velocities (eps 1e-5 for float32 weights, 1e-3
otherwise; the release tests the input's dtype, which differs only under autocast).

Every profile builds this network; ``smoke``/``quick`` only shrink ``dim`` and the attention (``heads`` x
``head_dim``, 4 x 32 in the release). Module names are our own; :mod:`.release` maps the release's
state_dict keys onto them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class STNetConfig:
    dim: int = 0  # base width; 0: the image size (the release: dim = --image_size)
    mults: tuple[int, ...] = (1, 2, 4)  # dim_mults
    heads: int = 4  # attention heads (release 4)
    head_dim: int = 32  # width of one head (release 32)
    groups: int = 1  # GroupNorm groups of the ResNet blocks (resnet_block_groups=1)


def time_features(t: Tensor, dim: int) -> Tensor:
    """The release's sinusoidal features of t (N,) -> (N, dim): [sin(t f_k), cos(t f_k)],
    f_k = exp(-log(10000) k / (dim/2 - 1)), k < dim/2. t is used as given (no rescaling)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class WSConv2d(nn.Conv2d):
    """Convolution with the release's weight standardisation (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        # the release picks eps by the input's dtype; by the weights' here, which is the same for a model cast
        # to half precision, while under autocast (float32 weights, bf16 activations) the standardised
        # weights stay those of the float32 model instead of changing scale by 1e-3 / var
        w = self.weight
        eps = 1e-5 if w.dtype == torch.float32 else 1e-3
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        w = (w - mean) / (var + eps).rsqrt()  # as released: scales by the std (see the module docstring)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ResBlock(nn.Module):
    """Two weight-standardised conv + GroupNorm + SiLU layers, the first modulated by the time embedding."""

    def __init__(self, cin: int, cout: int, time_dim: int, groups: int):
        super().__init__()
        self.film = nn.Linear(time_dim, 2 * cout)
        self.conv1 = WSConv2d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = WSConv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.film(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm1(self.conv1(x)) * (scale + 1) + shift)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


def _heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 3 heads d, H, W) -> q, k, v each (B, heads, d, H*W) (channel = part, head, feature)."""
    b, c, h, w = qkv.shape
    return qkv.reshape(b, 3, heads, c // (3 * heads), h * w).unbind(1)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v (B, heads, N, d) -> (B, heads, N, d), written out as the
    release computes it (``attention: einsum``)."""
    sim = torch.einsum("bhid,bhjd->bhij", q * q.shape[-1] ** -0.5, k)
    return torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)


#: ``method.attention``: the bottleneck's softmax attention, written out or as PyTorch's fused kernel
#: (``F.scaled_dot_product_attention``, default scale 1/sqrt(d): the same function up to rounding; flash /
#: memory-efficient kernels on CUDA, no N x N matrix kept).
ATTENTION = {"einsum": softmax_attention, "sdpa": F.scaled_dot_product_attention}


class LinearAttention(nn.Module):
    """x + GroupNorm(conv(linear attention(GroupNorm(x)))): q softmax over features, k over positions."""

    def __init__(self, ch: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.scale = head_dim ** -0.5
        self.norm = nn.GroupNorm(1, ch)
        self.qkv = nn.Conv2d(ch, 3 * heads * head_dim, 1, bias=False)
        self.out = nn.Conv2d(heads * head_dim, ch, 1)
        self.out_norm = nn.GroupNorm(1, ch)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = _heads(self.qkv(self.norm(x)), self.heads)  # (B,heads,d,N)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        o = torch.einsum("bhde,bhdn->bhen", context, q)
        return x + self.out_norm(self.out(o.reshape(b, -1, h, w)))


class Attention(nn.Module):
    """x + conv(multi-head softmax attention(GroupNorm(x))) over all positions (the bottleneck)."""

    def __init__(self, ch: int, heads: int, head_dim: int, attention: str = "einsum"):
        super().__init__()
        self.heads = heads
        self.attend = ATTENTION[attention]
        self.norm = nn.GroupNorm(1, ch)
        self.qkv = nn.Conv2d(ch, 3 * heads * head_dim, 1, bias=False)
        self.out = nn.Conv2d(heads * head_dim, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = (p.transpose(-1, -2) for p in _heads(self.qkv(self.norm(x)), self.heads))  # (B,heads,N,d)
        o = self.attend(q, k, v)
        return x + self.out(o.transpose(-1, -2).reshape(b, -1, h, w))


class Level(nn.Module):
    """One U-Net level: two ResBlocks, linear attention, and the resampling convolution."""

    def __init__(self, res1: ResBlock, res2: ResBlock, attn: LinearAttention, resample: nn.Module):
        super().__init__()
        self.res1, self.res2, self.attn, self.resample = res1, res2, attn, resample


class STNet(nn.Module):
    """v = g_theta(x_t, t | cond), the release's conditional U-Net.

    Args:
        cond_channels: channels of the condition (1: the image on LIDC, the greyscale image on ISIC).
        cfg: widths and attention.
        dim: base width when ``cfg.dim`` is 0 (the image size).
        channels_last: NHWC weights and activations (the same model; faster convolutions).
        attention: ``einsum`` (written out, as released) or ``sdpa`` (``F.scaled_dot_product_attention``)
            for the bottleneck attention: the same weights and function, up to rounding.

    Shapes: ``forward(x_t (N,1,H,W), t (N,) in [0, 1), cond (N,C,H,W)) -> v (N,1,H,W)``; H and W must be
    divisible by ``2 ** (len(mults) - 1)``.
    """

    def __init__(self, cond_channels: int, cfg: STNetConfig, dim: int = 0, channels_last: bool = False,
                 attention: str = "einsum"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"ST-Net attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        dim = cfg.dim or dim
        if dim < 4 or dim % 2:
            raise ValueError(f"ST-Net base width must be even and at least 4, got {dim}")
        if cfg.heads < 1 or cfg.head_dim < 1:
            raise ValueError(f"ST-Net attention needs heads >= 1 and head_dim >= 1, got {cfg.heads} x {cfg.head_dim}")
        self.dim = dim
        self.cond_channels = cond_channels
        self.channels_last = channels_last
        self.factor = 2 ** (len(cfg.mults) - 1)
        time_dim = 4 * dim
        widths = [dim, *(dim * m for m in cfg.mults)]
        pairs = list(zip(widths[:-1], widths[1:]))
        h, hd, g = cfg.heads, cfg.head_dim, cfg.groups

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, time_dim, g)

        self.stem = nn.Conv2d(cond_channels + 1, dim, 1)
        self.time_mlp = nn.Sequential(nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))
        self.down = nn.ModuleList()
        for i, (a, b) in enumerate(pairs):
            last = i == len(pairs) - 1
            resample = nn.Conv2d(a, b, 3, padding=1) if last else nn.Sequential(nn.PixelUnshuffle(2),
                                                                                nn.Conv2d(4 * a, b, 1))
            self.down.append(Level(res(a, a), res(a, a), LinearAttention(a, h, hd), resample))
        mid = widths[-1]
        self.mid1 = res(mid, mid)
        self.mid_attn = Attention(mid, h, hd, attention)
        self.mid2 = res(mid, mid)
        self.up = nn.ModuleList()
        for i, (a, b) in enumerate(reversed(pairs)):
            last = i == len(pairs) - 1
            resample = nn.Conv2d(b, a, 3, padding=1) if last else nn.Sequential(nn.Upsample(scale_factor=2),
                                                                                nn.Conv2d(b, a, 3, padding=1))
            self.up.append(Level(res(b + a, b), res(b + a, b), LinearAttention(b, h, hd), resample))
        self.final_res = res(2 * dim, dim)
        self.head = nn.Conv2d(dim, 1, 1)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if x_t.shape[-1] % self.factor or x_t.shape[-2] % self.factor:
            raise ValueError(f"ST-Net input of size {tuple(x_t.shape[-2:])} is not divisible by {self.factor}")
        x = torch.cat([cond.to(x_t.dtype), x_t], dim=1)  # the release concatenates (condition, x_t)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        r = x
        temb = self.time_mlp(time_features(t, self.dim))
        skips = []
        for lvl in self.down:
            x = lvl.res1(x, temb)
            skips.append(x)
            x = lvl.attn(lvl.res2(x, temb))
            skips.append(x)
            x = lvl.resample(x)
        x = self.mid2(self.mid_attn(self.mid1(x, temb)), temb)
        for lvl in self.up:
            x = lvl.res1(torch.cat([x, skips.pop()], dim=1), temb)
            x = lvl.res2(torch.cat([x, skips.pop()], dim=1), temb)
            x = lvl.resample(lvl.attn(x))
        x = self.final_res(torch.cat([x, r], dim=1), temb)
        return self.head(x)
