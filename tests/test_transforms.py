"""Transforms of spec hhcl §1.4: the train pipeline's steps and order, RandomErasing's rule, the
deterministic test pipeline."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from reidkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomErasing,
    denormalize,
    train_transform,
)
from reidkit.data.transforms import test_transform as eval_transform  # not collected as a test

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def random_image(seed=0, size=(64, 128)) -> Image.Image:
    """A random RGB PIL image of ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def constant_image(rgb=(200, 100, 50), size=(64, 128)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def to_normalised(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - MEAN) / STD


# ---------------------------------------------------------------------------------------------
# pipeline composition

def test_train_transform_steps_in_reference_order():
    steps = train_transform().transforms
    assert [type(s) for s in steps] == [T.Resize, T.RandomHorizontalFlip, T.Pad, T.RandomCrop, T.ToTensor,
                                        T.Normalize, RandomErasing]
    resize, flip, pad, crop, _, norm, erase = steps
    assert tuple(resize.size) == (256, 128)
    assert resize.interpolation == T.InterpolationMode.BICUBIC
    assert flip.p == 0.5
    assert pad.padding == 10 and pad.fill == 0
    assert tuple(crop.size) == (256, 128)
    assert tuple(norm.mean) == IMAGENET_MEAN and tuple(norm.std) == IMAGENET_STD
    assert (erase.p, erase.sl, erase.sh, erase.r1, erase.attempts) == (0.5, 0.02, 0.4, 0.3, 100)
    assert erase.fill == (0.485, 0.456, 0.406)


def test_train_transform_options_remove_steps():
    steps = train_transform(flip=False, pad=0, erasing_p=0).transforms
    assert [type(s) for s in steps] == [T.Resize, T.ToTensor, T.Normalize]


def test_test_transform_steps():
    steps = eval_transform().transforms
    assert [type(s) for s in steps] == [T.Resize, T.ToTensor, T.Normalize]
    assert steps[0].interpolation == T.InterpolationMode.BICUBIC
    assert tuple(steps[0].size) == (256, 128)


# ---------------------------------------------------------------------------------------------
# outputs

def test_train_transform_output_shape_and_normalisation():
    torch.manual_seed(0)
    random.seed(0)
    out = train_transform()(random_image(1, size=(50, 140)))
    assert out.shape == (3, 256, 128) and out.dtype == torch.float32
    # a constant image with no flip/crop/erasing: exactly the ImageNet normalisation of its colour
    out = train_transform(flip=False, pad=0, erasing_p=0)(constant_image((200, 100, 50)))
    expected = (torch.tensor([200, 100, 50], dtype=torch.float32) / 255 - torch.tensor(IMAGENET_MEAN)) \
        / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out, expected.view(3, 1, 1).expand(3, 256, 128), atol=1e-6)
    assert torch.allclose(denormalize(out)[:, 0, 0], torch.tensor([200, 100, 50]) / 255, atol=1e-6)


def test_test_transform_is_bicubic_resize_then_normalise_and_deterministic():
    img = random_image(2, size=(60, 150))
    tf = eval_transform()
    a, b = tf(img), tf(img)
    assert a.shape == (3, 256, 128)
    assert torch.equal(a, b)
    expected = to_normalised(img.resize((128, 256), Image.BICUBIC))
    assert torch.allclose(a, expected, atol=1e-6)
    # bilinear would differ: the interpolation really is bicubic
    assert not torch.allclose(a, to_normalised(img.resize((128, 256), Image.BILINEAR)), atol=1e-3)


def test_train_transform_resize_is_bicubic():
    img = random_image(3, size=(60, 150))
    out = train_transform(flip=False, pad=0, erasing_p=0)(img)
    assert torch.allclose(out, eval_transform()(img), atol=1e-6)


def test_flip_gives_the_image_or_its_mirror_and_both_occur():
    img = random_image(4)
    plain = train_transform(flip=False, pad=0, erasing_p=0)(img)
    mirror = torch.flip(plain, dims=[2])
    tf = train_transform(pad=0, erasing_p=0)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = tf(img)
        if torch.equal(out, plain):
            seen.add("plain")
        elif torch.equal(out, mirror):
            seen.add("mirror")
        else:
            pytest.fail("flip output is neither the image nor its mirror")
    assert seen == {"plain", "mirror"}


