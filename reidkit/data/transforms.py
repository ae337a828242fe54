"""Image transforms of the papers, and the image dataset that applies them.

HHCL / Cluster-Contrast training (spec hhcl §1.4), in order: bicubic resize to 256x128, random
horizontal flip, pad 10 (zeros) + random crop back to 256x128, ToTensor, ImageNet normalisation,
random erasing (p 0.5, area 2-40 %, aspect 0.3-3.33, up to 100 tries) whose rectangle is filled
with the per-channel constants 0.485 / 0.456 / 0.406 *after* normalisation, exactly as the
reference does (so the fill is not the mean colour in normalised space). Test: resize + normalise.

DGL (spec dgl §3.2): 384x128, flip, no crop, random erasing filled with 0.

Two backends compute the same pipeline (``backend=`` of :func:`train_transform` / :func:`test_transform`):

* ``"pil"``: the references' torchvision v1 steps on a PIL image (ToTensor, then Normalize);
* ``"tensor"`` (the default of both): ``torchvision.io`` decode straight to a uint8 CHW tensor, then
  ``torchvision.transforms.v2`` Resize + flip, one fused pad+crop copy and the normalisation on the
  uint8 tensor. Same random draws in the same order (flip: one ``torch.rand(1)``; crop: two
  ``torch.randint``; erasing: Python ``random``), same float arithmetic (``/255``, ``-mean``,
  ``/std``). Measured on the 768 sample JPEGs (``benchmarks/bench_pipeline.py``): the decoders give
  identical pixels and, where no resize happens (256x128 inputs at 256x128), the outputs are
  bit-identical; where a resize happens the tensor resize is bicubic *with antialias* (PIL's
  kernel, a = -0.5), at most 1 uint8 level from PIL's rounding (2 on uniform noise; without
  antialias it would be up to 60). Decode + augmentation per core: 1.8x (256x128, 384x128) to 2.5x
  (128x64) the PIL path's rate (docs/benchmarks.md). The pipeline also accepts a PIL image.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from typing import Any, Callable, Sequence

import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as v2
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from reidkit.data.records import CorruptImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the reference RandomErasing fills with these constants, in normalised space
REFERENCE_ERASING_FILL = IMAGENET_MEAN
BACKENDS = ("pil", "tensor")
#: the backend of train_transform / test_transform when none is asked (see the module docstring)
DEFAULT_BACKEND = "tensor"


class RandomErasing:
    """Erase one random rectangle of a normalised CHW tensor with probability ``p``.

    Area fraction ~ U[sl, sh], aspect ratio ~ U[r1, 1/r1]; up to ``attempts`` draws until the
    rectangle fits; filled per channel with ``fill``. Uses Python's ``random`` (seeded by
    ``reidkit.core.device.seed_everything`` and per DataLoader worker by torch)."""

    def __init__(self, p: float = 0.5, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3,
                 fill: Sequence[float] = REFERENCE_ERASING_FILL, attempts: int = 100, inplace: bool = False):
        self.p, self.sl, self.sh, self.r1 = p, sl, sh, r1
        self.fill = tuple(float(v) for v in fill)
        self.attempts = attempts
        self.inplace = inplace  # True: the tensor pipeline, which owns its freshly made tensor

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if random.uniform(0, 1) >= self.p:
            return img
        channels, height, width = img.shape
        area = height * width
        for _ in range(self.attempts):
            target = random.uniform(self.sl, self.sh) * area
            aspect = random.uniform(self.r1, 1 / self.r1)
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                fill = torch.tensor(self.fill if len(self.fill) == channels else self.fill[:1] * channels,
                                    dtype=img.dtype, device=img.device).view(channels, 1, 1)
                if not self.inplace:
                    img = img.clone()
                img[:, top:top + h, left:left + w] = fill
                return img
        return img

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.p}, area=[{self.sl}, {self.sh}], aspect>={self.r1}, fill={self.fill})"


class ToUint8:
    """First step of the tensor pipeline: a uint8 (3, H, W) tensor passes, a PIL image is converted
    (RGB) to one, so that the pipeline gives the same result on either input."""

    def __call__(self, img):
        if isinstance(img, torch.Tensor):
            if img.dtype != torch.uint8 or img.dim() != 3:
                raise TypeError(f"the tensor pipeline wants a uint8 (C, H, W) tensor, got {img.dtype} "
                                f"{tuple(img.shape)}")
            return img

        return pil_to_tensor(img.convert("RGB"))

    def __repr__(self) -> str:
        return "ToUint8()"


class PadRandomCrop:
    """``Pad(pad)`` (zeros) then ``RandomCrop(size)`` in one copy: the same two draws as
    torchvision's ``RandomCrop.get_params`` on the padded image (row offset, then column offset,
    each ``torch.randint``), without building the padded image."""

    def __init__(self, size: tuple[int, int], pad: int):
        self.size, self.pad = (int(size[0]), int(size[1])), int(pad)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        th, tw = self.size
        h, w = img.shape[-2] + 2 * self.pad, img.shape[-1] + 2 * self.pad
        if h < th or w < tw:
            raise ValueError(f"crop {self.size} larger than the padded image {(h, w)}")
        if (h, w) == (th, tw):
            top = left = 0
        else:
            top = int(torch.randint(0, h - th + 1, size=(1,)).item())
            left = int(torch.randint(0, w - tw + 1, size=(1,)).item())
        out = img.new_zeros(img.shape[:-2] + (th, tw))
        # crop window in padded coordinates [top, top+th) x [left, left+tw); image sits at [pad, pad+H)
        y0, y1 = max(top, self.pad), min(top + th, self.pad + img.shape[-2])
        x0, x1 = max(left, self.pad), min(left + tw, self.pad + img.shape[-1])
        if y1 > y0 and x1 > x0:
            out[..., y0 - top:y1 - top, x0 - left:x1 - left] = img[..., y0 - self.pad:y1 - self.pad,
                                                                   x0 - self.pad:x1 - self.pad]
        return out

    def __repr__(self) -> str:
        return f"PadRandomCrop(size={self.size}, pad={self.pad})"


class NormalizeUint8:
    """uint8 CHW (or a batch, NCHW) -> float32 ``(x / 255 - mean) / std``: ToTensor + Normalize's
    arithmetic, op for op. The float copy is made contiguous: a decoded JPEG arrives with its pixels
    interleaved (HWC strides), and three passes over inner rows of 3 channels cost twice the
    passes over rows of a whole image width (measured: 0.13 -> 0.05 ms per 256x128 image)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.mean.device != img.device:  # a GPU (nvjpeg) batch: keep the constants beside it
            self.mean, self.std = self.mean.to(img.device), self.std.to(img.device)
        return img.to(torch.float32, memory_format=torch.contiguous_format).div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"NormalizeUint8(mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())})"


