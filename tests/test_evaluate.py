"""The streamed evaluation (amisbench/evaluate.py): its numbers against the metric functions on the same draw
(prefixes of one draw per batch, each batch its own seeded generator), the files it writes, resuming from the
partial file, GED_true on datasets with a true distribution, and the checks of what ``sample`` returns."""

import csv

import numpy as np
import pytest
import torch
from torch import nn

from amisbench import metrics as M
from amisbench.api import SampleContext
from amisbench.config import EvalConfig
from amisbench.errors import SampleError
from amisbench.evaluate import PARTIAL, evaluate, sample_items
from amisbench.seeding import derive_seed, generator

CPU = torch.device("cpu")
ECFG = dict(n_samples=8, ged_ns=(4, 8, 16), hm_iou_n=4, mdm_n=4, true_samples=0, batch_images=2)


class ToyData:
    """``n`` 4x4 images, two per group; three reader masks that depend on the index; optionally a true
    distribution (``truth``) from which ``true_masks`` draws."""

    def __init__(self, n=5, truth=False):
        self.n = n
        if truth:
            self.true_masks = self._true_masks

    def __len__(self):
        return self.n

    def _readers(self, i):
        m = torch.zeros(3, 4, 4)
        m[0, : 1 + i % 3] = 1
        m[1, :, : 1 + i % 4] = 1
        m[2, 1:3, 1:3] = 1
        return m

    def __getitem__(self, i):
        return {"image": torch.full((1, 4, 4), float(i)), "masks": self._readers(i), "id": f"img{i}"}

    @property
    def ids(self):
        return [f"img{i}" for i in range(self.n)]

    @property
    def groups(self):
        return [f"g{i // 2}" for i in range(self.n)]

    def _true_masks(self, index, k, seed):
        rng = np.random.default_rng(seed)
        return (rng.random((k, 4, 4)) < 0.3).astype(np.uint8)


