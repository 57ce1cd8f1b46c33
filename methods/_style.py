"""Reader-style conditioning shared by the c-models of Zepf et al. (ICLR 2023): c-Prob. U-Net and c-SSN.

Private module (leading underscore): the registry does not scan it. What a style means per dataset is said
in :mod:`amisbench.methods.c_prob_unet`. The style of reader slot a is one-hot(a) over the A reader slots
of the dataset (the release fixes A = 3, the ISIC3 styles).
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from torch import Tensor

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


# the ``style`` config field of a style-conditioned method: "mix" (uniform over the styles) or one style index
Style = Union[Literal["mix"], int]


class StyleConditioned:
    """Mixin of the c-models: training on one random reader slot per image with its style, sampling once per
    style used. List it before :class:`~amisbench.api.Method`; the config needs a ``style`` field.

    Subclasses implement ``styled_loss(images, styles (B,), y (B,1,H,W))`` and
    ``styled_sample(images, state, styles (B,), n, generator) -> (B,n,H,W) bool`` where ``state`` is what
    ``sample_state(images)`` computed once per image batch (the style-free part, e.g. U-Net features).
    """

    def _check_style(self, cfg, styles: int) -> None:
        self.styles = styles
        style_plan(cfg.style, 1, styles, "method.style")  # validate early

    def loss(self, stage, images, masks):
        idx, y = pick_styled_reader(masks)
        return self.styled_loss(images, idx, y)

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        b, _, h, w = images.shape
        state = self.sample_state(images)
        out = torch.empty((b, n, h, w), dtype=torch.bool, device=images.device)
        for s, idx in style_plan(self.cfg.style, n, self.styles, "method.style"):
            st = torch.full((b,), s, device=images.device, dtype=torch.long)
            out[:, idx] = self.styled_sample(images, state, st, len(idx), generator)
        return out

    def styles_used(self, n: int) -> int:
        return len(style_plan(self.cfg.style, n, self.styles, "method.style"))
