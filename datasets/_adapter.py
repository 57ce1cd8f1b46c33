"""The shared dataset adapter over a prepared folder (see :mod:`._layout`); ``lidc`` and ``isic3`` subclass it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from amisbench.api import DataSpec, Sample
from amisbench.errors import UserError

from ._augment import augment as _augment
from ._layout import SPLITS, Prepared, group_split, split_hash

Split = Callable[[int], dict[str, list[int]]]


@dataclass
class PreparedConfig:
    """The ``dataset.*`` settings of every prepared dataset; an adapter's ``Config`` subclasses it, naming its
    protocols and changing the defaults that differ (``LIDCConfig``, ``ISIC3Config``)."""

    root: str = ""  # the prepared folder (``--data-root``)
    protocol: str = "clean"
    val_fraction: float = 0.15  # clean split: fractions of the images, whole groups (patients) each
    test_fraction: float = 0.15
    split_seed: int = 0
    size: int = 0  # 0: the native size; otherwise resize (image bilinear, masks by majority)
    hflip: bool = False  # training augmentation: flips, rotation in +-rotate_deg, scale in scale_range
    vflip: bool = False
    rotate_deg: float = 0.0
    scale_range: tuple[float, float] = (1.0, 1.0)
    verify: bool = True  # hash every prepared file against the manifest (once per process)


class PreparedDataset:
    """Reads one split of a prepared folder; subclasses set the class attributes below.

    Class attributes:
        kind: the prepared kind (``lidc``, ``isic3``), also the registry name.
        protocol_labels: protocol -> the label that every result and table of that protocol carries
            (only protocols that are not a clean random split have one).
        fixed_splits: protocol -> the function of the row count that gives its split (a release's split);
            computed on load, so a folder prepared by an older version gets the same lists.
        computed_protocols: protocols that need nothing stored (any prepared folder of this kind has them).
        stage_subsets: protocol -> {stage: function of the row count giving the rows that stage trains on}
            (the ATFM release trains GTR on a part of its SFM training rows).
    """

    kind: ClassVar[str] = ""
    protocol_labels: ClassVar[dict[str, str]] = {}
    fixed_splits: ClassVar[dict[str, Split]] = {}
    computed_protocols: ClassVar[tuple[str, ...]] = ()
    stage_subsets: ClassVar[dict[str, dict[str, Callable[[int], list[int]]]]] = {}

    def __init__(self, cfg: Any, split: str = "train"):
        if split not in SPLITS:
            raise UserError(f"{self.kind}: unknown split '{split}'; known: {', '.join(SPLITS)}")
        if not cfg.root:
            raise UserError(f"dataset.root is not set: prepare the data once with `amisbench data prepare "
                            f"{self.kind} --from SOURCE --out DIR` and pass `--data-root DIR`")
        if cfg.size < 0:
            raise UserError(f"dataset.size: expected 0 (native resolution) or a positive size, got {cfg.size}")
        check_augment_config(cfg)
        self.cfg = cfg
        self.split = split
        self.protocol = cfg.protocol
        self.data = Prepared(cfg.root, self.kind, verify=cfg.verify)
        self.rows = self._split_rows()
        if not self.rows:
            raise UserError(f"{self.kind}: the {split} split of protocol '{self.protocol}' in {self.data.root} is "
                            "empty")
        info = self.data.manifest["image"]
        h = w = cfg.size
        if not cfg.size:
            h, w = info["height"], info["width"]
        self.spec = DataSpec(channels=info["channels"], height=h, width=w, readers=self.data.manifest["readers"],
                             name=self.kind)

    # -- splits -------------------------------------------------------------------------------------------
    def _split_rows(self) -> list[int]:
        data, p = self.data, self.protocol
        if p not in data.protocols and p not in self.computed_protocols:
            raise UserError(f"protocol '{p}' is not available for {data.root} (prepared from a "
                            f"{data.source_format} source); available: {', '.join(data.protocols)}")
        fixed = self.fixed_splits.get(p)
        stored = data.manifest["protocols"].get(p, {}).get("params", {})
        method = stored.get("method")
        if fixed is not None or method != "group":  # a fixed split: a release's, or the source's own
            defaults = type(self.cfg)()
            changed = [k for k in ("val_fraction", "test_fraction", "split_seed")
                       if getattr(self.cfg, k) != getattr(defaults, k)]
            if changed:
                why = f"is a fixed release split ({p})" if fixed is not None else \
                    f"keeps the split stored in its {data.source_format} source"
                raise UserError(f"dataset.{changed[0]} does not apply: protocol '{p}' of {data.root} {why}")
            if fixed is not None:
                return self._entries(fixed(len(data.ids))[self.split])
            return self._entries(data.rows(data.split_file(p, self.split)))
        wanted = {"method": method, "val_fraction": self.cfg.val_fraction,
                  "test_fraction": self.cfg.test_fraction, "seed": self.cfg.split_seed}
        if wanted != stored:  # the configured fractions/seed differ from the prepared default: computed here
            split = group_split(data.groups, self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.split_seed)
            return self._entries(split[self.split])
        return self._entries(data.rows(data.split_file(p, self.split)))

    def _entries(self, rows: list[int]) -> list[int]:
        """Rows once per image, or once per (image, reader) entry (``entries`` of ISIC3: the releases'
        style-concatenated loaders list every image once per annotation style, style by style)."""
        mode = getattr(self.cfg, "entries", "none")
        if mode == "all" or (mode == "train" and self.split == "train"):
            return [r for _ in range(self.data.manifest["readers"]) for r in rows]
        return rows

    def stage_rows(self, stage: str) -> list[int] | None:
        """Positions in this split that training stage ``stage`` uses, or None for all of them."""
        make = self.stage_subsets.get(self.protocol, {}).get(stage)
        if make is None or self.split != "train":
            return None
        keep = set(make(len(self.data.ids)))
        return [k for k, r in enumerate(self.rows) if r in keep]

    @property
    def ids(self) -> list[str]:
        """IDs of this split, in order."""
        return [self.data.ids[r] for r in self.rows]

    @property
    def groups(self) -> list[str]:
        """Group (patient, series or image) of each sample of this split."""
        return [self.data.groups[r] for r in self.rows]

    @property
    def split_hash(self) -> str:
        """sha256 of this split's ID list (one id a line), recorded by the runner."""
        return split_hash(self.ids)

    @property
    def protocol_label(self) -> str:
        """The label of a leaky protocol, or '' for a clean one."""
        return self.protocol_labels.get(self.protocol, "")

    # -- samples ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self.rows):
            raise IndexError(index)
        r = self.rows[index]
        image = np.asarray(self.data.images[r], dtype=np.float32)
        if self.data.image_scale != 1.0:
            image = image * np.float32(self.data.image_scale)
        img = torch.from_numpy(np.array(image, dtype=np.float32))
        masks = torch.from_numpy(np.array(self.data.masks[r], dtype=np.uint8))
        if self.cfg.size and tuple(img.shape[-2:]) != (self.cfg.size, self.cfg.size):
            img, masks = _resize(img, masks, self.cfg.size)
        return {"image": img, "masks": masks, "id": self.data.ids[r], "group": self.data.groups[r]}

    def augment(self, image: Tensor, masks: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Random training augmentation of one sample (config: hflip, vflip, rotate_deg, scale_range)."""
        c = self.cfg
        return _augment(image, masks, generator, hflip=c.hflip, vflip=c.vflip, rotate_deg=c.rotate_deg,
                        scale_range=tuple(c.scale_range))


def _resize(image: Tensor, masks: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Image: bilinear with antialiasing; masks: area average thresholded at 1/2 (a per-pixel majority)."""
    img = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    m = F.interpolate(masks[None].float(), size=(size, size), mode="area")[0]
    return img, (m >= 0.5).to(torch.uint8)


def check_augment_config(cfg: Any) -> None:
    lo, hi = cfg.scale_range
    if not (0 < lo <= hi):
        raise UserError(f"dataset.scale_range: expected 0 < low <= high, got {list(cfg.scale_range)}")
    if cfg.rotate_deg < 0:
        raise UserError(f"dataset.rotate_deg: expected a non-negative angle, got {cfg.rotate_deg}")
