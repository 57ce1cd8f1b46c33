"""Segment Anything (Kirillov et al., ICCV 2023) as a building block: image encoder, prompt encoder and mask
decoder, written for this suite with the parameter names of the official release (``segment_anything``
1.0, Apache-2.0), so that an official checkpoint (``sam_vit_b_01ec64.pth`` and the like) loads into it.

What differs from the release, on purpose:
- Any square input size that is a multiple of the patch size, and any number of output masks (the
  SAMed-style adaptation that P2SAM builds on: 128 px inputs, 8 masks). :func:`load_sam_checkpoint`
  adapts an official checkpoint as SAMed's loader does: the absolute position embedding is resized
  bilinearly and the relative position tables of the global-attention blocks linearly (the interpolation the
  release itself applies to tables of the wrong length at run time); mask tokens, hypernetwork MLPs and the IoU head are kept when
  their count matches and newly initialised otherwise.
- Optional LoRA (Hu et al. 2022) on the query and value projections of every encoder block
  (``attn.lora_{q,v}_{a,b}``), the adaptation P2SAM trains.
- The point, box and mask prompt encoders are not built: the methods here prompt SAM only through the
  "no mask" dense embedding (perturbed per sample by P2SAM). Their checkpoint entries are skipped by name.

Shapes follow the release: the encoder works channels-last (B,H,W,C) inside and returns (B,256,h,w).
Equivalence with the release on shared random weights is tested in ``tests/methods/test_p2sam.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amisbench.errors import UserError


@dataclass
class SAMConfig:
    """Sizes of the SAM network. Defaults: the ViT-B model of the release (``build_sam_vit_b``)."""

    embed_dim: int = 768  # ViT-B 768, ViT-L 1024, ViT-H 1280
    depth: int = 12  # 12 / 24 / 32
    heads: int = 12  # 12 / 16 / 16
    global_attn: tuple[int, ...] = (2, 5, 8, 11)  # ViT-L (5, 11, 17, 23), ViT-H (7, 15, 23, 31)
    window: int = 14
    patch: int = 16
    mlp_ratio: float = 4.0
    prompt_dim: int = 256  # encoder output channels = prompt / decoder width
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp: int = 2048


# Presets of the release's three encoders, for error messages that name the right one.
_PRESETS = {
    "vit_b": dict(embed_dim=768, depth=12, heads=12, global_attn=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, heads=16, global_attn=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, heads=16, global_attn=(7, 15, 23, 31)),
}


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B,C,H,W) map (eps 1e-6, as the release)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).square().mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module]):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


# -- image encoder ------------------------------------------------------------------------------------------
def _rel_table(q_size: int, k_size: int, table: Tensor) -> Tensor:
    """Relative position embeddings (q_size, k_size, C) gathered from ``table`` (2*max-1, C)."""
    span = 2 * max(q_size, k_size) - 1
    if table.shape[0] != span:
        table = F.interpolate(table.T[None], size=span, mode="linear")[0].T
    q = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    return table[((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


class EncoderAttention(nn.Module):
    """Multi-head self-attention with decomposed relative positions (MViTv2 style) and optional LoRA."""

    def __init__(self, dim: int, heads: int, size: tuple[int, int], lora_rank: int = 0):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size[1] - 1, head_dim))
        self.lora_rank = lora_rank
        if lora_rank > 0:
            # LoRA on q and v: W x + B A x, A Kaiming-uniform, B zero (so training starts from the base model)
            self.lora_q_a = nn.Linear(dim, lora_rank, bias=False)
            self.lora_q_b = nn.Linear(lora_rank, dim, bias=False)
            self.lora_v_a = nn.Linear(dim, lora_rank, bias=False)
            self.lora_v_b = nn.Linear(lora_rank, dim, bias=False)
            for a, b in ((self.lora_q_a, self.lora_q_b), (self.lora_v_a, self.lora_v_b)):
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                nn.init.zeros_(b.weight)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x)
        if self.lora_rank > 0:
            dq = self.lora_q_b(self.lora_q_a(x))
            dv = self.lora_v_b(self.lora_v_a(x))
            qkv = qkv + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)
        qkv = qkv.reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * self.heads, h * w, -1)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rh = _rel_table(h, h, self.rel_pos_h)
        rw = _rel_table(w, w, self.rel_pos_w)
        rq = q.reshape(b * self.heads, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, rw)
        attn = (attn.view(-1, h, w, h, w) + rel_h[..., None] + rel_w[..., None, :]).view(-1, h * w, h * w)
        x = (attn.softmax(dim=-1) @ v).view(b, self.heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


def _windows(x: Tensor, size: int) -> tuple[Tensor, tuple[int, int]]:
    """(B,H,W,C) -> (B*nw, size, size, C), zero-padding H and W up to multiples of ``size``."""
    b, h, w, c = x.shape
    ph, pw = (size - h % size) % size, (size - w % size) % size
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // size, size, wp // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size, size, c), (hp, wp)


def _unwindow(x: Tensor, size: int, padded: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    hp, wp = padded
    b = x.shape[0] // ((hp // size) * (wp // size))
    x = x.view(b, hp // size, wp // size, size, size, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1]].contiguous()


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, window: int, grid: tuple[int, int], lora_rank: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EncoderAttention(dim, heads, grid if window == 0 else (window, window), lora_rank)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window = window

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            hw = (x.shape[1], x.shape[2])
            x, padded = _windows(x, self.window)
            x = _unwindow(self.attn(x), self.window, padded, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """ViT with windowed and global attention blocks and a conv neck: (B,3,S,S) -> (B,prompt_dim,S/p,S/p)."""

    def __init__(self, cfg: SAMConfig, image_size: int, lora_rank: int = 0):
        super().__init__()
        grid = image_size // cfg.patch
        self.patch_embed = PatchEmbed(cfg.patch, 3, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(cfg.embed_dim, cfg.heads, cfg.mlp_ratio, 0 if i in cfg.global_attn else cfg.window,
                         (grid, grid), lora_rank)
            for i in range(cfg.depth))
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.prompt_dim, 1, bias=False), LayerNorm2d(cfg.prompt_dim),
            nn.Conv2d(cfg.prompt_dim, cfg.prompt_dim, 3, padding=1, bias=False), LayerNorm2d(cfg.prompt_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


# -- prompt encoder (dense "no mask" prompt and positional encoding only) ----------------------------------
class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates."""

    def __init__(self, feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, feats))

    def forward(self, h: int, w: int) -> Tensor:
        m = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=m.device, dtype=m.dtype) + 0.5) / h
        xs = (torch.arange(w, device=m.device, dtype=m.dtype) + 0.5) / w
        coords = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)  # (h,w,2) as (x, y)
        proj = 2 * math.pi * ((2 * coords - 1) @ m)
        return torch.cat([proj.sin(), proj.cos()], dim=-1).permute(2, 0, 1)  # (C,h,w)


