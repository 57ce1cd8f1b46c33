"""c-SSN: the Stochastic Segmentation Network conditioned on the reader's labelling style (Zepf et al., ICLR
2023).

:class:`~amisbench.methods.ssn.SSN` whose U-Net receives, next to the image, the one-hot style of a reader
slot tiled over the image (A extra input channels). Styles, training (one random reader per image and step,
with its style) and sampling (``style: mix`` = sample i uses style i mod A; ``style: <int>`` = one style) are
as in :mod:`amisbench.methods.c_prob_unet`, whose notes on what a style means per dataset apply here (ISIC3:
the f / m / p styles; LIDC: a reader slot, not a fixed person; synthetic: arbitrary slot order, no
information). ``nfe(n) = min(n, A)`` with ``mix`` (one U-Net pass per image and style), 1 with a fixed style.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amisbench.nn import UNetConfig
from amisbench.registry import register_method

from ._style import Style, StyleConditioned
from .ssn import SSN, SSNConfig


@dataclass
class CSSNConfig(SSNConfig):
    # the 4-level U-Net c-SSN had before SSN's default became the 7-level LIDC release network
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(widths=(32, 64, 128, 192)))
    style: Style = "mix"  # sampling: uniform mixture of styles, or one style index


@register_method("c_ssn")
class CSSN(StyleConditioned, SSN):
    """c-SSN: SSN with a one-hot reader-style input (Zepf et al. 2023)."""

    Config = CSSNConfig
