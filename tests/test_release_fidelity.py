"""MoSE, CIMD, c-Prob. U-Net and c-SSN as their authors released them: layouts against the release's state_dict
shapes (../shared/reference/release_shapes), and the piece of each that is easiest to get wrong against an
independent computation (brute force, closed forms, stubs that must not be reached)."""

import collections
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from method_helpers import build, random_batch  # tests/fixtures, on sys.path by tests/conftest.py

from amisbench.api import DataSpec
from amisbench.config import resolve
from amisbench.errors import UserError
from amisbench.methods.cimd import (LearntVarianceDiffusion, discretized_gaussian_log_likelihood, space_timesteps,
                                    vb_term_bits)
from amisbench.methods.mose import exact_coupling, greedy_coupling, ot_loss
from amisbench.registry import METHODS

D64 = torch.float64
SHAPES = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "release_shapes"
SPEC = DataSpec(channels=1, height=16, width=16, readers=3, name="synthetic")


def _build(name, dataset, profile, spec, **overrides):
    return build(name, dataset, profile, spec, **overrides)


def _batch(b=2, spec=SPEC, seed=0):
    return random_batch(spec, b, seed)


# ---------------------------------------------------------------------------------------------------
# Layouts: the multiset of state_dict tensor shapes equals the release's
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,ref,dataset,spec,part", [
    ("mose", "mose_lidc", "lidc", DataSpec(1, 128, 128, 4, "lidc"), None),
    ("cimd", "cimd_denoiser_lidc128", "lidc", DataSpec(1, 128, 128, 4, "lidc"), "net"),
    ("c_ssn", "c_ssn_isic3", "isic3", DataSpec(3, 256, 256, 3, "isic3"), None),
    ("c_prob_unet", "c_prob_unet_isic3", "isic3", DataSpec(3, 256, 256, 3, "isic3"), None),
])
def test_paper_layout_matches_the_release(name, ref, dataset, spec, part):
    path = SHAPES / f"{ref}.json"
    if not path.exists():
        pytest.skip("../shared/reference/release_shapes is not available")
    release = json.loads(path.read_text())
    with torch.device("meta"):
        model = METHODS.get(name)(resolve(name, dataset, "paper").cfg.method, spec)
    module = model.get_submodule(part) if part else model
    ours = collections.Counter(tuple(v.shape) for v in module.state_dict().values() if isinstance(v, torch.Tensor))
    theirs = collections.Counter(tuple(s) for s in release["state_dict"].values())
    assert ours == theirs, f"ours - release: {ours - theirs}; release - ours: {theirs - ours}"
    assert sum(p.numel() for p in module.parameters()) == release["parameters"]


# ---------------------------------------------------------------------------------------------------
# MoSE: the OT loss with the release's constants (gamma0 = 1/2, beta = 1)
# ---------------------------------------------------------------------------------------------------

def _brute_force(cost: np.ndarray, capacity: int) -> float:
    """Cheapest assignment of every reader to one prediction, at most ``capacity`` readers per prediction
    (the plan polytope with column sums 1/M and row sums <= capacity / M is integral: its vertices are such
    assignments, each carrying mass 1/M)."""
    n, m = cost.shape
    best = math.inf
    for assign in itertools.product(range(n), repeat=m):
        if max(collections.Counter(assign).values()) <= capacity:
            best = min(best, sum(cost[assign[i], i] for i in range(m)) / m)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_mose_couplings_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    cost = rng.random((6, 4))  # N = K S predictions, M = 4 readers
    for gamma, cap in ((0.5, 2), (0.25, 1), (1.0, 4)):
        exact = exact_coupling(cost, gamma)
        greedy = greedy_coupling(cost, gamma)
        for plan in (exact, greedy):
            assert np.allclose(plan.sum(0), 0.25) and np.all(plan.sum(1) <= gamma + 1e-9) and plan.min() >= -1e-12
        brute = _brute_force(cost, cap)
        assert np.isclose((exact * cost).sum(), brute, atol=1e-9)
        assert (greedy * cost).sum() >= brute - 1e-12  # the release's greedy plan is feasible, never cheaper
    # gamma = 1: every reader to its nearest prediction
    assert np.isclose((greedy_coupling(cost, 1.0) * cost).sum(), cost.min(0).mean())


def test_mose_greedy_capacity_case_by_hand():
    # readers 0, 1, 2 all prefer prediction 0; capacity 1/2 lets two of them in (the cheapest first: reader 2,
    # then reader 0 whose own best cost is next), reader 1 goes to its second choice
    cost = np.array([[0.10, 0.20, 0.05, 0.9],
                     [0.50, 0.30, 0.60, 0.9],
                     [0.70, 0.80, 0.70, 0.1]])
    plan = greedy_coupling(cost, 0.5)
    expected = np.zeros((3, 4))
    expected[0, 2] = expected[0, 0] = expected[1, 1] = expected[2, 3] = 0.25
    assert np.allclose(plan, expected)
    assert np.isclose((plan * cost).sum(), _brute_force(cost, 2))


