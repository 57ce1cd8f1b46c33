"""LIDC-IDRI: prepare from each real format, load, split without leakage, and fail clearly on bad input."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from amisbench.datasets._layout import atfm_gtr_rows, atfm_paper_split, group_split
from amisbench.datasets._prepare import prepare
from amisbench.datasets.lidc import LIDC, LIDCConfig
from amisbench.errors import UserError

import data_formats as F  # tests/fixtures, put on sys.path by tests/conftest.py

SPLITS = ("train", "val", "test")


def load_all(root, **kw):
    cfg = LIDCConfig(root=str(root), **kw)
    return {s: LIDC(cfg, s) for s in SPLITS}


def assert_nothing_left(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


# ----------------------------------------------------------------------------------------------------
# pickle
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol, numpy1", [(3, True), (5, False)])
def test_pickle_round_trip(tmp_path, protocol, numpy1):
    entries = F.make_lidc_entries(n_scans=10, slices=3)
    src = F.write_lidc_pickle(tmp_path / "data_lidc.pickle", entries, protocol=protocol, numpy1=numpy1)
    out = prepare("lidc", src, tmp_path / "prep", show_progress=False)
    ds = load_all(out)
    assert sum(len(d) for d in ds.values()) == len(entries)
    assert sorted(i for d in ds.values() for i in d.ids) == sorted(entries)
    patients = {r["series_instance_uid"]: r["patient_id"] for r in F.scans()}
    for d in ds.values():
        assert d.spec.channels == 1 and d.spec.height == d.spec.width == 16 and d.spec.readers == 4
        for i in range(len(d)):
            s = d[i]
            e = entries[s["id"]]
            assert s["image"].dtype == torch.float32 and s["image"].shape == (1, 16, 16)
            assert s["masks"].dtype == torch.uint8 and s["masks"].shape == (4, 16, 16)
            np.testing.assert_array_equal(s["image"][0].numpy(), e["image"].astype(np.float32))
            np.testing.assert_array_equal(s["masks"].numpy(), np.stack(e["masks"]))
            assert s["group"] == patients[str(e["series_uid"])]
    meta = (out / "meta.csv").read_text().splitlines()
    assert meta[0].split(",")[:5] == ["id", "group", "patient", "series", "readers"]
    assert "pixel_spacing=0.703125 0.703125" in meta[1]
    # rows keep the pickle's dict order (the atfm-paper protocol depends on it)
    assert [line.split(",")[0] for line in meta[1:]] == list(entries)


def test_folder_of_pickle_parts_is_merged_like_the_original_loader(tmp_path):
    entries = F.make_lidc_entries(n_scans=6, slices=2)
    keys = list(entries)
    first = {k: entries[k] for k in keys[:7]}
    second = {k: entries[k] for k in keys[6:]}
    dup = keys[6]
    second[dup] = F.lidc_entry(np.full((16, 16), 0.25), np.zeros((4, 16, 16)), str(entries[dup]["series_uid"]))
    F.write_lidc_pickle(tmp_path / "parts" / "a.pickle", first)
    F.write_lidc_pickle(tmp_path / "parts" / "b.pickle", second)
    out = prepare("lidc", tmp_path / "parts", tmp_path / "prep", show_progress=False)
    man = json.loads((out / "manifest.json").read_text())
    assert man["count"] == len(keys) and man["duplicate_keys"] == 1
    assert [p["name"] for p in man["source"]["parts"]] == ["a.pickle", "b.pickle"]
    ds = load_all(out)
    for d in ds.values():
        if dup in d.ids:
            s = d[d.ids.index(dup)]
            assert torch.all(s["image"] == 0.25) and s["masks"].sum() == 0  # the later file wins, as dict.update


def test_clean_split_never_cuts_a_patient(tmp_path):
    entries = F.make_lidc_entries(n_scans=16, slices=3)  # scans 0 and 1: one patient (LIDC-IDRI-0132)
    src = F.write_lidc_pickle(tmp_path / "d.pickle", entries)
    out = prepare("lidc", src, tmp_path / "prep", show_progress=False)
    for kw in ({}, {"val_fraction": 0.3, "test_fraction": 0.3, "split_seed": 5}):
        ds = load_all(out, **kw)
        groups = {s: set(d.groups) for s, d in ds.items()}
        assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
        assert not groups["val"] & groups["test"]
        assert sum("LIDC-IDRI-0132" in g for g in groups.values()) == 1  # both its series in one split
        assert all(len(d) for d in ds.values())
    default = load_all(out)
    other = load_all(out, val_fraction=0.3, test_fraction=0.3, split_seed=5)
    assert default["test"].split_hash != other["test"].split_hash
    # the default split is the ID list written in the prepared folder, and its hash is that file's sha256
    import hashlib

    text = (out / "splits" / "clean" / "test.txt").read_text()
    assert text.splitlines() == default["test"].ids
    assert default["test"].split_hash == hashlib.sha256(text.encode()).hexdigest()
    assert default["test"].protocol_label == ""


def test_group_split_fractions_and_stability():
    groups = [f"p{i // 3:03d}" for i in range(300)]
    split = group_split(groups, 0.15, 0.15, 0)
    assert sorted(sum(split.values(), [])) == list(range(300))
    assert 45 <= len(split["test"]) <= 48 and 45 <= len(split["val"]) <= 48
    # adding patients does not move the existing ones between splits
    bigger = group_split(groups + [f"q{i}" for i in range(30)], 0.15, 0.15, 0)
    where = {groups[i]: s for s, rows in split.items() for i in rows}
    moved = sum(where[groups[i]] != s for s, rows in bigger.items() for i in rows if i < 300)
    assert moved < 0.2 * 300


# Taken once from the release's code path (dataloaders.py: indices = list(range(N)); np.random.seed(42);
# np.random.shuffle(indices); int(np.floor(0.8 * N)) / int(np.floor(0.6 * N))) at N = 15,096, not recomputed.
RELEASE_TRAIN_FIRST = [3692, 7781, 7907, 884, 411, 13602, 9001, 3434, 487, 3369]
RELEASE_TRAIN_LAST = [365, 13895, 15069, 147, 1668, 11280, 13361, 7650, 8599, 11698]
RELEASE_GTR_LAST = [5231, 2076, 4103, 7493, 9043, 5968, 12609, 11913, 3966, 10456]


def test_atfm_paper_protocol_reproduces_the_release_overlap(tmp_path):
    n = 15096  # the full pickle
    split = atfm_paper_split(n)
    assert (len(split["train"]), len(split["test"])) == (12076, 3020)
    assert split["train"][:10] == RELEASE_TRAIN_FIRST and split["train"][-10:] == RELEASE_TRAIN_LAST
    assert split["test"] == list(range(12076, 15096))  # the unshuffled last 20 %
    assert split["val"] == split["test"]
    gtr = atfm_gtr_rows(n)
    assert len(gtr) == 9057 and gtr[:10] == RELEASE_TRAIN_FIRST and gtr[-10:] == RELEASE_GTR_LAST
    assert gtr == split["train"][:9057]  # the same permutation
    overlap = len(set(split["test"]) & set(split["train"])) / len(split["test"])
    assert 0.77 < overlap < 0.83  # the paper's release: 79 % of its test slices are training slices

    entries = F.make_lidc_entries(n_scans=10, slices=3)
    src = F.write_lidc_pickle(tmp_path / "d.pickle", entries)
    out = prepare("lidc", src, tmp_path / "prep", show_progress=False)
    ds = load_all(out, protocol="atfm-paper")
    keys = list(entries)
    assert ds["test"].ids == keys[-6:]  # 30 slices: floor(0.8 * 30) = 24 train, 6 test
    assert len(ds["train"]) == 24 and ds["train"].ids == [keys[i] for i in atfm_paper_split(30)["train"]]
    # the GTR stage trains on perm[:floor(0.6 * 30)] = the first 18 training rows (train_GTR.py)
    assert ds["train"].stage_rows("gtr") == list(range(18)) and ds["train"].stage_rows("sfm") is None
    assert ds["test"].stage_rows("gtr") is None
    assert set(ds["test"].ids) & set(ds["train"].ids)  # leaky by construction
    assert "leaky protocol" in ds["test"].protocol_label
    assert LIDC.protocol_labels["atfm-paper"] == ds["test"].protocol_label
    with pytest.raises(UserError, match="dataset.split_seed does not apply.*fixed release split"):
        LIDC(LIDCConfig(root=str(out), protocol="atfm-paper", split_seed=3), "train")


@pytest.mark.slow
def test_atfm_gtr_stage_trains_on_the_release_gtr_rows(tmp_path, monkeypatch):
    """Under atfm-paper the runner gives the gtr stage perm[:floor(0.6 N)] only, and counts its epochs there."""
    from amisbench import runner

    entries = F.make_lidc_entries(n_scans=10, slices=3)  # 30 slices: 24 train rows, 18 of them GTR rows
    out = prepare("lidc", F.write_lidc_pickle(tmp_path / "d.pickle", entries), tmp_path / "prep",
                  show_progress=False)
    seen: dict[str, set[int]] = {}
    real = runner.collate

    def spy(dataset, idx, device, aug_seed=None, augment=None):
        seen.setdefault(aug_seed[1], set()).update(idx)
        return real(dataset, idx, device, aug_seed, augment)

    monkeypatch.setattr(runner, "collate", spy)
    sets = ["train.gtr.steps=null", "train.gtr.epochs=2", "train.gtr.batch_size=4", "train.sfm.steps=null",
            "train.sfm.epochs=1", "train.sfm.batch_size=4", "dataset.size=16"]
    folder = runner.run("atfm", "lidc", profile="smoke", data_root=str(out), protocol="atfm-paper", sets=sets,
                        results=tmp_path / "res", quiet=True)
    log = (folder / "train_log.csv").read_text().splitlines()
    last = {row.split(",")[0]: int(row.split(",")[1]) for row in log[1:]}
    assert last == {"gtr": 2 * 5, "sfm": 6}  # ceil(18 / 4) = 5 steps per GTR epoch, ceil(24 / 4) = 6 for SFM
    assert seen["gtr"] <= set(range(18)) and len(seen["gtr"]) == 18 and seen["sfm"] == set(range(24))


def test_patient_from_key_prefix_when_the_series_is_missing(tmp_path):
    entries = F.make_lidc_entries(n_scans=4, slices=2)
    for e in list(entries.values())[::2]:
        del e["series_uid"]
    unknown = F.lidc_entry(np.zeros((16, 16)), np.zeros((4, 16, 16)), "9.9.9")  # not an LIDC scan
    entries["123_slice0"] = unknown
    out = prepare("lidc", F.write_lidc_pickle(tmp_path / "d.pickle", entries), tmp_path / "prep", show_progress=False)
    by_prefix = {r["study_instance_uid"].rsplit(".", 1)[-1]: r["patient_id"] for r in F.scans()}
    ds = load_all(out)
    groups = {i: g for d in ds.values() for i, g in zip(d.ids, d.groups)}
    for key in entries:
        assert groups[key] == by_prefix.get(key.split("_")[0], "series:9.9.9")


# ----------------------------------------------------------------------------------------------------
# HDF5 and PNG tree
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NHWA", "NAHW"])
def test_hdf5_both_label_layouts(tmp_path, layout):
    pytest.importorskip("h5py")
    written = F.write_lidc_hdf5(tmp_path / "data_lidc.hdf5", layout=layout)
    out = prepare("lidc", tmp_path / "data_lidc.hdf5", tmp_path / "prep", show_progress=False)
    ds = load_all(out)
    for split, d in ds.items():
        w = written[split]
        assert len(d) == len(w["images"])  # clean keeps the file's own (series-disjoint) split
        for i in range(len(d)):
            s = d[i]
            assert s["id"] == f"{split}/{i:05d}" and s["group"] == f"uid:{w['uids'][i]}"
            np.testing.assert_allclose(s["image"][0].numpy(), w["images"][i] + 0.5, atol=1e-6)
            np.testing.assert_array_equal(s["masks"].numpy(), w["labels"][i])
    with pytest.raises(UserError, match="protocol 'atfm-paper' is not available.*available: clean"):
        LIDC(LIDCConfig(root=str(out), protocol="atfm-paper"), "train")
    with pytest.raises(UserError, match="dataset.test_fraction does not apply.*keeps the split stored in its hdf5"):
        LIDC(LIDCConfig(root=str(out), test_fraction=0.3), "train")


@pytest.mark.parametrize("k0, mask_max", [(0, 255), (1, 1)])
def test_png_tree_centre_crop_and_own_split(tmp_path, k0, mask_max):
    written = F.write_png_tree(tmp_path / "lidc_crops", k0=k0, mask_max=mask_max)
    out = prepare("lidc", tmp_path / "lidc_crops", tmp_path / "prep", show_progress=False)
    ds = load_all(out)
    assert set(ds["val"].groups) == {"LIDC-IDRI-0004"} and set(ds["test"].groups) == {"LIDC-IDRI-0005"}
    assert len(ds["train"]) == 6
    for d in ds.values():
        assert d.spec.height == d.spec.width == 128
        for i in range(len(d)):
            s = d[i]
            img, masks = written[s["id"]]
            np.testing.assert_allclose(s["image"][0].numpy(), img[26:154, 26:154] / 255.0, atol=1e-6)
            np.testing.assert_array_equal(s["masks"].numpy(), masks[:, 26:154, 26:154])


# ----------------------------------------------------------------------------------------------------
# bad input: one clear error each, nothing left behind
# ----------------------------------------------------------------------------------------------------

def _bad_pickle_shape(tmp_path):
    e = F.make_lidc_entries(n_scans=2, slices=2)
    k = list(e)[2]
    e[k] = F.lidc_entry(np.zeros((12, 12)), np.zeros((4, 12, 12)), "1.2")
    return F.write_lidc_pickle(tmp_path / "d.pickle", e), f"entry '{k}': image shape"


def _bad_pickle_values(tmp_path):
    e = F.make_lidc_entries(n_scans=2, slices=2)
    k = list(e)[1]
    e[k]["masks"][3][2, 2] = 2
    return F.write_lidc_pickle(tmp_path / "d.pickle", e), f"entry '{k}': mask values must be 0 or 1, found 2"


def _bad_pickle_readers(tmp_path):
    e = F.make_lidc_entries(n_scans=2, slices=2)
    k = list(e)[3]
    e[k]["masks"] = e[k]["masks"][:3]
    return F.write_lidc_pickle(tmp_path / "d.pickle", e), f"entry '{k}' has 3 masks.*reader count"


def _truncated_pickle(tmp_path):
    p = F.write_lidc_pickle(tmp_path / "d.pickle", F.make_lidc_entries(n_scans=2, slices=2))
    p.write_bytes(p.read_bytes()[:-200])
    return p, "truncated or corrupt"


def _truncated_hdf5(tmp_path):
    pytest.importorskip("h5py")
    p = tmp_path / "d.hdf5"
    F.write_lidc_hdf5(p, counts={"train": 40, "val": 4, "test": 4})
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p, "truncated"


def _hdf5_range(tmp_path):
    pytest.importorskip("h5py")
    import h5py

    p = tmp_path / "d.h5"
    F.write_lidc_hdf5(p)
    with h5py.File(p, "a") as f:
        f["val/images"][1, 0, 0] = 0.9
    return p, r"val/images\[0:2\] has values outside \[-0.5, 0.5\]"


def _hdf5_shape(tmp_path):
    pytest.importorskip("h5py")
    import h5py

    p = tmp_path / "d.h5"
    F.write_lidc_hdf5(p)
    with h5py.File(p, "a") as f:
        del f["test/labels"]
        f["test"].create_dataset("labels", data=np.zeros((3, 4, 16), np.uint8))
    return p, r"test/labels has shape \(3, 4, 16\)"


def _hdf5_values(tmp_path):
    pytest.importorskip("h5py")
    import h5py

    p = tmp_path / "d.h5"
    F.write_lidc_hdf5(p, layout="NAHW")
    with h5py.File(p, "a") as f:
        f["train/labels"][4, 1, 3, 3] = 255
    return p, r"train/labels\[0:6\]: mask values must be 0 or 1, found 255"


def _png_values(tmp_path):
    F.write_png_tree(tmp_path / "t")
    f = tmp_path / "t" / "val" / "gt" / "LIDC-IDRI-0004" / "z-101.0_c0_l2.png"
    a = np.zeros((180, 180), np.uint8)
    a[5, 5] = 128
    F.save_png(f, a)
    return tmp_path / "t", "z-101.0_c0_l2.png: mask values must be 0/1 or 0/255, found 0, 128"


def _png_readers(tmp_path):
    F.write_png_tree(tmp_path / "t")
    (tmp_path / "t" / "test" / "gt" / "LIDC-IDRI-0005" / "z-100.0_c0_l3.png").unlink()
    return tmp_path / "t", "LIDC-IDRI-0005/z-100.0_c0 has 3 masks.*reader count"


def _png_unpaired(tmp_path):
    F.write_png_tree(tmp_path / "t")
    for k in range(4):
        (tmp_path / "t" / "train" / "gt" / "LIDC-IDRI-0002" / f"z-101.0_c0_l{k}.png").unlink()
    return tmp_path / "t", r"train/LIDC-IDRI-0002/z-101.0_c0 \(no masks\)"


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", "the folder is empty"


def _missing(tmp_path):
    return tmp_path / "nope.pickle", "no such file"


BAD = [_bad_pickle_shape, _bad_pickle_values, _bad_pickle_readers, _truncated_pickle, _truncated_hdf5, _hdf5_range,
       _hdf5_shape, _hdf5_values, _png_values, _png_readers, _png_unpaired, _empty_folder, _missing]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_sources_give_one_clear_error_and_leave_nothing(tmp_path, make):
    src, message = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        prepare("lidc", src, out, show_progress=False)
    assert_nothing_left(tmp_path, out)


def test_out_must_be_new_or_empty(tmp_path):
    src = F.write_lidc_pickle(tmp_path / "d.pickle", F.make_lidc_entries(n_scans=2, slices=2))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not empty"):
        prepare("lidc", src, tmp_path / "full", show_progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert prepare("lidc", src, tmp_path / "empty", show_progress=False) == tmp_path / "empty"
    assert (tmp_path / "empty" / "manifest.json").is_file()


# ----------------------------------------------------------------------------------------------------
# the prepared folder is verified when opened
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def prepared(tmp_path):
    src = F.write_lidc_pickle(tmp_path / "d.pickle", F.make_lidc_entries(n_scans=8, slices=2))
    return prepare("lidc", src, tmp_path / "prep", show_progress=False)


def test_truncated_prepared_file_is_detected(prepared):
    p = prepared / "images.npy"
    p.write_bytes(p.read_bytes()[:-64])
    with pytest.raises(UserError, match=r"images\.npy: \d+ bytes where the manifest says \d+: the file is truncated"):
        LIDC(LIDCConfig(root=str(prepared)), "train")


@pytest.mark.parametrize("name", ["masks.npy", "meta.csv", "splits/clean/test.txt"])
def test_edited_prepared_file_is_detected(prepared, name):
    p = prepared / name
    data = bytearray(p.read_bytes())
    data[-3] ^= 1  # same size, one bit changed
    p.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{name}: checksum differs from the manifest"):
        LIDC(LIDCConfig(root=str(prepared)), "train")


def test_root_errors(tmp_path, prepared):
    with pytest.raises(UserError, match=r"dataset.root is not set.*amisbench data prepare lidc.*--data-root"):
        LIDC(LIDCConfig(), "train")
    with pytest.raises(UserError, match="no such folder"):
        LIDC(LIDCConfig(root=str(tmp_path / "nowhere")), "train")
    with pytest.raises(UserError, match="no manifest.json"):
        LIDC(LIDCConfig(root=str(tmp_path)), "train")
    from amisbench.datasets.isic3 import ISIC3, ISIC3Config

    with pytest.raises(UserError, match="holds prepared 'lidc' data, not 'isic3'"):
        ISIC3(ISIC3Config(root=str(prepared)), "train")
    with pytest.raises(UserError, match="unknown split 'dev'"):
        LIDC(LIDCConfig(root=str(prepared)), "dev")


def test_loader_reads_without_unpickling_and_resizes(prepared):
    d = LIDC(LIDCConfig(root=str(prepared)), "train")
    assert isinstance(d.data.images, np.memmap)
    small = LIDC(LIDCConfig(root=str(prepared), size=8), "train")
    s = small[0]
    assert small.spec.height == 8 and s["image"].shape == (1, 8, 8) and s["masks"].shape == (4, 8, 8)
    assert set(s["masks"].unique().tolist()) <= {0, 1}


def test_augmentation_is_off_by_default_and_a_pure_function_of_the_generator(prepared):
    d = LIDC(LIDCConfig(root=str(prepared)), "train")
    s = d[0]
    im, mk = d.augment(s["image"], s["masks"], torch.Generator().manual_seed(0))
    assert im is s["image"] and mk is s["masks"]
    cfg = replace(LIDCConfig(root=str(prepared)), hflip=True, vflip=True, rotate_deg=15.0, scale_range=(0.9, 1.1))
    d = LIDC(cfg, "train")
    outs = [d.augment(s["image"], s["masks"], torch.Generator().manual_seed(k)) for k in (3, 3, 4)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])
    for im, mk in outs:
        assert im.shape == s["image"].shape and mk.dtype == torch.uint8
        assert set(mk.unique().tolist()) <= {0, 1}


def test_flip_only_augmentation_is_an_exact_flip(prepared):
    cfg = replace(LIDCConfig(root=str(prepared)), hflip=True)
    d = LIDC(cfg, "train")
    s = d[0]
    seen = set()
    for k in range(12):
        im, mk = d.augment(s["image"], s["masks"], torch.Generator().manual_seed(k))
        flipped = torch.equal(im, s["image"].flip(-1))
        assert flipped or torch.equal(im, s["image"])
        assert torch.equal(mk, s["masks"].flip(-1) if flipped else s["masks"])
        seen.add(flipped)
    assert seen == {True, False}


# ----------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------

def test_cli_prepare_exit_codes(tmp_path, capsys):
    from amisbench import cli
    (tmp_path / "empty").mkdir()
    assert cli.main(["data", "prepare", "lidc", "--from", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "the folder is empty" in err and "Traceback" not in err
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(b"\x80\x03cposix\nsystem\nq\x00X\x05\x00\x00\x00touchq\x01\x85q\x02Rq\x03.")
    assert cli.main(["data", "prepare", "lidc", "--from", str(evil), "--out", str(tmp_path / "o")]) == 2
    assert "posix.system" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    src = F.write_lidc_pickle(tmp_path / "d.pickle", F.make_lidc_entries(n_scans=3, slices=2))
    assert cli.main(["data", "prepare", "lidc", "--from", str(src), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert (tmp_path / "o" / "manifest.json").is_file()


# ----------------------------------------------------------------------------------------------------
# the real crops (../shared/data/real/lidc/knegt_pickle_subset): pickle -> prepare -> load -> run
# ----------------------------------------------------------------------------------------------------

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "lidc" / "knegt_pickle_subset"


@pytest.fixture(scope="module")
def real_prepared(tmp_path_factory):
    if not (REAL / "lidc_subset.npz").is_file():
        pytest.skip("../shared/data/real/lidc is not available")
    z = np.load(REAL / "lidc_subset.npz")
    entries = {str(k): F.lidc_entry(img.astype(np.float64), m, str(s), 0.7)
               for k, img, m, s in zip(z["keys"], z["images"], z["masks"], z["series_uid"])}
    tmp = tmp_path_factory.mktemp("real")
    src = F.write_lidc_pickle(tmp / "data_lidc.pickle", entries)  # protocol 3, numpy.core names: the real file's
    return z, prepare("lidc", src, tmp / "prepared", show_progress=False)


@pytest.mark.slow
def test_real_crops_prepare_and_load(real_prepared):
    z, out = real_prepared
    ds = load_all(out)
    assert sum(len(d) for d in ds.values()) == 71
    index = {str(k): i for i, k in enumerate(z["keys"])}
    for d in ds.values():
        for i in range(len(d)):
            s = d[i]
            j = index[s["id"]]
            np.testing.assert_array_equal(s["image"][0].numpy(), z["images"][j])
            np.testing.assert_array_equal(s["masks"].numpy(), z["masks"][j])
            assert s["group"].startswith("LIDC-IDRI-")  # every series is in the shipped scan table
    groups = {s: set(d.groups) for s, d in ds.items()}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])
    assert len(set().union(*groups.values())) == 59


@pytest.mark.slow
def test_real_crops_smoke_run(real_prepared, tmp_path):
    from amisbench import runner
    _, out = real_prepared
    folder = runner.run("ssn", "lidc", profile="smoke", data_root=str(out), results=tmp_path, quiet=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    for k in ("GED_16", "GED_32", "GED_100", "HMIoU_32", "MDM_32"):
        assert np.isfinite(metrics[k]), k
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "done" and info["protocol"] == "clean" and not info["protocol_label"]
    test_ids = (out / "splits" / "clean" / "test.txt").read_text().splitlines()
    rows = (folder / "per_image.csv").read_text()
    assert any(i in rows for i in test_ids)
    # the statistics resample patients: groups.csv maps every scored image to its LIDC-IDRI patient
    scored = {line.split(",")[0] for line in rows.splitlines()[1:]}
    groups = dict(line.split(",") for line in (folder / "groups.csv").read_text().splitlines()[1:])
    assert set(groups) == scored and all(g.startswith("LIDC-IDRI-") for g in groups.values())


@pytest.mark.slow
def test_real_crops_leaky_protocol_is_labelled_and_kept_apart(real_prepared, tmp_path):
    from amisbench import runner
    _, out = real_prepared
    folder = runner.run("ssn", "lidc", profile="smoke", data_root=str(out), protocol="atfm-paper", results=tmp_path,
                        quiet=True)
    assert folder.relative_to(tmp_path).parts[:2] == ("runs", "lidc-atfm-paper")
    info = json.loads((folder / "run.json").read_text())
    assert info["protocol"] == "atfm-paper" and info["protocol_label"] == LIDC.protocol_labels["atfm-paper"]
    test_ids = (out / "splits" / "atfm-paper" / "test.txt").read_text()
    import hashlib

    assert info["split_hash"]["test"] == hashlib.sha256(test_ids.encode()).hexdigest()
