"""CCDM: the categorical forward process and posterior, the last reverse step, the sampling grid and NFE, the loss at
t = 1: the parts that are easy to get wrong, checked against independent computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amisbench.api import DataSpec
from amisbench.methods._blocks import sample_one_hot
from amisbench.methods._diffusion import strided_times as sampling_grid  # CCDM's strided grid
from amisbench.methods.ccdm import (CCDM, cosine_alpha_bar, p_posterior, q_posterior, q_xt_given_x0)
from amisbench.methods.ccdm import vote
from amisbench.nn.openai_unet import OpenAIUNetConfig

D64 = torch.float64


# ---------------------------------------------------------------------------------------------------
# CCDM: categorical forward process and posterior
# ---------------------------------------------------------------------------------------------------

def test_cosine_schedule_goes_from_data_to_uniform():
    T = 250
    ab = cosine_alpha_bar(T)
    assert ab.shape == (T + 1,) and ab.dtype == D64
    assert ab[0] == 1.0 and ab[-1] == 0.0
    assert torch.all(ab[1:] < ab[:-1])  # strictly decreasing
    # the cosine form of Nichol & Dhariwal: abar_t = f(t/T) / f(0)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    assert np.isclose(float(ab[125]), f(0.5) / f(0.0), rtol=1e-12)


@pytest.mark.parametrize("k", [2, 3])
def test_forward_process_rows_sum_to_one_and_end_uniform(k):
    T = 50
    ab = cosine_alpha_bar(T)
    x0 = F.one_hot(torch.randint(0, k, (4, 3, 3)), k).permute(0, 3, 1, 2).to(D64)
    for t in range(T + 1):
        probs = q_xt_given_x0(x0, ab[t].expand(4))
        assert torch.all(probs >= 0)
        assert torch.allclose(probs.sum(1), torch.ones(4, 3, 3, dtype=D64), atol=1e-12)
    assert torch.equal(q_xt_given_x0(x0, ab[0].expand(4)), x0)
    assert torch.allclose(q_xt_given_x0(x0, ab[T].expand(4)), torch.full_like(x0, 1 / k), atol=0)


def _bayes_posterior(ab, t, s, k):
    """q(x_s = i | x_t = j, x_0 = c) by Bayes' rule on the transition matrices: [c, j, i]."""
    eye, one = torch.eye(k, dtype=D64), torch.ones(k, k, dtype=D64) / k
    qbar = lambda a: a * eye + (1 - a) * one  # noqa: E731  rows: from, columns: to
    q_ts = qbar(ab[t] / ab[s])  # x_s -> x_t
    q_s0 = qbar(ab[s])  # x_0 -> x_s
    q_t0 = qbar(ab[t])  # x_0 -> x_t
    post = torch.empty(k, k, k, dtype=D64)
    for c in range(k):
        for j in range(k):
            for i in range(k):
                post[c, j, i] = q_ts[i, j] * q_s0[c, i] / q_t0[c, j]
    return post


@pytest.mark.parametrize("k,t,s", [(2, 7, 6), (3, 7, 6), (3, 10, 1), (2, 1, 0), (3, 10, 4)])
def test_posterior_matches_bayes_rule(k, t, s):
    T = 10
    ab = cosine_alpha_bar(T)
    ref = _bayes_posterior(ab, t, s, k)
    eye = torch.eye(k, dtype=D64)
    # every (x_0, x_t) pair as one "pixel" of a batch
    x0 = eye.repeat_interleave(k, 0)[:, :, None, None]  # (k*k, K, 1, 1): c major
    xt = eye.repeat(k, 1)[:, :, None, None]  # j minor
    n = k * k
    ours = q_posterior(xt, x0, ab[t].expand(n), ab[s].expand(n))[:, :, 0, 0].reshape(k, k, k)
    assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.allclose(ours.sum(-1), torch.ones(k, k, dtype=D64))
    # with a one-hot prediction the model's reverse step is the true posterior ...
    assert torch.allclose(p_posterior(xt, x0, ab[t].expand(n), ab[s].expand(n)),
                          q_posterior(xt, x0, ab[t].expand(n), ab[s].expand(n)), atol=1e-12)
    # ... and with a distribution over x_0 it is the mixture of the posteriors
    g = torch.Generator().manual_seed(1)
    p0 = torch.softmax(torch.randn(n, k, 1, 1, generator=g, dtype=D64), 1)
    mix = sum(p0[:, c:c + 1] * q_posterior(xt, eye[c].expand(n, k)[:, :, None, None], ab[t].expand(n), ab[s].expand(n))
              for c in range(k))
    assert torch.allclose(p_posterior(xt, p0, ab[t].expand(n), ab[s].expand(n)), mix, atol=1e-12)


def test_last_reverse_step_is_the_x0_prediction():
    ab = cosine_alpha_bar(10)
    g = torch.Generator().manual_seed(2)
    xt = sample_one_hot(torch.full((4, 2, 3, 3), 0.5, dtype=D64), g)
    p0 = torch.softmax(torch.randn(4, 2, 3, 3, generator=g, dtype=D64), 1)
    assert torch.allclose(p_posterior(xt, p0, ab[1].expand(4), ab[0].expand(4)), p0, atol=1e-12)