class PromptEncoder(nn.Module):
    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.no_mask_embed = nn.Embedding(1, dim)
        self.grid = grid

    def dense_pe(self) -> Tensor:
        """(1,C,g,g) positional encoding of the image-embedding grid."""
        return self.pe_layer(self.grid, self.grid)[None]

    def dense_no_mask(self, batch: int) -> Tensor:
        """(B,C,g,g) dense embedding of "no mask prompt"."""
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, self.grid, self.grid)


# -- mask decoder --------------------------------------------------------------------------------------------
class TokenAttention(nn.Module):
    """Attention with optional down-projection of the internal width (the release's ``downsample_rate``)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out = attn.softmax(dim=-1) @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayBlock(nn.Module):
    """Token self-attention, token-to-image, MLP on tokens, image-to-token (post-norm, as released)."""

    def __init__(self, dim: int, heads: int, mlp: int, skip_first_pe: bool):
        super().__init__()
        self.self_attn = TokenAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, heads, 2)
        self.skip_first_pe = skip_first_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, heads: int, mlp: int):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp, i == 0) for i in range(depth))
        self.final_attn_token_to_image = TokenAttention(dim, heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MLP(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, layers: int):
        super().__init__()
        dims = [cin] + [hidden] * (layers - 1) + [cout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Two-way transformer over [IoU token, mask tokens] and the image embedding; one low-res mask per mask
    token from a hypernetwork MLP dotted with the 4x upscaled embedding."""

    def __init__(self, cfg: SAMConfig, mask_tokens: int):
        super().__init__()
        d = cfg.prompt_dim
        self.transformer = TwoWayTransformer(cfg.decoder_depth, d, cfg.decoder_heads, cfg.decoder_mlp)
        self.iou_token = nn.Embedding(1, d)
        self.mask_tokens = nn.Embedding(mask_tokens, d)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, 2, stride=2), LayerNorm2d(d // 4), nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, 2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(d, d, d // 8, 3) for _ in range(mask_tokens))
        self.iou_prediction_head = MLP(d, 256, mask_tokens, 3)

    def forward(self, image: Tensor, image_pe: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        """Masks of every mask token.

        Args:
            image: (B,C,g,g) image embeddings (one per row of ``dense``).
            image_pe: (1,C,g,g) positional encoding.
            dense: (B,C,g,g) dense prompt embeddings.

        Returns:
            (B,T,4g,4g) low-resolution mask logits for all T mask tokens and (B,T) IoU predictions.
        """
        b, c, h, w = image.shape
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)[None].expand(b, -1, -1)
        hs, keys = self.transformer(image + dense, image_pe.expand(b, -1, -1, -1), tokens)
        t = self.mask_tokens.num_embeddings
        up = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper @ up.flatten(2)).view(b, t, up.shape[2], up.shape[3])
        return masks, self.iou_prediction_head(hs[:, 0])


