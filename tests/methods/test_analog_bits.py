"""Analog Bits: NFE as the network calls with a time difference, the self-conditioning path, the gamma schedule."""

import torch
from method_helpers import build, random_batch  # tests/fixtures, on sys.path by tests/conftest.py

from amisbench.api import DataSpec
from amisbench.methods.analog_bits import gamma_cosine

SPEC = DataSpec(channels=1, height=16, width=16, readers=3, name="synthetic")


def _smoke(name, spec=SPEC, **overrides):
    return build(name, "synthetic", "smoke", spec, **overrides)


def _batch(b=2, spec=SPEC, seed=0):
    return random_batch(spec, b, seed)


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
