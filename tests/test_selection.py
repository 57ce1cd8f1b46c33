"""Issue 13: the baselines as released (layouts and counts), checkpoint selection with resume, the plateau
schedule, the validation part carved from train, and CCDM's vote."""

import collections
import csv
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from amisbench import runner as R
from amisbench import selection as SEL
from amisbench.api import DataSpec
from amisbench.config import StageConfig, resolve
from amisbench.errors import UserError
from amisbench.methods.ccdm import vote
from amisbench.registry import DATASETS, METHODS
from amisbench.runner import run
from amisbench.selection import Plateau, carve, validation_split

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
LIDC = DataSpec(channels=1, height=128, width=128, readers=4, name="lidc")


def build(method: str, variant=None):
    res = resolve(method, "lidc", "paper", variant)
    with torch.device("meta"):
        return METHODS.get(method)(res.cfg.method, LIDC)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method, ref", [("prob_unet", "prob_unet_lidc"), ("ccdm", "ccdm_lidc128")])
def test_state_dict_shapes_are_the_release_layout(method, ref):
    path = SHARED / "reference" / "release_shapes" / f"{ref}.json"
    if not path.is_file():
        pytest.skip("../shared/reference is not available")
    release = json.loads(path.read_text())
    model = build(method)
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
        ours = n_params(build(method))
        assert abs(ours - ref) <= tol * ref, (method, ours, ref)


def test_ssn_count_equals_the_release_derivation_minus_the_binary_head():
    """likelihoods.proposed (MiguelMonteiro/PHiSeg-code), layer by layer: 3x3 convs without bias + BN (gamma,
    beta), decoder level jj at num_channels[6 - jj], three 1x1 recombination convs, 1x1 heads with bias."""
    ch = [32, 64, 128, 192, 192, 192, 192]
    block = lambda cin, c: 9 * cin * c + 2 * c + 2 * (9 * c * c + 2 * c)  # noqa: E731
    total, cin = 0, 1
    for c in ch:
        total += block(cin, c)
        cin = c
    below = ch[6]
    for jj in range(6):
        ii = 6 - jj
        total += block(below + ch[ii - 1], ch[ii])
        below = ch[ii]
    total += 64 * 32 + 64 + 2 * (32 * 32 + 64)
    release_heads = 2 * (32 * 2 + 2) + (32 * 20 + 20)  # 2 classes, rank 10
    total += release_heads
    assert total == 10_320_568
    ours_heads = 2 * (32 + 1) + (32 * 10 + 10)  # one logit per pixel
    assert n_params(build("ssn")) == total - release_heads + ours_heads == 10_320_172


def test_prob_unet_variants_switch_the_release():
    kohl = build("prob_unet", "kohl")
    assert kohl.cfg.classes == 2 and kohl.cfg.beta == 1.0
    assert n_params(kohl) == 4_999_449 + 9 * 32 + 33  # +1 posterior input channel, +1 logit channel