class SAM(nn.Module):
    """Image encoder + prompt encoder (dense part) + mask decoder with ``masks`` multimask outputs.

    As in the release, mask token 0 is the single-mask output and tokens 1..``masks`` the multimask ones,
    so the decoder has ``masks + 1`` mask tokens and :meth:`decode` returns tokens 1..``masks``.
    """

    def __init__(self, cfg: SAMConfig, image_size: int, masks: int = 3, lora_rank: int = 0):
        super().__init__()
        if image_size % cfg.patch:
            raise UserError(f"SAM needs an image size divisible by its patch size {cfg.patch}; got {image_size}")
        if cfg.embed_dim % cfg.heads or cfg.prompt_dim % (2 * cfg.decoder_heads) or cfg.prompt_dim % 8:
            raise UserError("method.sam: embed_dim must be divisible by heads, and prompt_dim by 8 and by "
                            "2 * decoder_heads")
        self.cfg = cfg
        self.image_size = image_size
        self.grid = image_size // cfg.patch
        self.image_encoder = ImageEncoderViT(cfg, image_size, lora_rank)
        self.prompt_encoder = PromptEncoder(cfg.prompt_dim, self.grid)
        self.mask_decoder = MaskDecoder(cfg, masks + 1)

    def encode(self, images: Tensor) -> Tensor:
        """(B,C,S,S) images (1 or 3 channels; one channel is repeated) -> (B,prompt_dim,g,g) embeddings.

        No pixel normalisation: P2SAM's release sets pixel mean 0 and std 1 on already normalised scans.
        """
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.image_encoder(images)

    def decode(self, embeddings: Tensor, dense: Tensor) -> Tensor:
        """Multimask logits upsampled to the input size: (B,masks,S,S)."""
        low, _ = self.mask_decoder(embeddings, self.prompt_encoder.dense_pe(), dense)
        return F.interpolate(low[:, 1:], size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if ".lora_" in n]


# -- official checkpoints ------------------------------------------------------------------------------------
_UNUSED_PREFIXES = ("prompt_encoder.point_embeddings.", "prompt_encoder.not_a_point_embed.",
                    "prompt_encoder.mask_downscaling.")
