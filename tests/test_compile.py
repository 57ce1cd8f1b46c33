"""``eval.compile`` / ``timing --compile``: compiled networks sample what the eager ones sample.

Compilation is slow on a CPU (tens of seconds per network), so this checks two methods: ATFM (the ST-Net,
2,500 evaluations per 100 samples at paper scale) and P2SAM (targets below the top level)."""

import pytest
import torch

from amisbench.api import compile_networks
from amisbench.config import resolve
from amisbench.registry import DATASETS, METHODS


@pytest.mark.slow
@pytest.mark.parametrize("name, targets", [("atfm", ["st_net"]),
                                           ("p2sam", ["sam.image_encoder", "sam.mask_decoder", "prior", "fcomb"])])
def test_compiled_sampling_matches_eager(name, targets):
    res = resolve(name, "synthetic", "smoke")
    ds = DATASETS.get("synthetic")(res.cfg.dataset, "test")
    images = torch.stack([ds[i]["image"] for i in range(2)])
    torch.manual_seed(0)
    model = METHODS.get(name)(res.cfg.method, ds.spec).eval()
    eager = model.sample(images, 6, generator=torch.Generator().manual_seed(3))
    assert compile_networks(model) == targets
    assert all(getattr(model.get_submodule(t), "_compiled_call_impl", None) is not None for t in targets)
    compiled = model.sample(images, 6, generator=torch.Generator().manual_seed(3))
    # masks are thresholded logits: reassociated sums may flip a pixel sitting exactly at the threshold
    assert compiled.shape == eager.shape and (compiled != eager).float().mean() < 1e-3


@pytest.mark.slow
def test_timing_compiles_before_the_warm_up(tmp_path):
    from amisbench.report import timing
    from amisbench.errors import UserError

    with pytest.raises(UserError, match="--compile needs at least one --warmup call"):
        timing.time_method("unet", "synthetic", profile="smoke", untrained=True, images=1, samples=2, warmup=0,
                           compile=True, results=tmp_path)
    rec = timing.time_method("unet", "synthetic", profile="smoke", untrained=True, images=1, samples=2,
                             compile=True, results=tmp_path)
    assert rec["compiled"] == ["unet"] and rec["dtype"] == "float32 + torch.compile"
