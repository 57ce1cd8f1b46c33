"""ISIC3 (Zepf et al. subset): prepare the isic256_3_style folder, load, split, augment, report bad folders."""


import numpy as np
import pytest
import torch

from amisbench.datasets._layout import atfm_gtr_rows, atfm_paper_split, zepf_split
from amisbench.datasets._prepare import prepare
from amisbench.datasets.isic3 import ISIC3, ISIC3Config
from amisbench.errors import UserError

import data_formats as F  # tests/fixtures, put on sys.path by tests/conftest.py

SPLITS = ("train", "val", "test")


def load_all(root, **kw):
    return {s: ISIC3(ISIC3Config(root=str(root), **kw), s) for s in SPLITS}


@pytest.mark.parametrize("image_ext, sep", [(".png", "_"), (".jpg", "")])
def test_isic_round_trip(tmp_path, image_ext, sep):
    written = F.write_isic(tmp_path / "isic256_3_style", n=10, image_ext=image_ext, sep=sep)
    out = prepare("isic3", tmp_path / "isic256_3_style", tmp_path / "prep", show_progress=False)
    ds = load_all(out)
    assert sorted(i for d in ds.values() for i in d.ids) == sorted(written)
    for d in ds.values():
        assert (d.spec.channels, d.spec.height, d.spec.width, d.spec.readers) == (3, 32, 32, 3)
        for i in range(len(d)):
            s = d[i]
            img, masks = written[s["id"]]
            assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 32, 32)
            assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
            if image_ext == ".png":  # lossless: exact
                np.testing.assert_allclose(s["image"].numpy(), img.transpose(2, 0, 1) / 255.0, atol=1e-6)
            np.testing.assert_array_equal(s["masks"].numpy(), masks)  # slots 0,1,2 = styles f, m, p
            assert s["group"] == s["id"]


# Taken once from the release's code path (np.random.seed(42); np.random.shuffle(list(range(300)))), for the
# 300 images of the ISIC3 subset (each style subset lists them once, in image order); not recomputed.
ISIC_PERM_FIRST = [203, 266, 152, 9, 233, 226, 196, 109, 5, 175]


def test_clean_split_by_image_and_the_release_splits(tmp_path):
    F.write_isic(tmp_path / "src", n=30, size=16)
    out = prepare("isic3", tmp_path / "src", tmp_path / "prep", show_progress=False)
    clean = load_all(out)
    ids = {s: set(d.ids) for s, d in clean.items()}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"] and not ids["val"] & ids["test"]
    assert sum(map(len, ids.values())) == 30 and len(ids["test"]) == 6 and len(ids["val"]) == 3
    assert clean["test"].protocol_label == ""
    order = sorted(ids["train"] | ids["val"] | ids["test"])  # image order of the folder
    # Zepf et al.: contiguous, unshuffled 60/20/20 in image order
    zepf = load_all(out, protocol="zepf")
    assert zepf["train"].ids == order[:18] and zepf["val"].ids == order[18:24] and zepf["test"].ids == order[24:]
    assert ISIC3.protocol_labels["zepf"] == zepf["test"].protocol_label != ""
    assert (out / "splits" / "zepf" / "test.txt").read_text().splitlines() == zepf["test"].ids
    # ATFM release: shuffled 80 % train (seed 42), unshuffled last 20 % test: leaky
    atfm = load_all(out, protocol="atfm-paper")
    assert atfm["train"].ids == [order[i] for i in atfm_paper_split(30)["train"]] and len(atfm["train"]) == 24
    assert atfm["test"].ids == order[24:] and set(atfm["test"].ids) & set(atfm["train"].ids)
    assert "leaky protocol" in atfm["test"].protocol_label
    assert (out / "splits" / "atfm-paper" / "test.txt").read_text().splitlines() == atfm["test"].ids
    with pytest.raises(UserError, match="dataset.test_fraction does not apply.*fixed release split"):
        ISIC3(ISIC3Config(root=str(out), protocol="zepf", test_fraction=0.3), "train")
    # entries: each image once per annotation style, style by style (the release's concatenated loader)
    ent = ISIC3(ISIC3Config(root=str(out), protocol="atfm-paper", entries="train"), "train")
    assert ent.ids == atfm["train"].ids * 3
    assert ISIC3(ISIC3Config(root=str(out), protocol="atfm-paper", entries="train"), "test").ids == order[24:]
    assert ISIC3(ISIC3Config(root=str(out), protocol="atfm-paper", entries="all"), "test").ids == order[24:] * 3
    # GTR trains on perm[:floor(0.6 N)]: 18 images, 54 entries
    gtr = ent.stage_rows("gtr")
    assert len(gtr) == 54 and {ent.ids[k] for k in gtr} == {order[i] for i in atfm_gtr_rows(30)}


def test_release_split_sizes_for_the_isic3_subset():
    z = zepf_split(300)
    assert [len(z[s]) for s in ("train", "val", "test")] == [180, 60, 60] and z["test"] == list(range(240, 300))
    a = atfm_paper_split(300)
    assert (len(a["train"]), len(a["test"])) == (240, 60) and a["train"][:10] == ISIC_PERM_FIRST
    assert a["test"] == list(range(240, 300)) and atfm_gtr_rows(300) == a["train"][:180]


