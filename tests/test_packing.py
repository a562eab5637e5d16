"""Token-budget micro-batch packing."""

import random

import pytest

from mgrpo_pl.algo.packing import pack_by_token_budget


def test_hand_example():
    # lengths sorted descending: 9(i1), 5(i0), 4(i3), 2(i2); budget 10:
    # [9] (2*9=18 > 10 closes it), [5, 4] (2*5=10 ok, 3*5=15 > 10), [2]... no: [5,4] then 2 -> 3*5=15 > 10 -> new.
    assert pack_by_token_budget([5, 9, 2, 4], 10) == [[1], [0, 3], [2]]


def test_row_cap():
    assert pack_by_token_budget([1, 1, 1, 1, 1], 100, max_rows=2) == [[0, 1], [2, 3], [4]]


def test_every_index_once_and_budget_respected():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(200)]
    batches = pack_by_token_budget(lengths, 1024)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 1024 or len(b) == 1


def test_oversized_sequence_alone():
    assert pack_by_token_budget([50, 3], 10) == [[0], [1]]


def test_bad_budget():
    with pytest.raises(ValueError, match="max_tokens"):
        pack_by_token_budget([1], 0)
