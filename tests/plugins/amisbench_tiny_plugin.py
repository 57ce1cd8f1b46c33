"""A third-party method plugin as a pip package would ship it, for the entry-point test."""

from dataclasses import dataclass

import torch
from torch import nn

from amisbench.api import Method


@dataclass
class TinyConfig:
    width: int = 4


class TinyMethod(Method):
    """A per-pixel logistic model with Bernoulli sampling (entry-point plugin test)."""

    Config = TinyConfig
    config_layers = {"profiles": {"smoke": {"train": {"main": {"steps": 3}}}}}

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.net = nn.Sequential(nn.Conv2d(spec.channels, cfg.width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(cfg.width, 1, 1))

    def loss(self, stage, images, masks):
        logits = self.net(images)[:, 0]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, masks.mean(1))
        return loss, {}

    @torch.no_grad()
    def sample(self, images, n, *, generator=None, context=None):
        p = torch.sigmoid(self.net(images))  # (B,1,H,W)
        u = torch.rand((images.shape[0], n, *images.shape[-2:]), generator=generator, device=images.device)
        return u < p