def _missing_mask(root):
    written = F.write_isic(root)
    iid = sorted(written)[3]
    (root / "Segmentations" / f"{iid}_m.png").unlink()
    return rf"1 image\(s\) without exactly one f, m and p mask: {iid} \(missing m\)"


def _extra_mask(root):
    written = F.write_isic(root)
    iid = sorted(written)[2]
    F.save_png(root / "Segmentations" / f"{iid}_f.jpg", np.zeros((32, 32), np.uint8))
    F.save_png(root / "Segmentations" / "ISIC_9999999_p.png", np.zeros((32, 32), np.uint8))
    return rf"{iid} \(2 masks of style f\).*extra mask\(s\): ISIC_9999999_p.png \(no image ISIC_9999999\)"


def _bad_style(root):
    written = F.write_isic(root)
    iid = sorted(written)[0]
    F.save_png(root / "Segmentations" / f"{iid}_x.png", np.zeros((32, 32), np.uint8))
    return rf"{iid}_x.png \(style 'x', expected f, m or p\)"


def _mask_values(root):
    written = F.write_isic(root)
    iid = sorted(written)[1]
    a = np.zeros((32, 32), np.uint8)
    a[3, 3] = 7
    F.save_png(root / "Segmentations" / f"{iid}_p.png", a)
    return rf"{iid}_p.png: mask values must be 0/1 or 0/255, found 0, 7"


def _size(root):
    written = F.write_isic(root)
    iid = sorted(written)[4]
    F.save_png(root / "Images" / f"{iid}.png", np.zeros((30, 32, 3), np.uint8))
    return rf"{iid}.png: image is 30x32, the first image .* is 32x32"


def _gray(root):
    written = F.write_isic(root)
    iid = sorted(written)[0]
    F.save_png(root / "Images" / f"{iid}.png", np.zeros((32, 32), np.uint8))
    return rf"{iid}.png: expected an 8-bit RGB image"


def _truncated(root):
    written = F.write_isic(root, image_ext=".jpg")
    p = root / "Images" / f"{sorted(written)[5]}.jpg"
    p.write_bytes(p.read_bytes()[:100])
    return "truncated or not an image"


def _empty(root):
    root.mkdir()
    return "the folder is empty"


def _no_segmentations(root):
    F.write_isic(root)
    import shutil

    shutil.rmtree(root / "Segmentations")
    return "no Segmentations/ folder"


BAD = [_missing_mask, _extra_mask, _bad_style, _mask_values, _size, _gray, _truncated, _empty, _no_segmentations]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_folders_are_reported_by_id(tmp_path, make):
    message = make(tmp_path / "src")
    with pytest.raises(UserError, match=message):
        prepare("isic3", tmp_path / "src", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


@pytest.fixture
def prepared(tmp_path):
    F.write_isic(tmp_path / "src", n=6)
    return prepare("isic3", tmp_path / "src", tmp_path / "prep", show_progress=False)


def test_paper_augmentation_is_on_by_default_and_deterministic(prepared):
    cfg = ISIC3Config(root=str(prepared))
    assert (cfg.hflip, cfg.vflip, cfg.rotate_deg, tuple(cfg.scale_range)) == (True, True, 15.0, (0.9, 1.1))
    d = ISIC3(cfg, "train")
    s = d[0]
    a = d.augment(s["image"], s["masks"], torch.Generator().manual_seed(7))
    b = d.augment(s["image"], s["masks"], torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    changed = 0
    for k in range(6):
        im, mk = d.augment(s["image"], s["masks"], torch.Generator().manual_seed(k))
        assert im.shape == (3, 32, 32) and mk.shape == (3, 32, 32) and mk.dtype == torch.uint8
        assert set(mk.unique().tolist()) <= {0, 1}
        # the centred disc masks keep their area within the scale range (0.9^2 .. 1.1^2) up to pixelation
        ratio = mk.float().sum() / s["masks"].float().sum()
        assert 0.7 < ratio < 1.4
        changed += not torch.equal(im, s["image"])
    assert changed >= 5


def test_resize_for_small_profiles(prepared):
    d = ISIC3(ISIC3Config(root=str(prepared), size=16), "test")
    s = d[0]
    assert d.spec.height == 16 and s["image"].shape == (3, 16, 16) and s["masks"].shape == (3, 16, 16)


def test_cli_prepare_isic_exit_code(tmp_path, capsys):
    from amisbench import cli
    written = F.write_isic(tmp_path / "src", n=4)
    (tmp_path / "src" / "Segmentations" / f"{sorted(written)[0]}_p.png").unlink()
    assert cli.main(["data", "prepare", "isic3", "--from", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    assert f"{sorted(written)[0]} (missing p)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_isic_smoke_run(tmp_path):
    from amisbench import runner
    import json

    F.write_isic(tmp_path / "src", n=10, size=64, image_ext=".jpg")
    out = prepare("isic3", tmp_path / "src", tmp_path / "prep", show_progress=False)
    folder = runner.run("ssn", "isic3", profile="smoke", data_root=str(out), results=tmp_path / "res", quiet=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert all(np.isfinite(metrics[k]) for k in ("GED_16", "GED_100", "HMIoU_32"))
    info = json.loads((folder / "run.json").read_text())
    assert info["protocol"] == "clean" and not info["protocol_label"]
