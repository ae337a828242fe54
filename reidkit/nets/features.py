"""Feature extraction: a model and a dataset in, L2-normalised float32 features in dataset order out.

Used for clustering every epoch (spec hhcl §3.1), for evaluation (hhcl §6) and for the SYSU-30k
gallery (dgl §4.2), which is why features can be *streamed*:

* :func:`extract_features` returns a (N, D) numpy array, or, with ``out="gallery.npy"``, writes a
  ``.npy`` file chunk by chunk through ``numpy.lib.format.open_memmap`` (a gallery larger than RAM
  never has to be held at once) plus a JSON sidecar ``gallery.json`` (model, count, dim, flip, ...),
  and returns the file opened read-only as a memmap;
* :func:`iter_features` yields ``(chunk, start)`` pairs for evaluation that consumes the gallery as
  it is produced.

Per batch: eval mode, ``torch.inference_mode()``, optional flip (``f(x) + f(hflip(x))``, then
L2-normalised: DGL's test feature, dgl §3.2 / §4.2; HHCL uses no flip), optional autocast (bf16 where
the GPU supports it, else fp16; on by default on CUDA only) and channels_last (by default where
``reidkit.core.device.channels_last`` says: CUDA and the CPU). In fp32 the network that runs is a
copy with its BatchNorms folded into the convolutions before them (``fold_bn``,
:mod:`reidkit.nets.inference`); the model's train/eval state (of every submodule) and memory format
are restored afterwards; the model is moved to ``device``. An ``ImageDataset`` with the tensor
test transform is loaded as uint8 batches and normalised on the device (:func:`feature_loader`).

Dataset items: a dict with key ``"img"`` (``reidkit.data.transforms.ImageDataset``), a tuple/list
whose first element is the image tensor, or a bare tensor. A ``DataLoader`` may be passed instead
of a dataset; it must not shuffle (its order is the output order).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from reidkit.core.device import bf16_native, resolve_device, tune_cpu_allocator
from reidkit.core.device import channels_last as prefers_channels_last
from reidkit.core.io import atomic_write_json
from reidkit.core.progress import progress
from reidkit.data.transforms import load_image, test_transform
from reidkit.nets.inference import fold_for_inference

__all__ = ['extract_features', 'iter_features', 'feature_loader', 'inference_network', 'batch_images', 'resolve_amp', 'sidecar_path', 'read_sidecar', 'DEFAULT_CHUNK_ROWS']


DEFAULT_CHUNK_ROWS = 8192


ForwardFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a collated batch: ``batch["img"]``, ``batch[0]`` or the batch itself."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "img" not in batch:
            raise KeyError(f"dataset items are dicts without an 'img' key (keys: {sorted(batch)})")
        return batch["img"]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError("dataset items must be a dict with 'img', a tuple whose first element is the image "
                    f"tensor, or a tensor; got {type(batch).__name__}")


def resolve_amp(amp: Any, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: "auto" -> bf16 on CUDA where native (compute capability >= 8; fp16 on GPUs
    that would only emulate bf16: T4, V100, P100), off elsewhere;
    True -> the same choice on any device; "bf16"/"fp16"/a dtype -> that; False/None -> off."""
    if amp is None or amp is False or (isinstance(amp, str) and amp.lower() in {"off", "none", "false", "fp32"}):
        return None
    if isinstance(amp, torch.dtype):
        return amp
    if isinstance(amp, str) and amp.lower() == "auto":
        if device.type != "cuda":
            return None
        amp = True
    if amp is True:
        if device.type == "cuda" and not bf16_native(device):
            return torch.float16
        return torch.bfloat16
    key = str(amp).lower()
    if key in {"bf16", "bfloat16"}:
        return torch.bfloat16
    if key in {"fp16", "float16", "half"}:
        return torch.float16
    raise ValueError(f"amp must be 'auto', True, False, 'bf16' or 'fp16'; got {amp!r}")


def sidecar_path(out: str | Path) -> Path:
    """``gallery.npy`` -> ``gallery.json``."""
    return Path(out).with_suffix(".json")


