"""Converters from the LIDC-IDRI formats met in practice to the prepared layout (:mod:`._layout`).

* **pickle** (Prob. U-Net PyTorch port, ``data_lidc.pickle``, 3.4 GB): a dict ``key -> {'image': float [0,1]
  (128,128), 'masks': [4 x (128,128) {0,1}], 'series_uid': pydicom UID, 'pixel_spacing': pydicom MultiValue}``,
  keys ``<last component of the StudyInstanceUID>_slice<N>[lesion<M>]``. A folder of ``*.pickle`` parts is
  merged like the original loader (``dict.update`` in file order, here sorted by name: later files win on a
  repeated key). Read with :mod:`._unpickle` (restricted, streamed); rows keep the dict order, which the
  ``atfm-paper`` protocol depends on.
* **HDF5** (PHiSeg / CCDM ``data_lidc.hdf5``): groups ``train``/``val``/``test`` with ``images`` (N,128,128)
  in [-0.5, 0.5] (shifted to [0, 1] here), ``labels`` (N,128,128,A) or (N,A,128,128) in {0,1} and optionally
  ``uids`` (PHiSeg stores a hash of the series UID: used as the group).
* **PNG tree** (DeepMind crops): ``<split>/images/<patient>/<stem>.png`` and
  ``<split>/gt/<patient>/<stem>_l<k>.png`` with k in 0..A-1 or 1..A, 180x180, centre-cropped to 128x128.
"""

from __future__ import annotations

import csv
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from amisbench.errors import UserError

from ._images import binary_mask, read_raw, to_unit
from ._layout import SPLITS, PreparedWriter, atfm_paper_split, check_disjoint, check_id_part, group_split, not_finite
from ._progress import Progress
from ._unpickle import load as restricted_load

CROP = 128  # the DeepMind crops are 180x180 around the nodule; every LIDC release used for AMIS uses 128x128
SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test",
              "testing": "test"}
ATFM_LABEL = "leaky protocol: ATFM release slice-level split (test slices also in training)"


# ----------------------------------------------------------------------------------------------------
# series -> patient
# ----------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def scan_table() -> tuple[dict[str, str], dict[str, str]]:
    """(series UID -> patient, last component of the study UID -> patient) from ``data/lidc_scans.csv``."""
    by_series: dict[str, str] = {}
    by_study: dict[str, str] = {}
    with resources.files("amisbench.datasets").joinpath("data", "lidc_scans.csv").open("r", newline="") as f:
        for row in csv.DictReader(f):
            by_series[row["series_instance_uid"]] = row["patient_id"]
            by_study[row["study_instance_uid"].rsplit(".", 1)[-1]] = row["patient_id"]
    return by_series, by_study


def patient_of(series: str, key: str) -> str:
    """The LIDC patient id of a scan, from its series UID or (failing that) its pickle key prefix; '' if unknown."""
    by_series, by_study = scan_table()
    if series in by_series:
        return by_series[series]
    return by_study.get(key.split("_", 1)[0], "")


def _group(patient: str, series: str, key: str) -> str:
    if patient:
        return patient
    if series:
        return f"series:{series}"
    return f"scan:{key.split('_', 1)[0]}"


def _default_fractions() -> dict[str, Any]:
    from .lidc import LIDCConfig

    c = LIDCConfig()
    return {"val_fraction": c.val_fraction, "test_fraction": c.test_fraction, "seed": c.split_seed}


# ----------------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------------

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
EXPECTED = ("expected data_lidc.pickle (or a folder of *.pickle parts), a PHiSeg/CCDM .h5/.hdf5 file, or the "
            "DeepMind PNG crop tree (<split>/images/<patient>/<stem>.png)")


