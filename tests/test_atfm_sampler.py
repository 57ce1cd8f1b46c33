"""ATFM's speed switches change the speed, not the samples (issue 16, "Sampling at paper scale").

On a briefly trained smoke model (CPU, float32): the chunk size (``method.sample_chunk``, ``auto`` included)
gives bit-equal masks; ``method.attention: sdpa`` and ``torch.compile`` (``eval.compile``) give ST-Net
velocities within 1e-5 of the plain path; bf16 autocast (``eval.amp``) gives the same masks for >= 99.9 % of
the pixels. CUDA graphs (``method.cuda_graphs``) are checked on a GPU by ``scripts/device_check_speed.sh``;
here only that they are a no-op with a note off CUDA.
"""

import pytest
import torch

from amisbench.config import resolve
from amisbench.registry import DATASETS, METHODS
from amisbench.seeding import derive_seed


@pytest.fixture(scope="module")
def trained():
    """The smoke ATFM on synthetic images, GTR and SFM trained for a few dozen Adam steps each."""
    res = resolve("atfm", "synthetic", "smoke")
    train = DATASETS.get("synthetic")(res.cfg.dataset, "train")
    test = DATASETS.get("synthetic")(res.cfg.dataset, "test")
    torch.manual_seed(derive_seed("init", 0))
    model = METHODS.get("atfm")(res.cfg.method, train.spec)
    g = torch.Generator().manual_seed(0)
    for stage, steps in (("gtr", 30), ("sfm", 60)):
        model.on_stage_start(stage)
        model.train()
        opt = torch.optim.Adam(model.trainable(stage), lr=2e-3)
        for _ in range(steps):
            idx = torch.randint(len(train), (4,), generator=g).tolist()
            images = torch.stack([train[i]["image"] for i in idx])
            masks = torch.stack([train[i]["masks"] for i in idx]).float()
            loss, _ = model.loss(stage, images, masks)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    images = torch.stack([test[i]["image"] for i in range(3)])
    return model, images


def _velocity_inputs(model, images, n=6):
    g = torch.Generator().manual_seed(7)
    b, _, h, w = images.shape
    x = torch.rand((b * n, 1, h, w), generator=g)
    t = torch.rand((b * n,), generator=g)
    return x, t, images.repeat_interleave(n, dim=0)


def test_chunking_is_bit_equal_in_float32(trained):
    model, images = trained
    outs = {}
    for attention in ("sdpa", "einsum"):
        model.st_net.mid_attn.attend = _attention(attention)
        for chunk in (0, 1, 7, 10, "auto"):  # 7 cuts across the 10 samples of an image
            model.cfg.sample_chunk = chunk
            outs[attention, chunk] = model.sample(images, 10, generator=torch.Generator().manual_seed(3))
    model.cfg.sample_chunk = "auto"
    model.st_net.mid_attn.attend = _attention("sdpa")
    for attention in ("sdpa", "einsum"):
        ref = outs[attention, 0]
        assert ref.dtype == torch.bool and ref.shape == (3, 10, *images.shape[-2:])
        assert 0.01 < ref.float().mean() < 0.99  # the trained flow draws masks, not blank images
        for chunk in (1, 7, 10, "auto"):
            assert torch.equal(outs[attention, chunk], ref), (attention, chunk)
    assert model.chunk_size(30, images, images) == 30  # auto off CUDA: 256 at most, no more than there are


def _attention(name):
    from amisbench.methods.atfm.st_net import ATTENTION

    return ATTENTION[name]


def test_sdpa_velocities_match_the_written_out_attention(trained):
    model, images = trained
    x, t, cond = _velocity_inputs(model, images)
    net = model.st_net
    assert model.cfg.attention == "sdpa" and net.mid_attn.attend is torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        fused = net(x, t, cond)
        net.mid_attn.attend = _attention("einsum")
        try:
            plain = net(x, t, cond)
        finally:
            net.mid_attn.attend = _attention("sdpa")
    assert plain.abs().max() > 0.1  # a trained network: velocities of size, not zeros
    assert (fused - plain).abs().max() < 1e-5
    # and the switch builds the written-out path
    from amisbench.methods.atfm.st_net import STNet

    assert STNet(1, model.cfg.st_net, dim=net.dim, attention="einsum").mid_attn.attend is _attention("einsum")
    with pytest.raises(ValueError, match="attention must be one of einsum, sdpa"):
        STNet(1, model.cfg.st_net, dim=net.dim, attention="flash")


def test_compiled_velocities_match_eager(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a private cache
    import torch._dynamo

    model, images = trained
    x, t, cond = _velocity_inputs(model, images)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model.st_net)
        with torch.no_grad():
            eager = model.st_net(x, t, cond)
            comp = compiled(x, t, cond)
    finally:
        torch._dynamo.reset()
    assert (comp - eager).abs().max() < 1e-5


def test_bf16_autocast_gives_the_same_masks_for_999_permille(trained):
    model, images = trained
    model.cfg.sample_chunk = "auto"
    ref = model.sample(images, 20, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.sample(images, 20, generator=torch.Generator().manual_seed(5))
    agree = float((low == ref).float().mean())
    print(f"\nbf16 autocast: {agree:.5%} of the pixels equal to float32")
    assert agree >= 0.999


def test_cuda_graphs_are_a_no_op_with_a_note_off_cuda(trained, capsys):
    from amisbench.methods.atfm import model as atfm_model

    model, images = trained
    ref = model.sample(images, 4, generator=torch.Generator().manual_seed(9))
    atfm_model._NOTED.discard("cpu")
    model.cfg.cuda_graphs = True
    try:
        out = model.sample(images, 4, generator=torch.Generator().manual_seed(9))
        model.sample(images, 4, generator=torch.Generator().manual_seed(9))
    finally:
        model.cfg.cuda_graphs = False
    assert torch.equal(out, ref)
    err = capsys.readouterr().err
    assert err.count("method.cuda_graphs has no effect on cpu") == 1  # one line, once per device
