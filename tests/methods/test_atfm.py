"""ATFM: GTR's low-rank Gaussian and L_Prior, the SFM flow maths and L_SF, the batched sampler, the
frozen-GTR stage logic, the Table 4 variants and a short learning test on ``synthetic``; the release's layouts,
outputs and checkpoint files; the sampler's speed switches (same samples). The speed benchmark of the sampler:
test_atfm_benchmark.py."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from amisbench.api import DataSpec
from amisbench.config import PROFILES, RunConfig, StageConfig, apply_layer, resolve
from amisbench.errors import UserError
from amisbench.methods.atfm import ATFM, ATFMConfig, release, sfm
from amisbench.methods.atfm.gtr import GTR, release_backbone
from amisbench.methods.atfm.model import RELEASE_WEIGHTS_LABEL
from amisbench.methods.atfm.st_net import STNet, STNetConfig
from amisbench.nn import UNetConfig
from amisbench.registry import DATASETS, METHODS
from amisbench.seeding import derive_seed

ROOT = Path(__file__).resolve().parents[2]


def tiny_cfg(**kw) -> ATFMConfig:
    base = dict(gtr=release_backbone((8, 16)), rank=4, mc_samples=4,
                st_net=STNetConfig(dim=8, heads=2, head_dim=4), steps=3, sample_chunk=0)
    base.update(kw)
    return ATFMConfig(**base)


def tiny_model(size: int = 16, **kw) -> ATFM:
    torch.manual_seed(0)
    return ATFM(tiny_cfg(**kw), DataSpec(channels=1, height=size, width=size, readers=4))


def batch(b: int = 3, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 1, size, size, generator=g)
    masks = (torch.rand(b, 4, size, size, generator=g) > 0.6).float()
    return images, masks


# ---------------------------------------------------------------------------------------------------
# GTR
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_gaussian():
    """GTR's distribution for two 4x4 images (D = 16), in float64."""
    torch.manual_seed(0)
    gtr = GTR(1, UNetConfig(widths=(4,)), rank=3).double().eval()
    with torch.no_grad():
        dist = gtr(torch.randn(2, 1, 4, 4, dtype=torch.float64))
    return dist