BatchStep = Callable[[torch.Tensor], torch.Tensor]


def feature_loader(data, batch_size: int = 64, num_workers: int = 0,
                   pin_memory: bool = False) -> tuple[DataLoader, BatchStep | None]:
    """The loader :func:`extract_features` reads ``data`` through, and the step it applies to each
    batch once the batch is on the device (None: the batches come ready).

    A dataset whose items end in a tensor-pipeline normalisation (``deferred_normalization()``,
    e.g. :class:`reidkit.data.transforms.ImageDataset` with the default test transform) is loaded
    as uint8 and normalised per batch, on the device: the same floats, a quarter of the bytes to
    stack and to send to a GPU, and one pass per operation over the batch instead of one per image.
    A ``DataLoader`` is taken as it is; it must not shuffle (its order is the output order)."""
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise ValueError("the DataLoader shuffles; features must come out in dataset order "
                             "(pass the dataset, or a loader with shuffle=False)")
        return data, None
    split = getattr(data, "deferred_normalization", None)
    split = split() if callable(split) else None
    step = None
    if split is not None:
        data, step = split
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False), step


def _expected_rows(loader: DataLoader) -> int | None:
    """How many rows the loader yields, when that is knowable up front."""
    bs = loader.batch_sampler
    if bs is None or type(bs) is not BatchSampler:
        return None
    try:
        n = len(bs.sampler)
    except TypeError:
        return None
    return n - n % bs.batch_size if bs.drop_last else n


def _is_channels_last(model: nn.Module) -> bool:
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


@contextmanager
def _inference_state(model: nn.Module, device: torch.device, channels_last: bool):
    """Eval mode (+ channels_last) for the duration; every submodule's mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    was_cl = _is_channels_last(model)
    model.to(device)
    if channels_last and not was_cl:
        model.to(memory_format=torch.channels_last)
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        if channels_last and not was_cl:
            model.to(memory_format=torch.contiguous_format)


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _default_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _batch_features(model, loader, step, device, flip, amp_dtype, channels_last, forward_fn, normalize,
                    fold_bn, report, desc) -> Iterator[torch.Tensor]:
    """(B, D) float32 CPU features per batch (``step``: see :func:`feature_loader`). With ``fold_bn``
    the network is :func:`reidkit.nets.inference.fold_for_inference`'s; ``report`` receives what it
    said. Inference mode is entered per batch, not around the ``yield``: the consumer's code
    between batches runs with autograd as it was."""
    forward_fn = forward_fn or _default_forward
    non_blocking = device.type == "cuda"
    with _inference_state(model, device, channels_last):
        net, info = inference_network(model, fold_bn, amp_dtype)
        report.update(info)
        for batch in progress(loader, desc=desc, total=_length(loader)):
            with torch.inference_mode():
                x = batch_images(batch).to(device, non_blocking=non_blocking)
                if step is not None:  # before the format change: NCHW's long inner rows are 3x faster
                    x = step(x)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    f = forward_fn(net, x).float()
                    if flip:
                        f = f + forward_fn(net, x.flip(3)).float()
                if normalize:
                    f = F.normalize(f, dim=1)
                f = f.cpu()
            yield f


def inference_network(model: nn.Module, fold_bn: Any = "auto",
                      amp_dtype: torch.dtype | None = None) -> tuple[nn.Module, dict]:
    """The network extraction runs for ``model`` under autocast ``amp_dtype`` (None: fp32), and
    what :func:`reidkit.nets.inference.fold_for_inference` said.
    ``fold_bn="auto"`` folds in fp32 only: under bf16 autocast the folded weights round to features
    further from fp32's (mean 1 - cosine 8.4e-3 against 6.6e-3 unfolded, ImageNet MobileNetV2 on the
    sample at 128x64), so a low-precision forward keeps the model's own layers."""
    if fold_bn == "auto":
        fold_bn = amp_dtype is None
        why = f"autocast {str(amp_dtype).replace('torch.', '')}: not folded (fold_bn='auto' folds in fp32)"
    else:
        why = "fold_bn=False"
    if not fold_bn:
        return model, {"folded": 0, "why": why}
    return fold_for_inference(model)


