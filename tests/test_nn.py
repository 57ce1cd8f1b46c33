

import math

import pytest
import torch

from amisbench.nn import LowRankGaussian, LowRankHead, UNet, UNetConfig, mc_log_likelihood, timestep_embedding


@pytest.mark.parametrize("cfg", [
    UNetConfig(widths=(4, 8, 16), norm="batch", down="max", up="bilinear"),
    UNetConfig(widths=(4, 8), norm="group", groups=2, down="conv", up="transpose", activation="silu"),
    UNetConfig(widths=(8, 16), norm="instance", down="avg", attention_levels=(1,), attention_heads=2),
])
def test_unet_shapes(cfg):
    net = UNet(3, 2, cfg)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 2, 16, 16)
    feats = UNet(3, 0, cfg)(torch.randn(2, 3, 16, 16))
    assert feats.shape == (2, cfg.widths[0], 16, 16)


def test_unet_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="not divisible by 4"):
        UNet(1, 1, UNetConfig(widths=(4, 8, 16)))(torch.randn(1, 1, 18, 18))


def test_time_conditioning_changes_the_output():
    torch.manual_seed(0)
    net = UNet(2, 1, UNetConfig(widths=(8, 16), norm="group", groups=4, attention_levels=(1,)), time_dim=16)
    x = torch.randn(2, 2, 8, 8)
    a = net(x, torch.tensor([0.1, 0.1]))
    b = net(x, torch.tensor([0.9, 0.9]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="time-conditioned"):
        net(x)
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 7)
    assert emb.shape == (2, 7) and torch.allclose(emb[0, :3], torch.ones(3))


def _small_gaussian(b=2, d=5, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(b, d, generator=g, dtype=torch.float64)
    factor = torch.randn(b, d, r, generator=g, dtype=torch.float64) * 0.5
    diag = torch.rand(b, d, generator=g, dtype=torch.float64) + 0.1
    return LowRankGaussian(mean, factor, diag)


def test_low_rank_log_density_matches_dense_mvn():
    dist = _small_gaussian()
    dense = torch.distributions.MultivariateNormal(dist.mean, covariance_matrix=dist.covariance())
    z = torch.randn(7, 2, 5, dtype=torch.float64)
    assert torch.allclose(dist.log_prob(z), dense.log_prob(z), atol=1e-10)


def test_low_rank_samples_have_the_right_covariance():
    dist = _small_gaussian(b=1, d=4, r=2, seed=3)
    z = dist.rsample(200_000, generator=torch.Generator().manual_seed(1))[:, 0]  # (m, d)
    emp = torch.cov(z.T)
    assert torch.allclose(emp, dist.covariance()[0], atol=0.03)
    assert torch.allclose(z.mean(0), dist.mean[0], atol=0.01)


def test_antithetic_pairs_average_to_the_mean():
    dist = _small_gaussian()
    z = dist.rsample(10, generator=torch.Generator().manual_seed(0), antithetic=True)
    assert z.shape == (10, 2, 5)
    assert torch.allclose((z[:5] + z[5:]) / 2, dist.mean.expand(5, -1, -1), atol=1e-12)
    with pytest.raises(ValueError, match="even number"):
        dist.rsample(3, antithetic=True)


def test_sampling_is_reproducible_with_a_generator():
    dist = _small_gaussian()
    a = dist.rsample(4, generator=torch.Generator().manual_seed(5))
    b = dist.rsample(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_mc_log_likelihood_modes():
    z = torch.tensor([[[2.0, -1.0]], [[0.0, 3.0]]])  # (M=2, B=1, D=2)
    y = torch.tensor([[1.0, 0.0]])
    ll = torch.stack([torch.log(torch.sigmoid(z[j, 0, 0])) + torch.log(1 - torch.sigmoid(z[j, 0, 1]))
                      for j in range(2)])
    assert torch.allclose(mc_log_likelihood(z, y), torch.logsumexp(ll, 0) - math.log(2))
    assert torch.allclose(mc_log_likelihood(z, y, "mean_nll"), ll.mean())


def test_head_builds_a_positive_diagonal():
    head = LowRankHead(4, rank=3, eps=1e-5)
    dist = head(torch.randn(2, 4, 6, 6))
    assert dist.mean.shape == (2, 36) and dist.cov_factor.shape == (2, 36, 3)
    assert (dist.cov_diag > 0).all()


def test_openai_attention_is_the_legacy_qkv_order():
    """QKVAttentionLegacy: qkv (B, H*3*C, T) is split per head into [q, k, v]; softmax(q^T k / sqrt(C)) v."""
    from amisbench.nn.openai_unet import AttentionBlock

    torch.manual_seed(0)
    blk = AttentionBlock(8, heads=2, groups=4)
    torch.nn.init.normal_(blk.proj_out.weight)
    x = torch.randn(3, 8, 4, 4)
    flat = x.reshape(3, 8, 16)
    qkv = blk.qkv(blk.norm(flat))
    q, k, v = qkv.reshape(3 * 2, 12, 16).split(4, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / 2.0, dim=-1)  # sqrt(C) = sqrt(4)
    h = torch.einsum("bts,bcs->bct", w, v).reshape(3, 8, 16)
    expected = (flat + blk.proj_out(h)).reshape(3, 8, 4, 4)
    assert torch.allclose(blk(x), expected, atol=1e-5)


def test_openai_unet_output_starts_at_zero_and_keeps_the_size():
    from amisbench.nn.openai_unet import OpenAIUNet, OpenAIUNetConfig

    net = OpenAIUNet(3, 2, OpenAIUNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                             attention_resolutions=(2,), num_head_channels=8, groups=4))
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 5.0]))
    assert out.shape == (2, 2, 16, 16) and torch.count_nonzero(out) == 0  # zero-initialised output conv
    with pytest.raises(ValueError, match="not divisible"):
        net(torch.randn(1, 3, 15, 15), torch.tensor([1.0]))
