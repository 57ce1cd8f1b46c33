"""The building blocks the methods share (methods/_blocks.py): the KL of diagonal Gaussians, categorical draws."""

import torch

from amisbench.methods._blocks import kl_diag_gaussians, sample_one_hot

D64 = torch.float64


# ---------------------------------------------------------------------------------------------------
# KL of diagonal Gaussians (Prob. U-Net, PHiSeg)
# ---------------------------------------------------------------------------------------------------

def test_kl_of_diagonal_gaussians_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 4, 5)  # batch, channels, h, w: summed over all but the batch
    mq, mp = torch.randn(shape, generator=g, dtype=D64), torch.randn(shape, generator=g, dtype=D64)
    sq = torch.rand(shape, generator=g, dtype=D64) + 0.1
    sp = torch.rand(shape, generator=g, dtype=D64) + 0.1
    ours = kl_diag_gaussians(mq, sq, mp, sp)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Independent(torch.distributions.Normal(mq.flatten(1), sq.flatten(1)), 1),
        torch.distributions.Independent(torch.distributions.Normal(mp.flatten(1), sp.flatten(1)), 1))
    assert ours.shape == (3,)
    assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.allclose(kl_diag_gaussians(mq, sq, mq, sq), torch.zeros(3, dtype=D64), atol=1e-12)
    # PHiSeg's eps = 1e-10 on the variances changes nothing measurable at these scales
    assert torch.allclose(kl_diag_gaussians(mq, sq, mp, sp, eps=1e-10), ref, atol=1e-7)


def test_categorical_draws_follow_the_probabilities():
    probs = torch.tensor([0.2, 0.5, 0.3], dtype=D64)[None, :, None, None].expand(1, 3, 200, 200)
    x = sample_one_hot(probs, torch.Generator().manual_seed(0))
    assert torch.equal(x.sum(1), torch.ones(1, 200, 200, dtype=D64))
    freq = x.mean(dim=(0, 2, 3))
    assert torch.allclose(freq, probs[0, :, 0, 0], atol=0.01)
    assert torch.equal(x, sample_one_hot(probs, torch.Generator().manual_seed(0)))
