"""ATFM against its release: the state_dict layouts of ``../shared/reference/atfm_release/shapes.json`` load
strictly, the release's reference outputs are reproduced, and a run starts from release-format checkpoint
files (``method.init_gtr`` / ``method.init_sfm``) and evaluates end to end, labelled leaky."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from amisbench.api import DataSpec
from amisbench.errors import UserError
from amisbench.methods.atfm import ATFM, release
from amisbench.methods.atfm.model import RELEASE_WEIGHTS_LABEL
from amisbench.methods.atfm.st_net import STNet, STNetConfig
from amisbench.config import resolve

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "atfm_release"


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
