"""The deterministic U-Net floor (reference row): one mask repeated."""

import torch

from amisbench.api import DataSpec
from amisbench.methods.unet import DeterministicUNet, UNetFloorConfig
from amisbench.nn import UNetConfig


# ---------------------------------------------------------------------------------------------------
# reference rows
# ---------------------------------------------------------------------------------------------------

def test_unet_floor_repeats_one_mask():
    torch.manual_seed(0)
    m = DeterministicUNet(UNetFloorConfig(unet=UNetConfig(widths=(4, 8))), DataSpec(1, 16, 16, 4)).eval()
    s = m.sample(torch.randn(3, 1, 16, 16), 7, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 7, 16, 16) and s.dtype == torch.bool
    assert torch.equal(s, s[:, :1].expand_as(s))
