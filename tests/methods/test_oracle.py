"""The oracle (reference row): draws from the true reader distribution, refuses datasets without one."""

import re

import numpy as np
import pytest
import torch

from amisbench.api import DataSpec, SampleContext
from amisbench.config import resolve
from amisbench.errors import UserError
from amisbench.methods.oracle import Oracle, OracleConfig
from amisbench.registry import DATASETS


def _synthetic():
    res = resolve("oracle", "synthetic", "smoke")
    return DATASETS.get("synthetic")(res.cfg.dataset, "test")


def test_oracle_draws_from_the_true_distribution_reproducibly():
    ds = _synthetic()
    m = Oracle(OracleConfig(), ds.spec)
    idx = [0, 2]
    images = torch.stack([ds[i]["image"] for i in idx])
    ctx = SampleContext(ds, idx, [ds[i]["id"] for i in idx])
    s = m.sample(images, 6, generator=torch.Generator().manual_seed(4), context=ctx)
    assert s.shape == (2, 6, ds.spec.height, ds.spec.width) and s.dtype == torch.bool
    g = torch.Generator().manual_seed(4)
    seeds = torch.randint(0, 2**62, (2,), generator=g).tolist()
    for j, i in enumerate(idx):
        assert np.array_equal(s[j].numpy(), ds.true_masks(i, 6, seeds[j]).astype(bool))
    other = m.sample(images, 6, generator=torch.Generator().manual_seed(5), context=ctx)
    assert not torch.equal(s, other)
    assert list(m.trainable("main")) == [] and resolve("oracle", "synthetic", "quick").cfg.train["main"].steps == 0


def test_oracle_refuses_datasets_without_a_known_distribution():
    m = Oracle(OracleConfig(), DataSpec(1, 8, 8, 4))
    images = torch.zeros(1, 1, 8, 8)
    with pytest.raises(UserError, match=re.escape("oracle needs a dataset with a known reader distribution")):
        m.sample(images, 2, generator=torch.Generator(), context=SampleContext(object(), [0], ["a"]))
    with pytest.raises(UserError, match="synthetic"):
        m.sample(images, 2, generator=torch.Generator(), context=None)
