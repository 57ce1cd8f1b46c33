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

from dataclasses import dataclass

from amisbench.registry import register_method

from ._style import Style, StyleConditioned
from .prob_unet import ProbUNet, ProbUNetConfig


@dataclass
class CProbUNetConfig(ProbUNetConfig):
    # as before Prob. U-Net's default became the PyTorch port (1 logit, beta 10): 2 softmax classes, beta 1
    classes: int = 2
    beta: float = 1.0
    style: Style = "mix"  # sampling: uniform mixture of styles, or one style index


@register_method("c_prob_unet")
class CProbUNet(StyleConditioned, ProbUNet):
    """c-Prob. U-Net: Prob. U-Net with a one-hot reader-style input (Zepf et al. 2023)."""

    Config = CProbUNetConfig
