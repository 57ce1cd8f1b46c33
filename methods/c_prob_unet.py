"""c-Prob. U-Net: the Prob. U-Net conditioned on the reader's labelling style (Zepf et al., ICLR 2023,
"That Label's got Style: Handling Label Style Bias for Uncertain Image Segmentation").

Model. :class:`~amisbench.methods.prob_unet.ProbUNet` whose every network (U-Net, prior and posterior
encoders) receives, next to the image, a one-hot style tiled over the image (A extra input channels). The style
of reader slot a is one-hot(a) over the A reader slots of the dataset:

- on ISIC3 the slots are the f / m / p annotation styles of the Zepf et al. subset (fixed per slot);
- on LIDC the slot is the reader position in the file, which is *not* the same radiologist across images, so
  the "style" there is only a slot index (as in the ATFM paper's use of the c-models it carries little meaning);
- on the synthetic dataset the reader slot order is arbitrary: the style carries no information (fine for a
  smoke-level comparison, and said here so nobody reads a style effect into it).

Training: one reader per image per step (uniformly at random, global torch RNG) together with its style;
the loss is the Prob. U-Net ELBO on that reader. Sampling: ``style: mix`` mixes the styles uniformly (sample i
uses style i mod A, so every style gets n / A samples); ``style: <int>`` uses that one style for every sample.
The U-Net runs once per (image, style used): ``nfe(n) = min(n, A)`` with ``mix``, 1 with a fixed style.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Union

import torch
from torch import Tensor

from amisbench.api import DataSpec
from amisbench.errors import UserError
from amisbench.registry import register_method

from .prob_unet import ProbUNet, ProbUNetConfig


def style_maps(styles: Tensor, count: int, like: Tensor) -> Tensor:
    """One-hot styles (B,) tiled to (B,count,H,W) in the dtype and size of ``like`` (B,C,H,W)."""
    oh = torch.nn.functional.one_hot(styles.long(), count).to(like.dtype)
    return oh[:, :, None, None].expand(-1, -1, *like.shape[-2:])


def with_style(images: Tensor, styles: Tensor, count: int) -> Tensor:
    """[image, one-hot style tiled]: (B,C,H,W) -> (B,C+count,H,W)."""
    return torch.cat([images, style_maps(styles, count, images)], dim=1)


def pick_styled_reader(masks: Tensor) -> tuple[Tensor, Tensor]:
    """One random reader slot per image (global torch RNG): its index (B,) and its mask (B,1,H,W)."""
    idx = torch.randint(0, masks.shape[1], (masks.shape[0],), device=masks.device)
    return idx, masks[torch.arange(masks.shape[0], device=masks.device), idx][:, None]


def style_plan(style: Union[str, int], n: int, count: int, where: str) -> list[tuple[int, list[int]]]:
    """(style, sample indices) pairs: ``mix`` gives sample i style i mod count; an int gives every sample it."""
    if style == "mix":
        return [(s, list(range(s, n, count))) for s in range(min(count, n))]
    if not isinstance(style, int) or not 0 <= style < count:
        raise UserError(f"{where}: expected 'mix' or a style index in 0..{count - 1}, got {style!r}")
    return [(style, list(range(n)))]


def styled_sample(base_sample, images: Tensor, n: int, style, count: int, generator, where: str) -> Tensor:
    """Run ``base_sample(styled_images, n_s, generator)`` once per style and scatter into (B,n,H,W)."""
    b, _, h, w = images.shape
    out = torch.empty((b, n, h, w), dtype=torch.bool, device=images.device)
    for s, idx in style_plan(style, n, count, where):
        st = torch.full((b,), s, device=images.device, dtype=torch.long)
        out[:, idx] = base_sample(with_style(images, st, count), len(idx), generator)
    return out


@dataclass
class CProbUNetConfig(ProbUNetConfig):
    style: Union[Literal["mix"], int] = "mix"  # sampling: uniform mixture of styles, or one style index


@register_method("c_prob_unet")
class CProbUNet(ProbUNet):
    """c-Prob. U-Net: Prob. U-Net with a one-hot reader-style input (Zepf et al. 2023)."""

    Config = CProbUNetConfig

    def __init__(self, cfg: CProbUNetConfig, spec: DataSpec):
        super().__init__(cfg, replace(spec, channels=spec.channels + spec.readers))
        self.spec = spec
        self.styles = spec.readers
        style_plan(cfg.style, 1, self.styles, "method.style")  # validate early

    def loss(self, stage, images, masks):
        idx, y = pick_styled_reader(masks)
        return super().loss(stage, with_style(images, idx, self.styles), y)

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        base = lambda x, m, g: ProbUNet.sample(self, x, m, generator=g)  # noqa: E731
        return styled_sample(base, images, n, self.cfg.style, self.styles, generator, "method.style")

    def nfe(self, n: int) -> int:
        return min(n, self.styles) if self.cfg.style == "mix" else 1