_MASK_TOKEN_PREFIXES = ("mask_decoder.mask_tokens.", "mask_decoder.output_hypernetworks_mlps.",
                        "mask_decoder.iou_prediction_head.layers.2.")


def _guess_preset(state: dict[str, Tensor]) -> str:
    w = state.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        return ""
    for name, p in _PRESETS.items():
        if p["embed_dim"] == w.shape[0]:
            return name
    return ""


def load_sam_checkpoint(model: SAM, path: str | Path) -> dict[str, list[str]]:
    """Load an official SAM checkpoint (a state dict of tensors) into ``model``, adapting sizes.

    Returns:
        ``{"resized": [...], "reinitialised": [...], "skipped": [...]}``: parameter names that were
        interpolated to the model's grid, left at their fresh initialisation because the number of mask
        tokens differs, and checkpoint entries of prompt encoders the model does not build.

    Raises:
        UserError: the file is missing or not a state dict, or its shapes belong to another encoder.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SAM checkpoint {path} does not exist: pass the official file (e.g. sam_vit_b_01ec64.pth) "
                        "that you downloaded yourself; amisbench never downloads weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one sentence
        raise UserError(f"SAM checkpoint {path} could not be read as a tensor state dict ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"SAM checkpoint {path} is not a state dict of tensors")
    own = model.state_dict()
    cfg = model.cfg
    preset = _guess_preset(state)
    if preset and _PRESETS[preset]["embed_dim"] != cfg.embed_dim:
        p = _PRESETS[preset]
        raise UserError(
            f"SAM checkpoint {path} holds a {preset.replace('_', '-').upper()} encoder (embed_dim {p['embed_dim']}, "
            f"depth {p['depth']}) but method.sam has embed_dim {cfg.embed_dim}; set method.sam.embed_dim="
            f"{p['embed_dim']}, depth={p['depth']}, heads={p['heads']}, global_attn={list(p['global_attn'])}")
    out: dict[str, Tensor] = {}
    report: dict[str, list[str]] = {"resized": [], "reinitialised": [], "skipped": []}
    tokens = state.get("mask_decoder.mask_tokens.weight")
    # another mask-token count (P2SAM: 8 multimask outputs instead of 3): every per-token part starts fresh,
    # as in SAMed's loader; keeping the first few tokens' MLPs would mix roles
    fresh_tokens = tokens is not None and tokens.shape != own["mask_decoder.mask_tokens.weight"].shape
    for name, value in state.items():
        if name.startswith(_UNUSED_PREFIXES):
            report["skipped"].append(name)
            continue
        if fresh_tokens and name.startswith(_MASK_TOKEN_PREFIXES):
            report["reinitialised"].append(name)
            continue
        if name not in own:
            raise UserError(f"SAM checkpoint {path} has an entry {name} that this SAM does not have: "
                            "is it a SAM 1 checkpoint of the configured size?")
        target = own[name]
        if value.shape == target.shape:
            out[name] = value.to(target.dtype)
        elif name == "image_encoder.pos_embed":
            g = target.shape[1]
            out[name] = F.interpolate(value.permute(0, 3, 1, 2).float(), size=(g, g), mode="bilinear",
                                      align_corners=False).permute(0, 2, 3, 1).to(target.dtype)
            report["resized"].append(name)
        elif name.endswith(("rel_pos_h", "rel_pos_w")) and value.shape[1] == target.shape[1]:
            out[name] = F.interpolate(value.T[None].float(), size=target.shape[0], mode="linear")[0].T.to(target.dtype)
            report["resized"].append(name)
        else:
            raise UserError(f"SAM checkpoint {path}: {name} has shape {tuple(value.shape)} but the model expects "
                            f"{tuple(target.shape)} (method.sam does not match the checkpoint)")
    missing = [n for n in own if n not in out and ".lora_" not in n
               and not (fresh_tokens and n.startswith(_MASK_TOKEN_PREFIXES))]
    if missing:
        raise UserError(f"SAM checkpoint {path} lacks {len(missing)} of the entries the model needs, e.g. {missing[0]}")
    model.load_state_dict(out, strict=False)
    return report
