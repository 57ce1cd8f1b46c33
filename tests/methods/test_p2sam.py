"""P2SAM and the SAM building block: equivalence with the official ``segment_anything`` code on shared random
weights, loading and adapting official-format checkpoints, bad checkpoints, stage freezing, losses, sampling."""

import importlib.util
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from amisbench.config import resolve
from amisbench.errors import UserError
from amisbench.nn.sam import SAM, SAMConfig, load_sam_checkpoint
from amisbench.registry import DATASETS, METHODS

SMALL = dict(embed_dim=48, depth=3, heads=4, global_attn=(1,), window=3, patch=8, prompt_dim=32,
             decoder_depth=2, decoder_heads=2, decoder_mlp=64)


def _official():
    """The release's modeling package, imported without its ``__init__`` (which needs torchvision only for
    the predictor and the automatic mask generator, neither used here)."""
    if "segment_anything.modeling" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        assert spec is not None, "segment-anything (test extra) is not installed"
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("segment_anything", pkg)
    import segment_anything.modeling as m

    return m


def _official_sam(size: int, masks: int = 3, seed: int = 0):
    m = _official()
    torch.manual_seed(seed)
    c = SAMConfig(**SMALL)
    g = size // c.patch
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=size, patch_size=c.patch, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.heads,
            mlp_ratio=4, out_chans=c.prompt_dim, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, global_attn_indexes=c.global_attn, window_size=c.window),
        prompt_encoder=m.PromptEncoder(embed_dim=c.prompt_dim, image_embedding_size=(g, g),
                                       input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=masks, transformer_dim=c.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256,
            transformer=m.TwoWayTransformer(depth=c.decoder_depth, embedding_dim=c.prompt_dim,
                                            mlp_dim=c.decoder_mlp, num_heads=c.decoder_heads)),
        pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1])
    for p in sam.parameters():  # zero-initialised tables (rel_pos, pos_embed) would hide indexing mistakes
        nn.init.normal_(p, std=0.2)
    return sam.eval()


def _official_masks(sam, images):
    """Multimask logits of the release at input size, prompted by "no mask" (what P2SAM does)."""
    s = images.shape[-1]
    emb = sam.image_encoder(images)
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    low, _ = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
    return emb, sam.postprocess_masks(low, (s, s), (s, s))


