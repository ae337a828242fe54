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
    DEFAULT_BACKEND,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    NormalizeUint8,
    PadRandomCrop,
    RandomErasing,
    TensorPipeline,
    ToUint8,
    decode_image_uint8,
    denormalize,
    load_image,
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
    steps = train_transform(backend="pil").transforms
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


def test_tensor_backend_is_the_default_with_the_same_steps():
    import torchvision.transforms.v2 as v2

    assert DEFAULT_BACKEND == "tensor"
    tf = train_transform()
    assert isinstance(tf, TensorPipeline) and tf.input_kind == "uint8"
    steps = tf.transforms
    assert [type(s) for s in steps] == [ToUint8, v2.Resize, v2.RandomHorizontalFlip, PadRandomCrop,
                                        NormalizeUint8, RandomErasing]
    _, resize, flip, crop, norm, erase = steps
    assert tuple(resize.size) == (256, 128) and resize.antialias is True
    assert resize.interpolation == v2.InterpolationMode.BICUBIC
    assert flip.p == 0.5 and (crop.size, crop.pad) == ((256, 128), 10)
    assert torch.equal(norm.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.equal(norm.std.flatten(), torch.tensor(IMAGENET_STD))
    assert (erase.p, erase.sl, erase.sh, erase.r1, erase.attempts, erase.inplace) == (0.5, 0.02, 0.4, 0.3, 100, True)
    assert erase.fill == (0.485, 0.456, 0.406)
    # colour jitter keeps the reference PIL colour ops unless the tensor backend is asked for
    assert isinstance(train_transform(color_jitter=0.1), T.Compose)
    assert isinstance(train_transform(color_jitter=0.1, backend="tensor"), TensorPipeline)
    with pytest.raises(ValueError, match="backend"):
        train_transform(backend="cuda")


def test_train_transform_options_remove_steps():
    steps = train_transform(flip=False, pad=0, erasing_p=0, backend="pil").transforms
    assert [type(s) for s in steps] == [T.Resize, T.ToTensor, T.Normalize]
    import torchvision.transforms.v2 as v2

    steps = train_transform(flip=False, pad=0, erasing_p=0).transforms
    assert [type(s) for s in steps] == [ToUint8, v2.Resize, NormalizeUint8]


def test_test_transform_steps():
    steps = eval_transform(backend="pil").transforms
    assert [type(s) for s in steps] == [T.Resize, T.ToTensor, T.Normalize]
    assert steps[0].interpolation == T.InterpolationMode.BICUBIC
    assert tuple(steps[0].size) == (256, 128)
    steps = eval_transform().transforms
    assert [type(s).__name__ for s in steps] == ["ToUint8", "Resize", "NormalizeUint8"]
    assert tuple(steps[1].size) == (256, 128) and steps[1].antialias is True


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


#: the tensor backend's antialiased bicubic resize vs PIL's, in uint8 levels: measured at most 1 on
#: the sample JPEGs resized to 384x128 / 128x64 (0 for a 2x upsample) and at most 2 on uniform noise
RESIZE_LEVELS = 2
RESIZE_ATOL = RESIZE_LEVELS / 255 / min(IMAGENET_STD) + 1e-6


def test_test_transform_is_bicubic_resize_then_normalise_and_deterministic():
    img = random_image(2, size=(60, 150))
    tf = eval_transform(backend="pil")
    a, b = tf(img), tf(img)
    assert a.shape == (3, 256, 128)
    assert torch.equal(a, b)
    expected = to_normalised(img.resize((128, 256), Image.BICUBIC))
    assert torch.allclose(a, expected, atol=1e-6)
    # bilinear would differ: the interpolation really is bicubic
    assert not torch.allclose(a, to_normalised(img.resize((128, 256), Image.BILINEAR)), atol=1e-3)
    # the tensor backend: PIL's bicubic within the measured rounding, far from bilinear
    t = eval_transform()(img)
    assert torch.equal(t, eval_transform()(img))
    assert torch.allclose(t, expected, atol=RESIZE_ATOL, rtol=0)
    assert float((t - expected).abs().mean()) < 0.02 / 255 / min(IMAGENET_STD)
    assert not torch.allclose(t, to_normalised(img.resize((128, 256), Image.BILINEAR)), atol=RESIZE_ATOL)
    # without antialias the tensor bicubic kernel (a = -0.75) would miss PIL's by far more
    import torchvision.transforms.v2.functional as F2
    noaa = F2.resize(F2.pil_to_tensor(img), [256, 128], interpolation=T.InterpolationMode.BICUBIC, antialias=False)
    assert not torch.allclose(NormalizeUint8()(noaa), expected, atol=RESIZE_ATOL)


def test_train_transform_resize_is_bicubic():
    img = random_image(3, size=(60, 150))
    for backend in ("pil", "tensor"):
        out = train_transform(flip=False, pad=0, erasing_p=0, backend=backend)(img)
        assert torch.allclose(out, eval_transform(backend=backend)(img), atol=1e-6)


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


# ---------------------------------------------------------------------------------------------
# the tensor backend against the PIL backend

def sample_paths(n=24):
    from reidkit.data.datasets import load_dataset

    recs = load_dataset("mini-mars").train
    return [recs[i].path for i in range(0, len(recs), max(1, len(recs) // n))][:n]


def rng_state():
    return torch.get_rng_state(), random.getstate()


def run_seeded(tf, img, seed):
    torch.manual_seed(seed)
    random.seed(seed)
    out = tf(img)
    return out, rng_state()


@pytest.mark.parametrize("size", [(256, 128), (384, 128), (128, 64)])
def test_tensor_and_pil_paths_make_the_same_draws_and_pixels(size):
    """Sample JPEGs, fixed seeds: the same flip, crop offsets and erasing rectangle, the same RNG
    state after; at 256x128 (the sample's own size: no resize) bit-identical, else within the
    measured resize rounding."""
    pil_tf = train_transform(*size, erasing_p=0.5, backend="pil")
    ten_tf = train_transform(*size, erasing_p=0.5, backend="tensor")
    no_resize = size == (256, 128)
    flips = erased = 0
    for k, path in enumerate(sample_paths()):
        seed = 1000 + k
        a, state_a = run_seeded(pil_tf, load_image(path), seed)
        b, state_b = run_seeded(ten_tf, decode_image_uint8(path), seed)
        assert torch.equal(state_a[0], state_b[0]) and state_a[1] == state_b[1], "different random draws"
        assert a.shape == b.shape == (3, *size) and b.dtype == torch.float32
        if no_resize:
            assert torch.equal(a, b), path
        else:
            assert torch.allclose(a, b, atol=RESIZE_ATOL, rtol=0), path
        # the erasing rectangle and the zero padding are exactly where they are in the PIL output
        fill = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        assert torch.equal((a == fill).all(0), (b == fill).all(0))
        erased += int((b == fill).all(0).any())
        # what the flip draw was: replay it
        torch.manual_seed(seed)
        flips += int(torch.rand(1) < 0.5)
    assert 0 < flips < len(sample_paths()) and erased > 0  # both branches were exercised


def test_tensor_pipeline_takes_pil_or_tensor_alike():
    path = sample_paths(1)[0]
    tf = train_transform(384, 128)
    a, _ = run_seeded(tf, load_image(path), 5)
    b, _ = run_seeded(tf, decode_image_uint8(path), 5)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="uint8"):
        tf(torch.zeros(3, 8, 4))


@pytest.mark.parametrize("pad,in_size,out_size", [(10, (256, 128), (256, 128)), (3, (20, 9), (20, 9)),
                                                  (4, (10, 6), (14, 8)), (0, (12, 8), (12, 8))])
def test_pad_random_crop_equals_pad_then_random_crop(pad, in_size, out_size):
    import torchvision.transforms.v2 as v2

    img = torch.randint(1, 256, (3, *in_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(pad))
    ref = v2.Compose([v2.Pad(pad), v2.RandomCrop(out_size)])
    offsets = set()
    for seed in range(25):
        torch.manual_seed(seed)
        expected = ref(img)
        torch.manual_seed(seed)
        got = PadRandomCrop(out_size, pad)(img)
        assert torch.equal(got, expected)
        offsets.add(int((got[0] == 0).all(1).sum()))
    if pad and in_size == out_size:
        assert len(offsets) > 1  # the offsets really are random


def test_normalize_uint8_is_totensor_then_normalize_bit_for_bit():
    arr = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(Image.fromarray(arr)))
    got = NormalizeUint8()(torch.from_numpy(arr).permute(2, 0, 1))
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_image_dataset_decodes_for_the_backend_and_reports_corrupt_files(tmp_path):
    from reidkit.data.records import CorruptImageError, Record

    path = sample_paths(1)[0]
    recs = [Record(path, 7, 2)]
    pil_ds, ten_ds = ImageDataset(recs, eval_transform(backend="pil")), ImageDataset(recs, eval_transform())
    assert pil_ds.decode is load_image and ten_ds.decode is decode_image_uint8
    assert torch.equal(pil_ds[0]["img"], ten_ds[0]["img"])
    raw = open(path, "rb").read()
    truncated = tmp_path / "0007C1T0001F001.jpg"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptImageError) as exc:
        ImageDataset([Record(str(truncated), 7, 0)], eval_transform())[0]
    assert exc.value.path == str(truncated)
    decoded = decode_image_uint8(path)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 256, 128)
    assert torch.equal(decoded, torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1))