class TensorPipeline:
    """The tensor backend's composition. ``input_kind = "uint8"`` tells :class:`ImageDataset` to
    decode files with ``torchvision.io`` straight to uint8 tensors (PIL input works too)."""

    input_kind = "uint8"

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, img):
        for step in self.transforms:
            img = step(img)
        return img

    def __repr__(self) -> str:
        return "TensorPipeline(" + ", ".join(repr(t) for t in self.transforms) + ")"


def _backend(backend: str | None) -> str:
    backend = DEFAULT_BACKEND if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _tensor_resize(height: int, width: int):
    """Bicubic resize of a uint8 tensor *with antialias*: PIL's bicubic kernel (a = -0.5, widened
    when shrinking), so the result stays within a few uint8 levels of the PIL path's."""

    return v2.Resize((height, width), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def _tensor_train(height, width, flip, pad, erasing_p, erasing_fill, color_jitter) -> TensorPipeline:

    steps: list = [ToUint8()]
    if color_jitter:  # v2's tensor colour ops: same draws, not pixel-identical to PIL's
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter, 0))
    steps.append(_tensor_resize(height, width))
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if pad:
        steps.append(PadRandomCrop((height, width), pad))
    steps.append(NormalizeUint8(IMAGENET_MEAN, IMAGENET_STD))
    if erasing_p > 0:
        steps.append(RandomErasing(p=erasing_p, fill=erasing_fill, inplace=True))
    return TensorPipeline(steps)


def train_transform(height: int = 256, width: int = 128, flip: bool = True, pad: int = 10,
                    erasing_p: float = 0.5, erasing_fill: Sequence[float] = REFERENCE_ERASING_FILL,
                    color_jitter: float = 0.0, backend: str | None = None):
    """The training augmentation of the papers (pad=0 disables pad+crop, erasing_p=0 disables erasing).

    ``backend``: "tensor" (default, :data:`DEFAULT_BACKEND`) or "pil" (the references' v1 steps);
    with ``color_jitter`` the default stays "pil", whose colour ops the references use."""

    if backend is None and color_jitter:
        backend = "pil"
    if _backend(backend) == "tensor":
        return _tensor_train(height, width, flip, pad, erasing_p, erasing_fill, color_jitter)
    steps = []
    if color_jitter:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter, 0))
    steps.append(T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC))
    if flip:
        steps.append(T.RandomHorizontalFlip(p=0.5))
    if pad:
        steps += [T.Pad(pad), T.RandomCrop((height, width))]
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if erasing_p > 0:
        steps.append(RandomErasing(p=erasing_p, fill=erasing_fill))
    return T.Compose(steps)


