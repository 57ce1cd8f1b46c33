"""Training-time augmentation of one sample: flips, rotation and isotropic scaling.

A pure function of the generator: the same generator state gives the same transform, on CPU or GPU, and
the generator advances by a fixed number of draws whatever the image holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def augment(image: Tensor, masks: Tensor, generator: torch.Generator | None, *, hflip: bool = False,
            vflip: bool = False, rotate_deg: float = 0.0, scale_range: tuple[float, float] = (1.0, 1.0)
            ) -> tuple[Tensor, Tensor]:
    """Apply one random flip/rotation/scale to an image and all its reader masks alike.

    Args:
        image: float (C,H,W).
        masks: (A,H,W), uint8/bool/float in {0,1}; returned with the same dtype.
        generator: the source of randomness (on any device).
        hflip, vflip: flip left-right / up-down, each with probability 1/2.
        rotate_deg: rotation angle drawn uniformly in [-rotate_deg, rotate_deg].
        scale_range: zoom factor drawn uniformly in this range (> 1 enlarges the content).

    Returns:
        The transformed image (bilinear, border padding) and masks (nearest, zero padding).
    """
    lo, hi = scale_range
    if not (hflip or vflip or rotate_deg or lo != 1.0 or hi != 1.0):
        return image, masks
    dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(4, generator=generator, device=dev, dtype=torch.float64).tolist()
    if hflip and u[0] < 0.5:
        image, masks = image.flip(-1), masks.flip(-1)
    if vflip and u[1] < 0.5:
        image, masks = image.flip(-2), masks.flip(-2)
    angle = math.radians(rotate_deg * (2.0 * u[2] - 1.0))
    scale = lo + (hi - lo) * u[3]
    if angle == 0.0 and scale == 1.0:
        return image, masks
    # affine_grid maps output coordinates to input coordinates: rotate back by -angle and shrink by 1/scale.
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=torch.float32, device=image.device)[None]
    h, w = image.shape[-2:]
    grid = F.grid_sample  # alias keeps the two calls below short
    g = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    img = grid(image[None].float(), g, mode="bilinear", padding_mode="border", align_corners=False)[0]
    m = grid(masks[None].float(), g.to(masks.device), mode="nearest", padding_mode="zeros",
             align_corners=False)[0]
    return img.to(image.dtype), m.to(masks.dtype)
