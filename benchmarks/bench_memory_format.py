"""Benchmark of the convolution memory format on the CPU: NCHW (contiguous) against channels_last (NHWC).

Usage::

    python benchmarks/bench_memory_format.py                  # mobilenetv2 and resnet50, 2 threads
    python benchmarks/bench_memory_format.py --archs mobilenetv2 --iters 4 --threads 1

Prints one JSON document. For each network (the kit's ``ReIDNet``: backbone, pooling, BN neck), each
ISA (``native``, and ``avx2``: oneDNN limited to AVX2 with ``ONEDNN_MAX_CPU_ISA=AVX2``, as on most
laptops) and each precision (fp32; bf16 autocast only where the CPU computes it natively, as
``reidkit.core.device.amp_dtype`` decides), it times, in a fresh subprocess:

* ``train``: one training step (forward, a loss on the features, backward, an Adam step) on a batch
  of the workshop's size (32 images at 256 x 128; 8 for ResNet-50);
* ``extract``: one forward pass of 64 images in eval and inference mode, the network's work in
  each batch of :func:`reidkit.nets.features.extract_features` (no loader, no flip).

Each child applies the kit's CPU allocator setting first (``tune_cpu_allocator``, as the engine and
``extract_features`` do). The median of ``--iters`` repetitions after one warm-up is kept; ``speedup`` is NCHW time over
channels_last time. The kit turns channels_last on for CUDA and the CPU
(``reidkit.core.device.channels_last``) because of this measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = {"mobilenetv2": 32, "resnet50": 8}


def measure(arch: str, layout: str, amp: bool, iters: int, threads: int) -> dict:
    """One configuration, in this process: median seconds of a train step and an extraction batch."""
    import torch

    from reidkit.core.device import tune_cpu_allocator
    from reidkit.nets.backbones import build_model

    tune_cpu_allocator()  # as the kit's training and extraction loops run on the CPU
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(arch, pretrained=False, device="cpu")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4)
    x = torch.randn(BATCH[arch], 3, 256, 128).contiguous(memory_format=fmt)
    xe = torch.randn(64, 3, 256, 128).contiguous(memory_format=fmt)

    def train_step():
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            feat = model(x)
        loss = feat.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def extract():
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model(xe)

    out = {}
    for name, fn in (("train_s", train_step), ("extract_s", extract)):
        times = []
        for i in range(iters + 1):
            t0 = time.perf_counter()
            fn()
            if i:
                times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times), 4)
    return out


def _child(args) -> None:
    print(json.dumps(measure(args.arch, args.layout, args.amp, args.iters, args.threads)))


def _run(arch: str, layout: str, amp: bool, isa: str, iters: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), REIDKIT_OFFLINE="1")
    if isa == "avx2":
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    cmd = [sys.executable, __file__, "--child", "--arch", arch, "--layout", layout, "--iters", str(iters),
           "--threads", str(threads)] + (["--amp"] if amp else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="mobilenetv2,resnet50")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arch", help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    sys.path.insert(0, str(ROOT))
    import torch

    from reidkit.core.device import bf16_native, cpu_description

    rows = []
    for arch in args.archs.split(","):
        for isa in ("native", "avx2"):
            # bf16 autocast is what the kit runs only where it is native, and never under AVX2 alone
            for amp in ([False, True] if isa == "native" and bf16_native("cpu") else [False]):
                res = {lay: _run(arch, lay, amp, isa, args.iters, args.threads)
                       for lay in ("contiguous", "channels_last")}
                row = {"arch": arch, "isa": isa, "precision": "bf16 autocast" if amp else "fp32",
                       "batch": BATCH[arch],
                       **{f"{lay}_{k}": v for lay, r in res.items() for k, v in r.items()}}
                for k in ("train_s", "extract_s"):
                    row[f"{k[:-2]}_speedup"] = round(res["contiguous"][k] / res["channels_last"][k], 2)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    print(json.dumps({"meta": {"cpu": cpu_description(), "threads": args.threads,
                               "torch": torch.__version__, "iters": args.iters}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
