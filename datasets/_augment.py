"""Training-time augmentation of one sample, applied alike to the image and every reader mask.

Two entry points:

* :func:`augment`: the datasets' built-in default (``dataset.hflip``, ``vflip``, ``rotate_deg``,
  ``scale_range``), used when a stage sets no ``augment`` list;
* :func:`parse_augment` / :func:`apply_augment`: the per-method list ``train.<stage>.augment`` (the
  releases' sets; ``[]`` is no augmentation). Items, applied in the order given:

  - ``hflip`` / ``vflip`` (or ``{hflip: p}``): flip left-right / up-down with probability p (default 1/2);
  - ``rot90``: rotate by k x 90 degrees, k uniform in 0..3 (exact, no interpolation);
  - ``{rotate: D}``: rotation by an angle uniform in [-D, D] degrees;
  - ``{scale: [lo, hi]}``: isotropic zoom by a factor uniform in [lo, hi] (> 1 enlarges the content);
  - ``{crop_scale: O}``: PHiSeg-code's scale augmentation (``data/batch_provider.py``, ``do_scaleaug``): a
    square of side n - k (k uniform integer in 0..O) at a uniform integer position, resized back to n x n;
  - ``{random_apply: {p: P, transforms: [...]}}``: the listed transforms together with probability P (the
    PHiSeg-code batch provider rotates and scales half of the images: ``augment_every_nth`` = 2);
  - ``{elastic: {alpha: A, sigma: S}}``: a smooth random displacement field, white noise blurred by a
    Gaussian of S pixels and scaled so that its largest component is A pixels;
  - ``{jitter: {brightness: b, contrast: c, saturation: s, hue: h}}``: intensity only (masks untouched),
    factors uniform in [1 - b, 1 + b] etc. as torchvision's ColorJitter, in a fixed order; saturation and hue
    act on 3-channel images only.

Interpolating transforms resample the image bilinearly (border padding) and the masks bilinearly then
threshold at 1/2 (zero padding), so a mask and a picture of it stay aligned to within the threshold.

A pure function of the generator: the same generator state gives the same transform on CPU or GPU, and each
transform draws a fixed number of values whatever the image holds, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from amisbench.errors import UserError


def _uniform(n: int, generator: torch.Generator | None) -> list[float]:
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=dev, dtype=torch.float64).tolist()


def _resample(image: Tensor, masks: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """Image bilinear with border padding; masks bilinear with zero padding, thresholded at 1/2."""
    g = grid.to(device=image.device, dtype=torch.float32)
    img = F.grid_sample(image[None].float(), g, mode="bilinear", padding_mode="border", align_corners=False)[0]
    m = F.grid_sample(masks[None].float(), g.to(masks.device), mode="bilinear", padding_mode="zeros",
                      align_corners=False)[0]
    return img.to(image.dtype), (m >= 0.5).to(masks.dtype)


def _affine_grid(angle: float, scale: float, h: int, w: int) -> Tensor:
    # affine_grid maps output coordinates to input coordinates: rotate back by -angle and shrink by 1/scale.
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=torch.float32)[None]
    return F.affine_grid(theta, [1, 1, h, w], align_corners=False)


def augment(image: Tensor, masks: Tensor, generator: torch.Generator | None, *, hflip: bool = False,
            vflip: bool = False, rotate_deg: float = 0.0, scale_range: tuple[float, float] = (1.0, 1.0)
            ) -> tuple[Tensor, Tensor]:
    """Apply one random flip/rotation/scale to an image and all its reader masks alike (the datasets' default).

    Args:
        image: float (C,H,W).
        masks: (A,H,W), uint8/bool/float in {0,1}; returned with the same dtype.
        generator: the source of randomness (on any device).
        hflip, vflip: flip left-right / up-down, each with probability 1/2.
        rotate_deg: rotation angle drawn uniformly in [-rotate_deg, rotate_deg].
        scale_range: zoom factor drawn uniformly in this range (> 1 enlarges the content).
    """
    lo, hi = scale_range
    if not (hflip or vflip or rotate_deg or lo != 1.0 or hi != 1.0):
        return image, masks
    u = _uniform(4, generator)
    if hflip and u[0] < 0.5:
        image, masks = image.flip(-1), masks.flip(-1)
    if vflip and u[1] < 0.5:
        image, masks = image.flip(-2), masks.flip(-2)
    angle = math.radians(rotate_deg * (2.0 * u[2] - 1.0))
    scale = lo + (hi - lo) * u[3]
    if angle == 0.0 and scale == 1.0:
        return image, masks
    return _resample(image, masks, _affine_grid(angle, scale, *image.shape[-2:]))


# ----------------------------------------------------------------------------------------------------
# the per-method pipeline
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transform:
    """One parsed item of an ``augment`` list."""

    kind: str  # hflip, vflip, rot90, rotate, scale, crop_scale, random_apply, elastic, jitter
    params: tuple[tuple[str, float], ...] = ()
    inner: tuple["Transform", ...] = ()  # random_apply only

    def p(self, key: str) -> float:
        return dict(self.params)[key]

    def describe(self) -> str:
        if self.kind == "random_apply":
            return f"with p={self.p('p'):g}: [" + ", ".join(t.describe() for t in self.inner) + "]"
        if not self.params:
            return self.kind
        return f"{self.kind}(" + ", ".join(f"{k}={v:g}" for k, v in self.params) + ")"


_KEYS = {"hflip": ("p",), "vflip": ("p",), "rot90": (), "rotate": ("degrees",), "scale": ("low", "high"),
         "crop_scale": ("offset",), "random_apply": ("p", "transforms"), "elastic": ("alpha", "sigma"),
         "jitter": ("brightness", "contrast", "saturation", "hue")}


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{where}: expected a number, got {v!r}")
    return float(v)


def parse_augment(items: Any, where: str = "augment") -> tuple[Transform, ...]:
    """Validate an ``augment`` list (see the module docstring) into transforms; a UserError names the item."""
    if not isinstance(items, (list, tuple)):
        raise UserError(f"{where}: expected a list of transforms ({', '.join(_KEYS)}), got {items!r}")
    out = []
    for i, item in enumerate(items):
        w = f"{where}[{i}]"
        if isinstance(item, str):
            kind, arg = item, None
        elif isinstance(item, dict) and len(item) == 1:
            kind, arg = next(iter(item.items()))
        else:
            raise UserError(f"{w}: expected a name or a one-key mapping such as {{rotate: 15}}, got {item!r}")
        if kind not in _KEYS:
            raise UserError(f"{w}: unknown transform '{kind}'; known: {', '.join(_KEYS)}")
        if kind in ("hflip", "vflip"):
            p = 0.5 if arg is None else _number(arg, w)
            if not 0 <= p <= 1:
                raise UserError(f"{w}: expected a probability in [0, 1], got {arg!r}")
            params: tuple = (("p", p),)
        elif kind == "rot90":
            if arg is not None:
                raise UserError(f"{w}: rot90 takes no value, got {arg!r}")
            params = ()
        elif kind == "crop_scale":
            o = _number(arg, w)
            if o < 0 or not o.is_integer():
                raise UserError(f"{w}: expected a non-negative whole number of pixels, got {arg!r}")
            params = (("offset", o),)
        elif kind == "random_apply":
            if not isinstance(arg, dict) or set(arg) != {"p", "transforms"}:
                raise UserError(f"{w}: expected {{p: probability, transforms: [...]}}, got {arg!r}")
            p = _number(arg["p"], f"{w}.p")
            if not 0 <= p <= 1:
                raise UserError(f"{w}.p: expected a probability in [0, 1], got {arg['p']!r}")
            out.append(Transform(kind, (("p", p),), parse_augment(arg["transforms"], f"{w}.transforms")))
            continue
        elif kind == "rotate":
            d = _number(arg, w)
            if d < 0:
                raise UserError(f"{w}: expected a non-negative angle in degrees, got {arg!r}")
            params = (("degrees", d),)
        elif kind == "scale":
            if not isinstance(arg, (list, tuple)) or len(arg) != 2:
                raise UserError(f"{w}: expected [low, high], got {arg!r}")
            lo, hi = (_number(v, w) for v in arg)
            if not 0 < lo <= hi:
                raise UserError(f"{w}: expected 0 < low <= high, got {list(arg)}")
            params = (("low", lo), ("high", hi))
        else:
            if not isinstance(arg, dict) or not set(arg) <= set(_KEYS[kind]):
                raise UserError(f"{w}: expected a mapping with keys among {', '.join(_KEYS[kind])}, got {arg!r}")
            vals = {k: _number(arg.get(k, 0.0), f"{w}.{k}") for k in _KEYS[kind]}
            if any(v < 0 for v in vals.values()):
                raise UserError(f"{w}: expected non-negative values, got {arg!r}")
            if kind == "elastic" and (vals["alpha"] > 0) != (vals["sigma"] > 0):
                raise UserError(f"{w}: set both alpha and sigma (pixels), got {arg!r}")
            if kind == "jitter" and (vals["brightness"] > 1 or vals["contrast"] > 1 or vals["saturation"] > 1
                                     or vals["hue"] > 0.5):
                raise UserError(f"{w}: expected brightness, contrast, saturation in [0, 1] and hue in "
                                f"[0, 0.5], got {arg!r}")
            params = tuple(vals.items())
        out.append(Transform(kind, params))
    return tuple(out)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N,H,W) with reflect padding."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    h = x[:, None]
    h = F.conv2d(F.pad(h, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    h = F.conv2d(F.pad(h, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return h[:, 0]


def _identity_grid(h: int, w: int) -> Tensor:
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)[None]  # (1,H,W,2), grid_sample's (x, y) order


def _affine_map(a: float, b: float, c: float, d: float, e: float, f: float):
    """Output -> input coordinates (normalised): x' = a x + b y + c, y' = d x + e y + f."""
    return lambda g: torch.stack([a * g[..., 0] + b * g[..., 1] + c, d * g[..., 0] + e * g[..., 1] + f], dim=-1)


def _elastic_map(h: int, w: int, alpha: float, sigma: float, generator: torch.Generator | None):
    dev = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand((2, h, w), generator=generator, device=dev, dtype=torch.float32).cpu() * 2 - 1
    field = _gaussian_blur(noise, sigma)
    field = field / field.abs().amax().clamp_min(1e-12) * alpha  # pixels
    field = torch.stack([field[0] * 2 / w, field[1] * 2 / h])[None]  # normalised (1,2,H,W)

    def move(g: Tensor) -> Tensor:
        d = F.grid_sample(field, g, mode="bilinear", padding_mode="border", align_corners=False)[0]
        return g + d.permute(1, 2, 0)[None]

    return move


def _grey(img: Tensor) -> Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def _hue_shift(img: Tensor, shift: float) -> Tensor:
    """Rotate the hue of an RGB image by ``shift`` turns (a rotation about the grey axis in RGB space)."""
    a = 2 * math.pi * shift
    c, s = math.cos(a), math.sin(a)
    k = 1.0 / 3.0
    sq = math.sqrt(k)
    m = torch.tensor([[c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
                      [k * (1 - c) + sq * s, c + (1 - c) * k, k * (1 - c) - sq * s],
                      [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + (1 - c) * k]], dtype=img.dtype,
                     device=img.device)
    return torch.einsum("ij,jhw->ihw", m, img)


def _jitter(img: Tensor, t: Transform, u: list[float]) -> Tensor:
    b, c, s, hue = (t.p(k) for k in ("brightness", "contrast", "saturation", "hue"))
    x = img.float()
    if b:
        x = x * (1 - b + 2 * b * u[0])
    if c:
        mean = (_grey(x) if x.shape[0] == 3 else x).mean()
        x = (x - mean) * (1 - c + 2 * c * u[1]) + mean
    if x.shape[0] == 3:
        if s:
            g = _grey(x)
            x = (x - g) * (1 - s + 2 * s * u[2]) + g
        if hue:
            x = _hue_shift(x, hue * (2 * u[3] - 1))
    return x.to(img.dtype)


def _steps(transforms: tuple[Transform, ...], h: int, w: int, generator: torch.Generator | None):
    """The transforms in order as ("exact" | "map" | "intensity", function), drawing their randomness in order."""
    for t in transforms:
        if t.kind in ("hflip", "vflip"):
            if _uniform(1, generator)[0] < t.p("p"):
                dim = -1 if t.kind == "hflip" else -2
                yield "exact", lambda x, dim=dim: x.flip(dim)
        elif t.kind == "rot90":
            k = min(3, int(_uniform(1, generator)[0] * 4))
            if k:
                yield "exact", lambda x, k=k: torch.rot90(x, k, (-2, -1))
        elif t.kind == "rotate":
            angle = math.radians(t.p("degrees") * (2 * _uniform(1, generator)[0] - 1))
            if angle:  # output -> input: rotate back by -angle
                c, s = math.cos(angle), math.sin(angle)
                yield "map", _affine_map(c, -s, 0.0, s, c, 0.0)
        elif t.kind == "scale":
            lo, hi = t.p("low"), t.p("high")
            z = lo + (hi - lo) * _uniform(1, generator)[0]
            if z != 1.0:
                yield "map", _affine_map(1 / z, 0.0, 0.0, 0.0, 1 / z, 0.0)
        elif t.kind == "crop_scale":
            o = int(t.p("offset"))
            u = _uniform(3, generator)
            r = h - min(o, int(u[0] * (o + 1)))  # side of the square, as np.random.random_integers(n - o, n)
            px, py = min(w - r, int(u[1] * (w - r + 1))), min(h - r, int(u[2] * (h - r + 1)))
            if r != h or px or py:  # output pixel centres -> the crop [px, px + r) x [py, py + r)
                yield "map", _affine_map(r / w, 0.0, (2 * px + r) / w - 1, 0.0, r / h, (2 * py + r) / h - 1)
        elif t.kind == "random_apply":
            if _uniform(1, generator)[0] < t.p("p"):
                yield from _steps(t.inner, h, w, generator)
        elif t.kind == "elastic":
            if t.p("alpha") > 0:
                yield "map", _elastic_map(h, w, t.p("alpha"), t.p("sigma"), generator)
        else:
            u = _uniform(4, generator)
            yield "intensity", lambda x, t=t, u=u: _jitter(x, t, u)


def apply_augment(transforms: tuple[Transform, ...], image: Tensor, masks: Tensor,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Apply a parsed ``augment`` list to an image (C,H,W) and its reader masks (A,H,W) alike.

    Consecutive resampling transforms are composed into one sampling grid, so the image and the masks are
    interpolated once per run of them, not once per transform.
    """
    h, w = image.shape[-2:]
    maps: list = []

    def flush(image: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        if not maps:
            return image, masks
        g = _identity_grid(h, w)
        for m in reversed(maps):  # output -> ... -> input: the last transform's map is applied first
            g = m(g)
        maps.clear()
        return _resample(image, masks, g)

    for kind, fn in _steps(transforms, h, w, generator):
        if kind == "map":
            maps.append(fn)
            continue
        image, masks = flush(image, masks)
        if kind == "exact":
            image, masks = fn(image), fn(masks)
        else:
            image = fn(image)
    return flush(image, masks)
