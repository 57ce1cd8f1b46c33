"""ISIC3: the Zepf et al. (2023) subset of ISIC 2018 with exactly 3 masks per image (300 images, 256x256 RGB).

Reads a folder written by ``amisbench data prepare isic3 --from isic256_3_style --out DIR``. Reader slots
0, 1, 2 hold the annotation styles f, m, p (the letter at the end of the mask file name). Images are float32
(3,H,W) in [0,1].

Protocols:

* ``clean`` (default): split by image (``val_fraction``/``test_fraction``, defaults 0.1/0.2).
* ``zepf``: Zepf et al.'s split (:func:`~amisbench.datasets._layout.zepf_split`): contiguous and
  unshuffled in image order, 60 % train, 20 % val, 20 % test, as their ``dataloaders.py`` cuts each
  style subset without ``randomsplit``. Labelled in :attr:`ISIC3.protocol_labels` (not random).
* ``atfm-paper``: the ATFM release's split (leaky): each style subset shuffled with seed 42, its first
  ``floor(0.8 N)`` entries for training and the unshuffled last 20 % for test (the LIDC rule,
  :func:`~amisbench.datasets._layout.atfm_paper_split`, on N images); the ATFM GTR stage trains on
  ``perm[:floor(0.6 N)]``. The release scores every test entry, so each test image up to 3 times
  (``entries: all``); the default scores each image once (the same expectation here, where every image
  has one mask of each style).

``entries``: ``none`` lists each image once; ``train`` lists each training image once per annotation
style, as the releases' style-concatenated loaders do (one epoch = one pass over the (image, style)
entries: the ATFM release's ISIC epoch); ``all`` does so for every split (the release's per-entry
scoring).

Training augmentation (defaults): horizontal and vertical flips, rotation in +-15 degrees, scale 0.9-1.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from amisbench.errors import UserError
from amisbench.registry import register_dataset

from ._adapter import PreparedConfig, PreparedDataset
from ._isic_format import ATFM_LABEL, ZEPF_LABEL
from ._layout import PreparedWriter, atfm_gtr_rows, atfm_paper_split, zepf_split
from ._progress import Progress


@dataclass
class ISIC3Config(PreparedConfig):
    """ISIC3 settings (:class:`PreparedConfig`): native size 256 px, split by image, flips, rotation and scale."""

    protocol: Literal["clean", "zepf", "atfm-paper"] = "clean"
    entries: Literal["none", "train", "all"] = "none"  # list images once per annotation style (see above)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    hflip: bool = True
    vflip: bool = True
    rotate_deg: float = 15.0
    scale_range: tuple[float, float] = (0.9, 1.1)


@register_dataset("isic3")
class ISIC3(PreparedDataset):
    """ISIC 2018 subset with 3 annotation styles per image (Zepf et al.), from `amisbench data prepare isic3`."""

    Config = ISIC3Config
    kind = "isic3"
    protocol_labels = {"zepf": ZEPF_LABEL, "atfm-paper": ATFM_LABEL}
    fixed_splits = {"atfm-paper": atfm_paper_split, "zepf": zepf_split}
    computed_protocols = ("atfm-paper", "zepf")
    stage_subsets = {"atfm-paper": {"gtr": atfm_gtr_rows}}

    @classmethod
    def prepare(cls, src: Path, out: Path, progress: Progress) -> Path:
        """``amisbench data prepare isic3``: Zepf et al.'s ``isic256_3_style`` folder at ``src`` (Images/,
        Segmentations/), split by this adapter's default fractions and seed."""
        from ._isic_format import from_isic_folder

        c = cls.Config()
        if not src.exists():
            raise UserError(f"--from {src}: no such folder; expected the ISIC3 folder (isic256_3_style) with Images/ "
                            "and Segmentations/")
        with PreparedWriter(out, cls.kind) as w:
            res = from_isic_folder(src, w, progress, val_fraction=c.val_fraction, test_fraction=c.test_fraction,
                                   seed=c.split_seed)
            return w.commit(**res)
