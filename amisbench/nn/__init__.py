"""Shared building blocks: a configurable U-Net (optionally time-conditioned) and a low-rank Gaussian head."""

from .lowrank import LowRankGaussian, LowRankHead, mc_log_likelihood
from .unet import UNet, UNetConfig, timestep_embedding

__all__ = ["UNet", "UNetConfig", "timestep_embedding", "LowRankGaussian", "LowRankHead", "mc_log_likelihood"]
