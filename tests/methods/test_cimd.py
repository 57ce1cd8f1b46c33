"""CIMD: learnt-variance diffusion against the closed form, the VLB term, the prior term's wiring, sampling without
the encoders."""

import math

import pytest
import torch
from method_helpers import build, random_batch  # tests/fixtures, on sys.path by tests/conftest.py

from amisbench.api import DataSpec
from amisbench.config import resolve
from amisbench.errors import UserError
from amisbench.methods.cimd import (LearntVarianceDiffusion, discretized_gaussian_log_likelihood, space_timesteps,
                                    vb_term_bits)
from amisbench.registry import METHODS

D64 = torch.float64
SPEC = DataSpec(channels=1, height=16, width=16, readers=3, name="synthetic")


# ---------------------------------------------------------------------------------------------------
# CIMD: learnt-variance diffusion, VLB term, the prior term's wiring, sampling without z
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, 7])
def test_cimd_posterior_and_learnt_variance_match_the_closed_form(count):
    from amisbench.methods._diffusion import linear_alpha_bar

    abar = linear_alpha_bar(50)[1:]
    use = space_timesteps(50, count)
    diff = LearntVarianceDiffusion(abar, use)
    g = torch.Generator().manual_seed(count)
    x0 = torch.randn((len(use), 1, 2, 2), generator=g, dtype=D64)
    xt = torch.randn((len(use), 1, 2, 2), generator=g, dtype=D64)
    k = torch.arange(len(use))
    mean, logvar = diff.q_posterior(x0, xt, k)
    for i in range(1, len(use)):
        a_t, a_s = abar[use[i]], abar[use[i - 1]]
        alpha = a_t / a_s  # q(x_t | x_s) = N(sqrt(alpha) x_s, 1 - alpha); q(x_s | x_0) = N(sqrt(a_s) x_0, 1 - a_s)
        var = 1 / (alpha / (1 - alpha) + 1 / (1 - a_s))
        mu = var * (alpha.sqrt() * xt[i] / (1 - alpha) + a_s.sqrt() * x0[i] / (1 - a_s))
        assert torch.allclose(mean[i], mu) and torch.allclose(logvar[i], var.log().expand(1, 2, 2))
        # v = +1 gives log beta_k, v = -1 the posterior variance, in between log-linear
        for v, ref in ((1.0, (1 - alpha).log()), (-1.0, var.log()), (0.0, 0.5 * ((1 - alpha).log() + var.log()))):
            _, lv, _ = diff.p_mean_logvar(torch.zeros_like(xt[i:i + 1]), torch.full_like(xt[i:i + 1], v), xt[i:i + 1],
                                          k[i:i + 1], clip=False)
            assert torch.allclose(lv, ref.expand_as(lv))
    assert torch.allclose(logvar[0], logvar[1])  # the clipped log variance at the first step


def test_cimd_ddim_step_recovers_the_noise_and_its_eta_one_variance_is_the_posterior_one():
    from amisbench.methods._diffusion import linear_alpha_bar

    abar = linear_alpha_bar(100)[1:]
    diff = LearntVarianceDiffusion(abar, space_timesteps(100, 10))
    g = torch.Generator().manual_seed(2)
    k = torch.arange(1, 10)
    x0 = torch.rand((9, 1, 2, 2), generator=g, dtype=D64)
    noise = torch.randn((9, 1, 2, 2), generator=g, dtype=D64)
    xt = diff.q_sample(x0, k, noise)
    mean, std = diff.ddim_step(x0, xt, k, 0.0)
    prev = diff.abar[k - 1].view(-1, 1, 1, 1)
    # eta 0 with the true x_0: deterministic, the same noise carried to the previous kept step
    assert torch.allclose(mean, prev.sqrt() * x0 + (1 - prev).sqrt() * noise) and not std.any()
    _, std1 = diff.ddim_step(x0, xt, k, 1.0)
    _, logvar = diff.q_posterior(x0, xt, k)
    assert torch.allclose(std1.square(), logvar.exp())  # eta 1: sigma^2 = beta~ (DDPM's posterior variance)
    mean0, _ = diff.ddim_step(x0[:1], xt[:1], torch.zeros(1, dtype=torch.long), 0.0)
    assert torch.allclose(mean0, x0[:1])  # the last step lands on the x_0 estimate