def test_gtr_log_density_matches_dense_gaussian(small_gaussian):
    dist = small_gaussian
    dense = torch.distributions.MultivariateNormal(dist.mean, covariance_matrix=dist.covariance())
    z = torch.randn(5, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    torch.testing.assert_close(dist.log_prob(z), dense.log_prob(z), rtol=1e-10, atol=1e-10)
    # the covariance is P P^T + diag(d) with d > 0 (d = exp(.) + eps)
    assert (dist.cov_diag > 0).all() and dist.cov_factor.shape == (2, 16, 3)


def test_gtr_sample_covariance_matches_dense_gaussian(small_gaussian):
    dist = small_gaussian
    z = dist.rsample(200_000, generator=torch.Generator().manual_seed(3))  # (m,B,D)
    emp_mean = z.mean(0)
    emp_cov = torch.einsum("mbi,mbj->bij", z - emp_mean, z - emp_mean) / (z.shape[0] - 1)
    cov = dist.covariance()
    scale = cov.diagonal(dim1=-2, dim2=-1).max()
    assert (emp_cov - cov).abs().max() < 0.02 * scale
    assert (emp_mean - dist.mean).abs().max() < 0.01 * scale.sqrt()


def test_antithetic_pairs_average_to_the_mean(small_gaussian):
    dist = small_gaussian
    z = dist.rsample(20, antithetic=True, generator=torch.Generator().manual_seed(4))
    assert z.shape == (20, 2, 16)
    torch.testing.assert_close((z[:10] + z[10:]) / 2, dist.mean.expand(10, -1, -1), rtol=0, atol=1e-12)
    assert not torch.allclose(z[:10], z[10:])


def test_prior_loss_is_the_monte_carlo_likelihood():
    torch.manual_seed(0)
    gtr = GTR(1, UNetConfig(widths=(4, 8)), rank=2).eval()
    images, masks = batch(2, 8)
    y = masks[:, 0]
    vals = {}
    for mode in ("logmeanexp", "mean_nll"):
        torch.manual_seed(5)
        with torch.no_grad():
            vals[mode] = float(gtr.prior_loss(images, y, mc_samples=6, likelihood=mode))
    # the same draws by hand: log p(y|z_j) = sum over pixels of Bernoulli log-likelihoods
    torch.manual_seed(5)
    with torch.no_grad():
        z = gtr(images).rsample(6, antithetic=True)
    ll = torch.distributions.Bernoulli(logits=z).log_prob(y.flatten(1).expand_as(z)).sum(-1)  # (M,B)
    d = y[0].numel()
    lme = -(torch.logsumexp(ll, 0) - math.log(6)).mean() / d
    mnll = -ll.mean(0).mean() / d
    assert vals["logmeanexp"] == pytest.approx(float(lme), rel=1e-5)
    assert vals["mean_nll"] == pytest.approx(float(mnll), rel=1e-5)
    assert vals["logmeanexp"] <= vals["mean_nll"]  # Jensen: -log mean p <= mean -log p


# ---------------------------------------------------------------------------------------------------
# SFM maths
# ---------------------------------------------------------------------------------------------------

def test_flow_path_target_and_projection():
    x0 = torch.tensor([[0.2, 0.9, -1.0]])
    x1 = torch.tensor([[1.0, 0.0, 1.0]])
    t = torch.tensor([0.25])
    xt = sfm.interpolate(x0, x1, t)
    torch.testing.assert_close(xt, torch.tensor([[0.4, 0.675, -0.5]]))
    torch.testing.assert_close(sfm.interpolate(x0, x1, torch.zeros(1)), x0)
    torch.testing.assert_close(sfm.interpolate(x0, x1, torch.ones(1)), x1)
    v = sfm.velocity_target(x0, x1)
    torch.testing.assert_close(v, torch.tensor([[0.8, -0.9, 2.0]]))
    # x_1t = x_t + v (1 - t): 0.4 + 0.8 * 0.75 = 1.0; with the true velocity it lands on x1 at any t
    for tt in (0.0, 0.3, 0.999):
        tv = torch.tensor([tt])
        torch.testing.assert_close(sfm.project(sfm.interpolate(x0, x1, tv), v, tv), x1)
    torch.testing.assert_close(sfm.project(xt, torch.zeros_like(xt), t), xt)


def test_training_times_lie_on_the_lambda_grid():
    t = sfm.sample_times(5000, timesteps=1000, generator=torch.Generator().manual_seed(0))
    k = t * 1000
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert t.min() >= 0 and t.max() <= 0.999 + 1e-6 and len(t.unique()) > 900


def test_dice_scores_values():
    a = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert float(sfm.dice_scores(a, a, smooth=0)) == 1.0
    assert float(sfm.dice_scores(a, b, smooth=0)) == 0.5
    assert float(sfm.dice_scores(torch.zeros(1, 4), torch.zeros(1, 4))) == 1.0  # two empties: 1
    assert float(sfm.dice_scores(a, b, smooth=1.0)) == pytest.approx(3 / 5)


def test_soft_dice_has_a_gradient_and_detached_has_none():
    x1t = torch.tensor([[[0.3, 0.8, 1.4, -0.2]]], requires_grad=True)
    y = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    soft = sfm.dice_loss(x1t, y, mode="soft")
    soft.backward()
    assert x1t.grad is not None and x1t.grad.abs().sum() > 0
    # clamp(x_1t, 0, 1): pixels pushed outside [0, 1] get no Dice gradient
    assert x1t.grad[0, 0, 2] == 0 and x1t.grad[0, 0, 3] == 0
    det = sfm.dice_loss(x1t, y, mode="detached")
    assert not det.requires_grad and det.grad_fn is None
    # thresholded at 0.5: prediction [0, 1, 1, 0] vs [1, 1, 0, 0] -> Dice (2 + 1) / (2 + 2 + 1)
    assert float(det) == pytest.approx(1 - 3 / 5)


def test_dice_against_all_readers():
    x1t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, A=2, D=2)
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert float(sfm.dice_loss(x1t, y, targets="own", smooth=0)) == 0.0
    # against all readers: half the pairs match (Dice 1), half are disjoint (Dice 0)
    assert float(sfm.dice_loss(x1t, y, targets="all", smooth=0)) == pytest.approx(0.5)


def test_sfm_loss_is_mse_plus_alpha_dice():
    seen = {}

    def net(x_t, t, images):
        seen.update(x_t=x_t, t=t, images=images)
        return 0.5 * x_t + images[:, :1]

    images, masks = batch(2, 8)
    x0 = torch.sigmoid(torch.randn(2, 1, 8, 8))
    torch.manual_seed(0)
    loss, logs = sfm.sfm_loss(net, x0, masks, images, alpha=0.3)
    x_t, t = seen["x_t"], seen["t"]
    assert x_t.shape == (8, 1, 8, 8) and t.shape == (8,)
    assert (t.reshape(2, 4) == t.reshape(2, 4)[:, :1]).all()  # one t per image, shared by its readers
    # each of the 4 readers of an image shares the image's source draw
    x1 = masks.reshape(8, 1, 8, 8)
    x0r = x0.repeat_interleave(4, 0)
    torch.testing.assert_close(x_t, t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0r)
    torch.testing.assert_close(seen["images"], images.repeat_interleave(4, 0))
    v = net(x_t, t, images.repeat_interleave(4, 0))
    mse = ((v - (x1 - x0r)) ** 2).mean()
    p = (x_t + v * (1 - t[:, None, None, None])).clamp(0, 1).reshape(2, 4, 64)
    y = masks.reshape(2, 4, 64)
    dice = (2 * (p * y).sum(-1) + 1) / (p.sum(-1) + y.sum(-1) + 1)
    torch.testing.assert_close(loss, mse + 0.3 * (1 - dice).mean())
    assert logs["l_fm"] == pytest.approx(float(mse), rel=1e-6)


