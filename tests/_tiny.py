"""The tiny training set-up the engine, HHCL and camera tests share: 8 training identities of the
embedded sample, 4 test identities, and the smoke profile cut to a few one-image-batch steps."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from reidkit.config import get_profile
from reidkit.data.datasets import load_dataset
from reidkit.data.records import ReIDDataset

QUIET = dict(log=lambda *_: None, selection="last", device="cpu")


@contextmanager
def one_torch_thread():
    """torch at one intra-op thread inside the block, restored after it (tiny tensors run as fast,
    and far faster on a shared CPU, where idle OpenMP threads spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_dataset(gallery_paths=None) -> ReIDDataset:
    """8 training identities, 4 query identities (every other image); ``gallery_paths`` replaces
    the first gallery images' paths (to plant damaged files)."""
    ds = load_dataset("mini-mars")
    pids = sorted({r.pid for r in ds.train})[:8]
    tr = [r for r in ds.train if r.pid in pids]
    qp = sorted({r.pid for r in ds.query})[:4]
    gallery = [r for r in ds.gallery if r.pid in qp][::2]
    if gallery_paths:
        gallery = [r._replace(path=str(p)) for r, p in zip(gallery, gallery_paths)] + gallery[len(gallery_paths):]
    return ReIDDataset("tiny", ds.root, tr, [r for r in ds.query if r.pid in qp][::2], gallery)


def tiny_hhcl_profile(**kw):
    """The smoke profile with batch 16 = 4 x 4, one iteration, 2 epochs, small k1/k2 (``kw`` wins)."""
    return get_profile("smoke").replace(**{"hhcl__iters": 1, "hhcl__batch_size": 16, "hhcl__num_instances": 4,
                                           "hhcl__epochs": 2, "hhcl__eval_step": 1, "data__test_batch_size": 64,
                                           "data__workers": 0, "cluster__k1": 10, "cluster__k2": 3,
                                           "cluster__eps": 0.6, **kw})
