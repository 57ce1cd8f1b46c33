"""A third-party dataset plugin with its own prepare step, as a pip package would ship it (entry-point test):
``amisbench data prepare toyset --from DIR --out OUT`` converts ``DIR/images.npy`` (N,C,H,W float in [0, 1])
and ``DIR/masks.npy`` (N,A,H,W 0/1) into the prepared layout, with nothing edited in amisbench."""

from dataclasses import dataclass

import numpy as np

from amisbench.datasets._adapter import PreparedConfig, PreparedDataset
from amisbench.datasets._layout import PreparedWriter, group_split
from amisbench.errors import UserError


@dataclass
class ToyConfig(PreparedConfig):
    val_fraction: float = 0.25
    test_fraction: float = 0.25


class ToySet(PreparedDataset):
    """Toy images with their readers' masks, from `amisbench data prepare toyset` (a pair of .npy files)."""

    Config = ToyConfig
    kind = "toyset"

    @classmethod
    def prepare(cls, src, out, progress):
        arrays = []
        for name in ("images.npy", "masks.npy"):
            if not (src / name).is_file():
                raise UserError(f"--from {src}: expected a folder with images.npy and masks.npy")
            arrays.append(np.load(src / name, allow_pickle=False))
        images, masks = arrays
        if images.ndim != 4 or masks.ndim != 4 or len(images) != len(masks) or images.shape[2:] != masks.shape[2:]:
            raise UserError(f"--from {src}: expected images (N,C,H,W) and masks (N,A,H,W) of the same N, H, W")
        c = cls.Config()
        advance = progress.task("toyset", len(images))
        with PreparedWriter(out, cls.kind) as w:
            w.allocate(len(images), images.shape[1:], masks.shape[1], np.float32)
            w.images[:] = images
            w.masks[:] = masks > 0
            advance(len(images))
            meta = [{"id": f"toy{i:03d}", "group": f"toy{i:03d}", "patient": "", "series": "",
                     "readers": masks.shape[1], "source_key": str(i), "source_split": "", "source_index": i,
                     "extra": ""} for i in range(len(images))]
            split = group_split([m["group"] for m in meta], c.val_fraction, c.test_fraction, c.split_seed)
            return w.commit(meta=meta, source={"format": "toy-npy", "name": src.name}, image_scale=1.0,
                            protocols={"clean": {"split": split, "params": {"method": "group"}, "label": ""}})