def test_prob_unet_one_logit_loss_is_bce_plus_beta_kl():
    from amisbench.methods._blocks import kl_diag_gaussians
    from amisbench.methods.prob_unet import ProbUNet, ProbUNetConfig
    from amisbench.nn import UNetConfig

    torch.manual_seed(0)
    m = ProbUNet(ProbUNetConfig(unet=UNetConfig(widths=(4, 8), convs_per_block=1, norm="none", down="avg"),
                                latent_dim=2, l2_weight=0.0), DataSpec(1, 16, 16, 2))
    x = torch.randn(2, 1, 16, 16)
    masks = (torch.rand(2, 2, 16, 16) > 0.5).float()
    masks[:, 1] = masks[:, 0]
    torch.manual_seed(1)
    loss, logs = m.loss("main", x, masks)
    torch.manual_seed(1)
    torch.randint(0, 2, (2,))  # pick_reader
    y = masks[:, 0]
    mu_q, s_q = m.posterior(torch.cat([x, y[:, None]], 1))
    mu_p, s_p = m.prior(x)
    z = mu_q + s_q * torch.randn_like(mu_q)
    logits = m.combine(m.unet(x), z[:, None])[:, 0, 0]
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / 2
    kl = kl_diag_gaussians(mu_q, s_q, mu_p, s_p).mean()
    assert torch.allclose(loss, (bce + 10.0 * kl) / 256, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# CCDM's vote
# ---------------------------------------------------------------------------------------------------

def test_confidence_and_majority_votes_against_a_hand_computed_case():
    # one sample, 3 chains, 2 classes, 1 x 3 pixels; foreground probabilities per chain and pixel:
    #   pixel 0: 0.9, 0.4, 0.4 -> mean 0.567 (confidence: 1); chain argmaxes 1, 0, 0 (majority: 0)
    #   pixel 1: 0.2, 0.6, 0.6 -> mean 0.467 (confidence: 0); argmaxes 0, 1, 1 (majority: 1)
    #   pixel 2: 0.1, 0.2, 0.3 -> mean 0.2 (0); argmaxes 0, 0, 0 (0)
    fg = torch.tensor([[0.9, 0.2, 0.1], [0.4, 0.6, 0.2], [0.4, 0.6, 0.3]])  # (V=3, W=3)
    probs = torch.stack([1 - fg, fg], dim=1)[None, :, :, None, :]  # (N=1, V=3, K=2, H=1, W=3)
    assert vote(probs, "confidence").tolist() == [[[1, 0, 0]]]
    assert vote(probs, "majority").tolist() == [[[0, 1, 0]]]
    # one chain: both strategies are the argmax of its probabilities
    assert vote(probs[:, :1], "confidence").tolist() == vote(probs[:, :1], "majority").tolist() == [[[1, 0, 0]]]
    with pytest.raises(ValueError, match="unknown vote"):
        vote(probs, "mean")


def test_ccdm_confidence_last_step_samples_are_masks():
    from amisbench.methods.ccdm import CCDM, CCDMConfig
    from amisbench.nn.openai_unet import OpenAIUNetConfig

    torch.manual_seed(0)
    net = OpenAIUNetConfig(base_channels=4, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                           num_head_channels=4, groups=2)
    for last, votes in (("confidence", 1), ("confidence", 3), ("majority", 3)):
        m = CCDM(CCDMConfig(net=net, steps=3, last_step=last, votes=votes), DataSpec(1, 8, 8, 2)).eval()
        s = m.sample(torch.randn(2, 1, 8, 8), 4, generator=torch.Generator().manual_seed(0))
        assert s.shape == (2, 4, 8, 8) and s.dtype == torch.bool


# ---------------------------------------------------------------------------------------------------
# checkpoint selection, resume, plateau, validation split
# ---------------------------------------------------------------------------------------------------

# SSN smoke on synthetic: its validation GED_true improves up to step 10 and not at 12 (CPU, seed 0), so the
# selected step lies after the last.pt of step 9 and before the end
SELECT = ["train.main.steps=12", "train.main.ckpt_every=3", "train.main.eval_every=2", "train.main.lr=0.03",
          "train.main.select=best:GED_true", "eval.val_images=4", "eval.val_samples=4",
          "train.main.augment=[hflip, rot90, {rotate: 10}]"]


def val_column(folder, key):
    with open(folder / "train_log.csv") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


class Killed(BaseException):
    pass


def test_kill_between_best_save_and_next_log_resumes_to_the_same_selection(tmp_path, monkeypatch):
    ref = run("ssn", "synthetic", profile="smoke", sets=SELECT, results=tmp_path / "ref", quiet=True)
    info = json.loads((ref / "run.json").read_text())
    sel = info["selection"]["main"]
    assert sel["select"] == "best:GED_true" and sel["validation"] == "val" and sel["metric"] == "GED_true_4"
    vals = val_column(ref, "val_GED_true_4")
    assert [s for s, _ in vals] == [2, 4, 6, 8, 10, 12]
    assert min(v for _, v in vals) == sel["value"] and dict(vals)[sel["step"]] == sel["value"]
    assert (ref / "ckpt" / "best.pt").is_file() and (ref / "ckpt" / "last.pt").is_file()
    best = torch.load(ref / "ckpt" / "best.pt", weights_only=True)
    assert best["step"] == sel["step"] and best["selection"]["main"]["step"] == sel["step"]

    # kill right after ckpt/best.pt of the selected step is written, before the next last.pt / log
    real = R.save_torch
    last_steps = []

    def save(path, state):
        real(path, state)
        if Path(path).name == "last.pt":
            last_steps.append(state["step"])
        if Path(path).name == "best.pt" and state["step"] == sel["step"]:
            raise Killed

    monkeypatch.setattr(R, "save_torch", save)
    with pytest.raises(Killed):
        run("ssn", "synthetic", profile="smoke", sets=SELECT, results=tmp_path / "cut", quiet=True)
    monkeypatch.setattr(R, "save_torch", real)
    cut = tmp_path / "cut" / ref.relative_to(tmp_path / "ref")
    assert not (cut / "run.json").exists()
    assert last_steps and max(last_steps) < sel["step"]  # the resume replays steps from an older last.pt
    run("ssn", "synthetic", profile="smoke", sets=SELECT, results=tmp_path / "cut", quiet=True)
    got = json.loads((cut / "run.json").read_text())
    assert got["selection"] == info["selection"]
    assert json.loads((cut / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
    assert (cut / "per_image.csv").read_text() == (ref / "per_image.csv").read_text()


def test_selected_weights_are_the_ones_evaluated(tmp_path):
    folder = run("ssn", "synthetic", profile="smoke", sets=SELECT, results=tmp_path / "best", quiet=True)
    best = torch.load(folder / "ckpt" / "best.pt", weights_only=True)
    last = torch.load(folder / "ckpt" / "last.pt", weights_only=True)
    for k, v in best["model"].items():
        assert torch.equal(v, last["model"][k]), k  # the final checkpoint holds the selected model
    # the same run with select: last evaluates other weights whenever the selected step is not the last one
    plain = run("ssn", "synthetic", profile="smoke", sets=SELECT + ["train.main.select=last"],
                results=tmp_path / "last", quiet=True)
    step = json.loads((folder / "run.json").read_text())["selection"]["main"]["step"]
    same = json.loads((plain / "metrics.json").read_text()) == json.loads((folder / "metrics.json").read_text())
    assert same == (step == 12)


@pytest.mark.parametrize("sets, words", [
    (["train.main.select=best:Dice", "train.main.eval_every=2"], "best:<metric>"),
    (["train.main.select=best:GED"], "eval_every"),
    (["train.main.schedule=plateau", "train.main.eval_every=2"], "plateau_metric"),
    (["train.main.augment=[shear]"], "train.main.augment\\[0\\]: unknown transform"),
    (["train.main.select=best:GED", "train.main.eval_every=2", "eval.val_carve_fraction=1.5"], "val_carve"),
])
def test_bad_selection_settings_fail_before_anything_is_written(tmp_path, sets, words):
    with pytest.raises(UserError, match=words):
        run("unet", "synthetic", profile="smoke", sets=sets, results=tmp_path, quiet=True)
    assert not any(tmp_path.iterdir())


def test_plateau_reduces_after_patience_and_resumes_from_its_state():
    sc = StageConfig(lr=1.0, gamma=0.5, patience=1, min_lr=0.2, schedule="plateau")
    p = Plateau(sc, "GED")
    seq = [1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85]
    factors = []
    for v in seq:
        p.observe(v)
        factors.append(p.factor)
    assert factors == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2]
    q = Plateau(sc, "GED")
    q.load_state_dict(p.state_dict())
    assert (q.factor, q.best, q.bad) == (p.factor, p.best, p.bad)
    f = R.lr_factor(sc, 100, p)
    assert f(50) == 0.2


def test_plateau_schedule_in_a_run_logs_a_lower_lr(tmp_path):
    sets = ["train.main.steps=8", "train.main.eval_every=2", "train.main.schedule=plateau",
            "train.main.plateau_metric=GED", "train.main.patience=0", "train.main.gamma=0.5",
            "eval.val_images=2", "eval.val_samples=2", "train.main.lr=0.001"]
    with pytest.raises(UserError, match="min_lr"):
        run("unet", "synthetic", profile="smoke", sets=sets + ["train.main.min_lr=1.0"], results=tmp_path,
            quiet=True)
    folder = run("unet", "synthetic", profile="smoke", sets=sets + ["train.main.log_every=1"], results=tmp_path,
                 quiet=True)
    lrs = [float(r.split(",")[3]) for r in (folder / "train_log.csv").read_text().splitlines()[1:]
           if r.split(",")[3]]
    assert lrs[0] == pytest.approx(1e-3) and min(lrs) < 1e-3


def test_carved_validation_is_whole_groups_disjoint_and_seeded():
    ds = DATASETS.get("synthetic")(resolve("unet", "synthetic", "smoke").cfg.dataset, "train")
    tr, va = carve(ds, 0.25, seed=5)
    tr2, va2 = carve(ds, 0.25, seed=5)
    assert va.indices == va2.indices and tr.indices == tr2.indices
    assert sorted(tr.indices + va.indices) == list(range(len(ds)))
    assert len(va) >= 0.25 * len(ds)
    groups = [ds.group_of(gi) for gi in ds.global_indices]
    assert not {groups[i] for i in va.indices} & {groups[i] for i in tr.indices}
    assert carve(ds, 0.25, seed=6)[1].indices != va.indices
    assert va.ids == [ds.ids[i] for i in va.indices]


def test_where_validation_is_the_test_split_a_labelled_part_of_train_is_used():
    base = DATASETS.get("synthetic")
    cfg = resolve("unet", "synthetic", "smoke").cfg

    class ValIsTest(base):
        def __init__(self, c, split="train"):
            super().__init__(c, "test" if split == "val" else split)

    train = ValIsTest(cfg.dataset, "train")
    tr, va, label = validation_split(ValIsTest, cfg, train, R.split_hash)
    assert label.startswith("carved from train") and len(tr) + len(va) == len(train)
    test_ids = set(ValIsTest(cfg.dataset, "test").ids)
    assert not set(va.ids) & test_ids
    tr, va, label = validation_split(base, cfg, base(cfg.dataset, "train"), R.split_hash)
    assert label == "val" and len(tr) == len(train)


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


def test_plateau_on_training_loss_windows_and_cumulative_means():
    sc = StageConfig(lr=1.0, gamma=0.5, patience=0, schedule="plateau", plateau_metric="train_loss")
    win, cum = Plateau(sc, "train_loss"), Plateau(sc, "train_loss_cumulative")
    for p in (win, cum):
        for v in (4.0, 2.0):
            p.add_loss(v)
    assert win.mean_loss() == 3.0 and cum.mean_loss() == 3.0
    for p in (win, cum):
        p.add_loss(6.0)
    assert win.mean_loss() == 6.0  # the window since the last observation
    assert cum.mean_loss() == 4.0  # (4 + 2 + 6) / 3: MoSE's never-emptied losses_list
    assert win.mean_loss() is None
    q = Plateau(sc, "train_loss_cumulative")
    q.load_state_dict(cum.state_dict())
    q.add_loss(0.0)
    assert q.mean_loss() == 3.0  # the running sums travel with the checkpoint
    assert not SEL.needs_validation(sc)
    assert SEL.needs_validation(dataclasses.replace(sc, select="best:GED"))


def test_plateau_on_training_loss_lowers_the_lr_without_a_validation_set(tmp_path):
    # threshold 10 (relative): no later mean counts as an improvement, so with patience 0 every observation
    # after the first halves the lr (observations at steps 2, 4, 6, each after that step's log row)
    sets = ["train.main.steps=6", "train.main.eval_every=2", "train.main.schedule=plateau",
            "train.main.plateau_metric=train_loss_cumulative", "train.main.patience=0", "train.main.gamma=0.5",
            "train.main.plateau_threshold=10", "train.main.lr=0.001", "train.main.log_every=1"]
    folder = run("unet", "synthetic", profile="smoke", sets=sets, results=tmp_path, quiet=True)
    rows = list(csv.DictReader(io.StringIO((folder / "train_log.csv").read_text())))
    lrs = [float(r["lr"]) for r in rows if r.get("lr")]
    assert lrs == [pytest.approx(v) for v in (1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4)]
    observed = [r for r in rows if r.get("mean_train_loss_cumulative")]
    assert len(observed) == 3 and not any(k.startswith("val_") and r[k] for r in rows for k in r)
