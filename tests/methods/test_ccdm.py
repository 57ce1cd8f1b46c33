"""Unit tests of the baselines (Prob. U-Net, PHiSeg, CCDM) and the reference rows (unet, oracle):
the parts that are easy to get wrong, checked against independent computations."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amisbench.api import DataSpec, SampleContext
from amisbench.config import resolve
from amisbench.errors import UserError
from amisbench.methods._blocks import kl_diag_gaussians, sample_one_hot
from amisbench.nn.openai_unet import OpenAIUNetConfig
from amisbench.methods.ccdm import (CCDM, cosine_alpha_bar, p_posterior, q_posterior, q_xt_given_x0)
from amisbench.methods._diffusion import strided_times as sampling_grid  # CCDM's strided grid
from amisbench.methods.oracle import Oracle, OracleConfig
from amisbench.methods.phiseg import PHiSeg, PHiSegConfig
from amisbench.methods.prob_unet import ProbUNet, ProbUNetConfig
from amisbench.methods.unet import DeterministicUNet, UNetFloorConfig
from amisbench.nn import UNetConfig
from amisbench.registry import DATASETS

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


def test_categorical_draws_follow_the_probabilities():
    probs = torch.tensor([0.2, 0.5, 0.3], dtype=D64)[None, :, None, None].expand(1, 3, 200, 200)
    x = sample_one_hot(probs, torch.Generator().manual_seed(0))
    assert torch.equal(x.sum(1), torch.ones(1, 200, 200, dtype=D64))
    freq = x.mean(dim=(0, 2, 3))
    assert torch.allclose(freq, probs[0, :, 0, 0], atol=0.01)
    assert torch.equal(x, sample_one_hot(probs, torch.Generator().manual_seed(0)))


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


# ---------------------------------------------------------------------------------------------------
# Prob. U-Net
# ---------------------------------------------------------------------------------------------------

def _prob_unet(**kw):
    torch.manual_seed(0)
    cfg = ProbUNetConfig(unet=UNetConfig(widths=(4, 8), convs_per_block=1, norm="none", down="avg"), **kw)
    return ProbUNet(cfg, DataSpec(1, 16, 16, 4))


def test_prob_unet_fcomb_equals_tile_and_concatenate():
    m = _prob_unet(latent_dim=3, classes=2)
    feats = torch.randn(2, 4, 16, 16)
    z = torch.randn(2, 5, 3)
    fast = m.combine(feats, z)
    tiled = torch.cat([feats[:, None].expand(-1, 5, -1, -1, -1),
                       z[..., None, None].expand(-1, -1, -1, 16, 16)], dim=2).flatten(0, 1)
    h = tiled
    for conv in m.fcomb:
        h = F.relu(conv(h))
    slow = m.logits(h).unflatten(0, (2, 5))
    assert fast.shape == (2, 5, 2, 16, 16)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_prob_unet_samples_vary_with_the_prior_and_chunking_changes_nothing():
    m = _prob_unet().eval()
    with torch.no_grad():
        m.prior.head.bias[m.cfg.latent_dim:] = 2.0  # wide prior: sigma = e^2
    x = torch.randn(2, 1, 16, 16)
    a = m.sample(x, 12, generator=torch.Generator().manual_seed(0))
    m.cfg.sample_chunk = 2  # one sample per image per f_comb batch
    b = m.sample(x, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert len({tuple(s.flatten().tolist()) for s in a[0]}) > 1


def test_prob_unet_beta_weights_the_kl():
    m = _prob_unet(beta=1.0)
    x = torch.randn(2, 1, 16, 16)
    masks = (torch.rand(2, 4, 16, 16) > 0.5).float()
    torch.manual_seed(3)
    l1, logs1 = m.loss("main", x, masks)
    m.cfg.beta = 10.0
    torch.manual_seed(3)
    l10, logs10 = m.loss("main", x, masks)
    assert logs1 == logs10
    assert torch.isclose(l10 - l1, torch.tensor(9.0 * logs1["kl"] / 256), rtol=1e-4)
    assert resolve("prob_unet", "synthetic", "paper").cfg.method.beta == 10.0  # the PyTorch port
    kohl = resolve("prob_unet", "synthetic", "paper", variant="kohl").cfg.method
    assert (kohl.beta, kohl.classes) == (1.0, 2)  # Kohl's TensorFlow release
    assert resolve("prob_unet", "synthetic", "paper", variant="beta1").cfg.method.beta == 1.0


# ---------------------------------------------------------------------------------------------------
# reference rows
# ---------------------------------------------------------------------------------------------------

def test_unet_floor_repeats_one_mask():
    torch.manual_seed(0)
    m = DeterministicUNet(UNetFloorConfig(unet=UNetConfig(widths=(4, 8))), DataSpec(1, 16, 16, 4)).eval()
    s = m.sample(torch.randn(3, 1, 16, 16), 7, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 7, 16, 16) and s.dtype == torch.bool
    assert torch.equal(s, s[:, :1].expand_as(s))


def _synthetic():
    res = resolve("oracle", "synthetic", "smoke")
    return DATASETS.get("synthetic")(res.cfg.dataset, "test")


def test_oracle_draws_from_the_true_distribution_reproducibly():
    ds = _synthetic()
    m = Oracle(OracleConfig(), ds.spec)
    idx = [0, 2]
    images = torch.stack([ds[i]["image"] for i in idx])
    ctx = SampleContext(ds, idx, [ds[i]["id"] for i in idx])
    s = m.sample(images, 6, generator=torch.Generator().manual_seed(4), context=ctx)
    assert s.shape == (2, 6, ds.spec.height, ds.spec.width) and s.dtype == torch.bool
    g = torch.Generator().manual_seed(4)
    seeds = torch.randint(0, 2**62, (2,), generator=g).tolist()
    for j, i in enumerate(idx):
        assert np.array_equal(s[j].numpy(), ds.true_masks(i, 6, seeds[j]).astype(bool))
    other = m.sample(images, 6, generator=torch.Generator().manual_seed(5), context=ctx)
    assert not torch.equal(s, other)
    assert list(m.trainable("main")) == [] and resolve("oracle", "synthetic", "quick").cfg.train["main"].steps == 0


def test_oracle_refuses_datasets_without_a_known_distribution():
    m = Oracle(OracleConfig(), DataSpec(1, 8, 8, 4))
    images = torch.zeros(1, 1, 8, 8)
    with pytest.raises(UserError, match=re.escape("oracle needs a dataset with a known reader distribution")):
        m.sample(images, 2, generator=torch.Generator(), context=SampleContext(object(), [0], ["a"]))
    with pytest.raises(UserError, match="synthetic"):
        m.sample(images, 2, generator=torch.Generator(), context=None)


# ---------------------------------------------------------------------------------------------------
# paper profiles at 128 px
# ---------------------------------------------------------------------------------------------------

def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_profiles_instantiate_at_128px():
    """The figures `amisbench methods --verbose` prints for the paper profiles at 128 px."""
    import argparse

    from amisbench.cli import _method_details

    args = argparse.Namespace(profile="paper", dataset="synthetic", size=128, channels=1)
    counts = {}
    for name in ("prob_unet", "phiseg", "ccdm", "unet", "oracle"):
        line = _method_details(name, args)
        m = re.match(r"profile paper, 128x128x1: ([\d,]+) parameters; stages main; NFE for 100 samples: (\d+)", line)
        assert m, line
        counts[name] = int(m.group(1).replace(",", ""))
        nfe = int(m.group(2))
        assert nfe == {"ccdm": 100 * 250, "phiseg": 100}.get(name, 1), (name, nfe)
    assert counts["oracle"] == 0
    # independent counts of the parts that are ours (the shared U-Net is counted by its own tests)
    with torch.device("meta"):
        pu = ProbUNet(resolve("prob_unet", "synthetic", "paper").cfg.method, DataSpec(1, 128, 128, 4))
        ph = PHiSeg(resolve("phiseg", "synthetic", "paper").cfg.method, DataSpec(1, 128, 128, 4))
    conv = lambda cin, cout, k=3, bias=True: cin * cout * k * k + (cout if bias else 0)  # noqa: E731
    # prior: input 1 channel; posterior: 1 + 1 (the {0,1} mask, as the PyTorch port); three convs per block;
    # head 1x1 -> 2 x 6
    def vgg(cin):
        total, c = 0, cin
        for w in (32, 64, 128, 192):
            for _ in range(3):
                total += conv(c, w)
                c = w
        return total + conv(192, 12, 1)
    assert _count(pu.prior) == vgg(1) and _count(pu.posterior) == vgg(2)
    assert _count(pu.fcomb) + _count(pu.logits) == conv(38, 32, 1) + 2 * conv(32, 32, 1) + conv(32, 1, 1)
    assert counts["prob_unet"] == _count(pu) and counts["phiseg"] == _count(ph)
    assert counts["ccdm"] > 1_000_000 and counts["unet"] > 1_000_000
