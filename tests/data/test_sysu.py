"""The SYSU-30k bag rule (reidkit.data.sysu; spec dgl-sysu30k §1.3, §1.4)."""

from __future__ import annotations

import pytest

from reidkit.data.sysu import BAG_MODES, bag_id, bag_index, bag_members, bag_slots


def test_maintainers_example():
    # the maintainers in wanggrun/SYSU-30k issue #7: around folder 3 (ordinal 2 of folders 1..5) the bags [3], [2, 3, 4], [1..5]
    folders = [1, 2, 3, 4, 5]
    assert [[folders[j] for j in bag_members(2, mode, 5)] for mode in BAG_MODES] == [
        [3], [2, 3, 4], [1, 2, 3, 4, 5]]
    assert [bag_id(3, mode) for mode in BAG_MODES] == ["bag0000000009", "bag0000000010", "bag0000000011"]


def test_real_set_ends():
    # 28,310 folders 0000000001 .. 0000028310 (no 0000000000: wanggrun/SYSU-30k issue #15)
    n = 28_310
    assert bag_id(n, 2) == "bag0000084932" and bag_id(1, 0) == "bag0000000003"
    assert bag_index(n - 1, 2) == 3 * n - 1  # the last of 84,930 bags
    assert bag_members(n - 1, 2, n) == [n - 3, n - 2, n - 1]


@pytest.mark.parametrize("center,mode,count,slots,members", [
    # inside: 1, 3, 5 adjacent indices
    (5, 0, 10, [5], [5]),
    (5, 1, 10, [4, 5, 6], [4, 5, 6]),
    (5, 2, 10, [3, 4, 5, 6, 7], [3, 4, 5, 6, 7]),
    # first folders: clamped at 0, the end slot repeated (UO/mySampler's clamp)
    (0, 0, 10, [0], [0]),
    (0, 1, 10, [0, 0, 1], [0, 1]),
    (0, 2, 10, [0, 0, 0, 1, 2], [0, 1, 2]),
    (1, 2, 10, [0, 0, 1, 2, 3], [0, 1, 2, 3]),
    # last folders: clamped at count - 1
    (9, 1, 10, [8, 9, 9], [8, 9]),
    (9, 2, 10, [7, 8, 9, 9, 9], [7, 8, 9]),
    (8, 2, 10, [6, 7, 8, 9, 9], [6, 7, 8, 9]),
    # fewer folders than a bag spans
    (0, 2, 1, [0, 0, 0, 0, 0], [0]),
    (1, 2, 3, [0, 0, 1, 2, 2], [0, 1, 2]),
])
def test_slots_and_members(center, mode, count, slots, members):
    assert bag_slots(center, mode, count) == slots
    assert bag_members(center, mode, count) == members


def test_every_bag_of_a_list():
    # three bags per folder, indices 0 .. 3n-1 in stream order, each bag inside the list
    n = 7
    idx = [bag_index(c, m) for c in range(n) for m in BAG_MODES]
    assert idx == list(range(3 * n))
    for c in range(n):
        for m in BAG_MODES:
            s = bag_slots(c, m, n)
            assert len(s) == 2 * m + 1 and s == sorted(s) and c in s
            assert all(0 <= j < n for j in s)
            assert max(s) - min(s) <= 2 * m


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode"):
        bag_slots(3, 3, 10)
    with pytest.raises(ValueError, match="outside"):
        bag_slots(10, 0, 10)
    with pytest.raises(ValueError, match="outside"):
        bag_members(-1, 1, 10)
    with pytest.raises(ValueError, match="mode"):
        bag_id(3, -1)
