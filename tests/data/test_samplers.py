"""Samplers: HHCL's camera-aware PK sampler (spec hhcl §1.5), DGL's PK bag sampler (spec dgl §1.2)
and the consecutive-bag sampler (spec dgl §1.3)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from reidkit.data.samplers import (
    CameraAwarePKSampler,
    ConsecutiveBagSampler,
    PKBagSampler,
)
from reidkit.data.sysu import bag_slots
from reidkit.dgl import graphical as weak


def chunks(sampler: CameraAwarePKSampler, stream: list[int]) -> list[list[int]]:
    """Split a CameraAwarePKSampler stream into its per-identity runs (1 for a singleton, else K)."""
    out, pos = [], 0
    while pos < len(stream):
        members = sampler.index_of[int(sampler.labels[stream[pos]])]
        size = 1 if len(members) == 1 else sampler.num_instances
        out.append(stream[pos:pos + size])
        pos += size
    assert pos == len(stream)
    return out


def one_id(n_images: int, cams) -> tuple[list[int], list[int]]:
    return [5] * n_images, list(cams)


# ---------------------------------------------------------------------------------------------
# CameraAwarePKSampler

def test_pk_stream_structure():
    # ids 0..5 with assorted sizes and cameras, -1 outliers interleaved
    rng = np.random.default_rng(0)
    labels, cams = [], []
    for pid, n in enumerate([1, 2, 5, 9, 20, 3]):
        labels += [pid] * n
        cams += rng.integers(0, 4, n).tolist()
    labels += [-1] * 7
    cams += [0] * 7
    order = rng.permutation(len(labels))
    labels, cams = [labels[i] for i in order], [cams[i] for i in order]
    s = CameraAwarePKSampler(labels, cams, num_instances=4, seed=1)
    for _ in range(3):
        stream = list(s)
        assert len(stream) == len(s) == 1 + 5 * 4
        runs = chunks(s, stream)
        # every pseudo-id exactly once per pass, its indices consecutive, outliers never
        assert sorted(labels[r[0]] for r in runs) == [0, 1, 2, 3, 4, 5]
        for run in runs:
            assert len({labels[i] for i in run}) == 1
        assert all(labels[i] != -1 for i in stream)


def partners_of(labels, cams, num_instances, seeds=range(10)):
    """(anchor, partners) of a one-identity dataset, over several seeds."""
    for seed in seeds:
        s = CameraAwarePKSampler(labels, cams, num_instances=num_instances, seed=seed)
        stream = list(s)
        yield stream[0], stream[1:]


def test_partners_come_from_other_cameras():
    labels, cams = one_id(8, [0, 0, 0, 1, 1, 2, 2, 2])
    for anchor, partners in partners_of(labels, cams, 4, seeds=range(30)):
        assert len(partners) == 3
        assert all(cams[p] != cams[anchor] for p in partners)


def test_without_replacement_when_enough_other_camera_images():
    # every image its own camera: 20 other-camera candidates >= 16 -> no duplicates
    labels, cams = one_id(21, range(21))
    for anchor, partners in partners_of(labels, cams, 16):
        assert len(partners) == 15
        assert len(set(partners)) == 15
        assert anchor not in partners


def test_with_replacement_when_few_other_camera_images():
    # 5 other-camera candidates < 16 -> drawn with replacement, still 15 partners
    labels, cams = one_id(6, range(6))
    for anchor, partners in partners_of(labels, cams, 16):
        assert len(partners) == 15
        assert set(partners) <= set(range(6)) - {anchor}
        assert len(set(partners)) < 15


def test_replacement_threshold_is_num_instances_not_num_instances_minus_1():
    # 15 other-camera candidates: enough for 15 partners, yet the reference draws with replacement
    labels, cams = one_id(16, range(16))
    dup = [len(set(p)) < 15 for _, p in partners_of(labels, cams, 16, seeds=range(5))]
    assert all(dup)
    # 16 candidates: without replacement
    labels, cams = one_id(17, range(17))
    assert all(len(set(p)) == 15 for _, p in partners_of(labels, cams, 16, seeds=range(5)))


def test_single_camera_identity_uses_its_other_images():
    labels, cams = one_id(6, [3] * 6)
    for anchor, partners in partners_of(labels, cams, 4):
        assert len(partners) == 3
        assert anchor not in partners
        assert len(set(partners)) == 3  # 5 others >= 4: without replacement
    labels, cams = one_id(3, [3] * 3)
    for anchor, partners in partners_of(labels, cams, 4):
        assert len(partners) == 3
        assert anchor not in partners and set(partners) <= {0, 1, 2}


def test_singleton_emits_anchor_only_and_outliers_skipped():
    s = CameraAwarePKSampler([-1, 4, -1], [0, 1, 2], num_instances=16, seed=0)
    assert list(s) == [1] and len(s) == 1
    s = CameraAwarePKSampler([-1, -1], [0, 1], num_instances=16, seed=0)
    assert list(s) == [] and len(s) == 0


def test_camera_aware_false_is_plain_pk():
    labels, cams = one_id(8, [0, 0, 0, 0, 1, 1, 1, 1])
    seen_same_cam = False
    for seed in range(10):
        stream = list(CameraAwarePKSampler(labels, cams, num_instances=4, seed=seed, camera_aware=False))
        assert stream[0] not in stream[1:] and len(set(stream)) == 4
        seen_same_cam |= any(cams[p] == cams[stream[0]] for p in stream[1:])
    assert seen_same_cam


def test_pk_deterministic_for_a_seed_and_mismatched_lengths():
    labels = np.repeat(np.arange(10), 6)
    cams = np.tile(np.arange(3), 20)
    a = [list(CameraAwarePKSampler(labels, cams, 4, seed=3)) for _ in range(2)]
    assert a[0] == a[1]
    assert list(CameraAwarePKSampler(labels, cams, 4, seed=4)) != a[0]
    with pytest.raises(ValueError, match="camera ids"):
        CameraAwarePKSampler([0, 0, 1], [0, 1], 4)


@pytest.mark.parametrize("make", [
    lambda seed: CameraAwarePKSampler(np.repeat(np.arange(10), 6), np.tile(np.arange(3), 20), 4, seed=seed),
    lambda seed: PKBagSampler(np.repeat(np.arange(12), 3), ids_per_batch=4, images_per_id=4, ids_per_bag=2, seed=seed),
    lambda seed: ConsecutiveBagSampler(np.repeat(np.arange(10), 20), batch_size=45, bags_per_batch=3,
                                       batches_per_epoch=3, seed=seed),
])
def test_state_dict_round_trip_resumes_the_same_stream(make):
    s = make(11)
    list(s)  # one epoch
    state = s.state_dict()
    json.dumps(state)  # plain data, checkpointable
    expected = [list(s), list(s)]
    resumed = make(999)
    resumed.load_state_dict(state)
    assert [list(resumed), list(resumed)] == expected


# ---------------------------------------------------------------------------------------------
# PKBagSampler

def test_pk_bag_batches():
    # 10 ids; id k has k+1 images (ids 0..2 have fewer than images_per_id)
    labels = [k for k in range(10) for _ in range(k + 1)]
    s = PKBagSampler(labels, ids_per_batch=4, images_per_id=4, ids_per_bag=2, seed=0)
    assert s.batch_size == 16
    assert s.bag_of_position().tolist() == [0] * 8 + [1] * 8
    index_of = {k: {i for i, lab in enumerate(labels) if lab == k} for k in range(10)}
    for _ in range(5):
        batches = list(s)
        assert len(batches) == len(s) == 2  # 10 ids // 4: the incomplete third batch is dropped
        epoch_ids = []
        for batch in batches:
            assert len(batch) == 16
            blocks = [batch[j:j + 4] for j in range(0, 16, 4)]
            ids = []
            for block in blocks:  # each id's images contiguous
                block_ids = {labels[i] for i in block}
                assert len(block_ids) == 1
                pid = block_ids.pop()
                ids.append(pid)
                assert set(block) <= index_of[pid]
                if len(index_of[pid]) >= 4:
                    assert len(set(block)) == 4  # without replacement when the id has enough
            bags = [set(ids[0:2]), set(ids[2:4])]
            assert not bags[0] & bags[1]
            epoch_ids += ids
        assert len(epoch_ids) == len(set(epoch_ids)) == 8  # every id at most once per epoch


def test_pk_bag_replacement_for_small_ids():
    labels = [0] + [1] * 5
    blocks = []
    for seed in range(5):
        for batch in PKBagSampler(labels, ids_per_batch=2, images_per_id=4, ids_per_bag=2, seed=seed):
            blocks += [batch[j:j + 4] for j in range(0, 8, 4)]
    assert [0, 0, 0, 0] in blocks  # the one-image id repeats its image


def test_pk_bag_rejects_bad_settings():
    with pytest.raises(ValueError, match="multiple of ids_per_bag"):
        PKBagSampler(list(range(20)), ids_per_batch=5, ids_per_bag=2)
    with pytest.raises(ValueError, match="fewer than ids_per_batch"):
        PKBagSampler(list(range(3)), ids_per_batch=4, ids_per_bag=2)


def test_pk_bag_matches_weak_bag_labels():
    # the sampler's layout is the one weak.bag_label_vectors (full_to_weak) expects
    import torch

    labels = np.repeat(np.arange(16), 4)
    s = PKBagSampler(labels, ids_per_batch=8, images_per_id=4, ids_per_bag=2, seed=0)
    batch = next(iter(s))
    vec = weak.bag_label_vectors(torch.as_tensor(labels[batch]), 2, 8, 4, 16)
    for bag in range(4):
        rows = vec[bag * 8:(bag + 1) * 8]
        ids = set(labels[batch[bag * 8:(bag + 1) * 8]].tolist())
        assert len(ids) == 2
        assert set(rows[0].nonzero().flatten().tolist()) == ids


# ---------------------------------------------------------------------------------------------
# ConsecutiveBagSampler

def test_consecutive_bag_sampler_uses_the_bag_rule():
    # the sampler's bag classes are reidkit.data.sysu.bag_slots (its tests pin the rule itself)
    s = ConsecutiveBagSampler(np.repeat(np.arange(10), 15), batch_size=45, bags_per_batch=3)
    for center in range(10):
        for mode in (0, 1, 2):
            assert s.bag_classes(center, mode) == bag_slots(center, mode, 10)
    assert s.bag_classes(0, 2) == [0, 0, 0, 1, 2] and s.bag_classes(9, 1) == [8, 9, 9]


def test_consecutive_bag_sampler_modes_cycle():
    C = 20
    labels = np.repeat(np.arange(C), 20)
    s = ConsecutiveBagSampler(labels, batch_size=180, bags_per_batch=12, batches_per_epoch=4, seed=0)
    assert s.bag_size == 15 and len(s) == 4
    for batch in s:
        assert len(batch) == 180
        centers = []
        for j in range(12):
            bag = labels[batch[j * 15:(j + 1) * 15]].tolist()
            mode = j % 3  # 0, 1, 2, 0, 1, 2, ...: 1, 3, 5 classes, split evenly
            per = 15 // (2 * mode + 1)
            slots = [bag[k:k + per] for k in range(0, 15, per)]
            assert all(len(set(slot)) == 1 for slot in slots)
            slot_classes = [slot[0] for slot in slots]
            center = slot_classes[mode]
            assert slot_classes == bag_slots(center, mode, C)
            centers.append(center)
            if mode == 0:
                assert len(set(batch[j * 15:(j + 1) * 15])) == 15  # 20 images >= 15: no replacement
        assert len(set(centers)) == 12  # centres from one permutation: distinct


def test_consecutive_bag_sampler_clamps_at_boundaries():
    # 3 classes: every 5-class bag is clamped, so it holds the 3 classes only
    labels = np.repeat(np.arange(3), 30)
    s = ConsecutiveBagSampler(labels, batch_size=45, bags_per_batch=3, batches_per_epoch=5, seed=2)
    for batch in s:
        bag2 = labels[batch[30:45]].tolist()
        counts = Counter(bag2)
        assert set(counts) == {0, 1, 2}
        center = bag2[6]
        assert [bag2[k] for k in range(0, 15, 3)] == bag_slots(center, 2, 3)


def test_consecutive_bag_sampler_rejects_misaligned_batch():
    labels = np.repeat(np.arange(20), 20)
    with pytest.raises(ValueError) as exc:
        ConsecutiveBagSampler(labels, batch_size=32, bags_per_batch=12)
    msg = str(exc.value)
    assert "misaligned" in msg and "batch_size=32" in msg and "12 bags" in msg
    assert "2 images per bag" in msg and "24 sampled indices" in msg
    for bad in (24, 60, 190):
        with pytest.raises(ValueError, match="misaligned"):
            ConsecutiveBagSampler(labels, batch_size=bad, bags_per_batch=12)
    ConsecutiveBagSampler(labels, batch_size=180, bags_per_batch=12)
    ConsecutiveBagSampler(labels, batch_size=360, bags_per_batch=12)


def test_consecutive_bag_sampler_needs_every_class():
    with pytest.raises(ValueError, match="missing"):
        ConsecutiveBagSampler([0, 0, 2, 2], batch_size=15, bags_per_batch=1)


def test_consecutive_bag_sampler_deterministic():
    labels = np.repeat(np.arange(10), 20)
    make = lambda seed: list(ConsecutiveBagSampler(labels, batch_size=45, bags_per_batch=3,
                                                   batches_per_epoch=3, seed=seed))
    assert make(0) == make(0)
    assert make(0) != make(1)
