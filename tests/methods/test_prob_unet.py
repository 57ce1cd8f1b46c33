"""Prob. U-Net: f_comb, sampling from the prior in chunks, the beta weight of the KL and the variants."""

import torch
import torch.nn.functional as F
from method_helpers import build_paper, n_params  # tests/fixtures, on sys.path by tests/conftest.py

from amisbench.api import DataSpec
from amisbench.config import resolve
from amisbench.methods.prob_unet import ProbUNet, ProbUNetConfig
from amisbench.nn import UNetConfig


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


def test_prob_unet_variants_switch_the_release():
    kohl = build_paper("prob_unet", "kohl")
    assert kohl.cfg.classes == 2 and kohl.cfg.beta == 1.0
    assert n_params(kohl) == 4_999_449 + 9 * 32 + 33  # +1 posterior input channel, +1 logit channel


def test_prob_unet_one_logit_loss_is_bce_plus_beta_kl():
    from amisbench.methods._blocks import kl_diag_gaussians
    from amisbench.methods.prob_unet import ProbUNet, ProbUNetConfig
    from amisbench.nn import UNetConfig

    torch.manual_seed(0)
    m = ProbUNet(ProbUNetConfig(unet=UNetConfig(widths=(4, 8), convs_per_block=1, norm="none", down="avg"),
                                latent_dim=2, l2_weight=0.0), DataSpec(1, 16, 16, 2))
    x = torch.randn(2, 1, 16, 16)
    masks = (torch.rand(2, 2, 16, 16) > 0.5).float()
    masks[:, 1] = masks[:, 0]
    torch.manual_seed(1)
    loss, logs = m.loss("main", x, masks)
    torch.manual_seed(1)
    torch.randint(0, 2, (2,))  # pick_reader
    y = masks[:, 0]
    mu_q, s_q = m.posterior(torch.cat([x, y[:, None]], 1))
    mu_p, s_p = m.prior(x)
    z = mu_q + s_q * torch.randn_like(mu_q)
    logits = m.combine(m.unet(x), z[:, None])[:, 0, 0]
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / 2
    kl = kl_diag_gaussians(mu_q, s_q, mu_p, s_p).mean()
    assert torch.allclose(loss, (bce + 10.0 * kl) / 256, rtol=1e-5)