def test_pad_10_then_random_crop_shifts_by_at_most_10_with_zero_border():
    # a constant image: after pad+crop every column/row is either the colour or the zero padding
    tf = train_transform(flip=False, erasing_p=0)
    colour = to_normalised(constant_image((200, 100, 50), size=(128, 256)))[:, 0, 0]
    pad_value = (torch.zeros(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    shifted = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = tf(constant_image((200, 100, 50)))
        assert out.shape == (3, 256, 128)
        is_pad = torch.isclose(out, pad_value.view(3, 1, 1), atol=1e-5).all(0)
        is_col = torch.isclose(out, colour.view(3, 1, 1), atol=1e-5).all(0)
        assert (is_pad | is_col).all()
        rows = is_col.any(1).nonzero().flatten()
        cols = is_col.any(0).nonzero().flatten()
        # the image region is one contiguous block, missing at most 10 rows / columns
        assert len(rows) >= 246 and len(cols) >= 118
        assert bool(is_col[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all())
        shifted += int(is_pad.any())
    assert shifted > 0  # the padding does show up


# ---------------------------------------------------------------------------------------------
# RandomErasing

def erased_rectangle(before: torch.Tensor, after: torch.Tensor, fill) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the changed region; asserts it is one filled rectangle."""
    changed = (before != after).any(0)
    ys, xs = changed.nonzero(as_tuple=True)
    assert len(ys) > 0, "nothing erased"
    top, left = int(ys.min()), int(xs.min())
    h, w = int(ys.max()) - top + 1, int(xs.max()) - left + 1
    assert int(changed.sum()) == h * w, "the erased region is not a rectangle"
    for c in range(3):
        region = after[c, top:top + h, left:left + w]
        assert torch.all(region == torch.tensor(fill[c], dtype=after.dtype)), f"channel {c} fill"
    outside = ~changed
    assert torch.equal(after[:, outside], before[:, outside])
    return top, left, h, w


def test_random_erasing_p1_fills_one_rectangle_with_the_reference_constants():
    erase = RandomErasing(p=1.0)
    height, width = 256, 128
    area = height * width
    fractions, aspects = [], []
    gen = torch.Generator().manual_seed(0)
    random.seed(0)
    img = torch.randn(3, height, width, generator=gen)  # no value equals a fill constant
    before = img.clone()
    for i in range(100):
        out = erase(img)
        assert torch.equal(img, before), "the input must not be modified in place"
        _, _, h, w = erased_rectangle(before, out, (0.485, 0.456, 0.406))
        # h = round(sqrt(target * aspect)), w = round(sqrt(target / aspect)): undo the rounding exactly
        assert (h + 0.5) * (w + 0.5) >= 0.02 * area
        assert (h - 0.5) * (w - 0.5) <= 0.4 * area
        assert (h + 0.5) / (w - 0.5) >= 0.3
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3
        assert h < height and w < width
        fractions.append(h * w / area)
        aspects.append(h / w)
    # the draws cover the ranges
    assert min(fractions) < 0.06 and max(fractions) > 0.3
    assert min(aspects) < 0.5 and max(aspects) > 2.0


def test_random_erasing_fill_is_not_renormalised():
    # after train_transform's Normalize, the fill stays the raw constants 0.485/0.456/0.406
    random.seed(1)
    torch.manual_seed(1)
    img = random_image(5)
    base = train_transform(flip=False, pad=0, erasing_p=0)(img)
    out = train_transform(flip=False, pad=0, erasing_p=1.0)(img)
    erased_rectangle(base, out, IMAGENET_MEAN)


def test_random_erasing_p0_leaves_image_unchanged():
    erase = RandomErasing(p=0.0)
    img = torch.randn(3, 256, 128)
    for _ in range(20):
        assert torch.equal(erase(img), img)


def test_random_erasing_probability_half():
    random.seed(3)
    erase = RandomErasing(p=0.5)
    img = torch.randn(3, 64, 32)
    hits = sum(not torch.equal(erase(img), img) for _ in range(400))
    assert 150 < hits < 250


def test_random_erasing_one_channel_and_repeatable():
    random.seed(7)
    img = torch.randn(1, 64, 32)
    out = RandomErasing(p=1.0)(img)
    changed = out[out != img]
    assert changed.numel() > 0 and torch.all(changed == torch.tensor(0.485))
    random.seed(7)
    assert torch.equal(RandomErasing(p=1.0)(img), out)
    assert "RandomErasing(p=1.0" in repr(RandomErasing(p=1.0))
