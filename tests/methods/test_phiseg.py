"""PHiSeg: latent levels and shapes, the paper configurations and the L1 variant, the KL weights per level."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amisbench.api import DataSpec
from amisbench.config import resolve
from amisbench.methods._blocks import kl_diag_gaussians
from amisbench.methods.phiseg import PHiSeg, PHiSegConfig


# ---------------------------------------------------------------------------------------------------
# PHiSeg
# ---------------------------------------------------------------------------------------------------

def _phiseg(levels, size=128, widths=(4, 4, 4, 4, 4, 4, 4)):
    torch.manual_seed(0)
    return PHiSeg(PHiSegConfig(widths=widths, latent_levels=levels, z_up_channels=4), DataSpec(1, size, size, 4))


@pytest.mark.parametrize("levels,sides", [(5, [32, 16, 8, 4, 2]), (1, [2])])
def test_phiseg_levels_and_latent_shapes(levels, sides):
    m = _phiseg(levels).eval()
    assert [s[-1] for s in m.latent_shapes(3)] == sides
    x = torch.randn(3, 1, 128, 128)
    noise = lambda i, shape: torch.zeros(shape)  # noqa: E731
    mus, sigmas, zs = m.prior_z(m.prior_enc(x), noise)
    assert len(zs) == levels
    assert [tuple(z.shape) for z in zs] == [(3, 2, s, s) for s in sides]
    assert all(torch.all(s > 0) for s in sigmas)  # softplus
    assert all(torch.equal(z, mu) for z, mu in zip(zs, mus))  # zero noise: z = mu
    s = m.likelihood(zs)  # level l predicts at resolution level l
    assert [tuple(t.shape) for t in s] == [(3, 2, 128 >> i, 128 >> i) for i in range(levels)]
    acc = m.accumulate(s, (128, 128))
    assert all(a.shape == (3, 2, 128, 128) for a in acc)
    top = F.interpolate(s[-1], size=(128, 128), mode="nearest")
    assert torch.allclose(acc[-1], top) and torch.allclose(acc[0], sum(F.interpolate(t, size=(128, 128)) for t in s))


def test_phiseg_paper_configs_and_variant():
    paper = resolve("phiseg", "synthetic", "paper").cfg.method
    assert paper.latent_levels == 5 and len(paper.widths) == 7 and paper.widths == (32, 64, 128, 192, 192, 192, 192)
    assert resolve("phiseg", "synthetic", "paper", variant="l1").cfg.method.latent_levels == 1
    # quick (64 px): L = 5 keeps the release's relative latent scales (1/4 .. 1/64 of the image); L = 1 keeps
    # the release's 2 x 2 latent (one resolution level fewer), not a 1 x 1 one
    spec64 = DataSpec(1, 64, 64, 4)
    for variant, sides in ((None, [16, 8, 4, 2, 1]), ("l1", [2])):
        with torch.device("meta"):
            m = PHiSeg(resolve("phiseg", "synthetic", "quick", variant=variant).cfg.method, spec64)
        assert [s[-1] for s in m.latent_shapes()] == sides
    with pytest.raises(ValueError, match="divisible by 64"):
        PHiSeg(PHiSegConfig(), DataSpec(1, 96, 96, 4))


def test_phiseg_kl_weights_grow_by_four_per_level():
    """With equal per-level KLs, the weighted KL is sum_l 4^l KL_l; without exponential weighting sum_l KL_l."""
    m = _phiseg(3, size=32, widths=(4, 4, 4, 4, 4, 4))
    x = torch.randn(2, 1, 32, 32)
    masks = (torch.rand(2, 4, 32, 32) > 0.5).float()
    out = {}
    for flag in (True, False):
        m.cfg.exponential_weighting = flag
        torch.manual_seed(5)
        _, logs = m.loss("main", x, masks)
        out[flag] = logs["kl_weighted"]
    torch.manual_seed(5)
    # recompute the per-level KLs directly with the same draws
    from amisbench.methods._blocks import one_hot, pick_reader

    y = pick_reader(masks).long()
    noise = lambda i, shape: torch.randn(shape)  # noqa: E731
    with torch.no_grad():
        mq, sq, zq = m.post_z(m.post_enc(torch.cat([x, one_hot(y, 2) - 0.5], 1)), noise)
        mp, sp, _ = m.prior_z(m.prior_enc(x), noise, cond=zq)
    kls = [float(kl_diag_gaussians(mq[i], sq[i], mp[i], sp[i], 1e-10).mean()) for i in range(3)]
    assert np.isclose(out[False], sum(kls), rtol=1e-4)
    assert np.isclose(out[True], sum(4 ** i * v for i, v in enumerate(kls)), rtol=1e-4)
