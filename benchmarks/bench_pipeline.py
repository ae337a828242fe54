"""Benchmark of the data pipeline: JPEG decode + the training augmentation, the training step and
feature extraction with their real DataLoaders; prints one JSON object to stdout.

Sections:

* ``transforms``: images/s per core (one thread) of decode + ``train_transform`` over the embedded
  mini-MARS JPEGs (768 files, all 256x128), for the PIL backend (PIL decode, torchvision v1 steps)
  and the tensor backend (``torchvision.io`` decode to uint8, v2 resize + flip, fused pad/crop and
  normalisation); at the workshop profile's size (256x128: no resize for these files), DGL /
  SYSU-30k's 384x128 and the smoke profile's 128x64. Also the decode-only rates (PIL, torchvision
  one file at a time, torchvision's batched list decode), reading through a tar shard instead of
  single files, and the largest difference between the two backends on fixed seeds.
* ``gpu_decode``: ``decode_jpeg(list, device="cuda")`` (nvjpeg) + the tensor augmentation on the GPU;
  only run when CUDA exists (reported as skipped otherwise).
* ``train_step``: the workshop profile's HHCL training iteration (MobileNetV2, batch 32, its autocast
  dtype, the CMhybrid memory) through the real ``DataLoader`` (ImageDataset + CameraAwarePKSampler,
  the profile's workers) against the bare forward + backward of the same network on batches held in
  memory: one loop (the kit's step: autocast forward, memory loss, backward, Adam), two batch
  sources. Goal: ratio <= 1.15.
* ``extract``: ``extract_features`` over ImageDataset(test_transform) against the bare forward of the
  same batches held in memory (same eval mode, inference mode, autocast, and the same network:
  BatchNorms folded in fp32, as ``extract_features`` does). Goal: ratio <= 1.1. Also the bare fp32
  forward, folded against the model as it is (``fold_speedup_fp32``).
* ``allocator``: the bare workshop forward (extraction's 256 images) and training step, each in
  fresh processes with and without the kit's CPU allocator setting (``tune_cpu_allocator``, which
  the engine and ``extract_features`` apply on the CPU), interleaved. The other sections run under
  it, as the kit's loops do, and in the memory format the kit uses (channels_last on the CPU).
* ``sysu30k_rate``: the decode rate a GPU SYSU-30k run needs (29.6M JPEGs per epoch) from a stated
  GPU training throughput, and the CPU workers that the measured per-core rate implies.

Timings are the best of interleaved repeats (the machine is shared). Usage::

    python benchmarks/bench_pipeline.py [--quick] [--section {transforms,gpu_decode,train_step,extract,allocator,all}]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from proc_memory import peak_mb  # noqa: E402

from reidkit.core.device import channels_last, cpu_description, tune_cpu_allocator  # noqa: E402
from reidkit.data import transforms as tfm  # noqa: E402
from reidkit.nets.features import inference_network  # noqa: E402
from reidkit.nets.inference import fold_batchnorm  # noqa: E402

SIZES = {"workshop_256x128": (256, 128), "dgl_sysu_384x128": (384, 128), "smoke_128x64": (128, 64)}
SYSU_JPEGS_PER_EPOCH = 29_600_000
#: stated GPU training throughputs (images/s) for DGL's ResNet-50 at 384x128 (49k pixels, about
#: ImageNet's 224x224 = 50k): NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README, training
#: performance on one GPU (pytorch-21.03 container): A100-80GB 938 img/s TF32, 2,470 img/s mixed
#: precision; V100-16GB 367 FP32, 1,200 mixed. "H100_amp_estimate" (2x the A100) is an assumption,
#: not a published figure. The DGL reference trains in fp32 (TF32 on Ampere and later).
GPU_TRAIN_IMGS_PER_S = {"V100_fp32": 367, "A100_tf32": 938, "A100_amp": 2470, "H100_amp_estimate": 5000}


def sample_paths() -> list[str]:
    from reidkit.data.datasets import load_dataset

    ds = load_dataset("mini-mars")
    return [r.path for r in list(ds.train) + list(ds.query) + list(ds.gallery)]


def best_rate(fn, items, repeats: int) -> float:
    """Items per second of ``fn`` over ``items``: the best of ``repeats`` passes."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def tar_shard(paths: list[str]) -> bytes:
    """The files as one uncompressed tar (WebDataset-style shard), in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, p in enumerate(paths):
            tar.add(p, arcname=f"{i:06d}.jpg")
    return buf.getvalue()


def decode_rates(paths: list[str], repeats: int) -> dict:
    """Decode-only images/s: PIL, torchvision one file at a time, torchvision batched list, tar."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    datas = [read_file(p) for p in paths]
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        decode_jpeg(datas, mode=ImageReadMode.RGB)
        best = min(best, time.perf_counter() - t0)
    shard = tar_shard(paths)

    def from_tar(_):
        with tarfile.open(fileobj=io.BytesIO(shard), mode="r") as tar:
            for m in tar:
                data = torch.frombuffer(bytearray(tar.extractfile(m).read()), dtype=torch.uint8)
                decode_jpeg(data, mode=ImageReadMode.RGB)

    tar_best = min(_timed(lambda: from_tar(None)) for _ in range(repeats))
    return {
        "pil_open_convert": best_rate(tfm.load_image, paths, repeats),
        "torchvision_read_decode": best_rate(tfm.decode_image_uint8, paths, repeats),
        "torchvision_read_file_only": best_rate(read_file, paths, repeats),
        "torchvision_batched_list_decode_no_read": len(paths) / best,
        "tar_shard_read_decode": len(paths) / tar_best,
        "note": "files are in the page cache here: file reads cost ~1-2 % of a decode, so tar shards "
                "only help where opening 29.6M small files is the bottleneck (network / spinning storage)",
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def backend_difference(paths: list[str], size: tuple[int, int]) -> dict:
    """Largest |PIL - tensor| (normalised units and uint8 levels) on fixed seeds, and whether the
    random draws (RNG states after the call) were the same."""
    pil_tf = tfm.train_transform(*size, backend="pil")
    ten_tf = tfm.train_transform(*size, backend="tensor")
    worst, same_draws, equal = 0.0, True, 0
    for k, p in enumerate(paths[:64]):
        outs = []
        for tf, img in ((pil_tf, tfm.load_image(p)), (ten_tf, tfm.decode_image_uint8(p))):
            torch.manual_seed(k)
            random.seed(k)
            outs.append((tf(img), torch.get_rng_state(), random.getstate()))
        (a, ta, ra), (b, tb, rb) = outs
        same_draws &= bool(torch.equal(ta, tb)) and ra == rb
        worst = max(worst, float((a - b).abs().max()))
        equal += int(torch.equal(a, b))
    return {"images": min(64, len(paths)), "same_random_draws": same_draws, "bit_identical": equal,
            "max_abs_diff_normalised": worst,
            "max_diff_uint8_levels": round(worst * 255 * min(tfm.IMAGENET_STD), 3)}


def section_transforms(paths: list[str], repeats: int) -> dict:
    torch.set_num_threads(1)
    out: dict = {"threads": 1, "images": len(paths), "decode_only_imgs_per_s": decode_rates(paths, repeats)}
    for name, size in SIZES.items():
        row: dict = {"size": list(size)}
        pil_tf = tfm.train_transform(*size, backend="pil")
        ten_tf = tfm.train_transform(*size, backend="tensor")
        rates = {"pil": [], "tensor": []}
        for _ in range(repeats):  # interleaved: both see the same machine load
            rates["pil"].append(best_rate(lambda p: pil_tf(tfm.load_image(p)), paths, 1))
            rates["tensor"].append(best_rate(lambda p: ten_tf(tfm.decode_image_uint8(p)), paths, 1))
        row["pil_imgs_per_s"] = max(rates["pil"])
        row["tensor_imgs_per_s"] = max(rates["tensor"])
        row["speedup_tensor_over_pil"] = row["tensor_imgs_per_s"] / row["pil_imgs_per_s"]
        row["difference"] = backend_difference(paths, size)
        out[name] = row
    return out


def section_gpu_decode(paths: list[str], repeats: int) -> dict:
    """nvjpeg batched decode + the tensor augmentation on the GPU (CUDA only)."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    datas = [read_file(p) for p in paths]
    tf = tfm.train_transform(384, 128, backend="tensor")
    decode_jpeg(datas[:8], mode=ImageReadMode.RGB, device="cuda")  # warm-up (nvjpeg handles)
    dec, full = math.inf, math.inf
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        imgs = decode_jpeg(datas, mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        batch = torch.stack([tf(im) for im in imgs])
        torch.cuda.synchronize()
        dec, full = min(dec, t1 - t0), min(full, time.perf_counter() - t0)
    return {"device": torch.cuda.get_device_name(), "batch_shape": list(batch.shape),
            "nvjpeg_batched_decode_imgs_per_s": len(paths) / dec,
            "decode_plus_augment_384x128_imgs_per_s": len(paths) / full,
            "note": "augmentation here is per image (Python per-image calls); batched GPU augmentation "
                    "would be faster"}


def workshop_setup():
    """The workshop profile's model, memory, sampler inputs and autocast dtype on the CPU. The model
    is in the memory format the kit trains and extracts in there (channels_last: the engine and
    ``extract_features``), so that every loop here, the bare ones included, runs the kit's kernels."""
    import numpy as np

    from reidkit.config import get_profile
    from reidkit.core.device import bf16_native, seed_everything
    from reidkit.data.datasets import load_dataset
    from reidkit.data.records import relabel
    from reidkit.hhcl.memory import ClusterMemory
    from reidkit.nets.backbones import build_model

    prof = get_profile("workshop")
    seed_everything(prof.seed)
    recs = list(load_dataset(prof.data.dataset).train)
    labels = np.asarray(relabel(recs)[0])  # stand-in pseudo-labels: the true ids
    model = build_model(prof.model.arch, prof.model.pooling, pretrained=False, last_stride=prof.model.last_stride,
                        device="cpu")  # weights do not change the cost
    if channels_last("cpu"):
        model = model.to(memory_format=torch.channels_last)
    cfg = prof.hhcl
    feats = torch.nn.functional.normalize(torch.randn(len(recs), model.feat_dim), dim=1)
    mem = ClusterMemory.from_features(feats, labels, mode=cfg.memory, temp=cfg.temp, momentum=cfg.momentum,
                                      hard_weight=cfg.hard_weight, num_instances=cfg.num_instances,
                                      generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                           weight_decay=cfg.weight_decay)
    amp = torch.bfloat16 if cfg.amp and bf16_native(torch.device("cpu")) else None  # the kit's rule
    return prof, recs, labels, model, mem, opt, amp


def train_loader(prof, recs, labels, backend: str):
    import numpy as np
    from torch.utils.data import BatchSampler, DataLoader

    from reidkit.data.samplers import CameraAwarePKSampler
    from reidkit.data.transforms import ImageDataset, train_transform

    d, cfg = prof.data, prof.hhcl
    tf = train_transform(d.height, d.width, flip=d.flip, pad=d.pad, erasing_p=d.erasing_p,
                         erasing_fill=d.erasing_fill, backend=backend)
    camids = np.array([r.camid for r in recs])
    sampler = CameraAwarePKSampler(labels, camids, num_instances=cfg.num_instances, seed=1,
                                   camera_aware=cfg.camera_aware)
    return DataLoader(ImageDataset(recs, tf, labels=labels.tolist()),
                      batch_sampler=BatchSampler(sampler, cfg.batch_size, drop_last=True),
                      num_workers=d.workers, generator=torch.Generator().manual_seed(1))


def _as_kit(x: torch.Tensor) -> torch.Tensor:
    """A batch in the memory format the kit's steps convert it to (HHCL, DGL, extract_features)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last("cpu") else x


def extraction_held(prof, limit: int) -> tuple[list, dict]:
    """The first ``limit`` sample images of the extraction sections, as an ImageDataset per backend,
    and the tensor backend's batches decoded once and held in memory (the bare loops' input)."""
    from torch.utils.data import DataLoader

    from reidkit.data.datasets import load_dataset
    from reidkit.data.transforms import ImageDataset, test_transform

    ds = load_dataset(prof.data.dataset)
    recs = (list(ds.query) + list(ds.gallery) + list(ds.train))[:limit]
    size = (prof.data.height, prof.data.width)
    datasets = {b: ImageDataset(recs, test_transform(*size, backend=b)) for b in tfm.BACKENDS}
    held = [b["img"] for b in DataLoader(datasets["tensor"], batch_size=prof.data.test_batch_size)]
    return held, datasets


def kit_network(model, amp):
    """The network as extract_features runs it (``inference_network``, ``fold_bn="auto"``): in fp32
    a copy with the BatchNorms folded into the convolutions, under autocast the model itself."""
    return inference_network(model, "auto", amp)[0]


def bare_extract(model, held: list, amp) -> None:
    """The network's work in extract_features' batches: eval, inference mode, autocast, kit format
    (``model``: :func:`kit_network`'s)."""
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        for x in held:
            model(_as_kit(x)).float()


def train_iterations(model, mem, batches, opt, iters: int, amp) -> tuple[float, float]:
    """The kit's HHCL step (autocast forward, memory loss, backward, Adam step) ``iters`` times on
    batches from ``batches`` (a DataLoader, restarted when exhausted, or a list). Returns the
    seconds spent getting batches and the seconds spent in the step (workers=0: synchronous)."""
    model.train()
    it, fetch, step = iter(batches), 0.0, 0.0
    for _ in range(iters):
        t0 = time.perf_counter()
        batch = next(it, None)
        if batch is None:
            it = iter(batches)
            batch = next(it)
        t1 = time.perf_counter()
        x, y = _as_kit(batch["img"]), torch.as_tensor(batch["label"])
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            feat = model(x)
        loss = mem(feat.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fetch, step = fetch + t1 - t0, step + time.perf_counter() - t1
    return fetch, step


def section_train_step(iters: int, repeats: int) -> dict:
    """Real DataLoader iteration vs the bare forward + backward.

    ``ratio_<backend>_same_iterations``: (batch fetch + step) / step over the same iterations (robust
    to load drift on a shared machine); ``ratio_<backend>_end_to_end``: best per-iteration time with
    the loader / best with batches held in memory, interleaved runs."""
    prof, recs, labels, model, mem, opt, amp = workshop_setup()
    out: dict = {"profile": "workshop", "arch": prof.model.arch, "batch_size": prof.hhcl.batch_size,
                 "size": [prof.data.height, prof.data.width], "workers": prof.data.workers,
                 "autocast": str(amp), "threads": torch.get_num_threads(), "iters_per_timing": iters}
    loaders = {b: train_loader(prof, recs, labels, b) for b in tfm.BACKENDS}
    held = [b for _, b in zip(range(iters), loaders["tensor"])]  # the bare loop's batches
    train_iterations(model, mem, held, opt, 2, amp)  # warm-up
    runs: dict = {"bare": [], **{b: [] for b in tfm.BACKENDS}}
    for _ in range(repeats):
        for name in runs:
            runs[name].append(train_iterations(model, mem, held if name == "bare" else loaders[name], opt, iters, amp))
    bare = min(f + s for f, s in runs["bare"]) / iters
    out["bare_s_per_iter"] = bare
    for b in tfm.BACKENDS:
        fetch, step = (sum(x) for x in zip(*runs[b]))
        out[f"{b}_fetch_s_per_batch"] = fetch / (iters * repeats)
        out[f"{b}_step_s_per_iter"] = step / (iters * repeats)
        out[f"ratio_{b}_same_iterations"] = (fetch + step) / step
        out[f"ratio_{b}_end_to_end"] = min(f + s for f, s in runs[b]) / iters / bare
    out["goal"] = "ratio <= 1.15 (default backend: %s)" % tfm.DEFAULT_BACKEND
    return out


def section_extract(repeats: int, limit: int) -> dict:
    """extract_features through ImageDataset vs the bare forward of the same batches in memory
    (``limit`` images). ``ratio_<backend>_from_parts``: (bare + DataLoader alone) / bare, robust to
    load drift; ``ratio_<backend>_over_bare``: the interleaved end-to-end timings."""
    from reidkit.nets.features import extract_features, feature_loader

    prof, _, _, model, _, _, amp = workshop_setup()
    held, datasets = extraction_held(prof, limit)
    bs, size = prof.data.test_batch_size, (prof.data.height, prof.data.width)
    n = len(datasets["tensor"])
    net = kit_network(model, amp)
    folded = net if net is not model else fold_batchnorm(model)[0]  # the fp32 fold, made once

    def bare():
        bare_extract(net, held, amp)

    def real(b):
        extract_features(model, datasets[b], device="cpu", batch_size=bs, num_workers=prof.data.workers,
                         amp=amp or False)

    def loader_only(b):  # the kit's loader and its per-batch step (uint8 batches normalised: tensor backend)
        loader, step = feature_loader(datasets[b], bs, prof.data.workers)
        for batch in loader:
            _as_kit(step(batch["img"]) if step is not None else batch["img"])

    bare()  # warm-up
    # the fold where extract_features applies it (fp32), whatever the profile's autocast
    fold_runs = {"fp32_unfolded": lambda: bare_extract(model, held, None),
                 "fp32_folded": lambda: bare_extract(folded, held, None)}
    times: dict = {"bare": [], **{k: [] for k in fold_runs}, **{b: [] for b in tfm.BACKENDS},
                   **{f"loader_{b}": [] for b in tfm.BACKENDS}}
    for _ in range(repeats):
        times["bare"].append(_timed(bare))
        for k, fn in fold_runs.items():
            times[k].append(_timed(fn))
        for b in tfm.BACKENDS:
            times[b].append(_timed(lambda: real(b)))
            times[f"loader_{b}"].append(_timed(lambda: loader_only(b)))
    best = {k: min(v) for k, v in times.items()}
    out = {"images": n, "batch_size": bs, "size": list(size), "autocast": str(amp),
           "threads": torch.get_num_threads(), **{f"{k}_s": v for k, v in best.items()},
           "bare_imgs_per_s": n / best["bare"], "bare_folded": net is not model,
           "fold_speedup_fp32": best["fp32_unfolded"] / best["fp32_folded"]}
    for b in tfm.BACKENDS:
        out[f"ratio_{b}_over_bare"] = best[b] / best["bare"]
        out[f"ratio_{b}_from_parts"] = (best["bare"] + best[f"loader_{b}"]) / best["bare"]
    out["goal"] = "ratio <= 1.1 (default backend: %s)" % tfm.DEFAULT_BACKEND
    return out


def _allocator_child(what: str, tuned: bool, repeats: int, limit: int) -> dict:
    """In a fresh process: the best of ``repeats`` bare extraction forwards or training steps, with
    or without the kit's allocator setting (applied before the first tensor), and the peak RSS."""
    env = {**os.environ, "REIDKIT_MALLOC_TUNING": "1" if tuned else "0"}
    code = ("import json, sys; sys.path[:0] = [%r, %r]; import bench_pipeline as bp; "
            "print(json.dumps(bp.allocator_probe(%r, %d, %d)))" % (str(ROOT), str(HERE), what, repeats, limit))
    out = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def allocator_probe(what: str, repeats: int, limit: int) -> dict:
    """The child's side of :func:`_allocator_child`."""
    state = tune_cpu_allocator()
    prof, recs, labels, model, mem, opt, amp = workshop_setup()
    if what == "extract":
        held, _ = extraction_held(prof, limit)
        net = kit_network(model, amp)

        def once():
            bare_extract(net, held, amp)
    else:
        held = [b for _, b in zip(range(4), train_loader(prof, recs, labels, "tensor"))]

        def once():
            train_iterations(model, mem, held, opt, len(held), amp)
    once()  # warm-up
    best = min(_timed(once) for _ in range(repeats))
    per = len(held) if what == "train_step" else 1
    # VmHWM: this process's own peak (ru_maxrss keeps the parent's across exec)
    return {"tuned": bool(state.get("tuned")), "why": state.get("why"), "s": best / per, "peak_rss_mb": peak_mb()}


def section_allocator(repeats: int, limit: int) -> dict:
    """Bare extraction forward and training step with and without ``tune_cpu_allocator``."""
    out: dict = {"what": "s = best bare extraction forward over the images / best training step; fresh "
                         "process per run, interleaved", "images": limit}
    for what in ("extract", "train_step"):
        runs: dict = {"default": [], "tuned": []}
        for _ in range(2):
            for name in runs:
                runs[name].append(_allocator_child(what, name == "tuned", repeats, limit))
        row = {name: {"s": min(r["s"] for r in rs), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                      "applied": rs[0]["tuned"], "why": rs[0]["why"]} for name, rs in runs.items()}
        row["speedup"] = row["default"]["s"] / row["tuned"]["s"]
        out[what] = row
    return out


def sysu30k_rate(transforms: dict | None) -> dict:
    """Decode + augmentation rate a GPU SYSU-30k epoch needs, and the CPU cores that implies."""
    per_core = {}
    if transforms and "dgl_sysu_384x128" in transforms:
        row = transforms["dgl_sysu_384x128"]
        per_core = {"pil": row["pil_imgs_per_s"], "tensor": row["tensor_imgs_per_s"]}
    plans = {}
    for gpu, rate in GPU_TRAIN_IMGS_PER_S.items():
        plan = {"gpu_train_imgs_per_s": rate, "decode_imgs_per_s_needed": rate,
                "epoch_hours_at_that_rate": SYSU_JPEGS_PER_EPOCH / rate / 3600}
        for b, r in per_core.items():  # 25 % headroom for collation, pinning and the sampler
            plan[f"cpu_workers_{b}"] = math.ceil(1.25 * rate / r)
        plans[gpu] = plan
    return {
        "jpegs_per_epoch": SYSU_JPEGS_PER_EPOCH,
        "measured_per_core_imgs_per_s_384x128": per_core,
        "throughput_source": "NVIDIA DeepLearningExamples PyTorch ResNet-50 v1.5 README, 1-GPU training: "
                             "V100-16GB 367 img/s FP32; A100-80GB 938 img/s TF32, 2,470 img/s AMP; the H100 "
                             "figure is an assumed 2x A100; 384x128 has about the pixel count of 224x224",
        "plans": plans,
        "how": "DataLoader workers = cpu_workers_tensor (tensor backend), pin_memory, persistent workers, "
               "prefetch_factor >= 2; beyond the host's cores decode on the GPU with decode_jpeg(list, "
               "device='cuda') (nvjpeg) and augment there; tar shards only where the storage, not the "
               "decode, is the limit (29.6M small files; not measurable on this page-cached disk)",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images, iterations and repeats")
    ap.add_argument("--section", choices=["transforms", "gpu_decode", "train_step", "extract", "allocator", "all"],
                    default="all")
    args = ap.parse_args(argv)
    paths = sample_paths()
    if args.quick:
        paths = paths[:96]
    repeats, iters, limit = (1, 2, 64) if args.quick else (3, 6, 256)
    threads = torch.get_num_threads()
    report: dict = {"benchmark": "reidkit data pipeline", "quick": args.quick,
                    "machine": {"cpus": os.cpu_count(), "cpu": cpu_description(), "torch_threads": threads, "torch": torch.__version__,
                                "python": platform.python_version(), "cuda": torch.cuda.is_available(),
                                "loadavg_at_start": [round(v, 2) for v in os.getloadavg()]},
                    "default_backend": tfm.DEFAULT_BACKEND}
    sections = (["transforms", "gpu_decode", "train_step", "extract", "allocator"] if args.section == "all"
                else [args.section])
    tune_cpu_allocator()  # as the kit's training and extraction loops do on the CPU
    for name in sections:
        torch.set_num_threads(threads)
        if name == "transforms":
            report[name] = section_transforms(paths, repeats)
        elif name == "gpu_decode":
            report[name] = section_gpu_decode(paths, repeats)
        elif name == "train_step":
            report[name] = section_train_step(iters, repeats)
        elif name == "allocator":
            report[name] = section_allocator(repeats, limit)
        else:
            report[name] = section_extract(repeats, limit)
        print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)
    report["sysu30k_rate"] = sysu30k_rate(report.get("transforms"))
    report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
