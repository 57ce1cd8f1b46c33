"""Unit tests of MoSE, CIMD, Analog Bits, c-Prob. U-Net and c-SSN: the pieces that are easiest to get wrong,
checked against independent computations (brute force, closed forms, finite differences)."""

import itertools

import numpy as np
import pytest
import torch

from amisbench.api import DataSpec
from amisbench.config import resolve
from amisbench.errors import UserError
from amisbench.methods.analog_bits import gamma_cosine
from amisbench.methods._style import style_plan
from amisbench.methods._diffusion import gaussian_posterior, linear_alpha_bar, strided_times
from amisbench.methods.mose import ot_exact, ot_loss, soft_iou_cost
from amisbench.registry import METHODS

D64 = torch.float64
SPEC = DataSpec(channels=1, height=16, width=16, readers=3, name="synthetic")


def _smoke(name, spec=SPEC, **overrides):
    cfg = resolve(name, "synthetic", "smoke").cfg.method
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return METHODS.get(name)(cfg, spec).eval()


def _batch(b=2, spec=SPEC, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((b, spec.channels, spec.height, spec.width), generator=g)
    masks = (torch.rand((b, spec.readers, spec.height, spec.width), generator=g) > 0.5).float()
    return images, masks


# ---------------------------------------------------------------------------------------------------
# MoSE: optimal transport
# ---------------------------------------------------------------------------------------------------

def _brute_force_ot(cost: np.ndarray, copies: int) -> float:
    """Uniform weights, N = copies * A samples: the OT value is the best assignment of the samples to
    readers duplicated ``copies`` times (Birkhoff: the extreme points of the polytope are permutations)."""
    n, a = cost.shape
    cols = [j for j in range(a) for _ in range(copies)]
    best = min(sum(cost[i, cols[p]] for i, p in enumerate(perm)) for perm in itertools.permutations(range(n)))
    return best / n


@pytest.mark.parametrize("n,a", [(3, 3), (6, 3), (4, 2)])
def test_exact_ot_matches_brute_force_assignment(n, a):
    rng = np.random.default_rng(n * 10 + a)
    cost = rng.random((n, a))
    plan, f = ot_exact(cost, np.full(n, 1.0 / n), np.full(a, 1.0 / a))
    assert np.allclose(plan.sum(1), 1.0 / n) and np.allclose(plan.sum(0), 1.0 / a) and plan.min() >= -1e-12
    assert np.isclose((plan * cost).sum(), _brute_force_ot(cost, n // a), atol=1e-9)
    # the torch wrapper gives the same value, for both solvers (Sinkhorn with a small epsilon: close)
    c = torch.tensor(cost)[None]
    aw, bw = torch.full((1, n), 1.0 / n, dtype=D64), torch.full((1, a), 1.0 / a, dtype=D64)
    assert torch.isclose(ot_loss(c, aw, bw, "exact")[0], torch.tensor(_brute_force_ot(cost, n // a), dtype=D64))
    assert abs(float(ot_loss(c, aw, bw, "sinkhorn", eps=1e-3, iters=2000)[0]) - _brute_force_ot(cost, n // a)) < 5e-3


def test_ot_gradients_are_the_plan_and_the_dual_potential():
    rng = np.random.default_rng(1)
    n, a = 5, 3
    cost = torch.tensor(rng.random((1, n, a)), requires_grad=True)
    logits = torch.tensor(rng.normal(size=(1, n)), requires_grad=True)
    w = torch.softmax(logits, 1)
    bw = torch.full((1, a), 1.0 / a, dtype=D64)
    val = ot_loss(cost, w, bw, "exact")
    val.sum().backward()
    plan, _ = ot_exact(cost.detach()[0].numpy(), w.detach()[0].numpy(), bw[0].numpy())
    assert np.allclose(cost.grad[0].numpy(), plan, atol=1e-9)
    # d OT / d logits by central finite differences of the exact LP value
    def value(lg):
        ww = torch.softmax(lg, 1)[0].numpy()
        p, _ = ot_exact(cost.detach()[0].numpy(), ww, bw[0].numpy())
        return float((p * cost.detach()[0].numpy()).sum())
    h = 1e-6
    fd = []
    for i in range(n):
        e = torch.zeros_like(logits)
        e[0, i] = h
        fd.append((value(logits.detach() + e) - value(logits.detach() - e)) / (2 * h))
    assert np.allclose(logits.grad[0].numpy(), fd, atol=1e-5)


def test_soft_iou_cost_on_hard_masks_is_one_minus_iou():
    y = torch.zeros((1, 2, 4, 4))
    y[0, 0, :2] = 1  # 8 pixels
    y[0, 1, 1:3] = 1  # 8 pixels, overlap 4 -> IoU 4 / 12
    p = y.clone()
    c = soft_iou_cost(p, y, eps=0.0)
    assert torch.allclose(c[0], torch.tensor([[0.0, 1 - 4 / 12], [1 - 4 / 12, 0.0]]))
    empty = torch.zeros((1, 1, 4, 4))
    assert soft_iou_cost(empty, empty, eps=1.0)[0, 0, 0] == 0.0  # two empty masks: IoU 1


def test_mose_weighted_samples_and_eval_weights():
    model = _smoke("mose")
    images, masks = _batch()
    ms, w = model.weighted_samples(images, 3, generator=torch.Generator().manual_seed(0))
    k = model.cfg.experts
    assert ms.shape == (2, 3 * k, 16, 16) and ms.dtype == torch.bool
    assert torch.allclose(w.sum(1), torch.ones(2)) and torch.all(w >= 0)
    # the loss is the OT value: in [0, 1] (costs are in [0, 1]) and it trains the gate
    model.train()
    loss, logs = model.loss("main", images, masks)
    assert 0.0 <= float(loss.detach()) <= 1.0
    loss.backward()
    assert model.gate.weight.grad is not None and model.gate.weight.grad.abs().sum() > 0
    model.eval()
    gated = _smoke("mose", eval_weights="gate")
    s = gated.sample(images, 7, generator=torch.Generator().manual_seed(3))
    assert s.shape == (2, 7, 16, 16)
    assert torch.equal(s, gated.sample(images, 7, generator=torch.Generator().manual_seed(3)))


# ---------------------------------------------------------------------------------------------------
# CIMD / Analog Bits: Gaussian diffusion
# ---------------------------------------------------------------------------------------------------

def test_linear_schedule_endpoints():
    ab = linear_alpha_bar(1000)
    assert ab.shape == (1001,) and ab[0] == 1.0 and torch.all(ab[1:] < ab[:-1])
    assert torch.isclose(ab[1], torch.tensor(1 - 1e-4, dtype=D64))
    betas = 1 - ab[1:] / ab[:-1]
    assert torch.isclose(betas[-1], torch.tensor(0.02, dtype=D64)) and float(ab[-1]) < 1e-4


@pytest.mark.parametrize("t,s", [(10, 9), (500, 400), (1000, 0)])
def test_gaussian_posterior_matches_bayes_rule(t, s):
    """q(x_s | x_t, x_0) from the product of the Gaussians q(x_s | x_0) and q(x_t | x_s) (precision form)."""
    ab = linear_alpha_bar(1000)
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn((4, 1, 3, 3), generator=g, dtype=D64)
    xt = torch.randn((4, 1, 3, 3), generator=g, dtype=D64)
    abt, abs_ = ab[t].expand(4), ab[s].expand(4)
    mean, var = gaussian_posterior(x0, xt, abt, abs_)
    a_ts = ab[t] / ab[s]
    prec = 1 / (1 - ab[s]) + a_ts / (1 - a_ts)  # prior N(sqrt(abar_s) x0, 1 - abar_s); likelihood of x_t
    ref_var = 1 / prec
    ref_mean = ref_var * (ab[s].sqrt() * x0 / (1 - ab[s]) + a_ts.sqrt() * xt / (1 - a_ts)) if s > 0 else x0
    if s == 0:
        ref_var = torch.tensor(0.0, dtype=D64)
    assert torch.allclose(var.flatten(), ref_var.expand(4), atol=1e-12)
    assert torch.allclose(mean, ref_mean, atol=1e-10)


def test_strided_times_and_nfe():
    assert strided_times(1000, 100)[:3] == [1000, 990, 980] and strided_times(1000, 100)[-1] == 0
    assert len(strided_times(1000, 100)) == 101 and strided_times(4, 0) == [4, 3, 2, 1, 0]
    model = _smoke("cimd", sample_steps=7)
    assert model.nfe(100) == 100 * 7 + 1  # + the prior net once per image
    assert _smoke("analog_bits", sample_steps=7).nfe(100) == 700


def test_analog_bits_nfe_counts_the_network_calls_with_a_time_difference():
    for td, calls in ((0.0, 10), (1.0, 9)):
        model = _smoke("analog_bits", sample_steps=10, time_difference=td).eval()
        seen = []
        hook = model.net.register_forward_hook(lambda *a: seen.append(1))
        model.sample(torch.zeros(1, 1, 32, 32), 1, generator=torch.Generator().manual_seed(0))
        hook.remove()
        assert len(seen) == calls == model.nfe(1)


def test_cimd_eps_and_x0_parameterisations_agree_on_x0():
    model = _smoke("cimd")
    x0 = torch.randn((3, 1, 4, 4), dtype=D64)
    eps = torch.randn((3, 1, 4, 4), dtype=D64)
    ab = model.abar[torch.tensor([1, 300, 999])]
    xt = ab.sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(model.x0_estimate(eps, xt, ab), x0, atol=1e-8)


def test_analog_bits_self_conditioning_path():
    model = _smoke("analog_bits")
    images, masks = _batch()
    xt = torch.randn((2, 1, 16, 16))
    t = torch.tensor([0.3, 0.8])
    without = model.predict_x0(xt, None, images, t)
    assert torch.equal(without, model.predict_x0(xt, torch.zeros_like(xt), images, t))  # None = zeros slot
    with_prev = model.predict_x0(xt, torch.ones_like(xt), images, t)
    assert with_prev.shape == without.shape and not torch.allclose(with_prev, without)
    # the training loss runs and backpropagates with self-conditioning never and always
    model.train()
    for p, flag in ((0.0, 0.0), (1.0, 1.0)):
        model.cfg.self_cond_prob = p
        model.zero_grad()
        loss, logs = model.loss("main", images, masks)
        loss.backward()
        assert logs["self_cond"] == flag and torch.isfinite(loss)
        assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in model.parameters())
    assert float(gamma_cosine(torch.tensor(0.0))) == 1.0 and float(gamma_cosine(torch.tensor(1.0))) < 1e-12


# ---------------------------------------------------------------------------------------------------
# c-Prob. U-Net / c-SSN: style conditioning
# ---------------------------------------------------------------------------------------------------

def test_style_plan():
    assert style_plan("mix", 7, 3, "x") == [(0, [0, 3, 6]), (1, [1, 4]), (2, [2, 5])]
    assert style_plan(1, 4, 3, "x") == [(1, [0, 1, 2, 3])]
    with pytest.raises(UserError, match="method.style"):
        style_plan(3, 4, 3, "method.style")


@pytest.mark.parametrize("name", ["c_prob_unet", "c_ssn"])
def test_style_conditioning_changes_samples(name):
    images, masks = _batch()
    model = _smoke(name)
    for p in model.parameters():  # make the style channels matter a lot
        p.data.add_(0.3 * torch.randn_like(p))
    draws = {}
    for s in range(3):
        model.cfg.style = s
        draws[s] = model.sample(images, 4, generator=torch.Generator().manual_seed(0))
        assert model.nfe(100) == 1
    assert not torch.equal(draws[0], draws[1]) or not torch.equal(draws[1], draws[2])
    # "mix": sample i uses style i mod A, with the same noise stream as a single style of the same count
    model.cfg.style = "mix"
    mixed = model.sample(images, 6, generator=torch.Generator().manual_seed(0))
    assert model.nfe(100) == 3 and mixed.shape == (2, 6, 16, 16)
    # the first style of the mixture draws from the fresh generator: equal to style 0 drawn alone
    mixed3 = model.sample(images, 3, generator=torch.Generator().manual_seed(0))
    model.cfg.style = 0
    alone = model.sample(images, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixed3[:, :1], alone)
    with pytest.raises(UserError, match="method.style"):
        _smoke(name, style=5)


def test_style_input_reaches_the_networks():
    spec = SPEC
    m = _smoke("c_prob_unet")
    assert m.spec == spec and m.prior.encoder[0].in_channels == spec.channels + spec.readers
    assert m.posterior.encoder[0].in_channels == spec.channels + spec.readers + 2
    s = _smoke("c_ssn")
    assert s.unet.down_blocks[0].convs[0].in_channels == spec.channels + spec.readers
