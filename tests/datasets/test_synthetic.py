import numpy as np
import pytest
import torch

from amisbench.datasets.synthetic import Synthetic, SyntheticConfig
from amisbench.errors import UserError


@pytest.fixture(scope="module")
def cfg():
    return SyntheticConfig(size=32, train_groups=30, val_groups=5, test_groups=10)


def test_samples_follow_the_contract(cfg):
    ds = Synthetic(cfg, "train")
    s = ds[3]
    assert s["image"].dtype == torch.float32 and s["image"].shape == (1, 32, 32)
    assert s["masks"].dtype == torch.uint8 and s["masks"].shape == (4, 32, 32)
    assert set(s["masks"].unique().tolist()) <= {0, 1}
    assert isinstance(s["id"], str) and isinstance(s["group"], str)
    assert ds.spec.readers == 4 and ds.spec.channels == 1 and ds.spec.height == 32


def test_deterministic_per_index_and_seed(cfg):
    a, b = Synthetic(cfg, "test"), Synthetic(cfg, "test")
    for i in (0, 5):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["masks"], b[i]["masks"])
    other = Synthetic(SyntheticConfig(size=32, train_groups=30, val_groups=5, test_groups=10, seed=1), "test")
    assert not torch.equal(a[0]["image"], other[0]["image"])
    assert np.array_equal(a.true_masks(0, 5, 7), b.true_masks(0, 5, 7))


def test_splits_are_group_disjoint_and_cover_all(cfg):
    splits = {s: Synthetic(cfg, s) for s in ("train", "val", "test")}
    groups = {s: {d[i]["group"] for i in range(len(d))} for s, d in splits.items()}
    ids = {s: set(d.ids) for s, d in splits.items()}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["val"]
    assert not groups["val"] & groups["test"]
    assert sum(len(v) for v in ids.values()) == (30 + 5 + 10) * cfg.images_per_group
    assert len(groups["test"]) == 10


@pytest.mark.slow
def test_reader_distribution_is_the_advertised_one():
    cfg = SyntheticConfig(size=48)
    ds = Synthetic(cfg, "train")
    k = 400
    empty_rates, rare_rates = [], []
    for i in range(40):
        les = ds.lesion(ds.global_indices[i])
        m = ds.true_masks(i, k, i).astype(bool)
        empty = ~m.reshape(k, -1).any(1)
        empty_rates.append((empty.mean(), les.p_empty))
        # the rare satellite blob never touches the core, so its centre pixel marks the rare mode
        cy, cx = int(round(les.rare[0])), int(round(les.rare[1]))
        if 0 <= cy < 48 and 0 <= cx < 48:
            rare_rates.append(m[:, cy, cx].mean())
        for e, _, p in les.lobes:  # lobes appear about as often as their probability (on non-empty masks)
            ly, lx = int(round(e[0])), int(round(e[1]))
            if 0 <= ly < 48 and 0 <= lx < 48:
                core_hit = m[~empty][:, int(round(les.core[0])), int(round(les.core[1]))]
                assert core_hit.mean() > 0.95  # every reader who marks anything marks the core
    obs = np.array([e for e, _ in empty_rates])
    exp = np.array([p for _, p in empty_rates])
    assert np.abs(obs - exp).max() < 0.1 and exp.min() >= 0.05  # readers who mark nothing
    assert 0.03 < np.mean(rare_rates) <= 0.10  # a rare mode, at most 10 %


def test_true_masks_match_the_readers_in_distribution():
    ds = Synthetic(SyntheticConfig(size=32), "train")
    draws = [ds[i]["masks"].float().mean() for i in range(200)]
    true = [ds.true_masks(i, 4, 100 + i).mean() for i in range(200)]
    assert abs(float(np.mean(draws)) - float(np.mean(true))) < 0.01


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="dataset.size"):
        Synthetic(SyntheticConfig(size=8))
    with pytest.raises(UserError, match="unknown split 'dev'"):
        Synthetic(SyntheticConfig(), "dev")
