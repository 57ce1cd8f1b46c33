"""The Gaussian diffusion helpers the methods share (methods/_diffusion.py): the linear schedule, the posterior
against Bayes' rule, the strided sampling times and the NFE they give."""

import pytest
import torch
from method_helpers import build  # tests/fixtures, on sys.path by tests/conftest.py

from amisbench.api import DataSpec
from amisbench.methods._diffusion import gaussian_posterior, linear_alpha_bar, strided_times

D64 = torch.float64
SPEC = DataSpec(channels=1, height=16, width=16, readers=3, name="synthetic")


def _smoke(name, spec=SPEC, **overrides):
    return build(name, "synthetic", "smoke", spec, **overrides)


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