def test_random_erasing_inplace_writes_into_its_input():
    img = torch.randn(3, 32, 16)
    random.seed(2)
    out = RandomErasing(p=1.0, inplace=True)(img)
    assert out is img and bool((img == 0.485).any())
    random.seed(2)
    copy = torch.randn(3, 32, 16)
    before = copy.clone()
    RandomErasing(p=1.0)(copy)
    assert torch.equal(copy, before)


def test_deferred_normalization_gives_uint8_items_and_the_same_floats_per_batch():
    """The extraction loader's split (reidkit.nets.features.feature_loader): the dataset without
    its last NormalizeUint8 gives uint8 items (a decoded JPEG's interleaved strides); that step on
    the stacked batch, in either memory format, gives the per-item floats bit for bit, contiguous;
    pipelines not ending in it are not split."""
    from reidkit.data.records import Record

    recs = [Record(p, k, 0) for k, p in enumerate(sample_paths(6))]
    for size in [(256, 128), (384, 128)]:  # no resize / a resize
        ds = ImageDataset(recs, eval_transform(*size))
        twin, step = ds.deferred_normalization()
        assert isinstance(step, NormalizeUint8) and ds.transform.transforms[-1] is step
        assert twin.records is ds.records and twin.decode is ds.decode
        assert len(ds.transform.transforms) == 3  # the original is left whole
        items = [twin[i]["img"] for i in range(len(recs))]
        assert all(x.dtype == torch.uint8 and x.shape == (3, *size) for x in items)
        per_item = torch.stack([ds[i]["img"] for i in range(len(recs))])
        for batch in (torch.stack(items), torch.stack(items).contiguous(memory_format=torch.channels_last)):
            out = step(batch)
            assert out.dtype == torch.float32 and out.is_contiguous() and torch.equal(out, per_item)
        assert ds[0]["img"].is_contiguous()
        if size == (256, 128):  # no resize: the decoder's interleaved (HWC) strides reach the step
            assert items[0].stride() == (1, 128 * 3, 3)
    assert ImageDataset(recs, eval_transform(backend="pil")).deferred_normalization() is None
    assert ImageDataset(recs, train_transform()).deferred_normalization() is None  # ends in erasing
    assert ImageDataset(recs, None).deferred_normalization() is None
