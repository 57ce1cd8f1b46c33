"""ISIC3: the Zepf et al. (2023) subset of ISIC 2018 with exactly 3 masks per image (300 images, 256x256 RGB).

Reads a folder written by ``amisbench data prepare isic3 --from isic256_3_style --out DIR``. Reader slots
0, 1, 2 hold the annotation styles f, m, p (the letter at the end of the mask file name). Images are float32
(3,H,W) in [0,1].

Protocols:

* ``clean`` (default): split by image (``val_fraction``/``test_fraction``, defaults 0.1/0.2).
* ``zepf``: Zepf et al.'s split by annotation: the 3 x N (image, style) pairs are shuffled and cut into
  train/val/test with the same fractions, so an image can sit in train and test. A split holds every image
  with at least one annotation in it, with all its masks. Results carry the label in
  :attr:`ISIC3.protocol_labels`. The original code's random generator could not be checked here, so this
  reproduces the protocol's structure (and its leak), not necessarily its exact lists.

Training augmentation (defaults): horizontal and vertical flips, rotation in +-15 degrees, scale 0.9-1.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from amisbench.registry import register_dataset

from ._adapter import PreparedDataset


@dataclass
class ISIC3Config:
    root: str = ""  # the prepared folder (``--data-root``)
    protocol: Literal["clean", "zepf"] = "clean"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    size: int = 0  # 0: native 256 px; otherwise resize (image bilinear, masks by majority)
    hflip: bool = True
    vflip: bool = True
    rotate_deg: float = 15.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    verify: bool = True  # hash every prepared file against the manifest (once per process)


@register_dataset("isic3")
class ISIC3(PreparedDataset):
    """ISIC 2018 subset with 3 annotation styles per image (Zepf et al.), from `amisbench data prepare isic3`."""

    Config = ISIC3Config
    kind = "isic3"
    protocol_labels = {
        "zepf": "leaky protocol: Zepf et al. split by annotation (the same image in train and test)",
    }
