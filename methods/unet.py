"""U-Net floor: a deterministic U-Net trained on random readers; every sample is the same mask.

A reference row no paper has. It calibrates the diversity metrics from below: GED, HM-IoU and MDM of a
method that ignores the ambiguity entirely. The network is the suite's shared U-Net (the SSN/GTR backbone,
widths 32/64/128/192 at paper scale) with a one-logit head, trained with binary cross-entropy against one
reader drawn at random per image and step (so it learns the per-pixel reader frequency); sampling thresholds
the sigmoid at 0.5 and repeats that mask n times.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from amisbench.api import DataSpec, Method
from amisbench.nn import UNet, UNetConfig
from amisbench.registry import register_method

from ._blocks import pick_reader


@dataclass
class UNetFloorConfig:
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(widths=(32, 64, 128, 192)))


@register_method("unet")
class DeterministicUNet(Method):
    """U-Net floor: one deterministic mask per image, repeated n times (reference row)."""

    Config = UNetFloorConfig
    stages = ("main",)

    def __init__(self, cfg: UNetFloorConfig, spec: DataSpec):
        super().__init__(cfg, spec)
        self.unet = UNet(spec.channels, 1, cfg.unet)

    def loss(self, stage, images, masks):
        y = pick_reader(masks)
        loss = F.binary_cross_entropy_with_logits(self.unet(images)[:, 0], y)
        return loss, {"bce": float(loss.detach())}

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        mask = self.unet(images)[:, 0] > 0  # (B,H,W)
        return mask[:, None].expand(-1, n, -1, -1).contiguous()

    def nfe(self, n: int) -> int:
        return 1