def test_mose_ot_loss_value_and_gradients_with_release_constants():
    rng = np.random.default_rng(3)
    b, n, m = 2, 8, 4  # K = 4 experts x S = 2
    cost = torch.tensor(rng.random((b, n, m)), requires_grad=True)
    pi = torch.softmax(torch.tensor(rng.normal(size=(b, 4))), 1)
    weights = (pi / 2).repeat_interleave(2, dim=1).requires_grad_(True)
    loss, seg, kl = ot_loss(cost, weights, gamma=0.5, beta=1.0)
    plans = [greedy_coupling(c, 0.5) for c in cost.detach().numpy()]
    ref_seg = np.mean([(p * c).sum() for p, c in zip(plans, cost.detach().numpy())])
    # F.kl_div(log w, t) with reduction "mean": mean over all B N entries of t (log t - log w), 0 where t = 0
    t = np.stack([p.sum(1) for p in plans])
    w = weights.detach().numpy() + 1e-8
    ref_kl = np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - np.log(w)), 0.0).mean()
    assert np.isclose(float(seg.detach()), ref_seg) and np.isclose(float(kl.detach()), ref_kl)
    assert np.isclose(float(loss.detach()), ref_seg + ref_kl)
    loss.backward()
    # d loss / d C = P / B (the plan carries no gradient), d loss / d w = -t / (w B N)
    assert np.allclose(cost.grad.numpy(), np.stack(plans) / b)
    assert np.allclose(weights.grad.numpy(), -t / w / (b * n))


def test_mose_trains_gate_and_experts_and_samples_from_the_gate():
    model = _build("mose", "synthetic", "smoke", SPEC)
    images, masks = _batch()
    model.train()
    loss, logs = model.loss("main", images, masks)
    loss.backward()
    assert logs["gamma"] == 0.5 and 0 <= logs["seg"] <= 1
    assert model.gating.fc[-1].weight.grad.abs().sum() > 0 and model.mu.grad.abs().sum() > 0
    model.eval()
    # gate draws: an expert with gate weight 0 is never used
    model.gating.fc[-1].weight.data.zero_()
    model.gating.fc[-1].weight.data[2] = 50.0
    model.gating.fc[-2 - 1].bias.data.fill_(1.0)
    drawn = []
    orig = model._draw
    model._draw = lambda feats, experts, g: drawn.append(experts) or orig(feats, experts, g)
    s = model.sample(images, 9, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 9, 16, 16) and torch.all(drawn[-1] == 2)
    model.cfg.eval_weights = "uniform"
    model.sample(images, 9, generator=torch.Generator().manual_seed(0))
    assert drawn[-1][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]


def test_mose_gamma_switches_after_a_plateau_and_resumes():
    model = _build("mose", "synthetic", "smoke", SPEC, gamma_epoch_steps=2, gamma_patience=1)
    for loss in (1.0, 1.0, 2.0, 2.0):  # epoch means of the cumulative loss: 1.0, then 1.5 (worse)
        model._track_gamma(loss)
    assert model.gamma == 0.5
    state = model.state_dict()
    for loss in (2.0, 2.0):  # 1.67: worse again -> more than one bad epoch
        model._track_gamma(loss)
    assert model.gamma == 1.0
    fresh = _build("mose", "synthetic", "smoke", SPEC, gamma_epoch_steps=2, gamma_patience=1)
    fresh.load_state_dict(state)
    assert fresh.gamma == 0.5 and fresh._plateau["count"] == 4
    with pytest.raises(UserError, match="gamma0"):
        _build("mose", "synthetic", "smoke", SPEC, gamma0=0.0)


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
    model = _build("cimd", "synthetic", "smoke", SPEC)
    images, masks = _batch()
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
    without = _build("cimd", "synthetic", "smoke", SPEC, kl_weight=0.0).train()
    model.zero_grad()
    for m in (model, without):
        torch.manual_seed(1)
        m.loss("main", images, masks)[0].backward()
    assert any(not torch.allclose(a.grad, b.grad) for a, b in zip(model.net.parameters(), without.net.parameters()))