@pytest.mark.parametrize("lora", [0, 4])
def test_sam_matches_the_release_on_shared_weights(lora):
    ref = _official_sam(64)
    ours = SAM(SAMConfig(**SMALL), 64, masks=3, lora_rank=lora).eval()
    unused = ("prompt_encoder.point_embeddings", "prompt_encoder.not_a_point", "prompt_encoder.mask_downscaling")
    result = ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith(unused)},
                                  strict=False)
    assert not result.unexpected_keys and all(".lora_" in k for k in result.missing_keys)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        emb_ref, masks_ref = _official_masks(ref, x)
        emb = ours.encode(x)
        masks = ours.decode(emb, ours.prompt_encoder.dense_no_mask(2))
    # LoRA's B starts at zero, so a LoRA model starts exactly at its base model
    torch.testing.assert_close(emb, emb_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(masks, masks_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.prompt_encoder.dense_pe(), ref.prompt_encoder.get_dense_pe())


def test_lora_adds_its_low_rank_update_to_q_and_v_only():
    from amisbench.nn.sam import EncoderAttention

    torch.manual_seed(0)
    d = SMALL["embed_dim"]
    attn = EncoderAttention(d, SMALL["heads"], (4, 4), lora_rank=2)
    for p in attn.parameters():
        nn.init.normal_(p, std=0.2)
    # the same attention without LoRA whose qkv weight carries the LoRA update B A in its q and v rows
    ref = EncoderAttention(d, SMALL["heads"], (4, 4), lora_rank=0)
    ref.load_state_dict({k: v for k, v in attn.state_dict().items() if "lora_" not in k})
    with torch.no_grad():
        dq = attn.lora_q_b.weight @ attn.lora_q_a.weight
        dv = attn.lora_v_b.weight @ attn.lora_v_a.weight
        ref.qkv.weight += torch.cat([dq, torch.zeros_like(dq), dv])
        x = torch.randn(2, 4, 4, d)
        torch.testing.assert_close(attn(x), ref(x), rtol=1e-5, atol=1e-5)
        # and the update matters: without it the outputs differ
        plain = EncoderAttention(d, SMALL["heads"], (4, 4), lora_rank=0)
        plain.load_state_dict(ref.state_dict())
        plain.qkv.weight -= torch.cat([dq, torch.zeros_like(dq), dv])
        assert not torch.allclose(plain(x), attn(x), atol=1e-3)
    sam = SAM(SAMConfig(**SMALL), 32, lora_rank=2)
    assert {n.split(".")[-2] for n, _ in sam.named_parameters() if ".lora_" in n} == {
        "lora_q_a", "lora_q_b", "lora_v_a", "lora_v_b"}


def test_an_official_checkpoint_loads_and_adapts(tmp_path):
    ref = _official_sam(64)
    path = tmp_path / "sam_small.pth"
    torch.save(ref.state_dict(), path)
    # same size and mask count: the loaded model is the release's model
    same = SAM(SAMConfig(**SMALL), 64, masks=3)
    report = load_sam_checkpoint(same, path)
    assert report["resized"] == [] and report["reinitialised"] == []
    assert set(report["skipped"]) == {k for k in ref.state_dict() if k.startswith(
        ("prompt_encoder.point_embeddings", "prompt_encoder.not_a_point_embed", "prompt_encoder.mask_downscaling"))}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same.decode(same.encode(x), same.prompt_encoder.dense_no_mask(1)),
                                   _official_masks(ref, x)[1], rtol=0, atol=1e-5)
    # P2SAM's adaptation: half the input size (smaller grid) and 8 masks
    small = SAM(SAMConfig(**SMALL), 32, masks=8, lora_rank=4)
    before = small.mask_decoder.mask_tokens.weight.clone()
    report = load_sam_checkpoint(small, path)
    globals_ = [f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in SMALL["global_attn"] for a in "hw"]
    assert sorted(report["resized"]) == sorted(["image_encoder.pos_embed", *globals_])
    assert "mask_decoder.mask_tokens.weight" in report["reinitialised"]
    assert "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight" in report["reinitialised"]
    assert torch.equal(small.mask_decoder.mask_tokens.weight, before)  # left at its fresh initialisation
    sd = ref.state_dict()
    assert torch.equal(small.image_encoder.blocks[0].attn.qkv.weight, sd["image_encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(small.mask_decoder.iou_prediction_head.layers[0].weight,
                       sd["mask_decoder.iou_prediction_head.layers.0.weight"])
    # SAMed's resizing: the 8x8 position grid bilinearly to 4x4 (align_corners=False averages 2x2 blocks)
    pos = sd["image_encoder.pos_embed"]
    want = pos.unflatten(1, (4, 2)).unflatten(3, (4, 2)).mean(dim=(2, 4))
    torch.testing.assert_close(small.image_encoder.pos_embed.detach(), want)
    # a global block's relative table (2*8-1 rows) linearly to 2*4-1 rows: the ends map inside the old range
    rel = sd["image_encoder.blocks.1.attn.rel_pos_h"]
    got = small.image_encoder.blocks[1].attn.rel_pos_h.detach()
    assert got.shape == (7, rel.shape[1])
    torch.testing.assert_close(got[3], rel[7])  # the centre row (offset 0) stays the centre row


class _Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


@pytest.mark.parametrize("case", ["missing", "hostile", "not_tensors", "vit_h", "shape", "incomplete"])
def test_bad_checkpoints_get_one_sentence(tmp_path, case):
    sam = SAM(SAMConfig(**SMALL), 32, masks=8)
    path = tmp_path / "ckpt.pth"
    good = _official_sam(64).state_dict()
    if case == "hostile":
        torch.save({"x": _Payload()}, path)
        expect = "could not be read as a tensor state dict"
    elif case == "not_tensors":
        torch.save({"image_encoder.pos_embed": [1, 2, 3]}, path)
        expect = "is not a state dict of tensors"
    elif case == "vit_h":
        good["image_encoder.patch_embed.proj.weight"] = torch.zeros(1280, 3, 16, 16)
        torch.save(good, path)
        expect = "holds a VIT-H encoder"
    elif case == "shape":
        good["image_encoder.blocks.0.mlp.lin1.weight"] = torch.zeros(7, 7)
        torch.save(good, path)
        expect = "image_encoder.blocks.0.mlp.lin1.weight has shape (7, 7)"
    elif case == "incomplete":
        del good["image_encoder.neck.0.weight"]
        torch.save(good, path)
        expect = "lacks 1 of the entries the model needs, e.g. image_encoder.neck.0.weight"
    else:
        expect = "does not exist"
    with pytest.raises(UserError) as err:
        load_sam_checkpoint(sam, path)
    assert expect in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def _model(**overrides):
    res = resolve("p2sam", "synthetic", "smoke", sets=[f"method.{k}={v}" for k, v in overrides.items()])
    ds = DATASETS.get("synthetic")(res.cfg.dataset, "train")
    items = [ds[i] for i in range(2)]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["masks"] for it in items]).float()
    torch.manual_seed(0)
    return METHODS.get("p2sam")(res.cfg.method, ds.spec), images, masks


