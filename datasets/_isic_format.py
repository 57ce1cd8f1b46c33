"""Converter of Zepf et al.'s ISIC3 folder (``isic256_3_style/``) to the prepared layout (:mod:`._layout`).

``Images/ISIC_<digits>.<ext>`` and ``Segmentations/ISIC_<digits>[_segmentation][_]<style>.<ext>`` with style
``f``, ``m`` or ``p`` and exactly one mask of each style per image (reader slots 0, 1, 2 = f, m, p). Any image
without its three masks, and any mask without an image, is reported by id; nothing is dropped silently.
Lossless masks must hold 0/1 or 0/255; JPEG masks are thresholded at 128.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from amisbench.errors import UserError

from ._images import IMAGE_SUFFIXES, LOSSY_SUFFIXES, binary_mask, read_raw
from ._layout import PreparedWriter, atfm_paper_split, group_split, zepf_split
from ._progress import Progress

STYLES = ("f", "m", "p")
ZEPF_LABEL = "Zepf et al. split: contiguous in image order (60/20/20, not shuffled)"
ATFM_LABEL = ("leaky protocol: ATFM release split (seed-42 shuffled 80 % train, unshuffled last 20 % test; test "
              "images also in training)")
_IMAGE_RE = re.compile(r"ISIC_\d+", re.IGNORECASE)
_MASK_RE = re.compile(r"(ISIC_\d+)(?:[_-]?segmentation)?[_-]?([A-Za-z])", re.IGNORECASE)


def _subdir(src: Path, name: str) -> Path:
    for p in src.iterdir():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    raise UserError(f"--from {src}: no {name}/ folder; expected the ISIC3 layout Images/ISIC_*.<ext> and "
                    "Segmentations/ISIC_*_<f|m|p>.<ext>")


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))


def _listing(src: Path) -> list[tuple[str, Path, list[Path]]]:
    if not src.is_dir():
        raise UserError(f"--from {src}: expected the ISIC3 folder (isic256_3_style) with Images/ and Segmentations/")
    if not any(src.iterdir()):
        raise UserError(f"--from {src}: the folder is empty; expected Images/ and Segmentations/")
    img_dir, seg_dir = _subdir(src, "Images"), _subdir(src, "Segmentations")
    images: dict[str, Path] = {}
    for f in _files(img_dir):
        if f.suffix.lower() not in IMAGE_SUFFIXES or not _IMAGE_RE.fullmatch(f.stem):
            raise UserError(f"{f}: unrecognised file in Images/ (expected ISIC_<digits>.<png|jpg|...>)")
        iid = f.stem.upper()
        if iid in images:
            raise UserError(f"{img_dir}: image {iid} is there twice ({images[iid].name}, {f.name})")
        images[iid] = f
    if not images:
        raise UserError(f"{img_dir}: no images (expected ISIC_<digits>.<ext>)")
    masks: dict[str, dict[str, list[Path]]] = {}
    extra: list[str] = []
    for f in _files(seg_dir):
        m = _MASK_RE.fullmatch(f.stem) if f.suffix.lower() in IMAGE_SUFFIXES else None
        if m is None:
            raise UserError(f"{f}: unrecognised file in Segmentations/ (expected ISIC_<digits>_<f|m|p>.<ext>)")
        iid, style = m.group(1).upper(), m.group(2).lower()
        if iid not in images:
            extra.append(f"{f.name} (no image {iid})")
        elif style not in STYLES:
            extra.append(f"{f.name} (style '{style}', expected f, m or p)")
        else:
            masks.setdefault(iid, {}).setdefault(style, []).append(f)
    problems = []
    for iid in sorted(images):
        have = masks.get(iid, {})
        missing = [s for s in STYLES if s not in have]
        doubled = [s for s in STYLES if len(have.get(s, [])) > 1]
        if missing or doubled:
            why = ([f"missing {', '.join(missing)}"] if missing else []) + \
                  [f"{len(have[s])} masks of style {s}" for s in doubled]
            problems.append(f"{iid} ({'; '.join(why)})")
    if problems or extra:
        parts = []
        if problems:
            parts.append(f"{len(problems)} image(s) without exactly one f, m and p mask: {', '.join(problems[:10])}"
                         + (", ..." if len(problems) > 10 else ""))
        if extra:
            parts.append(f"{len(extra)} extra mask(s): {', '.join(extra[:10])}" + (", ..." if len(extra) > 10 else ""))
        raise UserError(f"{src}: {'; '.join(parts)}")
    return [(iid, images[iid], [masks[iid][s][0] for s in STYLES]) for iid in sorted(images)]


def from_isic_folder(src: Path, w: PreparedWriter, progress: Progress, *, val_fraction: float,
                     test_fraction: float, seed: int) -> dict[str, Any]:
    items = _listing(src)
    n = len(items)
    hw = None
    advance = progress.task("converting", n)
    meta = []
    for i, (iid, ipath, mpaths) in enumerate(items):
        raw = read_raw(ipath)
        if raw.ndim != 3 or raw.shape[2] not in (3, 4) or raw.dtype != np.uint8:
            raise UserError(f"{ipath}: expected an 8-bit RGB image, found shape {raw.shape} {raw.dtype}")
        raw = raw[..., :3]
        if hw is None:
            hw = raw.shape[:2]
            w.allocate(n, (3, *hw), len(STYLES), np.uint8)
        elif raw.shape[:2] != hw:
            raise UserError(f"{ipath}: image is {raw.shape[0]}x{raw.shape[1]}, the first image {items[0][0]} is "
                            f"{hw[0]}x{hw[1]}: all images must have one size")
        assert w.images is not None and w.masks is not None
        w.images[i] = raw.transpose(2, 0, 1)
        for slot, mp in enumerate(mpaths):
            mraw = read_raw(mp)
            if mraw.shape[:2] != hw:
                raise UserError(f"{mp}: mask is {mraw.shape[0]}x{mraw.shape[1]}, its image {hw[0]}x{hw[1]}")
            w.masks[i, slot] = binary_mask(mraw, mp, lossy=mp.suffix.lower() in LOSSY_SUFFIXES)
        meta.append({"id": iid, "group": iid, "patient": "", "series": "", "readers": len(STYLES),
                     "source_key": ipath.relative_to(src).as_posix(), "source_split": "", "source_index": i,
                     "extra": "styles=" + ",".join(STYLES)})
        advance(1)
    params = {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}
    protocols = {
        "clean": {"split": group_split([m["group"] for m in meta], val_fraction, test_fraction, seed),
                  "params": {"method": "group", **params}, "label": ""},
        "zepf": {"split": zepf_split(n), "params": {"method": "zepf"}, "label": ZEPF_LABEL},
        "atfm-paper": {"split": atfm_paper_split(n), "params": {"method": "atfm-paper"}, "label": ATFM_LABEL},
    }
    lossy = sorted({p.suffix.lower() for _, _, mps in items for p in mps} & set(LOSSY_SUFFIXES))
    return {"meta": meta, "protocols": protocols, "source": {"format": "isic-folder", "name": src.name},
            "image_scale": 1.0 / 255.0,
            "notes": {"reader_styles": list(STYLES), "mask_threshold": "JPEG masks > 127" if lossy else ""}}
