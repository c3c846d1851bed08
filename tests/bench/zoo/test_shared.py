"""The suite-agnostic pieces both suites declare over: the task registry, split assignment and the
training batch order."""

from __future__ import annotations

import random

import pytest

from mergelab_bench.zoo.registry import Registry
from mergelab_bench.zoo.splits import SPLITS, SplitConfig, assign_splits, hash_sample, split_of
from mergelab_bench.zoo.training import epoch_batches, loss_ema


class _Spec:
    def __init__(self, name: str) -> None:
        self.name = name


def test_registry_refuses_a_second_spec_of_a_name_and_lists_the_known_ones() -> None:
    reg: Registry[_Spec] = Registry("LM task")
    a = reg.add(_Spec("b"))
    reg.add(_Spec("a"))
    assert reg.spec("b") is a and list(reg) == ["b", "a"]
    with pytest.raises(ValueError, match="LM task 'b' registered twice"):
        reg.add(_Spec("b"))
    with pytest.raises(KeyError, match="unknown LM task 'c'; known: a, b"):
        reg.spec("c")


def test_epoch_batches_chunk_one_fresh_shuffle_after_another() -> None:
    rng = random.Random(7)
    passes = []
    for _ in range(4):
        p = list(range(5))
        rng.shuffle(p)
        passes += p
    expected = [passes[i : i + 2] for i in range(0, 18, 2)]
    batches = epoch_batches(5, 2, random.Random(7))
    assert [next(batches) for _ in range(9)] == expected


def test_loss_ema_starts_at_the_first_value() -> None:
    assert loss_ema(float("nan"), 2.0) == 2.0
    assert loss_ema(2.0, 1.0) == pytest.approx(1.9)


def test_assigned_splits_follow_the_groups_and_ignore_input_order() -> None:
    cfg = SplitConfig(validation=0.3, test=0.3)
    items = [(f"text {i}", f"g{i % 4}" if i % 2 else None, {"key": f"k{i:02d}"}) for i in range(40)]
    splits = assign_splits("salt", items, cfg)
    assert set(splits) == set(SPLITS) and sum(map(len, splits.values())) == 40
    where = {r["key"]: s for s, rows in splits.items() for r in rows}
    for norm, group, record in items:
        assert where[record["key"]] == split_of("salt", group if group is not None else norm, cfg)
    assert assign_splits("salt", list(reversed(items)), cfg) == splits


def test_hash_sample_keeps_cap_items_whatever_the_input_order() -> None:
    keys = [f"k{i}" for i in range(30)]
    kept, over = hash_sample("salt", keys, 12, key=lambda k: k)
    assert len(kept) == 12 and over == 18 and len(set(kept)) == 12
    assert hash_sample("salt", list(reversed(keys)), 12, key=lambda k: k) == (kept, 18)
    assert hash_sample("other", keys, 12, key=lambda k: k)[0] != kept
    assert hash_sample("salt", keys[:5], 12, key=lambda k: k)[1] == 0