def iter_features(model: nn.Module, data, device: Any = "auto", flip: bool = False, amp: Any = "auto",
                  channels_last: Any = "auto", batch_size: int = 64, num_workers: int = 0,
                  chunk_rows: int | None = DEFAULT_CHUNK_ROWS, forward_fn: ForwardFn | None = None,
                  normalize: bool = True, fold_bn: Any = "auto",
                  desc: str = "features") -> Iterator[tuple[np.ndarray, int]]:
    """Yield ``(features, start)``: float32 (r, D) chunks of exactly ``chunk_rows`` rows (the last
    one shorter), ``start`` = dataset index of the first row. ``chunk_rows=None`` yields per batch.

    ``forward_fn(model, x)`` replaces ``model(x)``, e.g. ``lambda m, x: m(x, return_all=True).logits``
    for the SYSU-30k reference feature (classifier logits, flip-summed, normalised).

    ``fold_bn``: extract with a copy of the network whose BatchNorms are folded into the
    convolutions before them (:mod:`reidkit.nets.inference`; one pass fewer per layer, where the
    data flow from convolution to BatchNorm is known from the module classes; the model itself is
    never changed). ``"auto"`` (default): when the forward runs in fp32, whose features it leaves
    within 1e-6 (MobileNetV2 on two CPU cores: 1.13-1.19x); True: under autocast too; False: never."""
    device = resolve_device(device)
    loader, step = feature_loader(data, batch_size, num_workers, pin_memory=device.type == "cuda")
    return _chunks(model, loader, step, device, flip, amp, channels_last, chunk_rows, forward_fn, normalize,
                   fold_bn, {}, desc)


def _chunks(model, loader, step, device, flip, amp, channels_last, chunk_rows, forward_fn, normalize,
            fold_bn, report, desc) -> Iterator[tuple[np.ndarray, int]]:
    """:func:`iter_features` on a loader from :func:`feature_loader`."""
    amp_dtype = resolve_amp(amp, device)
    if channels_last == "auto":
        channels_last = prefers_channels_last(device)
    if device.type == "cpu":
        tune_cpu_allocator()  # the batches' activations stay in the process: 1.9x on two cores
    batches = _batch_features(model, loader, step, device, flip, amp_dtype, bool(channels_last), forward_fn,
                              normalize, fold_bn, report, desc)
    with closing(batches):  # an abandoned iteration still restores the model's state
        start = 0
        if not chunk_rows:
            for f in batches:
                yield f.numpy(), start
                start += f.shape[0]
            return
        pending: list[torch.Tensor] = []
        held = 0
        for f in batches:
            pending.append(f)
            held += f.shape[0]
            if held < chunk_rows:
                continue
            block = torch.cat(pending)
            while block.shape[0] >= chunk_rows:
                yield block[:chunk_rows].numpy(), start
                start += chunk_rows
                block = block[chunk_rows:]
            pending, held = ([block], block.shape[0]) if block.shape[0] else ([], 0)
        if held:
            yield torch.cat(pending).numpy(), start


