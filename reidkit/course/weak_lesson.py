"""Notebook 05's helpers: one example bag, per-image outputs, and the tables comparing the trained
variants."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from reidkit.config import Profile, get_profile
from reidkit.core.device import resolve_device
from reidkit.data.records import Record, ReIDDataset, relabel
from reidkit.data.samplers import PKBagSampler
from reidkit.data.sysu30k import iter_sysu_bags, streams_training
from reidkit.data.transforms import ImageDataset, test_transform
from reidkit.dgl.evaluate import evaluate_weak, extract_weak_features, sample_sysu_protocol
from reidkit.dgl.graphical import bag_label_vectors, weak_triplet_loss
from reidkit.nets.weak import forward_heads, weak_input_size
from reidkit.retrieval.protocol import rank_metrics

#: the names the three variants' test features and table rows carry
VARIANT_NAMES = {"full": "DGL_full", "unary_only": "DGL_unary-only", "supervised": "supervised_upper-bound"}


_SUPERVISION = {"full": "weak (bags)", "unary_only": "weak (bags)", "supervised": "full labels"}


def example_bag(profile: str | Profile, dataset: ReIDDataset, seed: int = 0, sysu_ids: int = 3) -> dict:
    """One bag to look at, formed the way training forms bags.

    Records datasets: the first bag of the first :class:`~reidkit.data.samplers.PKBagSampler` batch
    (``ids_per_bag`` ids x ``images_per_id`` images, id-major) and its soft bag vector. SYSU-30k
    (``dataset.train`` empty): the first streamed bag of 8 images with ``sysu_ids`` folders.
    Returns ``records``, ``true_cls`` (class index per image, hidden from training), ``bag_classes``
    (the label set, ascending), ``num_classes`` (None for SYSU-30k) and ``bag_vector`` (the first
    image's non-zero bag-vector entries, or None)."""

    prof = get_profile(profile)
    cfg = prof.dgl
    vector, num_classes = None, None
    if streams_training(dataset):
        bags = iter_sysu_bags(Path(dataset.root) / "sysu_train_set_all", bag_size=8, seed=seed)
        bag = next(b for b in bags if len(b.labels) == sysu_ids)
        records = list(bag.records)
        class_of_pid = {pid: pid - 1 for pid in bag.labels}
    else:
        labels, class_of_pid = relabel(dataset.train)
        num_classes = len(class_of_pid)
        sampler = PKBagSampler(labels, cfg.ids_per_batch, cfg.images_per_id, cfg.ids_per_bag, seed=seed)
        batch = next(iter(sampler))
        records = [dataset.train[i] for i in batch[:cfg.ids_per_bag * cfg.images_per_id]]
        vec = bag_label_vectors(torch.tensor([labels[i] for i in batch]), cfg.ids_per_bag, cfg.ids_per_batch,
                                cfg.images_per_id, num_classes)
        vector = {int(c): round(float(vec[0, c]), 4) for c in torch.nonzero(vec[0]).flatten()}
    true_cls = np.array([class_of_pid[r.pid] for r in records])
    return {"records": records, "true_cls": true_cls, "bag_classes": sorted(set(true_cls.tolist())),
            "num_classes": num_classes, "bag_vector": vector}


@torch.no_grad()
def forward_records(model: nn.Module, records: Sequence[Record], profile: str | Profile, device: Any = "auto",
                    variant: str = "full", batch_size: int = 64) -> dict:
    """Head-0 logits, the first triplet embedding and the low-level descriptor ``g`` of every
    record (eval mode, test transform at the variant's input size), as float32 NumPy:
    ``{"logits": (n, C), "emb": (n, e), "low": (n, d)}``."""

    prof = get_profile(profile)
    dev = resolve_device(device)
    ds = ImageDataset(records, test_transform(*weak_input_size(prof, variant)))
    was = model.training
    model.eval()
    logits, emb, low = [], [], []
    try:
        for s in range(0, len(ds), batch_size):
            x = torch.stack([ds[i]["img"] for i in range(s, min(s + batch_size, len(ds)))]).to(dev)
            z, f, g = forward_heads(model, x)
            logits.append(z[0].float().cpu())
            emb.append(f[0].float().cpu())
            low.append(g.float().cpu())
    finally:
        model.train(was)
    return {"logits": torch.cat(logits).numpy(), "emb": torch.cat(emb).numpy(), "low": torch.cat(low).numpy()}


def median_pick(emb, true_ids: Sequence[int], bag_of: Sequence[int]) -> dict:
    """What the weak triplet's in-bag distance ``d+`` of every anchor is, as the kit computes it.

    ``emb``: ``(n, e)`` embeddings of a batch; ``bag_of``: the bag of every image (bags must not
    share ids); ``true_ids``: the hidden identity of every image. Runs
    :func:`reidkit.dgl.graphical.weak_triplet_loss` (``d+`` = the lower median of the distances to
    the whole bag, the anchor itself included: sorted index ``(n_b - 1) // 2``) and finds the image
    each anchor's ``d+`` was taken from. Returns ``rank`` (that sorted index, 0 = the anchor
    itself), ``bag_size``, ``own`` (the image shows the anchor's person, the anchor excluded),
    ``self`` (it is the anchor) and ``share_own``: for every anchor, the share of its bag that
    shows its own person (itself included)."""
    e = torch.as_tensor(np.asarray(emb), dtype=torch.float32)
    bag_of = np.asarray(bag_of)
    y = np.asarray(true_ids)
    bags, col = np.unique(bag_of, return_inverse=True)
    vectors = torch.nn.functional.one_hot(torch.as_tensor(col), len(bags)).float()
    _, d_ap, _ = weak_triplet_loss(e, vectors)
    d_ap = d_ap.detach().numpy()
    dist = torch.cdist(e, e).numpy()
    same_bag = bag_of[:, None] == bag_of[None, :]
    # the in-bag image whose distance is d+ (nearest in value: the kit's distance is the expanded form)
    picked = np.where(same_bag, np.abs(dist - d_ap[:, None]), np.inf).argmin(1)
    n_bag = same_bag.sum(1)
    idx = np.arange(len(y))
    return {"rank": (n_bag - 1) // 2, "bag_size": n_bag, "picked": picked,
            "self": picked == idx, "own": (y[picked] == y) & (picked != idx),
            "share_own": ((y[:, None] == y[None, :]) & same_bag).sum(1) / n_bag}


def _pct(v):
    return round(100 * v, 1) if isinstance(v, float) else v


def evaluate_variants(runs: dict, dataset: ReIDDataset, profile: str | Profile, out_dir: str | Path,
                      device: Any = "auto", reuse: bool = True) -> dict:
    """Score every trained variant of ``runs`` (``{variant: TrainResult}``) on the test split.

    SYSU-30k: the official protocol ran at the end of training (``run.test``). Records datasets:
    the Market protocol, and the SYSU-30k protocol on the sample (gallery + every training image as
    a distractor, :func:`sample_sysu_protocol`); the test features are saved as
    ``out_dir/eval_<name>.npz`` (``qf``, ``gf``, ``tf``) for notebook 06.

    ``reuse``: when ``out_dir/eval_<name>.npz`` is newer than the variant's final network
    ``out_dir/<variant>/model_best.pt`` (the notebook trains each variant there), its features are
    read instead of extracted again, so a notebook reopened on a finished run scores in seconds;
    the metrics are computed from them with the same code either way.
    Returns ``{variant: {"market": ..., "sysu_protocol": ...}}`` (or ``{"sysu30k": ...}``)."""
    results = {}
    if streams_training(dataset):
        return {v: {"sysu30k": run.test} for v, run in runs.items()}
    q_pids = np.array([r.pid for r in dataset.query]); g_pids = np.array([r.pid for r in dataset.gallery])
    q_cams = np.array([r.camid for r in dataset.query]); g_cams = np.array([r.camid for r in dataset.gallery])
    for variant, run in runs.items():
        path = Path(out_dir) / f"eval_{VARIANT_NAMES[variant]}.npz"
        final = Path(out_dir) / variant / "model_best.pt"
        if reuse and path.is_file() and final.is_file() and path.stat().st_mtime >= final.stat().st_mtime:
            with np.load(path) as z:
                qf, gf, tf = z["qf"], z["gf"], z["tf"]
            market = rank_metrics(qf, gf, dataset.query, dataset.gallery, device)
        else:
            market, qf, gf = evaluate_weak(run.model, dataset.query, dataset.gallery, profile, device,
                                           variant=variant, return_features=True)
            tf = extract_weak_features(run.model, dataset.train, profile, device, variant=variant)
            np.savez(path, qf=qf, gf=gf, tf=tf)
        sysu = sample_sysu_protocol(qf, q_pids, q_cams, gf, g_pids, g_cams, tf)
        results[variant] = {"market": {k: v for k, v in market.items() if k != "cmc"}, "sysu_protocol": sysu}
    return results


RESULT_COLUMNS = ["model", "supervision", "mAP", "rank-1", "rank-5", "SYSU-protocol rank-1", "SYSU-protocol mAP"]


def results_table(ctx, results: dict, dataset: ReIDDataset) -> tuple[list[str], list[list]]:
    """The comparison table of notebook 05: the DGL variants of ``results`` (from
    :func:`evaluate_variants`), then every other model whose test features earlier notebooks left
    in the run folder (``ctx.eval_features()``: HHCL from 04, the ImageNet features from 02), scored
    here with the same two protocols. A missing notebook's row says "not run". Percentages."""
    rows = []
    for variant, res in results.items():
        name, sup = VARIANT_NAMES[variant], _SUPERVISION[variant]
        if "sysu30k" in res:
            t = res["sysu30k"] or {}
            rows.append([name, sup, "-", "-", "-", _pct(t.get("rank1", "-")), _pct(t.get("mAP", "-"))])
            continue
        m, s = res["market"], res["sysu_protocol"]
        rows.append([name, sup, _pct(m["mAP"]), _pct(m["rank1"]), _pct(m["rank5"]), _pct(s["rank1"]), _pct(s["mAP"])])
    if streams_training(dataset):
        return list(RESULT_COLUMNS), rows
    ours = {VARIANT_NAMES[v].replace("_", " ") for v in VARIANT_NAMES}
    found = {k: v for k, v in ctx.eval_features().items() if k not in ours}
    q_pids = np.array([r.pid for r in dataset.query]); g_pids = np.array([r.pid for r in dataset.gallery])
    q_cams = np.array([r.camid for r in dataset.query]); g_cams = np.array([r.camid for r in dataset.gallery])
    for name, f in found.items():
        m = rank_metrics(f["qf"], f["gf"], dataset.query, dataset.gallery, ctx.device)
        s = (sample_sysu_protocol(f["qf"], q_pids, q_cams, f["gf"], g_pids, g_cams, f["tf"]) if "tf" in f else {})
        imagenet = _is_imagenet(name)
        sup = "ImageNet only" if imagenet else "none (clusters)"
        rows.append(["ImageNet features" if imagenet else name, sup, _pct(m["mAP"]), _pct(m["rank1"]), _pct(m["rank5"]),
                     _pct(s.get("rank1", "-")), _pct(s.get("mAP", "-"))])
    if not any(n.lower().startswith(("hhcl", "cluster")) for n in found):
        rows.append(["HHCL (notebook 04)", "none (clusters)"] + ["not run"] * 5)
    if not any(_is_imagenet(n) for n in found):
        rows.append(["ImageNet features (notebook 02)", "ImageNet only"] + ["not run"] * 5)
    return list(RESULT_COLUMNS), rows


def _is_imagenet(name: str) -> bool:
    """Notebook 02's untrained network (file ``eval_direct_transfer.npz``, or a later name)."""
    return name.lower().replace("-", " ").startswith(("direct transfer", "imagenet"))


def training_table(runs: dict) -> tuple[list[str], list[list]]:
    """Per-epoch history of every variant as a table (loss terms, pseudo-label accuracy in %, seconds)."""
    def r(v, nd):
        return None if v is None else round(v, nd)

    columns = ["variant", "epoch", "loss", "CE", "pairwise", "triplet", "pseudo-label acc", "seconds"]
    rows = [[v, h["epoch"], r(h["loss"], 3), r(h["ce"], 3), r(h["pairwise"], 4), r(h["triplet"], 3),
             None if h["pseudo_acc"] is None else _pct(h["pseudo_acc"]), r(h["t_epoch"], 1)]
            for v, run in runs.items() for h in run.history]
    return columns, rows


def variants_summary(runs: dict, results: dict) -> dict:
    """The ``variants`` entry of notebook 05's metrics: network, epochs, classes, final loss and
    pseudo-label accuracy, and the test results of every variant."""
    out = {}
    for v, run in runs.items():
        last = run.history[-1] if run.history else {}
        out[v] = {"network": run.network, "epochs": len(run.history), "num_classes": run.num_classes,
                  "final_loss": last.get("loss"), "final_pseudo_acc": last.get("pseudo_acc"), **results.get(v, {})}
    return out


__all__ = [
    "VARIANT_NAMES",
    "evaluate_variants",
    "example_bag",
    "forward_records",
    "median_pick",
    "results_table",
    "training_table",
    "variants_summary",
]
