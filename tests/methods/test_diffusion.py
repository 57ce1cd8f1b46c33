"""Unit tests of the MoSE cost, the diffusion helpers, Analog Bits and the style plan: the pieces that are easiest
to get wrong, checked against independent computations (closed forms). MoSE's OT loss, CIMD and the c-models as
released: tests/test_release_fidelity.py."""

import pytest
import torch
from method_helpers import build, random_batch  # tests/fixtures, on sys.path by tests/conftest.py

from amisbench.api import DataSpec
from amisbench.errors import UserError
from amisbench.methods.analog_bits import gamma_cosine
from amisbench.methods._style import style_plan
from amisbench.methods._diffusion import gaussian_posterior, linear_alpha_bar, strided_times
from amisbench.methods.mose import soft_iou_cost

D64 = torch.float64
SPEC = DataSpec(channels=1, height=16, width=16, readers=3, name="synthetic")


def _smoke(name, spec=SPEC, **overrides):
    return build(name, "synthetic", "smoke", spec, **overrides)


def _batch(b=2, spec=SPEC, seed=0):
    return random_batch(spec, b, seed)


# ---------------------------------------------------------------------------------------------------
# MoSE: the IoU cost
# ---------------------------------------------------------------------------------------------------

def test_soft_iou_cost_on_hard_masks_is_one_minus_iou():
    y = torch.zeros((1, 2, 4, 4))
    y[0, 0, :2] = 1  # 8 pixels
    y[0, 1, 1:3] = 1  # 8 pixels, overlap 4 -> IoU 4 / 12
    p = y.clone()
    c = soft_iou_cost(p, y, eps=0.0)
    assert torch.allclose(c[0], torch.tensor([[0.0, 1 - 4 / 12], [1 - 4 / 12, 0.0]]))
    empty = torch.zeros((1, 1, 4, 4))
    assert soft_iou_cost(empty, empty, eps=1.0)[0, 0, 0] == 0.0  # two empty masks: IoU 1


# ---------------------------------------------------------------------------------------------------
# Diffusion helpers / Analog Bits
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
    assert _smoke("analog_bits", sample_steps=7).nfe(100) == 700


def test_analog_bits_nfe_counts_the_network_calls_with_a_time_difference():
    for td, calls in ((0.0, 10), (1.0, 9)):
        model = _smoke("analog_bits", sample_steps=10, time_difference=td).eval()
        seen = []
        hook = model.net.register_forward_hook(lambda *a: seen.append(1))
        model.sample(torch.zeros(1, 1, 32, 32), 1, generator=torch.Generator().manual_seed(0))
        hook.remove()
        assert len(seen) == calls == model.nfe(1)


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
