"""The Semantic-aware Transformation Network (ST-Net) of SFM: a time-conditioned U-Net.

Input: the flow state x_t (one channel) concatenated with the image; output: the velocity v (one channel).
Time enters through sinusoidal features and an MLP, then a per-block scale and shift of the normalised
activations (:class:`amisbench.nn.UNet` with ``time_dim > 0``). At paper scale the release uses a
DDPM-style U-Net whose base width equals the image size (128 on LIDC), width multipliers (1, 2, 4) and
self-attention at the lowest resolution. Here: the suite's U-Net at the same widths, four 3x3 convolutions
per level and side (the two residual blocks of the DDPM U-Net), about 18 M parameters at 128 px against
about 38 M in the release; group normalisation, so that a sample's velocity does not depend on the other
samples of its batch (which keeps chunked sampling exact).

Time: the paper sets lambda = 1e-3, i.e. T = 1000 steps on a linear schedule. The network sees
``t * time_scale`` (time_scale = T), so the sinusoidal features span the same range as the integer
timesteps of DDPM-style U-Nets; flow time itself stays in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from amisbench.nn import UNet, UNetConfig


class STNet(nn.Module):
    """v = g_theta(x_t, t | image).

    Args:
        image_channels: C.
        unet: architecture (widths = base x (1, 2, 4) at paper scale).
        time_dim: width of the time embedding (0: 4 x base width, the DDPM convention).
        time_scale: multiplies t in [0, 1] before the sinusoidal features (T = 1 / lambda).
        channels_last: keep weights and activations in NHWC order (the same model; about 2x faster
            convolutions on CPU with few channels, and the layout tensor cores prefer on GPU).
    """

    def __init__(self, image_channels: int, unet: UNetConfig, time_dim: int = 0, time_scale: float = 1000.0,
                 channels_last: bool = False):
        super().__init__()
        self.time_scale = float(time_scale)
        self.channels_last = channels_last
        self.unet = UNet(image_channels + 1, 1, unet, time_dim=time_dim or 4 * unet.widths[0])
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)

    def forward(self, x_t: Tensor, t: Tensor, images: Tensor) -> Tensor:
        """x_t (N,1,H,W), t (N,) in [0,1], images (N,C,H,W) -> v (N,1,H,W)."""
        x = torch.cat([x_t, images], dim=1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.unet(x, t * self.time_scale)