def extract_features(model: nn.Module, data, device: Any = "auto", flip: bool = False, amp: Any = "auto",
                     channels_last: Any = "auto", batch_size: int = 64, num_workers: int = 0,
                     out: str | Path | None = None, chunk_rows: int | None = None,
                     forward_fn: ForwardFn | None = None, normalize: bool = True, fold_bn: Any = "auto",
                     meta: Mapping[str, Any] | None = None, desc: str = "features") -> np.ndarray:
    """Features of every item of ``data`` (a Dataset or a non-shuffling DataLoader), in order.

    Returns float32 (N, D), L2-normalised rows (``normalize=False`` keeps the raw output, e.g. to
    average views yourself). With ``out`` (a ``.npy`` path) the rows go to disk in chunks of
    ``chunk_rows`` (default 8192) through a memmap written under a temporary name and renamed when
    complete, next to a JSON sidecar; the finished file is returned as a read-only memmap.
    ``meta`` entries are added to the sidecar (with ``bn_folded``: the pairs ``fold_bn`` folded, see
    :func:`iter_features`). An empty dataset is an error."""
    t0 = time.time()
    dev = resolve_device(device)
    loader, step = feature_loader(data, batch_size, num_workers, pin_memory=dev.type == "cuda")
    expected = _expected_rows(loader)
    if expected == 0:
        raise ValueError("no items to extract features from")
    folding: dict = {}
    chunks = _chunks(model, loader, step, dev, flip, amp, channels_last, chunk_rows or DEFAULT_CHUNK_ROWS,
                     forward_fn, normalize, fold_bn, folding, desc)

    with closing(chunks):
        if out is None:
            return _collect(chunks, expected)
        return _write_npy(chunks, expected, Path(out), model, dev, flip, amp, normalize, forward_fn, meta, t0,
                          folding)


def _collect(chunks, expected: int | None) -> np.ndarray:
    if expected is None:
        parts = [c for c, _ in chunks]
        if not parts:
            raise ValueError("no items to extract features from")
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    feats = None
    rows = 0
    for chunk, start in chunks:
        if feats is None:
            feats = np.empty((expected, chunk.shape[1]), dtype=np.float32)
        feats[start:start + chunk.shape[0]] = chunk
        rows = start + chunk.shape[0]
    if rows != expected:
        raise RuntimeError(f"the loader produced {rows} rows, expected {expected}")
    return feats


def _write_npy(chunks, expected, out: Path, model, dev, flip, amp, normalize, forward_fn, meta, t0, folding):
    if expected is None:
        raise ValueError("out=... needs a loader whose length is known up front (a map-style dataset "
                         "with the default batch sampler)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    mm = None
    rows = 0
    try:
        for chunk, start in chunks:
            if mm is None:
                mm = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                               shape=(expected, chunk.shape[1]))
            if start + chunk.shape[0] > expected:
                raise RuntimeError(f"the loader produced more than the expected {expected} rows")
            mm[start:start + chunk.shape[0]] = chunk
            rows = start + chunk.shape[0]
        if rows != expected:
            raise RuntimeError(f"the loader produced {rows} rows, expected {expected}")
        dim = int(mm.shape[1])
        mm.flush()
        mm = None  # closes the mapping before the rename
        os.replace(partial, out)
    except BaseException:
        mm = None
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        raise
    amp_dtype = resolve_amp(amp, dev)
    info = {
        "file": out.name, "count": expected, "dim": dim, "dtype": "float32", "normalized": bool(normalize),
        "flip": bool(flip), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
        "device": str(dev), "arch": getattr(model, "arch", type(model).__name__),
        "pooling": getattr(model, "pooling", None), "init_source": getattr(model, "init_source", None),
        "forward_fn": getattr(forward_fn, "__name__", None) if forward_fn else "model(x)",
        "bn_folded": folding.get("folded", 0),
        "seconds": round(time.time() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    info.update(dict(meta or {}))
    atomic_write_json(sidecar_path(out), info)
    return np.load(out, mmap_mode="r")


def read_sidecar(out: str | Path) -> dict:
    """The JSON sidecar of a features file written by :func:`extract_features`."""
    return json.loads(sidecar_path(out).read_text())


def pixel_features(records, profile, size: tuple[int, int] = (16, 8)) -> np.ndarray:
    """The no-network baseline: each image resized as the test transform does (profile height x
    width, ImageNet-normalised), block-averaged to ``size`` (h, w) cells of RGB and L2-normalised.
    An (N, 3 * h * w) float32 array."""

    tf = test_transform(profile.data.height, profile.data.width)
    out = []
    for start in range(0, len(records), 64):
        batch = torch.stack([tf(load_image(r.path)) for r in records[start:start + 64]])
        out.append(F.normalize(F.adaptive_avg_pool2d(batch, size).flatten(1), dim=1))
    if not out:
        raise ValueError("no records to compute pixel features of")
    return torch.cat(out).numpy().astype(np.float32)
