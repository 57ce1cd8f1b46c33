"""Bridge to the ATFM release's trained networks (PerceptionComputingLab/ATFM at eeaa1b4).

The release saves checkpoints as dicts with ``model_state_dict`` (``train_GTR.py``: ``GTR_LIDC.pt``,
``GTR-ISIC.pt``; ``train_prior_*.py``: ``SFM-for-ATFM-LIDC.pth``, ``120SFM-checkpoint.pth``). This module
maps their state_dict keys onto our module names and loads them *strictly* (every key, every shape):

* :func:`st_net_from_release` -> our :class:`~.st_net.STNet`, called as ``v = net(x_t, t, cond)`` with the
  release's meaning (t in [0, 1) as is, cond the image: greyscale 0.299 R + 0.587 G + 0.114 B on ISIC);
* :func:`gtr_from_release` -> our :class:`~.gtr.GTR`, with
  ``mean, cov_diag, cov_factor = gtr.gaussian(image)`` of shapes (B,H*W), (B,H*W), (B,H*W,rank);
* :func:`read_checkpoint` reads a release file (``torch.load(weights_only=True)``); anything else is one
  :class:`~amisbench.errors.UserError` naming the file;
* :func:`st_net_to_release` / :func:`gtr_to_release` write our weights under the release's names.

Sizes are read from the tensors (ST-Net ``dim`` and condition channels from the stem, GTR input channels,
widths and rank from the convolutions); the attention heads are not visible in the shapes and are taken
as the release's 4 (``heads`` to override).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from amisbench.errors import UserError

from .gtr import GTR, release_backbone
from .st_net import STNet, STNetConfig

StateDict = Mapping[str, Tensor]

_RES = {"film": "mlp.1", "conv1": "block1.proj", "norm1": "block1.norm", "conv2": "block2.proj",
        "norm2": "block2.norm", "skip": "res_conv"}
_LIN_ATTN = {"norm": "fn.norm", "qkv": "fn.fn.to_qkv", "out": "fn.fn.to_out.0", "out_norm": "fn.fn.to_out.1"}
_ATTN = {"norm": "fn.norm", "qkv": "fn.fn.to_qkv", "out": "fn.fn.to_out"}
_LEVEL = {"res1": "0", "res2": "1", "attn": "2", "resample": "3"}
_TOP = {"stem": "init_conv", "mid1": "mid_block1", "mid2": "mid_block2", "mid_attn": "mid_attn",
        "final_res": "final_res_block", "head": "final_conv", "down": "downs", "up": "ups"}


def st_net_release_key(key: str) -> str:
    """Our ST-Net state_dict key -> the release's (``Unet`` of ``models/Condition_Unet.py``)."""
    p = key.split(".")
    if p[0] == "time_mlp":  # ours: Linear, GELU, Linear; the release puts the sinusoidal module first
        return ".".join(["time_mlp", str(int(p[1]) + 1), *p[2:]])
    head = _TOP[p[0]]
    if p[0] in ("down", "up"):
        part, rest = p[2], p[3:]
        if part in ("res1", "res2"):
            rest = [_RES[rest[0]], *rest[1:]]
        elif part == "attn":
            rest = [_LIN_ATTN[rest[0]], *rest[1:]]
        return ".".join([head, p[1], _LEVEL[part], *rest])
    if p[0] == "mid_attn":
        return ".".join([head, _ATTN[p[1]], *p[2:]])
    if p[0] in ("mid1", "mid2", "final_res"):
        return ".".join([head, _RES[p[1]], *p[2:]])
    return ".".join([head, *p[1:]])


def gtr_release_key(key: str) -> str:
    """Our GTR state_dict key -> the release's (``GaussianTruncationRepresentation`` of ``models/GTR.py``).

    The release's blocks are ``nn.Sequential`` of [AvgPool (levels > 0), Dropout2d, conv, ReLU, conv, ReLU,
    conv, ReLU], so conv k of level i sits at index 2k + 1 (+1 below the first level)."""
    p = key.split(".")
    if p[0] == "head":
        return ".".join([{"mean": "mean_l", "log_diag": "log_cov_diag_l", "factor": "cov_factor_l"}[p[1]], *p[2:]])
    if p[:2] == ["unet", "down_blocks"] and p[3] == "convs":
        i, k = int(p[2]), int(p[4])
        return ".".join(["unet.contracting_path", str(i), "layers", str(2 * k + 1 + (i > 0)), *p[5:]])
    if p[:2] == ["unet", "up_blocks"] and p[3] == "convs":
        return ".".join(["unet.upsampling_path", p[2], "conv_block.layers", str(2 * int(p[4]) + 1), *p[5:]])
    raise KeyError(key)


