"""What a paper profile costs on a GPU: peak memory and time per epoch, **derived, not measured**.

No GPU run stands behind these numbers. They are derived from two things measured on the CPU:

* the network's FLOPs per image (``torch.utils.flop_counter.FlopCounterMode`` over one forward
  and one backward pass, at the profile's input size), and
* its activation memory per image: the bytes of every tensor autograd saves for the backward pass
  (``torch.autograd.graph.saved_tensors_hooks``, parameters left out), measured at batch 2 and
  scaled by the batch (both grow linearly with it).

Both are measured once by :func:`measure_network` and kept in :data:`NETWORK_COSTS`, so that
``reidkit train`` prints the cost at start without spending minutes (a test re-measures one).
The classifier heads of DGL (28,310 classes on SYSU-30k) are added analytically.

**Time.** FLOPs divided by an *effective* rate, calibrated on NVIDIA's published single-GPU
ResNet-50 training throughput on an A100 80GB (DeepLearningExamples, PyTorch ResNet50 v1.5,
pytorch-21.03 container: 938 img/s in TF32, 2,470 img/s in mixed precision) times the FLOPs of one
such training image at 224x224 (measured the same way). That rate already holds a convnet's real
utilisation (batch norm, ReLU and memory traffic), but it came with DALI data loading and a tuned
pipeline: read the times as a lower bound, reached only when JPEG decoding keeps up (the
``decode_img_s`` field says how many images per second that needs). Per epoch: the training
iterations, the forward passes of the clustering step (HHCL, every epoch) and the evaluation spread
over its period; the CPU parts of clustering (Jaccard, DBSCAN) are left out.

**Memory.** weights + gradients + optimiser state (Adam 2 tensors per parameter, AMSGrad 3, SGD
momentum 1) + 1.2 x the saved activations of one batch (the backward pass's transient gradients)
+ the clustering features (HHCL) + 1 GB for the CUDA context and cuDNN workspace. bf16 autocast
(``amp``) is counted as halving the activations.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from reidkit.nets.backbones import ReIDNet
from reidkit.nets.mgn import build_mgn

__all__ = ['estimate', 'cost_line', 'measure_network', 'network_cost', 'NETWORK_COSTS', 'GPU', 'DATASET_SIZES',
           'PAPER_PROFILES', 'NoCostModel']


class NoCostModel(ValueError):
    """No figure can be derived for this run: a profile on no paper dataset, a method without a
    cost model, a network whose cost is not cached. Any other error is a bug and propagates."""


PAPER_PROFILES = ("market1501", "dukemtmcreid", "msmt17", "sysu30k")


#: the GPU assumed and its effective training rate (see the module docstring)
GPU = {
    "name": "A100 80GB",
    "ref_img_s": {"fp32": 938.0, "bf16": 2470.0},
    "ref_network": ("torchvision:resnet50", 224, 224),
    "source": "NVIDIA DeepLearningExamples PyTorch ResNet50 v1.5, 1x A100 80GB: 938 img/s TF32, 2,470 img/s AMP",
}


#: (training images, training identities, query, gallery) of the datasets; SYSU-30k's training
#: images are streamed as bags (three per folder), its identities are the 28,310 folders
DATASET_SIZES = {
    "market1501": (12_936, 751, 3_368, 15_913),
    "dukemtmcreid": (16_522, 702, 2_228, 17_661),
    "msmt17": (32_621, 1_041, 11_659, 82_161),
    "sysu30k": (29_606_918, 28_310, 1_000, 478_731),
}


#: per-image cost of each network at an input size, measured by :func:`measure_network` on the
#: CPU (torch 2.14, batch 2, train mode, fp32): forward GFLOPs, forward+backward GFLOPs, MB of
#: activations saved for backward, millions of parameters (without DGL's classifier heads)
NETWORK_COSTS: dict[tuple[str, int, int], dict[str, float]] = {
    # calibration: the network behind GPU["ref_img_s"]
    ("torchvision:resnet50", 224, 224):
        {"fwd_gflop": 8.1784, "train_gflop": 24.2991, "act_mb": 82.13, "params_m": 25.557},
    # HHCL: ResNet-50, last stride 1, 256x128
    ("reidnet:resnet50:ls1", 256, 128):
        {"fwd_gflop": 8.1065, "train_gflop": 24.1655, "act_mb": 60.86, "params_m": 23.512},
    # DGL full model: MGN at 384x128 (one class per head; the real heads are added analytically)
    ("mgn", 384, 128):
        {"fwd_gflop": 23.7696, "train_gflop": 71.0777, "act_mb": 133.34, "params_m": 68.81},
    # DGL unary-only: ft_net (ResNet-50, last stride 2) on 192x96 crops; SYSU-30k test size 256x128
    ("reidnet:resnet50:ls2", 192, 96):
        {"fwd_gflop": 3.0028, "train_gflop": 8.9217, "act_mb": 30.33, "params_m": 23.512},
    ("reidnet:resnet50:ls2", 256, 128):
        {"fwd_gflop": 5.3383, "train_gflop": 15.8608, "act_mb": 53.73, "params_m": 23.512},
}


CONTEXT_GB = 1.0            # CUDA context + cuDNN workspace


BACKWARD_TRANSIENT = 1.2    # saved activations x this: the gradients alive during backward


AMP_ACTIVATION = 0.5        # bf16 autocast halves the activations (approximately)


def _build(network: str):
    """The network named by a :data:`NETWORK_COSTS` key, random weights, on the CPU."""

    if network == "torchvision:resnet50":

        return torchvision.models.resnet50(weights=None)
    if network == "mgn":

        return build_mgn(1, pretrained=False, device="cpu")
    if network.startswith("reidnet:"):
        _, arch, stride = network.split(":")
        return ReIDNet(arch, "avg", num_classes=0, last_stride=int(stride.removeprefix("ls")))
    raise KeyError(f"unknown network {network!r}")


def measure_network(network: str, height: int, width: int, batch: int = 2) -> dict[str, float]:
    """FLOPs (forward; forward + backward) and saved-activation bytes per image of ``network`` at
    ``height x width``, in train mode, fp32, on the CPU. Returns the :data:`NETWORK_COSTS` entry."""

    torch.manual_seed(0)
    model = _build(network).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            saved[ptr] = max(saved.get(ptr, 0), storage.nbytes())
        return t

    x = torch.randn(batch, 3, height, width)
    with FlopCounterMode(display=False) as fwd:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
            loss = (out if isinstance(out, torch.Tensor) else out.feat).float().sum()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    f, b = fwd.get_total_flops(), bwd.get_total_flops()
    return {"fwd_gflop": round(f / batch / 1e9, 4), "train_gflop": round((f + b) / batch / 1e9, 4),
            "act_mb": round(sum(saved.values()) / batch / 2**20, 2),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}


def network_cost(network: str, height: int, width: int) -> dict[str, float]:
    """The cached cost of a network at an input size. A size not in :data:`NETWORK_COSTS` (an
    override of the input size) is scaled from the cached size of the same network by the pixel
    count (a convnet's FLOPs and activations grow with it), and marked ``"scaled": True``."""
    key = (network, int(height), int(width))
    if key in NETWORK_COSTS:
        return NETWORK_COSTS[key]
    base = next((k for k in NETWORK_COSTS if k[0] == network), None)
    if base is None:
        raise NoCostModel(f"no cached cost of {network}; measure it with measure_network({network!r}, H, W)")
    ratio = (height * width) / (base[1] * base[2])
    cost = dict(NETWORK_COSTS[base])
    for k in ("fwd_gflop", "train_gflop", "act_mb"):
        cost[k] = cost[k] * ratio
    cost["scaled"] = True
    return cost


def _rate_tflops(amp: bool) -> float:
    """Effective training TFLOP/s of the assumed GPU (see the module docstring)."""
    ref = NETWORK_COSTS[GPU["ref_network"]]["train_gflop"]
    return GPU["ref_img_s"]["bf16" if amp else "fp32"] * ref / 1e3


def estimate(prof, plan: dict[str, Any]) -> dict[str, Any]:
    """Expected peak GPU memory (GB) and minutes per training epoch of a paper profile on one GPU
    (:data:`GPU`), **derived** from the network's FLOPs and activation size (module docstring).
    ``plan`` is the method's own account of a run (``Method.gpu_plan``): ``method``, ``network``,
    ``input``, ``batch``, ``amp``, ``epochs``, ``train_images`` per epoch, ``train_gflop`` per
    training image, ``fwd_gflop_epoch`` (other forward passes per epoch), ``eval_gflop``, ``act_mb``,
    ``params_m``, ``opt_states``, ``resident_gb``, ``head``, ``epoch_note``.
    :func:`reidkit.methods.gpu_cost` asks the profile's method for its plan.

    Fields: ``memory_gb``, ``epoch_minutes``, ``eval_minutes`` (one full evaluation),
    ``run_hours`` (all epochs), ``decode_img_s`` (JPEG decoding needed to keep up), ``basis``
    (starts with ``"derived: "``), ``method``, ``network``, ``input``, ``batch``, ``amp``, ``gpu``."""

    rate = _rate_tflops(plan["amp"]) * 1e3                # GFLOP/s
    train_s = plan["train_images"] * plan["train_gflop"] / rate
    epoch_s = train_s + plan["fwd_gflop_epoch"] / rate
    static_gb = plan["params_m"] * 1e6 * 4 * (2 + plan["opt_states"]) / 1e9
    act_gb = plan["act_mb"] * 2**20 * plan["batch"] * (AMP_ACTIVATION if plan["amp"] else 1.0) / 1e9
    memory = static_gb + BACKWARD_TRANSIENT * act_gb + plan["resident_gb"] + CONTEXT_GB
    precision = "bf16 autocast" if plan["amp"] else "fp32 (TF32 convolutions)"
    head = f" with {plan['head']}" if plan["head"] else ""
    basis = (f"derived, not measured: {plan['network']}{head} at {plan['input'][0]}x{plan['input'][1]}, "
             f"{plan['train_gflop']:.1f} GFLOP per training image and {plan['act_mb']:.0f} MB of activations per "
             f"image (counted on the CPU), batch {plan['batch']}, {precision}; {plan['epoch_note']}; "
             f"{GPU['name']} at {_rate_tflops(plan['amp']):.0f} effective TFLOP/s ({GPU['source']}); "
             f"time is a lower bound (data loading keeping up, CPU clustering steps not counted)")
    return {"profile": prof.name, "method": plan["method"], "network": plan["network"], "input": plan["input"],
            "batch": plan["batch"], "amp": plan["amp"], "gpu": GPU["name"],
            "memory_gb": round(memory, 1), "epoch_minutes": round(epoch_s / 60, 1),
            "eval_minutes": round(plan["eval_gflop"] / rate / 60, 1),
            "run_hours": round(plan["epochs"] * epoch_s / 3600, 1),
            "decode_img_s": round(plan["train_images"] / train_s) if train_s else 0,
            "basis": basis}


def cost_line(c: dict[str, Any]) -> str:
    """One line for the start of a run, of an :func:`estimate`:
    ``GPU cost of market1501 (derived ...; one A100 80GB): ~21.2 GB peak, >= 1 min per epoch ...``."""

    return (f"GPU cost of {c['profile']} (derived from FLOPs and activation size, not measured; one "
            f"{c['gpu']}): ~{c['memory_gb']:g} GB peak, >= {c['epoch_minutes']:g} min per epoch "
            f"({c['run_hours']:g} h for all epochs), evaluation >= {c['eval_minutes']:g} min; needs "
            f"~{c['decode_img_s']:,} decoded images/s to keep the GPU busy")