def test_time_per_reader_draws_one_t_per_flow():
    seen = {}

    def net(x_t, t, images):
        seen["t"] = t
        return x_t

    images, masks = batch(8, 8)
    torch.manual_seed(0)
    sfm.sfm_loss(net, torch.rand(8, 1, 8, 8), masks, images, alpha=0.0, time_per="reader")
    per_image = seen["t"].reshape(8, 4)
    assert (per_image != per_image[:, :1]).any()


def test_release_dice_is_batch_global_hard_and_detached():
    # two images, two readers; x_1t thresholded at >= 0.5 (0.5 counts as foreground, as .ge(0.5))
    x1t = torch.tensor([[[0.5, 0.9, 0.1, 0.0], [1.0, 0.0, 0.0, 0.0]],
                        [[0.0, 0.0, 0.0, 0.0], [0.7, 0.7, 0.7, 0.7]]], requires_grad=True)
    y = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
                      [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    d = sfm.dice_loss(x1t, y, mode="release")
    assert not d.requires_grad
    # reader 0 over the batch: hard [1,1,0,0 | 0,0,0,0] vs [1,0,0,0 | 0,0,0,1]: 2*1 / (2 + 2)
    # reader 1: hard [1,0,0,0 | 1,1,1,1] vs [1,0,0,0 | 0,0,0,0]: 2*1 / (5 + 1)
    expect = 1 - (0.5 + 2 / 6) / 2
    assert float(d) == pytest.approx(expect, abs=1e-6)
    # per image (detached) differs: image 2 of reader 1 has an empty target
    assert float(sfm.dice_loss(x1t, y, mode="detached")) != pytest.approx(expect, abs=1e-3)


def test_detached_dice_leaves_the_gradient_of_l_fm_unchanged():
    images, masks = batch(2, 16)

    def grads(**kw):
        m = tiny_model(**kw)
        m.on_stage_start("sfm")
        m.train()
        torch.manual_seed(7)
        loss, _ = m.loss("sfm", images, masks)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in m.st_net.parameters()])

    g0 = grads(alpha=0.0)
    assert torch.equal(grads(alpha=1.0, dice="detached"), g0)
    assert torch.equal(grads(alpha=1.0, dice="release"), g0)  # the release: "w/o L_SF" is the same
    assert not torch.allclose(grads(alpha=1.0, dice="soft"), g0)


# ---------------------------------------------------------------------------------------------------
# the method: stages, frozen GTR, sampling
# ---------------------------------------------------------------------------------------------------

def test_stages_and_frozen_gtr():
    m = tiny_model()
    images, masks = batch(3, 16)
    assert ATFM.stages == ("gtr", "sfm")
    assert {id(p) for p in m.trainable("gtr")} == {id(p) for p in m.gtr.parameters()}
    assert {id(p) for p in m.trainable("sfm")} == {id(p) for p in m.st_net.parameters()}
    m.on_stage_start("gtr")
    m.train()
    loss, logs = m.loss("gtr", images, masks)
    loss.backward()
    assert "l_prior" in logs and all(p.grad is None for p in m.st_net.parameters())
    m.zero_grad(set_to_none=True)
    m.on_stage_start("sfm")
    m.train()  # the runner calls train() every step: the frozen GTR must stay in eval mode
    assert not m.gtr.training and m.st_net.training
    assert all(not p.requires_grad for p in m.gtr.parameters())
    stats = {k: v.clone() for k, v in m.gtr.state_dict().items()}
    loss, logs = m.loss("sfm", images, masks)
    loss.backward()
    assert set(logs) == {"l_fm", "l_dice"}
    assert all(p.grad is None for p in m.gtr.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.st_net.parameters())
    for k, v in m.gtr.state_dict().items():  # the frozen GTR is untouched
        assert torch.equal(v, stats[k]), k
    with pytest.raises(UserError, match="unknown stage 'main'"):
        m.loss("main", images, masks)


@pytest.mark.parametrize("kw", [{}, {"solver": "heun"}, {"source": "gaussian"}, {"flow": False}],
                         ids=["euler", "heun", "gaussian", "act_gtr"])
def test_sample_is_bool_and_independent_of_the_chunk_size(kw):
    m = tiny_model(steps=2, **kw)
    images, _ = batch(2, 16)
    outs = []
    for chunk in (0, 3, 4):  # chunks of 3 cut across the 5 samples of an image
        m.cfg.sample_chunk = chunk
        outs.append(m.sample(images, 5, generator=torch.Generator().manual_seed(11)))
    s = outs[0]
    assert s.dtype == torch.bool and s.shape == (2, 5, 16, 16)
    assert 0 < s.float().mean() < 1
    for o in outs[1:]:
        assert torch.equal(o, s)
    other = m.sample(images, 5, generator=torch.Generator().manual_seed(12))
    assert not torch.equal(other, s)


