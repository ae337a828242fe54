"""Image transforms of the papers, and the image dataset that applies them.

HHCL / Cluster-Contrast training (spec hhcl §1.4), in order: bicubic resize to 256x128, random
horizontal flip, pad 10 (zeros) + random crop back to 256x128, ToTensor, ImageNet normalisation,
random erasing (p 0.5, area 2-40 %, aspect 0.3-3.33, up to 100 tries) whose rectangle is filled
with the per-channel constants 0.485 / 0.456 / 0.406 *after* normalisation, exactly as the
reference does (so the fill is not the mean colour in normalised space). Test: resize + normalise.

DGL (spec dgl §3.2): 384x128, flip, no crop, random erasing filled with 0.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the reference RandomErasing fills with these constants, in normalised space
REFERENCE_ERASING_FILL = IMAGENET_MEAN


class RandomErasing:
    """Erase one random rectangle of a normalised CHW tensor with probability ``p``.

    Area fraction ~ U[sl, sh], aspect ratio ~ U[r1, 1/r1]; up to ``attempts`` draws until the
    rectangle fits; filled per channel with ``fill``. Uses Python's ``random`` (seeded by
    ``reidkit.utils.seed_everything`` and per DataLoader worker by torch)."""

    def __init__(self, p: float = 0.5, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3,
                 fill: Sequence[float] = REFERENCE_ERASING_FILL, attempts: int = 100):
        self.p, self.sl, self.sh, self.r1 = p, sl, sh, r1
        self.fill = tuple(float(v) for v in fill)
        self.attempts = attempts

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
                                    dtype=img.dtype).view(channels, 1, 1)
                img = img.clone()
                img[:, top:top + h, left:left + w] = fill
                return img
        return img

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.p}, area=[{self.sl}, {self.sh}], aspect>={self.r1}, fill={self.fill})"


def train_transform(height: int = 256, width: int = 128, flip: bool = True, pad: int = 10,
                    erasing_p: float = 0.5, erasing_fill: Sequence[float] = REFERENCE_ERASING_FILL,
                    color_jitter: float = 0.0):
    """The training augmentation of the papers (pad=0 disables pad+crop, erasing_p=0 disables erasing)."""
    import torchvision.transforms as T

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


def test_transform(height: int = 256, width: int = 128):
    """Feature extraction for clustering and evaluation: bicubic resize, ToTensor, normalise."""
    import torchvision.transforms as T

    return T.Compose([T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def denormalize(img: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation (for display); returns values clipped to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype).view(-1, 1, 1)
    return (img * std + mean).clamp(0, 1)


def load_image(path: str):
    """Open an image as RGB; a file that cannot be decoded raises ``CorruptImageError`` naming it."""
    from PIL import Image

    from reidkit.data.datasets import CorruptImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise CorruptImageError(path, f"{type(exc).__name__}: {exc}") from exc


class ImageDataset(Dataset):
    """Records -> dicts ``{"img", "pid", "label", "camid", "index", "path"}``.

    ``labels`` overrides the training target (pseudo-labels, relabelled ids, bag labels); by default
    it is the record's pid."""

    def __init__(self, records, transform=None, labels: Sequence[int] | None = None):
        self.records = list(records)
        self.transform = transform
        self.labels = list(labels) if labels is not None else None
        if self.labels is not None and len(self.labels) != len(self.records):
            raise ValueError(f"{len(self.labels)} labels for {len(self.records)} records")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        img = load_image(rec.path)
        if self.transform is not None:
            img = self.transform(img)
        label = self.labels[index] if self.labels is not None else rec.pid
        return {"img": img, "pid": rec.pid, "label": label, "camid": rec.camid, "index": index,
                "path": rec.path}
