"""The built-in synthetic dataset: procedural lesions whose reader distribution is known exactly.

Every image is a blurred, noisy picture of one lesion made of

* a **core** ellipse that every reader who marks anything includes;
* zero to two fainter **lobes** attached to the core; reader r includes lobe k independently with
  probability ``p_k``, an increasing function of the lobe's contrast (faint lobes are included rarely);
* a **rare mode**: a small faint satellite blob next to the lesion that a reader marks (as well) with
  probability ``rare_prob`` (default 0.08);
* **boundary jitter**: each reader scales every ellipse by a factor ``exp(N(0, jitter))``;
* **readers who mark nothing**, with a probability that grows as the core gets fainter.

All of it is a deterministic function of ``(seed, index)``; the reader masks of an image are one draw of
that distribution with a generator seeded from the index, and :meth:`Synthetic.true_masks` draws any
number of further masks from it (the suite scores ``GED_true_100`` against them, which no real dataset
allows). Images come in groups (several "slices" of one "patient" share the lesion's geometry); splits
cut only between groups.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from amisbench.api import DataSpec, Sample
from amisbench.errors import UserError
from amisbench.registry import register_dataset


@dataclass
class SyntheticConfig:
    size: int = 64
    readers: int = 4
    train_groups: int = 200
    val_groups: int = 20
    test_groups: int = 40
    images_per_group: int = 2
    seed: int = 0  # the data's seed: the same for every run and method
    rare_prob: float = 0.08
    jitter: float = 0.08
    noise: float = 0.08


@dataclass(frozen=True)
class Lesion:
    """Latent description of one image's lesion (pixel units)."""

    core: tuple[float, float, float, float, float]  # cy, cx, ry, rx, angle
    core_contrast: float
    lobes: tuple[tuple[tuple[float, float, float, float, float], float, float], ...]  # (ellipse, contrast, p)
    rare: tuple[float, float, float, float, float]
    rare_contrast: float
    p_empty: float


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _ellipse(size: int, e: tuple[float, float, float, float, float], scale: float = 1.0) -> np.ndarray:
    cy, cx, ry, rx, ang = e
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(ang), math.sin(ang)
    u = (c * dx + s * dy) / (rx * scale)
    v = (-s * dx + c * dy) / (ry * scale)
    return (u * u + v * v) <= 1.0


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, r, mode="reflect")
    tmp = np.apply_along_axis(lambda row: np.convolve(row, k, mode="valid"), 1, pad)
    return np.apply_along_axis(lambda col: np.convolve(col, k, mode="valid"), 0, tmp)