def test_sample_leaves_the_module_mode_alone_and_release_loop_shape():
    m = tiny_model()
    images, _ = batch(2, 16)
    m.train()
    a = m.sample(images, 5, generator=torch.Generator().manual_seed(0))
    assert m.training and m.gtr.training  # restored after sampling in eval mode
    m.eval()
    b = m.sample(images, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    loop = m.sample_loop(images, 5, generator=torch.Generator().manual_seed(0))
    assert loop.dtype == torch.bool and loop.shape == (2, 5, 16, 16)
    m.cfg.sampler = "release_loop"
    calls = {"gtr": 0, "st_net": 0}
    hooks = [getattr(m, k).register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls]
    assert torch.equal(m.sample(images, 5, generator=torch.Generator().manual_seed(0)), loop)
    for h in hooks:
        h.remove()
    # as the release's test script: one GTR pass per image, then the Euler steps of one sample at a time
    assert calls == {"gtr": 2, "st_net": 2 * 5 * m.cfg.steps}


def test_sample_under_autocast_keeps_the_flow_in_float32():
    m = tiny_model().eval()
    images, _ = batch(2, 16)
    ref = m.sample(images, 6, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x0 = m._sources(images, 6, torch.Generator().manual_seed(0))
        low = m.sample(images, 6, generator=torch.Generator().manual_seed(0))
    assert x0.dtype == torch.float32
    assert low.dtype == torch.bool and low.shape == ref.shape
    assert (low != ref).float().mean() < 0.05  # bf16 network, same draws: nearly the same masks


def test_batched_sampler_matches_an_explicit_euler_loop():
    m = tiny_model().eval()
    images, _ = batch(2, 16)
    s = m.sample(images, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = m.gtr(images).rsample(3, generator=torch.Generator().manual_seed(5))  # (n,B,D)
        for i in range(2):
            for j in range(3):
                x = torch.sigmoid(z[j, i]).reshape(1, 1, 16, 16)
                for k in range(m.cfg.steps):
                    x = x + m.st_net(x, torch.tensor([k / m.cfg.steps]), images[i:i + 1]) / m.cfg.steps
                assert torch.equal(s[i, j], x[0, 0] > 0.5)


def test_nfe():
    spec = DataSpec(1, 16, 16, 4)
    assert ATFMConfig().steps == 25
    assert ATFM(tiny_cfg(steps=25), spec).nfe(100) == 1 + 2500
    assert ATFM(tiny_cfg(steps=25, solver="heun"), spec).nfe(100) == 1 + 5000
    assert ATFM(tiny_cfg(steps=25, source="gaussian"), spec).nfe(100) == 2500
    assert ATFM(tiny_cfg(flow=False), spec).nfe(100) == 1
    assert ATFM(tiny_cfg(steps=25, sampler="release_loop"), spec).nfe(100) == 1 + 2500  # GTR once per image


def test_state_dict_round_trip_gives_the_same_samples():
    a, b = tiny_model(), tiny_model()
    for p in b.parameters():
        p.data.add_(0.1)
    b.load_state_dict(a.state_dict())
    images, _ = batch(2, 16)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(a.eval().sample(images, 4, generator=g()), b.eval().sample(images, 4, generator=g()))


def test_bad_settings_are_user_errors():
    spec = DataSpec(1, 16, 16, 4)
    with pytest.raises(UserError, match="method.steps"):
        ATFM(tiny_cfg(steps=0), spec)
    with pytest.raises(UserError, match="method.mc_samples"):
        ATFM(tiny_cfg(mc_samples=5), spec)


# ---------------------------------------------------------------------------------------------------
# configs: paper scale and the Table 4 variants
# ---------------------------------------------------------------------------------------------------

def test_paper_profile_values():
    c = resolve("atfm", "synthetic", "paper").cfg
    m = c.method
    assert m.gtr.widths == (32, 64, 128, 192) and m.rank == 10 and m.mc_samples == 20 and m.antithetic
    assert m.gtr.convs_per_block == 3 and m.gtr.norm == "none" and m.gtr.down == "avg" and m.gtr.align_corners
    assert m.eps == 1e-5 and m.eps_twice
    assert m.st_net == STNetConfig(dim=0, mults=(1, 2, 4), heads=4, head_dim=32, groups=1)
    assert m.steps == 25 and m.timesteps == 1000 and m.alpha == 1e-3 and m.dice == "soft"
    assert m.time_per == "image" and m.cond == "image"
    g, f = c.train["gtr"], c.train["sfm"]
    assert (g.epochs, g.batch_size, g.optimizer, g.lr, g.weight_decay) == (1000, 256, "adamw", 1e-4, 1e-4)
    assert (f.epochs, f.batch_size, f.optimizer, f.lr, f.weight_decay, f.schedule) == \
        (200, 6, "adam", 1e-4, 0.0, "constant")


@pytest.mark.parametrize("dataset,alpha,epochs,batches,cond", [("lidc", 1e-3, (1000, 200), (256, 6), "image"),
                                                              ("isic3", 1e-4, (400, 120), (8, 1), "grey")])
def test_dataset_defaults(dataset, alpha, epochs, batches, cond):
    layer = yaml.safe_load((ROOT / "configs" / "methods" / "atfm.yaml").read_text())
    from amisbench.registry import DATASETS

    cfg = RunConfig(method=ATFMConfig(), dataset=DATASETS.get(dataset).Config(),
                    train={"gtr": StageConfig(), "sfm": StageConfig()})
    apply_layer(cfg, layer, "atfm.yaml", profile="paper", dataset=dataset, variant=None, used_variant=[False])
    assert cfg.method.alpha == alpha
    assert (cfg.train["gtr"].epochs, cfg.train["sfm"].epochs) == epochs
    assert (cfg.train["gtr"].batch_size, cfg.train["sfm"].batch_size) == batches
    assert cfg.method.cond == cond and cfg.method.st_net.dim == 0  # ST-Net base width = the image size
    # ISIC: an epoch is one pass over the (image, style) entries, as the release's concatenated loader
    assert getattr(cfg.dataset, "entries", "none") == ("train" if dataset == "isic3" else "none")


VARIANTS = {  # name: (flow, source, alpha, gtr trained, sfm trained)
    "act_gtr": (False, "gtr", 1e-3, True, False),
    "sfm": (True, "gaussian", 1e-3, False, True),
    "sfm_no_lsf": (True, "gaussian", 0.0, False, True),
    "atfm_no_lsf": (True, "gtr", 0.0, True, True),
    "atfm": (True, "gtr", 1e-3, True, True),
}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants(variant, profile):
    c = resolve("atfm", "synthetic", profile, variant).cfg
    flow, source, alpha, gtr_on, sfm_on = VARIANTS[variant]
    assert (c.method.flow, c.method.source, c.method.alpha) == (flow, source, alpha)
    assert (c.train["gtr"].steps != 0) == gtr_on
    assert (c.train["sfm"].steps != 0) == sfm_on


def test_release_variant_uses_the_release_dice():
    assert resolve("atfm", "synthetic", "quick", "release").cfg.method.dice == "release"
    assert resolve("atfm", "synthetic", "quick").cfg.method.dice == "soft"


def test_grey_condition_for_the_st_net_rgb_for_gtr():
    m = ATFM(tiny_cfg(cond="grey"), DataSpec(channels=3, height=16, width=16, readers=3))
    assert m.st_net.stem.in_channels == 2 and m.gtr.unet.down_blocks[0].convs[0].in_channels == 3
    rgb = torch.rand(2, 3, 16, 16)
    grey = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    torch.testing.assert_close(m.condition(rgb)[:, 0], grey)
    assert m.sample(rgb, 2, generator=torch.Generator().manual_seed(0)).shape == (2, 2, 16, 16)
    with pytest.raises(UserError, match="method.cond: 'grey' needs RGB"):
        ATFM(tiny_cfg(cond="grey"), DataSpec(channels=1, height=16, width=16, readers=4))


# ---------------------------------------------------------------------------------------------------
# learning test: ATFM beats its own GTR samples thresholded (Act. GTR) on the true distribution
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_atfm_beats_its_own_thresholded_gtr(tmp_path):
    from amisbench.evaluate import evaluate
    from amisbench.registry import DATASETS
    from amisbench.runner import run
    from amisbench.store import load_torch

    # the quick networks on 32 px images, 80 GTR and 240 SFM steps, 6 test images (about a minute of CPU)
    sets = ["dataset.size=32", "dataset.train_groups=40", "train.gtr.steps=80", "train.sfm.steps=240",
            "eval.max_images=6"]
    folder = run("atfm", "synthetic", seed=0, profile="quick", sets=sets, results=tmp_path, quiet=True)
    atfm = yaml.safe_load((folder / "metrics.json").read_text())
    # Act. GTR of the same trained model: the GTR samples through the sigmoid, thresholded at 0.5
    res = resolve("atfm", "synthetic", "quick", None, sets)
    ds = DATASETS.get("synthetic")(res.cfg.dataset, "test")
    model = ATFM(res.cfg.method, ds.spec)
    model.load_state_dict(load_torch(folder / "ckpt" / "last.pt")["model"])
    model.cfg.flow = False
    out = tmp_path / "act_gtr"
    out.mkdir()
    act = evaluate(model, ds, res.cfg.eval, seed=0, device=torch.device("cpu"), out_dir=out)
    print(f"\nGED_true_100: ATFM {atfm['GED_true_100']:.4f}, Act. GTR {act['GED_true_100']:.4f}")
    assert atfm["GED_true_100"] < act["GED_true_100"]


# ---------------------------------------------------------------------------------------------------
# ATFM against its release: the state_dict layouts of ``../shared/reference/atfm_release/shapes.json`` load strictly,
# the release's reference outputs are reproduced, and a run starts from release-format checkpoint files
# (``method.init_gtr`` / ``method.init_sfm``) and evaluates end to end, labelled leaky.
# ---------------------------------------------------------------------------------------------------

REF = Path(__file__).resolve().parents[3] / "shared" / "reference" / "atfm_release"


def ref(name: str):
    if not (REF / name).is_file():
        pytest.skip("../shared/reference/atfm_release is not available")
    return REF / name


@pytest.fixture(scope="module")
def shapes() -> dict:
    return json.loads(ref("shapes.json").read_text())


def random_state(layout: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v, generator=g) for k, v in layout.items()}


@pytest.mark.parametrize("key, build", [("st_net_dim128", release.st_net_from_release),
                                        ("st_net_dim256", release.st_net_from_release),
                                        ("gtr_in1", release.gtr_from_release),
                                        ("gtr_in3", release.gtr_from_release)])
@pytest.mark.slow
def test_release_layouts_load_strictly(shapes, key, build):
    state = random_state(shapes[key])
    net = build(state)
    assert sum(p.numel() for p in net.parameters()) == shapes[f"{key}_params"]
    # every tensor arrived where the key map says (strict: same keys, same shapes, same values)
    back = release.st_net_to_release(net) if key.startswith("st_net") else release.gtr_to_release(net)
    assert set(back) == set(state)
    for k in list(state)[:: max(1, len(state) // 25)]:
        assert torch.equal(back[k], state[k]), k
    del state, back, net


def test_a_wrong_layout_is_refused(shapes):
    state = random_state(shapes["gtr_in1"])
    bad = dict(state)
    bad.pop("cov_factor_l.bias")
    with pytest.raises(ValueError, match="missing cov_factor_l.bias"):
        release.gtr_from_release(bad)
    bad = dict(state, **{"unet.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected unet.extra.weight"):
        release.gtr_from_release(bad)
    net = STNet(1, STNetConfig(dim=16, heads=2, head_dim=4))
    sd = release.st_net_to_release(net)
    sd["final_conv.weight"] = torch.zeros(2, 16, 1, 1)
    with pytest.raises(ValueError, match=r"final_conv.weight has shape \(2, 16, 1, 1\)"):
        release.load_st_net(net, sd)


def test_st_net_reproduces_the_release():
    r = torch.load(ref("st_net_dim32.pt"), weights_only=True)
    net = release.st_net_from_release(r["state_dict"])
    assert net.dim == 32 and net.cond_channels == 1
    with torch.no_grad():
        v = net(r["x_t"], r["t"], r["cond"])
    assert v.shape == r["v"].shape
    torch.testing.assert_close(v, r["v"], rtol=0, atol=1e-5)
    with torch.no_grad():  # and the output depends on t as the release feeds it (t not rescaled)
        assert not torch.allclose(net(r["x_t"], r["t"] * 1000, r["cond"]), r["v"], atol=1e-3)


def test_gtr_reproduces_the_release():
    r = torch.load(ref("gtr.pt"), weights_only=True)
    gtr = release.gtr_from_release(r["state_dict"])
    with torch.no_grad():
        mean, cov_diag, cov_factor = gtr.gaussian(r["image"])
    b, _, h, w = r["image"].shape
    assert mean.shape == (b, h * w) and cov_diag.shape == (b, h * w) and cov_factor.shape == (b, h * w, 10)
    for ours, theirs in ((mean, r["mean"]), (cov_diag, r["cov_diag"]), (cov_factor, r["cov_factor"])):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_round_trip_through_the_release_names():
    torch.manual_seed(0)
    net = STNet(3, STNetConfig(dim=16, mults=(1, 2), heads=2, head_dim=8))
    back = release.st_net_from_release(release.st_net_to_release(net), heads=2)
    x, t, c = torch.rand(2, 1, 16, 16), torch.rand(2), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, c), net.eval()(x, t, c), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# release checkpoint files -> a run
# ---------------------------------------------------------------------------------------------------

def smoke_model(sets=()) -> ATFM:
    res = resolve("atfm", "synthetic", "smoke", None, list(sets))
    from amisbench.registry import DATASETS

    spec = DATASETS.get("synthetic")(res.cfg.dataset, "test").spec
    return ATFM(res.cfg.method, spec)


def write_release_files(tmp_path: Path) -> tuple[Path, Path, ATFM]:
    """Random weights of the smoke networks, saved as the release saves them (train_GTR.py, train_prior_*.py)."""
    torch.manual_seed(3)
    m = smoke_model()
    gtr_file, sfm_file = tmp_path / "GTR_LIDC.pt", tmp_path / "SFM-for-ATFM-LIDC.pth"
    torch.save({"epoch": 1, "model_state_dict": release.gtr_to_release(m.gtr), "optimizer_state_dict": {},
                "loss": torch.tensor(0.5)}, gtr_file)
    torch.save({"epoch": 1, "model_state_dict": release.st_net_to_release(m.st_net),
                "optimizer_state_dict": {}, "loss": torch.tensor(0.1)}, sfm_file)
    return gtr_file, sfm_file, m


@pytest.mark.slow
def test_a_run_from_release_checkpoints_evaluates_end_to_end(tmp_path):
    from amisbench.runner import run
    from amisbench.store import load_torch

    gtr_file, sfm_file, m = write_release_files(tmp_path)
    sets = [f"method.init_gtr={gtr_file}", f"method.init_sfm={sfm_file}", "train.gtr.steps=0",
            "train.sfm.steps=0"]
    folder = run("atfm", "synthetic", profile="smoke", sets=sets, results=tmp_path / "res", quiet=True)
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "done" and RELEASE_WEIGHTS_LABEL in info["protocol_label"]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n_images"] > 0 and 0 <= metrics["GED_100"] <= 2
    state = load_torch(folder / "ckpt" / "last.pt")["model"]
    for k, v in m.state_dict().items():  # the evaluated model holds the files' weights
        assert torch.equal(state[k], v), k


def test_release_files_are_checked(tmp_path):
    gtr_file, sfm_file, _ = write_release_files(tmp_path)
    # the GTR file given as the ST-Net
    with pytest.raises(UserError, match=rf"method.init_sfm {gtr_file}: ST-Net: the state_dict does not have"):
        smoke_model([f"method.init_sfm={gtr_file}"])
    # a paper-scale network cannot take the smoke weights
    with pytest.raises(UserError, match=r"method.init_gtr .*GTR_LIDC.pt: GTR: .* has shape"):
        smoke_model([f"method.init_gtr={gtr_file}", "method.gtr.widths=[16,32]"])
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=rf"method.init_gtr {missing}: no such file"):
        smoke_model([f"method.init_gtr={missing}"])
    plain = tmp_path / "plain.pt"
    torch.save(release.gtr_to_release(smoke_model().gtr), plain)  # a bare state_dict, not the release format
    with pytest.raises(UserError, match=rf"{plain}: expected a dict with 'model_state_dict'"):
        smoke_model([f"method.init_gtr={plain}"])
    unsafe = tmp_path / "unsafe.pt"
    unsafe.write_bytes(pickle.dumps({"model_state_dict": Path("x")}, protocol=2))
    with pytest.raises(UserError, match=rf"{unsafe}: not a checkpoint that loads with torch.load\(weights_only"):
        smoke_model([f"method.init_gtr={unsafe}"])
    assert smoke_model().weights_label == ""
    assert smoke_model([f"method.init_gtr={gtr_file}"]).weights_label == RELEASE_WEIGHTS_LABEL


def test_paper_counts_match_the_release(shapes):
    """The paper profile builds exactly the release's networks (LIDC 128 px; ST-Net from the layout)."""
    res = resolve("atfm", "lidc", "paper")
    m = ATFM(res.cfg.method, DataSpec(channels=1, height=128, width=128, readers=4, name="lidc"))
    assert sum(p.numel() for p in m.gtr.parameters()) == shapes["gtr_in1_params"]
    assert sum(p.numel() for p in m.st_net.parameters()) == shapes["st_net_dim128_params"]
    assert {release.st_net_release_key(k) for k in m.st_net.state_dict()} == set(shapes["st_net_dim128"])
    assert {release.gtr_release_key(k) for k in m.gtr.state_dict()} == set(shapes["gtr_in1"])


# ---------------------------------------------------------------------------------------------------
# ATFM's speed switches change the speed, not the samples (issue 16, "Sampling at paper scale").
# On a briefly trained smoke model (CPU, float32): the chunk size (``method.sample_chunk``, ``auto`` included) gives
# bit-equal masks; ``method.attention: sdpa`` and ``torch.compile`` (``eval.compile``) give ST-Net velocities within
# 1e-5 of the plain path; bf16 autocast (``eval.amp``) gives the same masks for >= 99.9 % of the pixels. CUDA graphs
# (``method.cuda_graphs``) are checked on a GPU by ``scripts/device_check_speed.sh``; here only that they are a no-op
# with a note off CUDA.
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    """The smoke ATFM on synthetic images, GTR and SFM trained for a few dozen Adam steps each."""
    res = resolve("atfm", "synthetic", "smoke")
    train = DATASETS.get("synthetic")(res.cfg.dataset, "train")
    test = DATASETS.get("synthetic")(res.cfg.dataset, "test")
    torch.manual_seed(derive_seed("init", 0))
    model = METHODS.get("atfm")(res.cfg.method, train.spec)
    g = torch.Generator().manual_seed(0)
    for stage, steps in (("gtr", 30), ("sfm", 60)):
        model.on_stage_start(stage)
        model.train()
        opt = torch.optim.Adam(model.trainable(stage), lr=2e-3)
        for _ in range(steps):
            idx = torch.randint(len(train), (4,), generator=g).tolist()
            images = torch.stack([train[i]["image"] for i in idx])
            masks = torch.stack([train[i]["masks"] for i in idx]).float()
            loss, _ = model.loss(stage, images, masks)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    images = torch.stack([test[i]["image"] for i in range(3)])
    return model, images


def _velocity_inputs(model, images, n=6):
    g = torch.Generator().manual_seed(7)
    b, _, h, w = images.shape
    x = torch.rand((b * n, 1, h, w), generator=g)
    t = torch.rand((b * n,), generator=g)
    return x, t, images.repeat_interleave(n, dim=0)


@pytest.mark.slow
def test_chunking_is_bit_equal_in_float32(trained):
    model, images = trained
    outs = {}
    for attention in ("sdpa", "einsum"):
        model.st_net.mid_attn.attend = _attention(attention)
        for chunk in (0, 1, 7, 10, "auto"):  # 7 cuts across the 10 samples of an image
            model.cfg.sample_chunk = chunk
            outs[attention, chunk] = model.sample(images, 10, generator=torch.Generator().manual_seed(3))
    model.cfg.sample_chunk = "auto"
    model.st_net.mid_attn.attend = _attention("sdpa")
    for attention in ("sdpa", "einsum"):
        ref = outs[attention, 0]
        assert ref.dtype == torch.bool and ref.shape == (3, 10, *images.shape[-2:])
        assert 0.01 < ref.float().mean() < 0.99  # the trained flow draws masks, not blank images
        for chunk in (1, 7, 10, "auto"):
            assert torch.equal(outs[attention, chunk], ref), (attention, chunk)
    assert model.chunk_size(30, images, images) == 30  # auto off CUDA: 256 at most, no more than there are


def _attention(name):
    from amisbench.methods.atfm.st_net import ATTENTION

    return ATTENTION[name]


@pytest.mark.slow
def test_sdpa_velocities_match_the_written_out_attention(trained):
    model, images = trained
    x, t, cond = _velocity_inputs(model, images)
    net = model.st_net
    assert model.cfg.attention == "sdpa" and net.mid_attn.attend is torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        fused = net(x, t, cond)
        net.mid_attn.attend = _attention("einsum")
        try:
            plain = net(x, t, cond)
        finally:
            net.mid_attn.attend = _attention("sdpa")
    assert plain.abs().max() > 0.1  # a trained network: velocities of size, not zeros
    assert (fused - plain).abs().max() < 1e-5
    # and the switch builds the written-out path
    from amisbench.methods.atfm.st_net import STNet

    assert STNet(1, model.cfg.st_net, dim=net.dim, attention="einsum").mid_attn.attend is _attention("einsum")
    with pytest.raises(ValueError, match="attention must be one of einsum, sdpa"):
        STNet(1, model.cfg.st_net, dim=net.dim, attention="flash")


@pytest.mark.slow
def test_compiled_velocities_match_eager(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a private cache
    import torch._dynamo

    model, images = trained
    x, t, cond = _velocity_inputs(model, images)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model.st_net)
        with torch.no_grad():
            eager = model.st_net(x, t, cond)
            comp = compiled(x, t, cond)
    finally:
        torch._dynamo.reset()
    assert (comp - eager).abs().max() < 1e-5


@pytest.mark.slow
def test_bf16_autocast_gives_the_same_masks_for_999_permille(trained):
    model, images = trained
    model.cfg.sample_chunk = "auto"
    ref = model.sample(images, 20, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.sample(images, 20, generator=torch.Generator().manual_seed(5))
    agree = float((low == ref).float().mean())
    print(f"\nbf16 autocast: {agree:.5%} of the pixels equal to float32")
    assert agree >= 0.999


@pytest.mark.slow
def test_cuda_graphs_are_a_no_op_with_a_note_off_cuda(trained, capsys):
    from amisbench.methods.atfm import model as atfm_model

    model, images = trained
    ref = model.sample(images, 4, generator=torch.Generator().manual_seed(9))
    atfm_model._NOTED.discard("cpu")
    model.cfg.cuda_graphs = True
    try:
        out = model.sample(images, 4, generator=torch.Generator().manual_seed(9))
        model.sample(images, 4, generator=torch.Generator().manual_seed(9))
    finally:
        model.cfg.cuda_graphs = False
    assert torch.equal(out, ref)
    err = capsys.readouterr().err
    assert err.count("method.cuda_graphs has no effect on cpu") == 1  # one line, once per device
