"""MoSE: the OT loss with the release's constants against brute force and a hand-worked case, the training of gate
and experts, sampling from the gate, the gamma switch after a plateau."""

import collections
import itertools
import math

import numpy as np
import pytest
import torch
from method_helpers import build, random_batch  # tests/fixtures, on sys.path by tests/conftest.py

from amisbench.api import DataSpec
from amisbench.errors import UserError
from amisbench.methods.mose import exact_coupling, greedy_coupling, ot_loss
from amisbench.methods.mose import soft_iou_cost

SPEC = DataSpec(channels=1, height=16, width=16, readers=3, name="synthetic")


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
    model = build("mose", "synthetic", "smoke", SPEC)
    images, masks = random_batch(SPEC)
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
    model = build("mose", "synthetic", "smoke", SPEC, gamma_epoch_steps=2, gamma_patience=1)
    for loss in (1.0, 1.0, 2.0, 2.0):  # epoch means of the cumulative loss: 1.0, then 1.5 (worse)
        model._track_gamma(loss)
    assert model.gamma == 0.5
    state = model.state_dict()
    for loss in (2.0, 2.0):  # 1.67: worse again -> more than one bad epoch
        model._track_gamma(loss)
    assert model.gamma == 1.0
    fresh = build("mose", "synthetic", "smoke", SPEC, gamma_epoch_steps=2, gamma_patience=1)
    fresh.load_state_dict(state)
    assert fresh.gamma == 0.5 and fresh._plateau["count"] == 4
    with pytest.raises(UserError, match="gamma0"):
        build("mose", "synthetic", "smoke", SPEC, gamma0=0.0)


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
