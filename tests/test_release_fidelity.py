"""The methods as their authors released them, over several methods at once: layouts against the release's state_dict
shapes (../shared/reference/release_shapes), parameter counts against the releases' (release_counts.tsv) and
against independent counts, as `amisbench methods --verbose` prints them. The piece of each method that is easiest
to get wrong is tested in tests/methods/test_<name>.py."""

import collections
import json
import re
from pathlib import Path

import pytest
import torch
from method_helpers import build_paper, n_params  # tests/fixtures, on sys.path by tests/conftest.py

from amisbench.api import DataSpec
from amisbench.config import resolve
from amisbench.methods.phiseg import PHiSeg
from amisbench.methods.prob_unet import ProbUNet
from amisbench.registry import METHODS

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
SHAPES = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "release_shapes"


# ---------------------------------------------------------------------------------------------------
# Layouts: the multiset of state_dict tensor shapes equals the release's
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,ref,dataset,spec,part", [
    ("mose", "mose_lidc", "lidc", DataSpec(1, 128, 128, 4, "lidc"), None),
    ("cimd", "cimd_denoiser_lidc128", "lidc", DataSpec(1, 128, 128, 4, "lidc"), "net"),
    ("c_ssn", "c_ssn_isic3", "isic3", DataSpec(3, 256, 256, 3, "isic3"), None),
    ("c_prob_unet", "c_prob_unet_isic3", "isic3", DataSpec(3, 256, 256, 3, "isic3"), None),
])
def test_paper_layout_matches_the_release(name, ref, dataset, spec, part):
    path = SHAPES / f"{ref}.json"
    if not path.exists():
        pytest.skip("../shared/reference/release_shapes is not available")
    release = json.loads(path.read_text())
    with torch.device("meta"):
        model = METHODS.get(name)(resolve(name, dataset, "paper").cfg.method, spec)
    module = model.get_submodule(part) if part else model
    ours = collections.Counter(tuple(v.shape) for v in module.state_dict().values() if isinstance(v, torch.Tensor))
    theirs = collections.Counter(tuple(s) for s in release["state_dict"].values())
    assert ours == theirs, f"ours - release: {ours - theirs}; release - ours: {theirs - ours}"
    assert sum(p.numel() for p in module.parameters()) == release["parameters"]


def test_methods_verbose_counts_the_releases():
    """`amisbench methods --verbose` builds ISIC3 methods with its 3 reader slots (styles), LIDC ones with 4."""
    import argparse

    from amisbench.cli import _method_details

    expect = {("mose", "lidc", 128, 1): "9,321,195", ("c_prob_unet", "isic3", 256, 3): "3,951,449",
              ("c_ssn", "isic3", 256, 3): "2,263,308"}
    for (name, dataset, size, channels), count in expect.items():
        line = _method_details(name, argparse.Namespace(profile="paper", dataset=dataset, size=size, channels=channels))
        assert f"{size}x{size}x{channels}: {count} parameters" in line, line


# ---------------------------------------------------------------------------------------------------
# paper profiles at 128 px
# ---------------------------------------------------------------------------------------------------

def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_profiles_instantiate_at_128px():
    """The figures `amisbench methods --verbose` prints for the paper profiles at 128 px."""
    import argparse

    from amisbench.cli import _method_details

    args = argparse.Namespace(profile="paper", dataset="synthetic", size=128, channels=1)
    counts = {}
    for name in ("prob_unet", "phiseg", "ccdm", "unet", "oracle"):
        line = _method_details(name, args)
        m = re.match(r"profile paper, 128x128x1: ([\d,]+) parameters; stages main; NFE for 100 samples: (\d+)", line)
        assert m, line
        counts[name] = int(m.group(1).replace(",", ""))
        nfe = int(m.group(2))
        assert nfe == {"ccdm": 100 * 250, "phiseg": 100}.get(name, 1), (name, nfe)
    assert counts["oracle"] == 0
    # independent counts of the parts that are ours (the shared U-Net is counted by its own tests)
    with torch.device("meta"):
        pu = ProbUNet(resolve("prob_unet", "synthetic", "paper").cfg.method, DataSpec(1, 128, 128, 4))
        ph = PHiSeg(resolve("phiseg", "synthetic", "paper").cfg.method, DataSpec(1, 128, 128, 4))
    conv = lambda cin, cout, k=3, bias=True: cin * cout * k * k + (cout if bias else 0)  # noqa: E731
    # prior: input 1 channel; posterior: 1 + 1 (the {0,1} mask, as the PyTorch port); three convs per block;
    # head 1x1 -> 2 x 6
    def vgg(cin):
        total, c = 0, cin
        for w in (32, 64, 128, 192):
            for _ in range(3):
                total += conv(c, w)
                c = w
        return total + conv(192, 12, 1)
    assert _count(pu.prior) == vgg(1) and _count(pu.posterior) == vgg(2)
    assert _count(pu.fcomb) + _count(pu.logits) == conv(38, 32, 1) + 2 * conv(32, 32, 1) + conv(32, 1, 1)
    assert counts["prob_unet"] == _count(pu) and counts["phiseg"] == _count(ph)
    assert counts["ccdm"] > 1_000_000 and counts["unet"] > 1_000_000


@pytest.mark.parametrize("method, ref", [("prob_unet", "prob_unet_lidc"), ("ccdm", "ccdm_lidc128")])
def test_state_dict_shapes_are_the_release_layout(method, ref):
    path = SHARED / "reference" / "release_shapes" / f"{ref}.json"
    if not path.is_file():
        pytest.skip("../shared/reference is not available")
    release = json.loads(path.read_text())
    model = build_paper(method)
    ours = collections.Counter(tuple(p.shape) for p in model.parameters())
    theirs = collections.Counter(tuple(s) for s in release["state_dict"].values())
    assert ours == theirs, (ours - theirs, theirs - ours)
    assert n_params(model) == release["parameters"]


def test_counts_within_the_issue_tolerances():
    path = SHARED / "reference" / "release_counts.tsv"
    if not path.is_file():
        pytest.skip("../shared/reference is not available")
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    wanted = {r[0]: (int(r[2]), float(r[3])) for r in rows if "--dataset lidc" in r[1]}
    for method in ("prob_unet", "ccdm", "ssn"):
        ref, tol = wanted[method]
        ours = n_params(build_paper(method))
        assert abs(ours - ref) <= tol * ref, (method, ours, ref)