def test_stages_train_what_the_release_trains():
    model, images, masks = _model(train_encoder="false")
    model.on_stage_start("adapt")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    enc = {n for n in trained if n.startswith("sam.image_encoder.")}
    assert enc and all(".lora_" in n for n in enc)  # the pretrained encoder is frozen, its LoRA trains
    assert "mask_weights" in trained and any(n.startswith("sam.mask_decoder.") for n in trained)
    assert not any(n.startswith(("prior.", "fcomb.")) for n in trained)
    model.on_stage_start("prompt")
    loss, _ = model.loss("prompt", images, masks)
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.startswith(("prior.", "fcomb.")), n


def test_weights_sum_to_one_and_losses_match_hand_values():
    from amisbench.methods.p2sam import sigmoid_focal_loss, soft_dice_loss

    model, _, _ = _model()
    with torch.no_grad():
        model.mask_weights.copy_(torch.tensor([0.3, -0.1]))
    assert torch.allclose(model.weights(), torch.tensor([0.8, 0.3, -0.1]))
    x = torch.tensor([[0.0, 2.0]])
    y = torch.tensor([[1.0, 0.0]])
    p = torch.sigmoid(x)
    # element 0: p_t = 0.5, ce = log 2, alpha 0.25; element 1: p_t = 1 - p, ce = -log(1 - p), 1 - alpha
    want = (0.25 * 0.25 * torch.log(torch.tensor(2.0)) + 0.75 * p[0, 1] ** 2 * -torch.log(1 - p[0, 1])) / 2
    torch.testing.assert_close(sigmoid_focal_loss(x, y, 0.25, 2.0), want)
    dice = 1 - (2 * 0.5 + 1) / (0.5 + p[0, 1] + 1 + 1)
    torch.testing.assert_close(soft_dice_loss(x, y), dice)


def test_samples_follow_the_prior_and_ignore_chunking():
    model, images, _ = _model(sample_chunk=0)
    model.eval()
    with torch.no_grad():
        model.prior.head.bias[model.cfg.latent_dim:] = 3.0  # sigma = e^3: latents far apart
        model.fcomb.layers[-1].weight.mul_(50)  # make the prompt perturbation matter
    a = model.sample(images, 12, generator=torch.Generator().manual_seed(1))
    model.cfg.sample_chunk = 1
    b = model.sample(images, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert len({s.numpy().tobytes() for s in a[0]}) > 1  # samples differ
    assert model.nfe(100) == 101


@pytest.mark.slow
def test_paper_profile_without_weights_is_a_usage_error(tmp_path):
    res = resolve("p2sam", "synthetic", "paper")
    ds_spec = DATASETS.get("synthetic")(res.cfg.dataset, "test").spec
    with pytest.raises(UserError, match="method.sam_checkpoint: p2sam needs an official SAM checkpoint"):
        METHODS.get("p2sam")(res.cfg.method, ds_spec)
    out = subprocess.run([sys.executable, "-m", "amisbench.cli", "run", "--method", "p2sam", "--dataset",
                          "synthetic", "--profile", "paper", "--results", str(tmp_path / "r")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "method.sam_checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_p2sam_runs_from_a_user_checkpoint(tmp_path):
    """The paper path end to end on a tiny official-format checkpoint: load, train both stages, evaluate."""
    ref = _official_sam(64)
    path = tmp_path / "sam.pth"
    torch.save(ref.state_dict(), path)
    sets = [f"method.sam.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in SMALL.items()]
    sets += ["method.sam_init=checkpoint", f"method.sam_checkpoint={path}", "method.prior_widths=[8]",
             "method.latent_dim=4", "method.prior_convs=1"]
    cmd = [sys.executable, "-m", "amisbench.cli", "run", "--method", "p2sam", "--dataset", "synthetic",
           "--profile", "smoke", "--results", str(tmp_path / "r"), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    run = next(Path(tmp_path / "r").glob("runs/synthetic/p2sam/smoke/seed-0"))
    assert (run / "metrics.json").is_file()