def test_transform(height: int = 256, width: int = 128, backend: str | None = None):
    """Feature extraction for clustering and evaluation: bicubic resize, ToTensor, normalise."""

    if _backend(backend) == "tensor":
        return TensorPipeline([ToUint8(), _tensor_resize(height, width), NormalizeUint8(IMAGENET_MEAN, IMAGENET_STD)])
    return T.Compose([T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def denormalize(img: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation (for display); returns values clipped to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype).view(-1, 1, 1)
    return (img * std + mean).clamp(0, 1)


def load_image(path: str):
    """Open an image as RGB; a file that cannot be decoded raises ``CorruptImageError`` naming it."""

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise CorruptImageError(path, f"{type(exc).__name__}: {exc}") from exc


_IO_WARNING = "The image decoding and encoding capabilities of TorchVision"


def _quiet_torchvision_io() -> None:
    """torchvision 0.29 warns on every decode that its decoders will move to TorchCodec; the kit
    pins 0.29 (Makefile), so that one warning, from that one module, is silenced (re-installed
    when a ``catch_warnings`` block, e.g. pytest's, has reset the filters)."""
    if not any(f[1] is not None and f[1].pattern == _IO_WARNING for f in warnings.filters):
        warnings.filterwarnings("ignore", message=_IO_WARNING, category=DeprecationWarning,
                                module=r"torchvision\.io\.image")


def decode_image_uint8(path: str) -> torch.Tensor:
    """Read and decode an image file to a uint8 (3, H, W) RGB tensor with ``torchvision.io``
    (libjpeg-turbo, the same pixels as PIL on JPEGs); undecodable files, truncated JPEGs included,
    raise ``CorruptImageError`` naming the file. Without torchvision's decoders (a future
    torchvision), PIL decodes."""

    try:  # optional: torchvision's decoders may leave a future torchvision; PIL decodes then
        from torchvision.io import ImageReadMode, decode_image, read_file
    except ImportError:
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(load_image(path))
    _quiet_torchvision_io()
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except Exception as exc:
        raise CorruptImageError(path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc


def decoder_for(transform) -> Callable[[str], Any]:
    """The decoder a transform takes: :func:`decode_image_uint8` for the tensor backend
    (``transform.input_kind == "uint8"``), else :func:`load_image` (PIL). On JPEGs both give the
    same pixels; the tensor decode is the faster one."""
    return decode_image_uint8 if getattr(transform, "input_kind", None) == "uint8" else load_image


class ImageDataset(Dataset):
    """Records -> dicts ``{"img", "pid", "label", "camid", "index", "path"}``.

    ``labels`` overrides the training target (pseudo-labels, relabelled ids, bag labels); by default
    it is the record's pid. Files are decoded by PIL, or straight to uint8 tensors when the
    transform says it takes them (``transform.input_kind == "uint8"``, the tensor backend)."""

    def __init__(self, records, transform=None, labels: Sequence[int] | None = None):
        self.records = list(records)
        self.transform = transform
        self.decode = decoder_for(transform)
        self.labels = list(labels) if labels is not None else None
        if self.labels is not None and len(self.labels) != len(self.records):
            raise ValueError(f"{len(self.labels)} labels for {len(self.records)} records")

    def __len__(self) -> int:
        return len(self.records)

    def deferred_normalization(self) -> tuple["ImageDataset", NormalizeUint8] | None:
        """For loaders that normalise whole batches: this dataset with its tensor pipeline's last
        step, the :class:`NormalizeUint8`, taken off (items' ``"img"`` stay uint8), and that step.

        Applied to a collated uint8 batch the step gives the same floats bit for bit (elementwise,
        op for op), while the loader stacks one byte per pixel instead of four and a GPU is sent a
        quarter of the bytes and normalises them itself. None when the transform does not end in
        that step (the PIL backend, a training pipeline ending in random erasing)."""
        tf = self.transform
        if not isinstance(tf, TensorPipeline) or not tf.transforms or not isinstance(tf.transforms[-1], NormalizeUint8):
            return None
        twin = copy.copy(self)
        twin.transform = TensorPipeline(tf.transforms[:-1])
        return twin, tf.transforms[-1]

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        img = self.decode(rec.path)
        if self.transform is not None:
            img = self.transform(img)
        label = self.labels[index] if self.labels is not None else rec.pid
        return {"img": img, "pid": rec.pid, "label": label, "camid": rec.camid, "index": index,
                "path": rec.path}
