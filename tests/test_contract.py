"""Contract tests over every registered method: a new plugin is checked without editing this file."""

import pytest
import torch

from amisbench.api import SampleContext
from amisbench.config import resolve
from amisbench.registry import DATASETS, METHODS

NAMES = METHODS.names()


def _setup(name):
    res = resolve(name, "synthetic", "smoke")
    ds = DATASETS.get("synthetic")(res.cfg.dataset, "train")
    items = [ds[i] for i in range(3)]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["masks"] for it in items]).float()
    ctx = SampleContext(ds, [0, 1, 2], [it["id"] for it in items])
    return res, ds, images, masks, ctx


def _build(name, res, ds, seed=0):
    torch.manual_seed(seed)
    return METHODS.get(name)(res.cfg.method, ds.spec)


def _sample(model, images, n, seed, ctx):
    model.eval()
    kw = {"context": ctx} if model.wants_context else {}
    return model.sample(images, n, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("name", NAMES)
def test_every_stage_trains(name):
    res, ds, images, masks, _ = _setup(name)
    model = _build(name, res, ds)
    trained = []
    for stage in model.stages:
        model.on_stage_start(stage)
        params = [p for p in model.trainable(stage) if p.requires_grad]
        if not params:
            continue
        trained.append(stage)
        opt = torch.optim.Adam(params, lr=1e-3)
        for _ in range(2):
            model.train()
            loss, logs = model.loss(stage, images, masks)
            assert loss.ndim == 0 and torch.isfinite(loss), f"{name}/{stage}: {loss}"
            assert all(isinstance(v, float) for v in logs.values())
            opt.zero_grad()
            loss.backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), f"{name}/{stage}: no gradient"
            opt.step()
    # a method with nothing to train must also have no training budget (the oracle); others train something
    assert trained or all(res.cfg.train[s].steps == 0 for s in model.stages), f"{name}: no stage has parameters"


@pytest.mark.parametrize("name", NAMES)
def test_samples_are_bool_batched_and_seeded(name):
    res, ds, images, masks, ctx = _setup(name)
    model = _build(name, res, ds)
    s = _sample(model, images, 5, 0, ctx)
    assert s.dtype == torch.bool and s.shape == (3, 5, *images.shape[-2:])
    assert torch.equal(s, _sample(model, images, 5, 0, ctx))
    assert model.nfe(100) >= 1


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name, tmp_path):
    res, ds, images, masks, ctx = _setup(name)
    a = _build(name, res, ds, seed=0)
    for stage in a.stages:  # move the weights off their initial values
        a.on_stage_start(stage)
        params = [p for p in a.trainable(stage) if p.requires_grad]
        if params:
            a.train()
            loss, _ = a.loss(stage, images, masks)
            loss.backward()
            torch.optim.SGD(params, lr=0.1).step()
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = _build(name, res, ds, seed=123)
    b.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    for stage in b.stages:
        b.on_stage_start(stage)
    assert torch.equal(_sample(a, images, 4, 9, ctx), _sample(b, images, 4, 9, ctx))


@pytest.mark.parametrize("name", NAMES)
def test_compile_targets_name_modules_with_parameters(name):
    res, ds, *_ = _setup(name)
    model = _build(name, res, ds)
    for target in model.compile_targets():
        sub = model.get_submodule(target)  # raises AttributeError for a wrong name
        assert any(True for _ in sub.parameters()), f"{name}: {target} has no parameters"