def test_sampling_grid_and_nfe():
    assert sampling_grid(5, 0) == [5, 4, 3, 2, 1, 0]
    grid = sampling_grid(250, 10)
    assert grid[0] == 250 and grid[-1] == 0 and len(grid) == 11 and grid == sorted(set(grid), reverse=True)
    spec = DataSpec(1, 16, 16, 4)
    net = OpenAIUNetConfig(base_channels=4, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                           num_head_channels=4, groups=2)
    from amisbench.methods.ccdm import CCDMConfig

    assert CCDM(CCDMConfig(net=net, steps=250), spec).nfe(100) == 100 * 250
    assert CCDM(CCDMConfig(net=net, steps=250, sample_steps=10), spec).nfe(100) == 100 * 10
    assert CCDM(CCDMConfig(net=net, steps=250, votes=3), spec).nfe(100) == 3 * 100 * 250


def test_ccdm_loss_at_t1_is_the_cross_entropy_of_the_prediction():
    """At t = 1 the KL to the true posterior (one-hot x_0) is -log p(x_0 | x_1)."""
    from amisbench.methods.ccdm import CCDMConfig

    torch.manual_seed(0)
    spec = DataSpec(1, 8, 8, 2)
    net = OpenAIUNetConfig(base_channels=4, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                           num_head_channels=4, groups=2)
    m = CCDM(CCDMConfig(net=net, steps=1), spec)
    for p in m.parameters():  # the release zero-initialises the output conv: perturb it so p0 is not uniform
        torch.nn.init.normal_(p, 0.0, 0.3)
    images = torch.randn(2, 1, 8, 8)
    masks = (torch.rand(2, 2, 8, 8) > 0.5).float()
    masks[:, 1] = masks[:, 0]  # both readers agree: the reader draw does not matter
    state = torch.get_rng_state()
    loss, _ = m.loss("main", images, masks)
    torch.set_rng_state(state)  # replay the same draws
    torch.randint(0, 2, (2,))  # pick_reader
    torch.randint(1, 2, (2,))  # t
    x0 = F.one_hot(masks[:, 0].long(), 2).permute(0, 3, 1, 2).float()
    xt = sample_one_hot(q_xt_given_x0(x0, m.abar[torch.ones(2, dtype=torch.long)]))
    p0 = m.predict_x0(xt, images, torch.ones(2, dtype=torch.long))
    ce = -(x0 * torch.log(p0)).sum(1).mean()
    assert torch.allclose(loss, ce, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# CCDM's vote
# ---------------------------------------------------------------------------------------------------

def test_confidence_and_majority_votes_against_a_hand_computed_case():
    # one sample, 3 chains, 2 classes, 1 x 3 pixels; foreground probabilities per chain and pixel:
    #   pixel 0: 0.9, 0.4, 0.4 -> mean 0.567 (confidence: 1); chain argmaxes 1, 0, 0 (majority: 0)
    #   pixel 1: 0.2, 0.6, 0.6 -> mean 0.467 (confidence: 0); argmaxes 0, 1, 1 (majority: 1)
    #   pixel 2: 0.1, 0.2, 0.3 -> mean 0.2 (0); argmaxes 0, 0, 0 (0)
    fg = torch.tensor([[0.9, 0.2, 0.1], [0.4, 0.6, 0.2], [0.4, 0.6, 0.3]])  # (V=3, W=3)
    probs = torch.stack([1 - fg, fg], dim=1)[None, :, :, None, :]  # (N=1, V=3, K=2, H=1, W=3)
    assert vote(probs, "confidence").tolist() == [[[1, 0, 0]]]
    assert vote(probs, "majority").tolist() == [[[0, 1, 0]]]
    # one chain: both strategies are the argmax of its probabilities
    assert vote(probs[:, :1], "confidence").tolist() == vote(probs[:, :1], "majority").tolist() == [[[1, 0, 0]]]
    with pytest.raises(ValueError, match="unknown vote"):
        vote(probs, "mean")


def test_ccdm_confidence_last_step_samples_are_masks():
    from amisbench.methods.ccdm import CCDM, CCDMConfig
    from amisbench.nn.openai_unet import OpenAIUNetConfig

    torch.manual_seed(0)
    net = OpenAIUNetConfig(base_channels=4, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                           num_head_channels=4, groups=2)
    for last, votes in (("confidence", 1), ("confidence", 3), ("majority", 3)):
        m = CCDM(CCDMConfig(net=net, steps=3, last_step=last, votes=votes), DataSpec(1, 8, 8, 2)).eval()
        s = m.sample(torch.randn(2, 1, 8, 8), 4, generator=torch.Generator().manual_seed(0))
        assert s.shape == (2, 4, 8, 8) and s.dtype == torch.bool