@register_dataset("synthetic")
class Synthetic:
    """Procedural lesions with a known reader distribution (core, optional lobes, rare mode, empties)."""

    Config = SyntheticConfig

    def __init__(self, cfg: SyntheticConfig, split: str = "train"):
        if split not in ("train", "val", "test"):
            raise UserError(f"synthetic: unknown split '{split}'; known: train, val, test")
        if cfg.size < 16:
            raise UserError(f"dataset.size: expected at least 16 pixels, got {cfg.size}")
        if cfg.readers < 1 or cfg.images_per_group < 1:
            raise UserError("dataset.readers and dataset.images_per_group must be at least 1")
        self.cfg = cfg
        self.split = split
        g0 = {"train": 0, "val": cfg.train_groups, "test": cfg.train_groups + cfg.val_groups}[split]
        ng = {"train": cfg.train_groups, "val": cfg.val_groups, "test": cfg.test_groups}[split]
        self.global_indices = list(range(g0 * cfg.images_per_group, (g0 + ng) * cfg.images_per_group))
        self.spec = DataSpec(channels=1, height=cfg.size, width=cfg.size, readers=cfg.readers,
                             name="synthetic")
        self._cache: dict[int, Sample] = {}

    def __len__(self) -> int:
        return len(self.global_indices)

    @property
    def ids(self) -> list[str]:
        return [f"syn-{i:06d}" for i in self.global_indices]

    @property
    def groups(self) -> list[str]:
        """Group (the lesion shared by a group's slices) of each image, in order."""
        return [self.group_of(gi) for gi in self.global_indices]

    def group_of(self, gi: int) -> str:
        return f"grp-{gi // self.cfg.images_per_group:05d}"

    # -- the generative model -------------------------------------------------------------------------
    def lesion(self, gi: int) -> Lesion:
        return _lesion(self.cfg.seed, gi, self.cfg.images_per_group, self.cfg.size, self.cfg.rare_prob)

    def _draw(self, les: Lesion, rng: np.random.Generator) -> np.ndarray:
        size, jit = self.cfg.size, self.cfg.jitter
        m = np.zeros((size, size), dtype=bool)
        if rng.random() < les.p_empty:
            return m
        m |= _ellipse(size, les.core, math.exp(rng.normal(0, jit)))
        for e, _, p in les.lobes:
            if rng.random() < p:
                m |= _ellipse(size, e, math.exp(rng.normal(0, jit)))
        if rng.random() < self.cfg.rare_prob:
            m |= _ellipse(size, les.rare, math.exp(rng.normal(0, jit)))
        return m

    def _image(self, gi: int, les: Lesion) -> np.ndarray:
        size = self.cfg.size
        rng = np.random.default_rng(_seed("image", self.cfg.seed, gi))
        img = np.zeros((size, size))
        img += les.core_contrast * _ellipse(size, les.core)
        for e, c, _ in les.lobes:
            img = np.maximum(img, c * _ellipse(size, e))
        img = np.maximum(img, les.rare_contrast * _ellipse(size, les.rare))
        background = _blur(rng.normal(0, 1, (size, size)), size / 16) * 0.6
        img = _blur(img, 1.0) + background * self.cfg.noise + rng.normal(0, self.cfg.noise, (size, size))
        return img.astype(np.float32)

    def true_masks(self, index: int, k: int, generator: np.random.Generator | torch.Generator | int | None = None
                   ) -> np.ndarray:
        """Draw ``k`` further reader masks of split-local ``index`` from the true distribution.

        Returns:
            uint8 (k,H,W) in {0,1}.
        """
        if isinstance(generator, torch.Generator):
            generator = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
        les = self.lesion(self.global_indices[index])
        return np.stack([self._draw(les, rng) for _ in range(k)]).astype(np.uint8)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index not in self._cache:
            gi = self.global_indices[index]
            les = self.lesion(gi)
            rng = np.random.default_rng(_seed("readers", self.cfg.seed, gi))
            masks = np.stack([self._draw(les, rng) for _ in range(self.cfg.readers)]).astype(np.uint8)
            self._cache[index] = {
                "image": torch.from_numpy(self._image(gi, les))[None],
                "masks": torch.from_numpy(masks),
                "id": f"syn-{gi:06d}",
                "group": self.group_of(gi),
            }
        return self._cache[index]


@lru_cache(maxsize=4096)
def _lesion(seed: int, gi: int, per_group: int, size: int, rare_prob: float) -> Lesion:
    group = gi // per_group
    g = np.random.default_rng(_seed("group", seed, group))  # geometry shared by a group's slices
    s = np.random.default_rng(_seed("slice", seed, gi))  # per-slice variation
    cy, cx = size / 2 + g.normal(0, size / 16, 2) + s.normal(0, size / 64, 2)
    r = size * g.uniform(0.08, 0.16) * s.uniform(0.9, 1.1)
    ry, rx = r * g.uniform(0.75, 1.25), r * g.uniform(0.75, 1.25)
    ang = g.uniform(0, math.pi)
    core = (cy, cx, ry, rx, ang)
    core_contrast = float(g.uniform(0.35, 1.0))
    lobes = []
    for _ in range(int(g.integers(0, 3))):
        theta = g.uniform(0, 2 * math.pi)
        d = 0.9 * min(ry, rx) + g.uniform(0, 0.4) * r
        lr = r * g.uniform(0.45, 0.8)
        e = (cy + d * math.sin(theta), cx + d * math.cos(theta), lr * g.uniform(0.8, 1.2), lr, g.uniform(0, math.pi))
        contrast = float(g.uniform(0.1, 0.6))
        p = float(np.clip(1.5 * contrast, 0.1, 0.9))  # fainter lobes are included less often
        lobes.append((e, contrast, p))
    theta = g.uniform(0, 2 * math.pi)
    d = 2.0 * r + g.uniform(0, 0.5) * r
    rr = r * 0.35
    rare = (cy + d * math.sin(theta), cx + d * math.cos(theta), rr, rr, 0.0)
    rare_contrast = 0.12
    p_empty = float(np.clip(0.05 + 0.4 * (1.0 - core_contrast), 0.05, 0.35))
    return Lesion(core, core_contrast, tuple(lobes), rare, rare_contrast, p_empty)
