"""Unit tests for actors/sampler.py: shards partition the data, samplers are seeded,
visit every sample once per epoch, and resume exactly from their saved state."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.sampler import ShardSampler, make_shards

pytestmark = pytest.mark.unit


@settings(max_examples=50, deadline=None)
@given(
    n_train=st.integers(min_value=1, max_value=2000),
    n_shards=st.integers(min_value=1, max_value=64),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_shards_are_disjoint_near_equal_and_cover_everything(
    n_train: int, n_shards: int, seed: int
) -> None:
    if n_shards > n_train:
        with pytest.raises(ValueError, match="fewer workers"):
            make_shards(n_train, n_shards, seed)
        return
    shards = make_shards(n_train, n_shards, seed)
    assert len(shards) == n_shards
    joined = np.concatenate(shards)
    assert joined.dtype == np.int64
    assert np.array_equal(np.sort(joined), np.arange(n_train))  # disjoint and covering
    sizes = [s.size for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shards_depend_on_seed() -> None:
    a, b, c = make_shards(100, 4, 0), make_shards(100, 4, 0), make_shards(100, 4, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _stream(sampler: ShardSampler, batch_size: int, n_batches: int) -> list[list[int]]:
    return [sampler.next_batch(batch_size).tolist() for _ in range(n_batches)]


def test_sampler_deterministic_per_seed_and_shard_key() -> None:
    shard = np.arange(50, 90)
    base = _stream(ShardSampler(shard, seed=7, shard_key=0), 8, 10)
    assert base == _stream(ShardSampler(shard, seed=7, shard_key=0), 8, 10)
    assert base != _stream(ShardSampler(shard, seed=7, shard_key=1), 8, 10)
    assert base != _stream(ShardSampler(shard, seed=8, shard_key=0), 8, 10)


@pytest.mark.parametrize("batch_size", [1, 7, 40, 95])
def test_every_sample_once_per_epoch_and_exact_batch_sizes(batch_size: int) -> None:
    shard = np.arange(100, 140)  # 40 samples
    sampler = ShardSampler(shard, seed=0, shard_key=3)
    n_batches = (40 * 5) // batch_size + 1
    batches = [sampler.next_batch(batch_size) for _ in range(n_batches)]
    assert all(b.size == batch_size and b.dtype == np.int64 for b in batches)
    flat = np.concatenate(batches)
    epochs = [flat[i : i + 40] for i in range(0, flat.size - 39, 40)]
    assert len(epochs) >= 5
    for epoch in epochs:
        assert np.array_equal(np.sort(epoch), shard)
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh permutation each epoch
    assert sampler.samples_seen == n_batches * batch_size
    assert sampler.epoch == flat.size // 40 and sampler.pos == flat.size % 40


def test_state_round_trips_through_json() -> None:
    sampler = ShardSampler(np.arange(0, 60, 2), seed=11, shard_key=2)
    _stream(sampler, 7, 6)  # 42 samples: mid second epoch
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state["epoch"] == 1 and state["pos"] == 12 and state["samples_seen"] == 42
    restored = ShardSampler.from_state(state)
    assert _stream(restored, 7, 20) == _stream(sampler, 7, 20)
    assert restored.samples_seen == sampler.samples_seen


def test_from_state_refuses_position_outside_shard() -> None:
    state = ShardSampler(np.arange(10), seed=0, shard_key=0).state_dict()
    state["pos"] = 10
    with pytest.raises(ValueError, match="outside"):
        ShardSampler.from_state(state)


def test_reshard_continues_on_new_shard_with_fresh_epoch() -> None:
    sampler = ShardSampler(np.arange(10), seed=0, shard_key=1)
    sampler.next_batch(4)
    sampler.reshard(np.arange(100, 120))
    assert (sampler.epoch, sampler.pos) == (1, 0)
    nxt = np.concatenate([sampler.next_batch(5) for _ in range(4)])
    assert np.array_equal(np.sort(nxt), np.arange(100, 120))  # one full epoch of the new shard
    assert sampler.samples_seen == 24
    # the resharded sampler also round-trips
    restored = ShardSampler.from_state(sampler.state_dict())
    assert _stream(restored, 3, 10) == _stream(sampler, 3, 10)


@pytest.mark.parametrize(
    "shard",
    [np.array([], dtype=np.int64), np.array([0.5, 1.5]), np.array([[1, 2]]), np.array([-1])],
)
def test_bad_shards_refused(shard: np.ndarray) -> None:
    with pytest.raises(ValueError, match="shard"):
        ShardSampler(shard, seed=0, shard_key=0)


def test_bad_batch_size_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ShardSampler(np.arange(4), seed=0, shard_key=0).next_batch(0)