class Coin(nn.Module):
    """Every pixel foreground with probability 1/2, drawn from the generator it is given (records the calls)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def sample(self, images, n, *, generator=None, context=None):
        self.calls.append((images.shape[0], n, context))
        b, _, h, w = images.shape
        return torch.rand((b, n, h, w), generator=generator) < 0.5


def per_image(folder):
    with open(folder / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        out.setdefault(r["metric"], {})[r["id"]] = float(r["value"])
    return out


def test_values_are_the_metric_functions_on_prefixes_of_each_batchs_own_draw(tmp_path):
    data = ToyData(5)
    res = evaluate(Coin(), data, EvalConfig(**ECFG), seed=3, device=CPU, out_dir=tmp_path)
    got = per_image(tmp_path)
    # n = 16 exceeds the 8 samples drawn: left out; the largest GED n gives the diversity
    assert set(got) == {"GED_4", "GED_8", "HMIoU_4", "MDM_4", "diversity_8"}
    for b, idx in enumerate([[0, 1], [2, 3], [4]]):
        images = torch.stack([data[i]["image"] for i in idx])
        gts = torch.stack([data[i]["masks"] for i in idx]).bool()
        s = Coin().sample(images, 8, generator=generator(CPU, "eval", 3, b))  # batch b's own generator
        want = {"GED_4": M.ged(s[:, :4], gts), "GED_8": M.ged(s, gts), "HMIoU_4": M.hm_iou(s[:, :4], gts),
                "MDM_4": M.mdm(s[:, :4], gts), "diversity_8": M.ged(s, gts, return_terms=True)[2]}
        for key, v in want.items():
            for j, i in enumerate(idx):
                assert got[key][f"img{i}"] == pytest.approx(float(v[j]), abs=1e-12), (key, i)
    for key, by_id in got.items():
        assert res[key] == pytest.approx(np.mean(list(by_id.values())), abs=1e-12)
    assert res["n_images"] == 5
    assert not (tmp_path / PARTIAL).exists()
    # the draw depends on the seed
    other = tmp_path / "other"
    other.mkdir()
    evaluate(Coin(), data, EvalConfig(**ECFG), seed=4, device=CPU, out_dir=other)
    assert per_image(other)["GED_8"] != got["GED_8"]


def test_max_images_batches_and_groups_file(tmp_path):
    method = Coin()
    res = evaluate(method, ToyData(5), EvalConfig(**{**ECFG, "max_images": 3}), seed=0, device=CPU,
                   out_dir=tmp_path)
    assert res["n_images"] == 3 and [c[:2] for c in method.calls] == [(2, 8), (1, 8)]
    assert all(c[2] is None for c in method.calls)  # no context for a method that does not ask for one
    assert set(per_image(tmp_path)["GED_8"]) == {"img0", "img1", "img2"}
    assert (tmp_path / "groups.csv").read_text() == "id,group\nimg0,g0\nimg1,g0\nimg2,g1\n"


def test_a_killed_evaluation_resumes_at_the_next_batch_with_the_same_numbers(tmp_path):
    whole = tmp_path / "whole"
    cut = tmp_path / "cut"
    whole.mkdir()
    cut.mkdir()
    ref = evaluate(Coin(), ToyData(5), EvalConfig(**ECFG), seed=1, device=CPU, out_dir=whole)

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(Coin(), ToyData(5), EvalConfig(**ECFG), seed=1, device=CPU, out_dir=cut, progress=stop_after_two)
    assert (cut / PARTIAL).read_text().splitlines()[-1] == "#batch,2,"
    method = Coin()
    again = evaluate(method, ToyData(5), EvalConfig(**ECFG), seed=1, device=CPU, out_dir=cut)
    assert len(method.calls) == 1  # only the third batch is drawn again
    assert again == ref
    assert (cut / "per_image.csv").read_text() == (whole / "per_image.csv").read_text()


def test_ged_true_scores_the_samples_against_draws_of_the_true_distribution(tmp_path):
    data = ToyData(2, truth=True)
    evaluate(Coin(), data, EvalConfig(**{**ECFG, "true_samples": 6}), seed=0, device=CPU, out_dir=tmp_path)
    got = per_image(tmp_path)["GED_true_8"]
    s = Coin().sample(torch.stack([data[i]["image"] for i in range(2)]), 8, generator=generator(CPU, "eval", 0, 0))
    truth = torch.from_numpy(np.stack([data.true_masks(i, 6, derive_seed("true", i)) for i in range(2)])).bool()
    want = M.ged(s, truth)
    assert [got["img0"], got["img1"]] == pytest.approx([float(want[0]), float(want[1])], abs=1e-12)


def test_an_empty_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="the evaluation split is empty"):
        evaluate(Coin(), ToyData(0), EvalConfig(**ECFG), seed=0, device=CPU, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


class Wrong(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def sample(self, images, n, *, generator=None, context=None):
        return self.out


@pytest.mark.parametrize("out, text", [
    (torch.zeros(2, 3, 4, 4),
     r"Wrong.sample returned torch.float32 \(2, 3, 4, 4\); expected torch.bool \(2, 3, 4, 4\)"),
    (torch.zeros(2, 2, 4, 4, dtype=torch.bool),
     r"Wrong.sample returned torch.bool \(2, 2, 4, 4\); expected torch.bool \(2, 3, 4, 4\)"),
])
def test_sample_items_names_what_sample_returned(out, text):
    images = torch.zeros(2, 1, 4, 4)
    with pytest.raises(SampleError, match=text):  # typed: the runner fails the run by this type, not the words
        sample_items(Wrong(out), ToyData(2), [0, 1], images, 3, generator=None)


def test_methods_that_want_the_context_get_the_items_and_their_ids():
    method = Coin()
    method.wants_context = True
    data = ToyData(4)
    out = sample_items(method, data, [1, 3], torch.zeros(2, 1, 4, 4), 2, generator=torch.Generator())
    assert out.shape == (2, 2, 4, 4) and out.dtype == torch.bool
    ctx = method.calls[0][2]
    assert isinstance(ctx, SampleContext)
    assert ctx.dataset is data and list(ctx.indices) == [1, 3] and list(ctx.ids) == ["img1", "img3"]
