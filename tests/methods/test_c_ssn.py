"""c-SSN: the style enters only the head, as in the release."""

import torch
from method_helpers import build, random_batch  # tests/fixtures, on sys.path by tests/conftest.py

from amisbench.api import DataSpec

SPEC = DataSpec(channels=1, height=16, width=16, readers=3, name="synthetic")


# ---------------------------------------------------------------------------------------------------
# c-models: the style enters only where the release lets it
# ---------------------------------------------------------------------------------------------------

def test_c_ssn_style_changes_only_the_head():
    model = build("c_ssn", "synthetic", "smoke", SPEC)
    images, _ = random_batch(SPEC)
    inputs = []
    model.unet.register_forward_hook(lambda m, inp, out: inputs.append(inp[0]))  # append returns None
    feats = model.unet(images)
    assert torch.equal(inputs[0], images)  # the U-Net sees the image alone
    d0, d1 = (model.distribution(feats, torch.full((2,), s)) for s in (0, 1))
    assert not torch.allclose(d0.mean, d1.mean)
    model.style_encoder.weight.data.zero_()  # the style enters only through the 1x1 style encoder
    d0, d1 = (model.distribution(feats, torch.full((2,), s)) for s in (0, 1))
    assert torch.equal(d0.mean, d1.mean) and torch.equal(d0.cov_factor, d1.cov_factor)
    assert model.nfe(100) == 1
