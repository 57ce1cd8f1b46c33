"""Reader-style conditioning shared by the c-models of Zepf et al. (ICLR 2023): c-Prob. U-Net and c-SSN.

Private module (leading underscore): the registry does not scan it. What a style means per dataset is said
in :mod:`amisbench.methods.c_prob_unet`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Union

import torch
from torch import Tensor

from amisbench.api import DataSpec
from amisbench.errors import UserError

from ._blocks import pick_reader


def style_maps(styles: Tensor, count: int, like: Tensor) -> Tensor:
    """One-hot styles (B,) tiled to (B,count,H,W) in the dtype and size of ``like`` (B,C,H,W)."""
    oh = torch.nn.functional.one_hot(styles.long(), count).to(like.dtype)
    return oh[:, :, None, None].expand(-1, -1, *like.shape[-2:])


def with_style(images: Tensor, styles: Tensor, count: int) -> Tensor:
    """[image, one-hot style tiled]: (B,C,H,W) -> (B,C+count,H,W)."""
    return torch.cat([images, style_maps(styles, count, images)], dim=1)


def pick_styled_reader(masks: Tensor) -> tuple[Tensor, Tensor]:
    """One random reader slot per image (global torch RNG): its index (B,) and its mask (B,1,H,W)."""
    idx, y = pick_reader(masks, return_index=True)
    return idx, y[:, None]


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


# the ``style`` config field of a style-conditioned method: "mix" (uniform over the styles) or one style index
Style = Union[Literal["mix"], int]


class StyleConditioned:
    """Mixin that turns a method into its style-conditioned version; list it before the method class:
    ``class CSSN(StyleConditioned, SSN)``. The config must have a ``style`` field ("mix" or an index).

    The wrapped networks see ``C + A`` input channels (image and one-hot style of the A reader slots).
    Training uses one random reader slot per image with its style; sampling runs the wrapped method once per
    style used (``nfe(n) = min(n, A)`` with ``mix``, 1 with a fixed style).
    """

    def __init__(self, cfg, spec: DataSpec):
        super().__init__(cfg, replace(spec, channels=spec.channels + spec.readers))
        self.spec = spec
        self.styles = spec.readers
        style_plan(cfg.style, 1, self.styles, "method.style")  # validate early

    def loss(self, stage, images, masks):
        idx, y = pick_styled_reader(masks)
        return super().loss(stage, with_style(images, idx, self.styles), y)

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        unstyled = super().sample
        base = lambda x, m, g: unstyled(x, m, generator=g)  # noqa: E731
        return styled_sample(base, images, n, self.cfg.style, self.styles, generator, "method.style")

    def nfe(self, n: int) -> int:
        # the wrapped method once per style used, for that style's share of the samples
        unstyled = super().nfe  # (zero-argument super() does not work inside the generator below)
        return sum(unstyled(len(idx)) for _, idx in style_plan(self.cfg.style, n, self.styles, "method.style"))