def detect(src: Path) -> tuple[str, Any]:
    """The format of a LIDC source: ('pickle', [files]) | ('hdf5', file) | ('png', folder)."""
    if not src.exists():
        raise UserError(f"--from {src}: no such file or folder; {EXPECTED}")
    if src.is_file():
        suffix = src.suffix.lower()
        if suffix in (".pickle", ".pkl"):
            return "pickle", [src]
        if suffix in (".h5", ".hdf5", ".hdf", ".he5"):
            return "hdf5", src
        with open(src, "rb") as f:
            head = f.read(8)
        if head == HDF5_MAGIC:
            return "hdf5", src
        if head[:1] == b"\x80":
            return "pickle", [src]
        raise UserError(f"--from {src}: not a pickle or HDF5 file; {EXPECTED}")
    entries = [p for p in src.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise UserError(f"--from {src}: the folder is empty; {EXPECTED}")
    if any(p.is_dir() and p.name.lower() in SPLIT_DIRS and (p / "images").is_dir() for p in entries):
        return "png", src
    pickles = sorted(p for p in entries if p.is_file() and p.suffix.lower() in (".pickle", ".pkl"))
    if pickles:
        return "pickle", pickles
    h5 = sorted(p for p in entries if p.is_file() and p.suffix.lower() in (".h5", ".hdf5"))
    if len(h5) == 1:
        return "hdf5", h5[0]
    if len(h5) > 1:
        raise UserError(f"--from {src}: several HDF5 files ({', '.join(p.name for p in h5)}); give one of them")
    raise UserError(f"--from {src}: no LIDC data found in the folder; {EXPECTED}")


# ----------------------------------------------------------------------------------------------------
# pickle
# ----------------------------------------------------------------------------------------------------

def _entry_arrays(key: str, entry: Any, where: str) -> tuple[np.ndarray, list[np.ndarray]]:
    if not isinstance(entry, dict) or "image" not in entry or "masks" not in entry:
        found = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise UserError(f"{where}: entry '{key}' must be a dict with 'image' and 'masks', found {found}")
    image = entry["image"]
    if not isinstance(image, np.ndarray) or image.dtype.kind not in "biuf":
        raise UserError(f"{where}: entry '{key}': 'image' must be a numeric numpy array, found "
                        f"{type(image).__name__}")
    masks = entry["masks"]
    if isinstance(masks, np.ndarray):
        masks = list(masks) if masks.ndim == 3 else [masks]
    if not isinstance(masks, (list, tuple)) or not masks:
        raise UserError(f"{where}: entry '{key}': 'masks' must be a non-empty list of arrays")
    for m in masks:
        if not isinstance(m, np.ndarray) or m.dtype.kind not in "biuf":
            raise UserError(f"{where}: entry '{key}': every mask must be a numeric numpy array, found "
                            f"{type(m).__name__}")
    return np.squeeze(image) if image.ndim > 2 else image, [np.squeeze(m) if m.ndim > 2 else m for m in masks]


def _check_mask_values(masks: np.ndarray, what: str) -> None:
    bad = (masks != 0) & (masks != 1)
    if bad.any():
        vals = np.unique(masks[bad])[:5].tolist()
        raise UserError(f"{what}: mask values must be 0 or 1, found {', '.join(map(str, vals))}")


def from_pickle(files: list[Path], src: Path, w: PreparedWriter, progress: Progress) -> dict[str, Any]:
    advance = progress.task("reading pickle", sum(f.stat().st_size for f in files), unit="bytes")
    data: dict[Any, Any] = {}
    parts = []
    duplicates = 0
    for f in files:
        obj, sha = restricted_load(f, on_bytes=advance)
        if not isinstance(obj, dict):
            raise UserError(f"{f}: expected a dict of slices keyed by id (the Prob. U-Net LIDC pickle), found "
                            f"{type(obj).__name__}")
        duplicates += sum(1 for k in obj if k in data)
        data.update(obj)  # like the original loader
        parts.append({"name": f.name, "bytes": f.stat().st_size, "sha256": sha})
        del obj
    where = str(src)
    if not data:
        raise UserError(f"{where}: the pickle holds no slices")
    keys = list(data)
    image0, masks0 = _entry_arrays(str(keys[0]), data[keys[0]], where)
    shape, readers = image0.shape, len(masks0)
    if image0.ndim != 2:
        raise UserError(f"{where}: entry '{keys[0]}': expected a 2-D image, found shape {image0.shape}")
    n = len(keys)
    w.allocate(n, (1, *shape), readers, np.float32)
    assert w.images is not None and w.masks is not None
    meta = []
    advance = progress.task("converting", n)
    for i, k in enumerate(keys):
        key = check_id_part(str(k), f"{where}: a slice key")
        entry = data.pop(k)  # free each slice once copied: the peak stays near the pickle's own size
        image, masks = _entry_arrays(key, entry, where)
        if image.shape != shape:
            raise UserError(f"{where}: entry '{key}': image shape {image.shape}, expected {shape} like "
                            f"entry '{keys[0]}'")
        if len(masks) != readers:
            raise UserError(f"{where}: entry '{key}' has {len(masks)} masks, entry '{keys[0]}' has {readers}: the "
                            "reader count must be the same for every slice")
        for m in masks:
            if m.shape != shape:
                raise UserError(f"{where}: entry '{key}': mask shape {m.shape}, expected {shape}")
        img = image.astype(np.float64, copy=False)
        bad = not_finite(img)
        if bad:
            raise UserError(f"{where}: entry '{key}': the image holds {bad}; expected finite values in [0, 1]")
        if img.min() < -1e-6 or img.max() > 1 + 1e-6:
            raise UserError(f"{where}: entry '{key}': image values must be finite and in [0, 1] (the Prob. U-Net "
                            f"pickle convention), found [{np.nanmin(img):.4g}, {np.nanmax(img):.4g}]")
        mk = np.stack(masks)
        _check_mask_values(mk, f"{where}: entry '{key}'")
        w.images[i, 0] = np.clip(img, 0.0, 1.0)
        w.masks[i] = mk
        series = entry.get("series_uid")
        series = series.decode("ascii", "replace") if isinstance(series, bytes) else series
        series = series.strip() if isinstance(series, str) else ""
        spacing = entry.get("pixel_spacing")
        extra = ""
        if isinstance(spacing, (list, tuple)) and all(isinstance(v, (int, float)) for v in spacing):
            extra = "pixel_spacing=" + " ".join(f"{float(v):g}" for v in spacing)
        patient = patient_of(series, key)
        meta.append({"id": key, "group": _group(patient, series, key), "patient": patient, "series": series,
                     "readers": readers, "source_key": key, "source_split": "", "source_index": i,
                     "extra": extra})
        advance(1)
    groups = [m["group"] for m in meta]
    params = _default_fractions()
    protocols = {
        "clean": {"split": group_split(groups, params["val_fraction"], params["test_fraction"], params["seed"]),
                  "params": {"method": "group", **params}, "label": ""},
        "atfm-paper": {"split": atfm_paper_split(n), "params": {"method": "atfm-paper"}, "label": ATFM_LABEL},
    }
    source = {"format": "pickle", "name": src.name, "parts": parts}
    unknown = sum(1 for m in meta if not m["patient"])
    return {"meta": meta, "protocols": protocols, "source": source, "image_scale": 1.0,
            "notes": {"duplicate_keys": duplicates, "series_without_patient": unknown}}


# ----------------------------------------------------------------------------------------------------
# HDF5
# ----------------------------------------------------------------------------------------------------

def _h5py():
    try:
        import h5py
    except ImportError:
        raise UserError("reading the LIDC HDF5 file needs h5py; install it with: pip install 'amisbench[hdf5]'"
                        ) from None
    return h5py


def _uid_str(u: Any) -> str:
    """PHiSeg stores ``hash(series_uid)`` as an integer; other files may store the UID itself."""
    if isinstance(u, bytes):
        return u.decode("ascii", "replace")
    if isinstance(u, (np.integer, int)):
        return str(int(u))
    if isinstance(u, np.ndarray):  # a stray (1,) row
        return _uid_str(u.reshape(-1)[0]) if u.size == 1 else "-".join(_uid_str(x) for x in u.reshape(-1))
    return str(u)


def from_hdf5(path: Path, w: PreparedWriter, progress: Progress) -> dict[str, Any]:
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: cannot open the HDF5 file, it is truncated or not HDF5 ({e})") from None
    try:
        return _from_hdf5(f, path, w, progress)
    except OSError as e:  # a read error mid-file (truncated data)
        raise UserError(f"{path}: cannot read the HDF5 data, the file is truncated or corrupt ({e})") from None
    finally:
        f.close()


def _from_hdf5(f: Any, path: Path, w: PreparedWriter, progress: Progress) -> dict[str, Any]:
    groups = [(name, SPLIT_DIRS[name.lower()]) for name in f.keys() if name.lower() in SPLIT_DIRS]
    groups.sort(key=lambda g: SPLITS.index(g[1]))
    if not groups:
        raise UserError(f"{path}: expected the groups train, val and test (PHiSeg/CCDM layout), found "
                        f"{', '.join(f.keys()) or 'none'}")
    layout = []
    hw: tuple[int, int] | None = None
    readers = None
    for name, split in groups:
        g = f[name]
        for ds in ("images", "labels"):
            if ds not in g:
                raise UserError(f"{path}: group '{name}' has no '{ds}' dataset")
        im, lb = g["images"], g["labels"]
        if im.ndim == 4 and im.shape[-1] == 1:
            ihw = tuple(im.shape[1:3])
        elif im.ndim == 4 and im.shape[1] == 1:
            ihw = tuple(im.shape[2:4])
        elif im.ndim == 3:
            ihw = tuple(im.shape[1:3])
        else:
            raise UserError(f"{path}: {name}/images has shape {im.shape}, expected (N,H,W)")
        if hw is None:
            hw = ihw
        elif ihw != hw:
            raise UserError(f"{path}: {name}/images has {ihw[0]}x{ihw[1]} images, other groups {hw[0]}x{hw[1]}")
        if lb.ndim != 4 or lb.shape[0] != im.shape[0]:
            raise UserError(f"{path}: {name}/labels has shape {lb.shape}, expected ({im.shape[0]},H,W,A) or "
                            f"({im.shape[0]},A,H,W)")
        nhwa, nahw = tuple(lb.shape[1:3]) == hw, tuple(lb.shape[2:4]) == hw
        if nhwa == nahw:
            raise UserError(f"{path}: {name}/labels has shape {lb.shape}, which matches neither (N,H,W,A) nor "
                            f"(N,A,H,W) for {hw[0]}x{hw[1]} images unambiguously")
        a = lb.shape[3] if nhwa else lb.shape[1]
        if readers is None:
            readers = a
        elif a != readers:
            raise UserError(f"{path}: {name}/labels has {a} readers, other groups {readers}: the reader count must "
                            "be the same for every image")
        uids = g["uids"][()] if "uids" in g else None
        if uids is not None and len(uids) != im.shape[0]:
            raise UserError(f"{path}: {name}/uids has {len(uids)} entries for {im.shape[0]} images")
        layout.append((name, split, im, lb, nhwa, uids))
    assert hw is not None and readers is not None
    n = sum(im.shape[0] for _, _, im, _, _, _ in layout)
    if n == 0:
        raise UserError(f"{path}: the file holds no images")
    w.allocate(n, (1, *hw), readers, np.float32)
    assert w.images is not None and w.masks is not None
    meta: list[dict[str, Any]] = []
    advance = progress.task("converting", n)
    row = 0
    chunk = 256
    for name, split, im, lb, nhwa, uids in layout:
        for s in range(0, im.shape[0], chunk):
            images = np.asarray(im[s:s + chunk], dtype=np.float64).reshape(-1, *hw)
            labels = np.asarray(lb[s:s + chunk])
            if nhwa:
                labels = labels.transpose(0, 3, 1, 2)
            bad = not_finite(images)
            if bad:
                raise UserError(f"{path}: {name}/images[{s}:{s + len(images)}] holds {bad}; expected finite values in "
                                "[-0.5, 0.5]")
            if images.min() < -0.5 - 1e-6 or images.max() > 0.5 + 1e-6:
                raise UserError(f"{path}: {name}/images[{s}:{s + len(images)}] has values outside [-0.5, 0.5] "
                                f"(the PHiSeg/CCDM convention): [{np.nanmin(images):.4g}, {np.nanmax(images):.4g}]")
            _check_mask_values(labels, f"{path}: {name}/labels[{s}:{s + len(labels)}]")
            k = len(images)
            w.images[row:row + k, 0] = np.clip(images + 0.5, 0.0, 1.0)
            w.masks[row:row + k] = labels
            for j in range(k):
                i = s + j
                rid = f"{split}/{i:05d}"
                series = _uid_str(uids[i]) if uids is not None else ""
                meta.append({"id": rid, "group": f"uid:{series}" if series else rid, "patient": "",
                             "series": series, "readers": readers, "source_key": f"{name}[{i}]",
                             "source_split": split, "source_index": row + j, "extra": ""})
            row += k
            advance(k)
    groups_ = [m["group"] for m in meta]
    split_rows = {s: [i for i, m in enumerate(meta) if m["source_split"] == s] for s in SPLITS}
    check_disjoint(groups_, split_rows, str(path))
    return {"meta": meta, "source": {"format": "hdf5", "name": path.name}, "image_scale": 1.0,
            "protocols": {"clean": {"split": split_rows, "params": {"method": "source"}, "label": ""}},
            "notes": {"labels_layout": "NHWA" if layout[0][4] else "NAHW"}}


# ----------------------------------------------------------------------------------------------------
# DeepMind PNG tree
# ----------------------------------------------------------------------------------------------------

_GT_RE = re.compile(r"(.+)_l(\d+)\.png", re.IGNORECASE)


def _listing(src: Path) -> list[tuple[str, str, str, Path, dict[int, Path]]]:
    """(split, patient, stem, image path, {k: mask path}) for every image of the tree, validated."""
    out = []
    problems: list[str] = []
    dirs = [p for p in src.iterdir() if p.is_dir() and p.name.lower() in SPLIT_DIRS]
    for d in sorted(dirs, key=lambda p: (SPLITS.index(SPLIT_DIRS[p.name.lower()]), p.name)):
        split = SPLIT_DIRS[d.name.lower()]
        img_dir, gt_dir = d / "images", d / "gt"
        if not img_dir.is_dir() or not gt_dir.is_dir():
            raise UserError(f"{d}: expected the subfolders images/ and gt/")
        masks: dict[tuple[str, str], dict[int, Path]] = {}
        for pdir in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
            for f in sorted(pdir.iterdir()):
                if f.name.startswith(".") or not f.is_file():
                    continue
                m = _GT_RE.fullmatch(f.name)
                if m is None:
                    raise UserError(f"{f}: unrecognised mask file name (expected <stem>_l<k>.png)")
                masks.setdefault((pdir.name, m.group(1)), {})[int(m.group(2))] = f
        seen = set()
        for pdir in sorted(p for p in img_dir.iterdir() if p.is_dir()):
            for f in sorted(pdir.iterdir()):
                if f.name.startswith(".") or not f.is_file():
                    continue
                if f.suffix.lower() != ".png":
                    raise UserError(f"{f}: unexpected file in the image tree (expected .png)")
                key = (check_id_part(pdir.name, f"{pdir}: a patient folder"),
                       check_id_part(f.stem, f"{f}: a file name"))
                seen.add(key)
                ks = masks.get(key, {})
                if not ks:
                    problems.append(f"{split}/{pdir.name}/{f.stem} (no masks)")
                    continue
                out.append((split, pdir.name, f.stem, f, ks))
        for key in sorted(set(masks) - seen):
            problems.append(f"{split}/{key[0]}/{key[1]} (masks without an image)")
    if problems:
        raise UserError(f"{src}: {len(problems)} image(s) and masks do not pair up: {', '.join(problems[:8])}"
                        + (", ..." if len(problems) > 8 else ""))
    if not out:
        raise UserError(f"{src}: the PNG tree holds no images")
    return out


def from_png_tree(src: Path, w: PreparedWriter, progress: Progress) -> dict[str, Any]:
    items = _listing(src)
    readers = len(items[0][4])
    first = f"{items[0][0]}/{items[0][1]}/{items[0][2]}"
    for split, patient, stem, _, ks in items:
        rid = f"{patient}/{stem}"
        if len(ks) != readers:
            raise UserError(f"{src}: image {split}/{rid} has {len(ks)} masks, {first} has {readers}: the reader "
                            "count must be the same for every image")
        order = sorted(ks)
        if order not in (list(range(readers)), list(range(1, readers + 1))):
            raise UserError(f"{src}: image {split}/{rid} has masks _l{', _l'.join(map(str, order))}; expected "
                            f"_l0.._l{readers - 1} or _l1.._l{readers}")
    n = len(items)
    w.allocate(n, (1, CROP, CROP), readers, np.float32)
    assert w.images is not None and w.masks is not None
    meta = []
    advance = progress.task("converting", n)
    for i, (split, patient, stem, path, ks) in enumerate(items):
        raw = read_raw(path)
        if raw.ndim == 3:  # gray stored as RGB(A)
            raw = raw[..., 0]
        h, wd = raw.shape
        if h < CROP or wd < CROP:
            raise UserError(f"{path}: image is {h}x{wd}, expected at least {CROP}x{CROP} (the crops are 180x180)")
        top, left = (h - CROP) // 2, (wd - CROP) // 2
        w.images[i, 0] = to_unit(raw, path)[top:top + CROP, left:left + CROP]
        for slot, k in enumerate(sorted(ks)):
            mraw = read_raw(ks[k])
            if mraw.shape[:2] != (h, wd):
                raise UserError(f"{ks[k]}: mask is {mraw.shape[0]}x{mraw.shape[1]}, its image {h}x{wd}")
            w.masks[i, slot] = binary_mask(mraw, ks[k])[top:top + CROP, left:left + CROP]
        meta.append({"id": f"{patient}/{stem}", "group": patient, "patient": patient, "series": "",
                     "readers": readers, "source_key": path.relative_to(src).as_posix(), "source_split": split,
                     "source_index": i, "extra": ""})
        advance(1)
    groups = [m["group"] for m in meta]
    split_rows = {s: [i for i, m in enumerate(meta) if m["source_split"] == s] for s in SPLITS}
    check_disjoint(groups, split_rows, str(src))
    return {"meta": meta, "source": {"format": "png", "name": src.name}, "image_scale": 1.0,
            "protocols": {"clean": {"split": split_rows, "params": {"method": "source"}, "label": ""}},
            "notes": {"crop": f"centre {CROP}x{CROP}"}}
