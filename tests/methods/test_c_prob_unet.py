"""c-Prob. U-Net: the style enters only the prior and posterior, and the loss is the release's ELBO."""

import math

import pytest
import torch
from method_helpers import build, random_batch  # tests/fixtures, on sys.path by tests/conftest.py

from amisbench.api import DataSpec
from amisbench.errors import UserError

SPEC = DataSpec(channels=1, height=16, width=16, readers=3, name="synthetic")


def test_c_prob_unet_style_changes_only_the_prior_and_posterior():
    model = build("c_prob_unet", "synthetic", "smoke", SPEC)
    images, masks = random_batch(SPEC)
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
        build("c_prob_unet", "synthetic", "smoke", SPEC, style=5)


def test_c_prob_unet_loss_is_the_release_elbo():
    model = build("c_prob_unet", "synthetic", "smoke", SPEC)
    images, masks = random_batch(SPEC)
    model.train()
    torch.manual_seed(5)
    loss, logs = model.loss("main", images, masks)
    reg = sum(p.norm(2) for mod in (model.posterior, model.prior, model.fcomb.layers) for p in mod.parameters())
    # loss = sum of per-pixel BCE over the batch + 10 * mean KL + 1e-5 * sum of L2 norms
    rec = logs["bce_per_px"] * images.shape[0] * 16 * 16
    assert math.isclose(float(loss.detach()), rec + 10.0 * logs["kl"] + 1e-5 * float(reg.detach()), rel_tol=1e-5)
    loss.backward()
    assert model.unet.down_blocks[0].convs[0].weight.grad.abs().sum() > 0