def test_cimd_vb_term_is_the_gaussian_kl_in_bits_and_the_decoder_nll_at_zero():
    from amisbench.methods._diffusion import linear_alpha_bar

    abar = linear_alpha_bar(100)[1:]
    diff = LearntVarianceDiffusion(abar, list(range(100)))
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand((3, 1, 2, 2), generator=g) > 0.5).to(D64)
    k = torch.tensor([0, 40, 99])
    noise = torch.randn((3, 1, 2, 2), generator=g, dtype=D64)
    xt = diff.q_sample(x0, k, noise)
    eps = noise + 0.1 * torch.randn((3, 1, 2, 2), generator=g, dtype=D64)  # a fair denoiser
    v = torch.rand((3, 1, 2, 2), generator=g, dtype=D64) * 2 - 1
    vb = vb_term_bits(diff, x0, xt, k, eps, v)
    for i in (1, 2):
        true_mean, true_logvar = diff.q_posterior(x0[i:i + 1], xt[i:i + 1], k[i:i + 1])
        mean, logvar, _ = diff.p_mean_logvar(eps[i:i + 1], v[i:i + 1], xt[i:i + 1], k[i:i + 1], clip=False)
        q = torch.distributions.Normal(true_mean, (0.5 * true_logvar).exp())
        p = torch.distributions.Normal(mean, (0.5 * logvar).exp())
        assert torch.isclose(vb[i], torch.distributions.kl_divergence(q, p).mean() / math.log(2))
    # k = 0: -log P(bin of x0) with the exact normal CDF (the release's tanh approximation: within 1e-3)
    mean, logvar, _ = diff.p_mean_logvar(eps[:1], v[:1], xt[:1], k[:1], clip=False)
    sd = (0.5 * logvar).exp()
    cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    p_one = 1 - cdf((1 - 1 / 255 - mean) / sd)
    p_zero = cdf((0 + 1 / 255 - mean) / sd) - cdf((0 - 1 / 255 - mean) / sd)
    nll = -torch.where(x0[:1] > 0.5, p_one, p_zero).log().mean() / math.log(2)
    assert abs(float(vb[0]) - float(nll)) < 1e-3 * max(1.0, float(nll))
    ll = discretized_gaussian_log_likelihood(torch.tensor([-1.0, 1.0]), torch.zeros(2), torch.zeros(2))
    assert torch.allclose(ll.exp(), cdf(torch.tensor([-1 + 1 / 255, -1 + 1 / 255])), atol=1e-3)


def test_cimd_prior_sees_the_denoiser_output_and_only_the_denoiser_trains():
    model = build("cimd", "synthetic", "smoke", SPEC)
    images, masks = random_batch(SPEC)
    seen = {}
    model.prior.register_forward_hook(lambda m, inp, out: [seen.setdefault("prior", inp[0])] and None)
    model.net.register_forward_hook(lambda m, inp, out: [seen.setdefault("net", out)] and None)
    model.train()
    loss, logs = model.loss("main", images, masks)
    assert torch.equal(seen["prior"][:, :1], images) and torch.equal(seen["prior"][:, 1:], seen["net"][:, :1])
    assert {"mse", "vb", "kl"} <= set(logs)
    loss.backward()
    assert all(p.grad is None for p in model.prior.parameters()) and all(p.grad is None for p in model.posterior.parameters())
    assert {id(p) for p in model.trainable("main")} == {id(p) for p in model.net.parameters()}
    # the KL / 1000 term reaches the denoiser: the same step without it gives other denoiser gradients
    without = build("cimd", "synthetic", "smoke", SPEC, kl_weight=0.0).train()
    model.zero_grad()
    for m in (model, without):
        torch.manual_seed(1)
        m.loss("main", images, masks)[0].backward()
    assert any(not torch.allclose(a.grad, b.grad) for a, b in zip(model.net.parameters(), without.net.parameters()))


def test_cimd_sampling_never_uses_the_encoders_and_counts_its_steps():
    model = build("cimd", "synthetic", "smoke", SPEC, sample_steps=5)

    def refuse(*a, **k):
        raise AssertionError("sampling must not run the prior or posterior")

    model.prior.forward = refuse
    model.posterior.forward = refuse
    calls = []
    model.net.register_forward_hook(lambda *a: calls.append(1))
    images, _ = random_batch(SPEC)
    s = model.sample(images, 3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 3, 16, 16) and s.dtype == torch.bool
    assert len(calls) == 5 == model.nfe(3) // 3
    assert torch.equal(s, model.sample(images, 3, generator=torch.Generator().manual_seed(0)))
    # --use_ddim True: as many network calls, other (seeded) masks; a bad sampler name is refused
    ddim = build("cimd", "synthetic", "smoke", SPEC, sample_steps=5, sampler="ddim")
    d = ddim.sample(images, 3, generator=torch.Generator().manual_seed(0))
    assert d.shape == s.shape and ddim.nfe(3) == model.nfe(3) and not torch.equal(d, s)
    assert torch.equal(d, ddim.sample(images, 3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(UserError, match="method.sampler"):
        build("cimd", "synthetic", "smoke", SPEC, sampler="dpm")
    # the release samples all T = 1000 steps; Table 3's respacing keeps 100 of improved diffusion's indices
    with torch.device("meta"):
        paper = METHODS.get("cimd")(resolve("cimd", "lidc", "paper").cfg.method, DataSpec(1, 128, 128, 4, "lidc"))
    assert paper.nfe(100) == 100 * 1000
    grid = space_timesteps(1000, 100)
    assert len(grid) == 100 and grid[:4] == [0, 10, 20, 30] and grid[-1] == 999 and grid[6] == 61