def _load_strict(net: nn.Module, state: StateDict, to_release, what: str) -> nn.Module:
    """Load release-named ``state`` into ``net`` through the key map, requiring the same keys and shapes."""
    ours = net.state_dict()
    names = {to_release(k): k for k in ours}
    missing = sorted(set(names) - set(state))
    extra = sorted(set(state) - set(names))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else "")] if missing else []) + \
                ([f"unexpected {', '.join(extra[:4])}" + (" ..." if len(extra) > 4 else "")] if extra else [])
        raise ValueError(f"{what}: the state_dict does not have the release's layout ({'; '.join(parts)})")
    for rk, k in names.items():
        if tuple(state[rk].shape) != tuple(ours[k].shape):
            raise ValueError(f"{what}: {rk} has shape {tuple(state[rk].shape)}, this network needs "
                             f"{tuple(ours[k].shape)}")
    net.load_state_dict({k: state[rk] for rk, k in names.items()}, strict=True)
    return net


def load_st_net(net: STNet, state: StateDict) -> STNet:
    """Load a release ST-Net state_dict into ``net`` (strict; ValueError on another layout)."""
    return _load_strict(net, state, st_net_release_key, "ST-Net")


def load_gtr(net: GTR, state: StateDict) -> GTR:
    """Load a release GTR state_dict into ``net`` (strict; ValueError on another layout)."""
    return _load_strict(net, state, gtr_release_key, "GTR")


def _shape(state: StateDict, key: str, what: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"{what}: no '{key}' in the state_dict: not the release's layout")
    return tuple(state[key].shape)


def st_net_from_release(state_dict: StateDict, *, heads: int = 4) -> STNet:
    """Our ST-Net holding the release's weights; ``dim``, condition channels, multipliers and head width
    are read from the tensors."""
    dim, cin = _shape(state_dict, "init_conv.weight", "ST-Net")[:2]
    levels = len({k.split(".")[1] for k in state_dict if k.startswith("downs.")})
    # level i works at width dims[i] of dims = [dim, dim m_1, ..., dim m_L]; the bottleneck at dim m_L
    widths = [_shape(state_dict, f"downs.{i}.0.block1.proj.weight", "ST-Net")[0] for i in range(1, levels)]
    widths.append(_shape(state_dict, "mid_block1.block1.proj.weight", "ST-Net")[0])
    qkv = _shape(state_dict, "mid_attn.fn.fn.to_qkv.weight", "ST-Net")[0]
    cfg = STNetConfig(dim=dim, mults=tuple(w // dim for w in widths), heads=heads, head_dim=qkv // (3 * heads))
    return load_st_net(STNet(cin - 1, cfg), state_dict).eval()


def gtr_from_release(state_dict: StateDict, *, eps: float = 1e-5) -> GTR:
    """Our GTR holding the release's weights; input channels, widths and rank are read from the tensors."""
    levels = len({k.split(".")[2] for k in state_dict if k.startswith("unet.contracting_path.")})
    if not levels:
        raise ValueError("GTR: no 'unet.contracting_path' keys in the state_dict: not the release's layout")
    first = _shape(state_dict, "unet.contracting_path.0.layers.1.weight", "GTR")
    widths = tuple(_shape(state_dict, f"unet.contracting_path.{i}.layers.{1 + (i > 0)}.weight", "GTR")[0]
                   for i in range(levels))
    rank = _shape(state_dict, "cov_factor_l.weight", "GTR")[0]
    return load_gtr(GTR(first[1], release_backbone(widths), rank, eps, eps_twice=True), state_dict).eval()


def st_net_to_release(net: STNet) -> dict[str, Tensor]:
    """Our ST-Net's weights under the release's key names (a state_dict its ``Unet`` loads)."""
    return {st_net_release_key(k): v for k, v in net.state_dict().items()}


def gtr_to_release(net: GTR) -> dict[str, Tensor]:
    """Our GTR's weights under the release's key names."""
    return {gtr_release_key(k): v for k, v in net.state_dict().items()}


def read_checkpoint(path: str | Path, what: str) -> dict[str, Tensor]:
    """The ``model_state_dict`` of a release checkpoint file, read with ``weights_only=True``.

    Raises:
        UserError: naming the file, when it is missing, not a torch file, unsafe to unpickle, or not a
            dict holding a ``model_state_dict`` of tensors.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} {p}: no such file (expected an ATFM release checkpoint, e.g. GTR_LIDC.pt)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"{what} {p}: not a checkpoint that loads with torch.load(weights_only=True) "
                        f"({type(e).__name__})") from None
    sd = obj.get("model_state_dict") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UserError(f"{what} {p}: expected a dict with 'model_state_dict' (the ATFM release's checkpoint "
                        "format), found " + (f"keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict)
                                             else type(obj).__name__))
    return sd