def test_cimd_sampling_never_uses_the_encoders_and_counts_its_steps():
    model = _build("cimd", "synthetic", "smoke", SPEC, sample_steps=5)

    def refuse(*a, **k):
        raise AssertionError("sampling must not run the prior or posterior")

    model.prior.forward = refuse
    model.posterior.forward = refuse
    calls = []
    model.net.register_forward_hook(lambda *a: calls.append(1))
    images, _ = _batch()
    s = model.sample(images, 3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 3, 16, 16) and s.dtype == torch.bool
    assert len(calls) == 5 == model.nfe(3) // 3
    assert torch.equal(s, model.sample(images, 3, generator=torch.Generator().manual_seed(0)))
    # --use_ddim True: as many network calls, other (seeded) masks; a bad sampler name is refused
    ddim = _build("cimd", "synthetic", "smoke", SPEC, sample_steps=5, sampler="ddim")
    d = ddim.sample(images, 3, generator=torch.Generator().manual_seed(0))
    assert d.shape == s.shape and ddim.nfe(3) == model.nfe(3) and not torch.equal(d, s)
    assert torch.equal(d, ddim.sample(images, 3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(UserError, match="method.sampler"):
        _build("cimd", "synthetic", "smoke", SPEC, sampler="dpm")
    # the release samples all T = 1000 steps; Table 3's respacing keeps 100 of improved diffusion's indices
    with torch.device("meta"):
        paper = METHODS.get("cimd")(resolve("cimd", "lidc", "paper").cfg.method, DataSpec(1, 128, 128, 4, "lidc"))
    assert paper.nfe(100) == 100 * 1000
    grid = space_timesteps(1000, 100)
    assert len(grid) == 100 and grid[:4] == [0, 10, 20, 30] and grid[-1] == 999 and grid[6] == 61


# ---------------------------------------------------------------------------------------------------
# c-models: the style enters only where the release lets it
# ---------------------------------------------------------------------------------------------------

def test_c_ssn_style_changes_only_the_head():
    model = _build("c_ssn", "synthetic", "smoke", SPEC)
    images, _ = _batch()
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


def test_c_prob_unet_style_changes_only_the_prior_and_posterior():
    model = _build("c_prob_unet", "synthetic", "smoke", SPEC)
    images, masks = _batch()
    assert model.unet.down_blocks[0].convs[0].in_channels == SPEC.channels
    assert model.prior.encoder[0].in_channels == SPEC.channels + SPEC.readers
    assert model.posterior.encoder[0].in_channels == SPEC.channels + SPEC.readers + 1
    draws = {}
    for s in range(3):
        model.cfg.style = s
        draws[s] = model.sample(images, 4, generator=torch.Generator().manual_seed(0))
    assert any(not torch.equal(draws[0], draws[s]) for s in (1, 2))
    # with a prior that ignores its input, the style changes nothing: it reaches the samples only through p(z|x,s)
    model.prior.forward = lambda x: (torch.zeros(x.shape[0], model.cfg.latent_dim), torch.ones(x.shape[0], model.cfg.latent_dim))
    same = []
    for s in range(3):
        model.cfg.style = s
        same.append(model.sample(images, 4, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(same[0], same[1]) and torch.equal(same[1], same[2])
    model.cfg.style = "mix"
    assert model.nfe(100) == 3 and model.sample(images, 6, generator=torch.Generator().manual_seed(0)).shape == (2, 6, 16, 16)
    with pytest.raises(UserError, match="method.style"):
        _build("c_prob_unet", "synthetic", "smoke", SPEC, style=5)


def test_c_prob_unet_loss_is_the_release_elbo():
    model = _build("c_prob_unet", "synthetic", "smoke", SPEC)
    images, masks = _batch()
    model.train()
    torch.manual_seed(5)
    loss, logs = model.loss("main", images, masks)
    reg = sum(p.norm(2) for mod in (model.posterior, model.prior, model.fcomb.layers) for p in mod.parameters())
    # loss = sum of per-pixel BCE over the batch + 10 * mean KL + 1e-5 * sum of L2 norms
    rec = logs["bce_per_px"] * images.shape[0] * 16 * 16
    assert math.isclose(float(loss.detach()), rec + 10.0 * logs["kl"] + 1e-5 * float(reg.detach()), rel_tol=1e-5)
    loss.backward()
    assert model.unet.down_blocks[0].convs[0].weight.grad.abs().sum() > 0


def test_methods_verbose_counts_the_releases():
    """`amisbench methods --verbose` builds ISIC3 methods with its 3 reader slots (styles), LIDC ones with 4."""
    import argparse

    from amisbench.cli import _method_details

    expect = {("mose", "lidc", 128, 1): "9,321,195", ("c_prob_unet", "isic3", 256, 3): "3,951,449",
              ("c_ssn", "isic3", 256, 3): "2,263,308"}
    for (name, dataset, size, channels), count in expect.items():
        line = _method_details(name, argparse.Namespace(profile="paper", dataset=dataset, size=size, channels=channels))
        assert f"{size}x{size}x{channels}: {count} parameters" in line, line
