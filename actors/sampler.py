"""Data shards and seeded, resumable mini-batch samplers.

The training set is cut once into disjoint, near-equal shards (:func:`make_shards`), one per
worker. A :class:`ShardSampler` walks its shard epoch by epoch, each epoch in a fresh
permutation drawn from ``(seed, shard_key, epoch)``, so the stream of batches is a pure
function of those numbers and the position in it: a worker that crashes and rejoins, or a
coordinator restored from a checkpoint, resumes exactly where :meth:`ShardSampler.state_dict`
left off. When membership changes, :meth:`ShardSampler.reshard` moves a worker to a new shard.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def make_shards(n_train: int, n_shards: int, seed: int) -> list[np.ndarray]:
    """Disjoint, near-equal shards covering range(n_train), from one seeded permutation.

    Args:
        n_train: number of training rows.
        n_shards: number of shards (usually the number of live workers).
        seed: fixes the permutation.

    Returns:
        ``n_shards`` sorted int64 index arrays whose sizes differ by at most one.

    Raises:
        ValueError: ``n_shards < 1`` or more shards than rows (a shard would be empty).
    """
    if n_shards < 1:
        raise ValueError(f"need at least one shard, got n_shards={n_shards}")
    if n_shards > n_train:
        raise ValueError(
            f"cannot cut {n_train} training rows into {n_shards} non-empty shards; "
            "use fewer workers or a larger dataset"
        )
    perm = np.random.default_rng(seed).permutation(n_train).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, n_shards)]


def _check_shard(shard: np.ndarray) -> np.ndarray:
    out = np.asarray(shard)
    if out.ndim != 1 or out.size == 0 or not np.issubdtype(out.dtype, np.integer):
        raise ValueError(
            f"a shard must be a non-empty 1-D integer array, got {out.dtype} {out.shape}"
        )
    if out.min() < 0:
        raise ValueError("shard indices must be >= 0")
    return out.astype(np.int64)


class ShardSampler:
    """Seeded sampler over one shard: each epoch a fresh permutation of the shard (rng
    seeded by (seed, shard_key, epoch)); batches are consecutive slices; a batch that runs
    past the end of the epoch wraps into the next epoch's permutation (so every batch has
    exactly batch_size samples).

    Args:
        shard: indices into the training set this sampler draws from.
        seed: the job's seed.
        shard_key: tells samplers of one job apart (e.g. the worker id).

    Attributes:
        epoch: passes over the current shard started so far (0-based number of the current).
        pos: position inside the current epoch's permutation.
        samples_seen: samples handed out since creation (kept across :meth:`reshard`).
    """

    def __init__(self, shard: np.ndarray, seed: int, shard_key: int) -> None:
        if seed < 0 or shard_key < 0:
            raise ValueError(f"seed and shard_key must be >= 0, got {seed}, {shard_key}")
        self.shard = _check_shard(shard)
        self.seed = int(seed)
        self.shard_key = int(shard_key)
        self.epoch = 0
        self.pos = 0
        self.samples_seen = 0
        self._perm_epoch = -1
        self._perm = self.shard

    def _permutation(self) -> np.ndarray:
        """The current epoch's order of the shard (cached; a pure function of the key)."""
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.shard_key, self.epoch])
            self._perm = self.shard[rng.permutation(self.shard.size)]
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self, batch_size: int) -> np.ndarray:
        """The next ``batch_size`` training-set indices (int64), wrapping across epochs.

        A batch larger than the shard spans several epochs, so it repeats samples.

        Raises:
            ValueError: ``batch_size < 1``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        parts: list[np.ndarray] = []
        needed = batch_size
        while needed > 0:
            perm = self._permutation()
            take = min(needed, perm.size - self.pos)
            parts.append(perm[self.pos : self.pos + take])
            self.pos += take
            needed -= take
            if self.pos == perm.size:  # epoch done: the next sample opens a new one
                self.epoch += 1
                self.pos = 0
        self.samples_seen += batch_size
        return np.concatenate(parts)

    def reshard(self, new_shard: np.ndarray) -> None:
        """Continue on ``new_shard``, starting a fresh epoch of it.

        The epoch counter moves on (a partly used epoch counts as used), so the new shard's
        first permutation is drawn from a key this sampler has not used yet.
        """
        self.shard = _check_shard(new_shard)
        if self.pos > 0:
            self.epoch += 1
        self.pos = 0
        self._perm_epoch = -1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as JSON-serialisable plain Python values."""
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "seed": self.seed,
            "shard_key": self.shard_key,
            "shard": self.shard.tolist(),
            "samples_seen": self.samples_seen,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ShardSampler:
        """A sampler that continues exactly where the one that saved ``state`` was.

        Raises:
            KeyError: a required key is missing.
            ValueError: the position lies outside the shard.
        """
        sampler = cls(np.asarray(state["shard"], dtype=np.int64), state["seed"], state["shard_key"])
        epoch, pos = int(state["epoch"]), int(state["pos"])
        if epoch < 0 or not 0 <= pos < sampler.shard.size:
            raise ValueError(
                f"sampler state has epoch={epoch}, pos={pos} outside a shard of "
                f"{sampler.shard.size} samples"
            )
        sampler.epoch, sampler.pos = epoch, pos
        sampler.samples_seen = int(state.get("samples_seen", 0))
        return sampler
