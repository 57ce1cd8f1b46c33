"""Training augmentation (datasets/_augment.py): image and every reader mask move together, exactly for flips
and 90-degree rotations, up to interpolation for the resampling transforms; intensity transforms leave the
masks alone; the same seed gives the same result."""

import math

import pytest
import torch

from amisbench.datasets._augment import apply_augment, parse_augment
from amisbench.errors import UserError


def blobs(size=64, readers=3, seed=0):
    """Reader masks: ellipses of different sizes around a common centre, away from the border."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    masks = []
    for r in range(readers):
        cy, cx = size / 2 + 3 * torch.rand(2, generator=g) - 1.5
        ry, rx = size * (0.12 + 0.04 * r), size * (0.18 - 0.02 * r)
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
    return torch.stack(masks).to(torch.uint8)


def picture(masks, seed=1):
    """An image whose first channel is noise and whose other channels are the masks themselves."""
    noise = torch.rand((1, *masks.shape[-2:]), generator=torch.Generator().manual_seed(seed))
    return torch.cat([noise, masks.float()])


def iou(a, b):
    a, b = a.bool(), b.bool()
    return float((a & b).sum()) / max(1, float((a | b).sum()))


@pytest.mark.parametrize("spec", [["hflip"], ["vflip"], ["rot90"], ["hflip", "vflip", "rot90"],
                                  [{"hflip": 1.0}, {"vflip": 1.0}]])
def test_flips_and_rot90_keep_image_and_masks_exactly_aligned(spec):
    masks = blobs()
    image = picture(masks)
    t = parse_augment(spec)
    changed = 0
    for s in range(12):
        im, mk = apply_augment(t, image, masks, torch.Generator().manual_seed(s))
        assert mk.dtype == masks.dtype and mk.shape == masks.shape
        assert torch.equal(im[1:], mk.float())  # exact: no interpolation
        assert mk.sum() == masks.sum()
        changed += not torch.equal(mk, masks)
    assert changed > 0


def test_rot90_draws_each_quarter_turn():
    masks = blobs()
    seen = set()
    for s in range(40):
        _, mk = apply_augment(parse_augment(["rot90"]), picture(masks), masks, torch.Generator().manual_seed(s))
        seen.add(next(k for k in range(4) if torch.equal(mk, torch.rot90(masks, k, (-2, -1)))))
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("spec", [[{"rotate": 15}], [{"scale": [0.8, 1.25]}], [{"crop_scale": 12}],
                                  [{"elastic": {"alpha": 4, "sigma": 6}}],
                                  [{"random_apply": {"p": 1.0, "transforms": [{"rotate": 10}, {"crop_scale": 10}]}}],
                                  ["hflip", {"rotate": 20}, {"scale": [0.9, 1.1]}, {"elastic": {"alpha": 3,
                                                                                                 "sigma": 5}}]])
def test_interpolating_transforms_keep_masks_on_the_transformed_picture(spec):
    masks = blobs()
    image = picture(masks)
    t = parse_augment(spec)
    moved = 0
    for s in range(8):
        im, mk = apply_augment(t, image, masks, torch.Generator().manual_seed(s))
        assert mk.dtype == masks.dtype and set(mk.unique().tolist()) <= {0, 1}
        for a in range(masks.shape[0]):
            assert iou(mk[a], im[1 + a] >= 0.5) >= 0.98
        moved += iou(mk[0], masks[0]) < 0.99
    assert moved > 0  # the transform did move the masks


def test_masks_follow_the_image_not_the_identity():
    # the check above would fail for masks left in place: a 20-degree rotation of an elongated blob
    masks = blobs(readers=1)
    image = picture(masks)
    t = parse_augment([{"rotate": 30}])
    im, _ = apply_augment(t, image, masks, torch.Generator().manual_seed(3))
    assert iou(masks[0], im[1] >= 0.5) < 0.98


def test_intensity_jitter_leaves_masks_unchanged_and_changes_the_image():
    masks = blobs()
    grey = picture(masks)[:1]
    rgb = torch.rand((3, 64, 64), generator=torch.Generator().manual_seed(5))
    t = parse_augment([{"jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}}])
    for image in (grey, rgb):
        im, mk = apply_augment(t, image, masks, torch.Generator().manual_seed(0))
        assert mk is masks or torch.equal(mk, masks)
        assert im.shape == image.shape and not torch.allclose(im, image)
    # saturation and hue act on colour only: a grey RGB image keeps equal channels under them
    g3 = grey.expand(3, -1, -1).clone()
    im, _ = apply_augment(parse_augment([{"jitter": {"saturation": 0.5, "hue": 0.2}}]), g3, masks,
                          torch.Generator().manual_seed(1))
    assert torch.allclose(im, g3, atol=1e-5)


def test_brightness_factor_is_in_range():
    image = torch.full((1, 8, 8), 0.5)
    masks = torch.zeros((1, 8, 8), dtype=torch.uint8)
    t = parse_augment([{"jitter": {"brightness": 0.2}}])
    for s in range(20):
        im, _ = apply_augment(t, image, masks, torch.Generator().manual_seed(s))
        assert 0.5 * 0.8 - 1e-6 <= float(im[0, 0, 0]) <= 0.5 * 1.2 + 1e-6


def test_reproducible_from_the_seed():
    masks = blobs()
    image = picture(masks)
    t = parse_augment(["hflip", "vflip", "rot90", {"rotate": 15}, {"scale": [0.9, 1.1]}, {"crop_scale": 10},
                       {"elastic": {"alpha": 3, "sigma": 5}}, {"jitter": {"brightness": 0.3, "contrast": 0.3}}])
    a = apply_augment(t, image, masks, torch.Generator().manual_seed(7))
    b = apply_augment(t, image, masks, torch.Generator().manual_seed(7))
    c = apply_augment(t, image, masks, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_empty_list_is_no_augmentation():
    masks = blobs()
    image = picture(masks)
    im, mk = apply_augment(parse_augment([]), image, masks, torch.Generator().manual_seed(0))
    assert torch.equal(im, image) and torch.equal(mk, masks)


@pytest.mark.parametrize("bad, words", [
    (["shear"], "unknown transform 'shear'"),
    ([{"rotate": -3}], "non-negative angle"),
    ([{"scale": [1.2, 0.9]}], "0 < low <= high"),
    ([{"elastic": {"alpha": 3}}], "both alpha and sigma"),
    ([{"jitter": {"gamma": 1}}], "keys among"),
    ([{"hflip": 2}], "probability"),
    ("hflip", "expected a list"),
])
def test_bad_lists_name_the_item(bad, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        parse_augment(bad, "train.main.augment")


def test_crop_scale_zooms_by_the_release_range():
    # a centred square of side 32 in 64 px: after a crop of side r it covers 32 * 64 / r pixels per side
    masks = torch.zeros((1, 64, 64), dtype=torch.uint8)
    masks[0, 16:48, 16:48] = 1
    t = parse_augment([{"crop_scale": 16}])
    for s in range(10):
        _, mk = apply_augment(t, picture(masks), masks, torch.Generator().manual_seed(s))
        side = math.sqrt(float(mk.sum()))
        assert 32 - 1.5 <= side <= 32 * 64 / 48 + 1.5
