"""The training stream: shards -> decoded, augmented batches for one rank, with exact resume.

What a sample becomes is the task's business (its SampleCodec, albef_ds.data.codec); this module
decides which samples, in which order, on which rank and worker, and where to resume.

Order. Each DataLoader worker reads a sequence of shard *draws*; a draw is (shard, draw seed) and
the sequence is a pure function of (seed, epoch, rank, worker) and the shard list:
- resampled: shards drawn with replacement (probability from corpus sizes or weights), so every
  worker of every rank has data whatever the shard count, and each worker makes its share of the
  epoch's `steps_per_epoch` batches (DataLoader hands batch n to worker n % workers);
- not resampled: the shards shuffled once per epoch and dealt out over all ranks x workers, each
  shard read once, every worker to its end (ranks may then make different numbers of batches).
A draw's samples are shuffled with a buffer that lives inside the draw, seeded by the draw seed,
and each sample's decoding (caption choice, augmentation) uses an RNG seeded by (draw seed, position).

Resume. A worker's position is (draw index, samples of that draw passed, batches made). Every batch
carries its worker's position after it; the main process keeps, per worker, the position of the
last batch handed to the caller. Resuming, a worker skips earlier draws without opening them and
the passed samples of its current draw without decoding them; the new DataLoader's worker i plays
worker (i + next_worker) % workers so batches come in the order an uninterrupted run gives.

Bad input (undecodable image, missing or empty caption, non UTF-8 text, truncated or unreadable
tar) is skipped; the counts travel with the batches, so stats() covers what was consumed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
from collections import Counter
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from albef_ds.config import DataConfig
from albef_ds.data.codec import SKIP_COUNTERS, SampleCodec
from albef_ds.data.samples import ERROR_KEY
from albef_ds.data.shards import open_shard, resolve_corpora

# Resampled draws in a row without one usable sample before a worker gives up: the data is
# unreadable, and waiting for a batch that cannot come would hang every rank.
MAX_EMPTY_DRAWS = 100


def shuffled(items: Iterator, rng: random.Random, buffer_size: int) -> Iterator:
    """Buffer shuffle within one draw: a function of the items and the RNG only."""
    if buffer_size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class _EpochReader(IterableDataset):
    """What one DataLoader runs: every worker resumes its own position in one epoch."""

    def __init__(self, stream: "ShardStream", state: dict):
        self.stream = stream
        self.state = copy.deepcopy(state)

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.state["next_worker"]) % self.stream.num_workers
        draw, offset, batches = self.state["positions"][worker]
        return self.stream._worker_batches(self.state["epoch"], worker, draw, offset, batches)


class ShardStream:
    """Batches of the codec's keys plus "keys" (the samples' keys) for one rank; see the module doc.

    Iterating goes on over epochs in resampled mode, and makes one pass otherwise (a new
    iteration then starts the next epoch). state_dict() / load_state_dict() save and restore the
    position of what was consumed; load before iterating."""

    def __init__(self, data_cfg: DataConfig, codec: SampleCodec, batch_size: int,
                 rank: int, world_size: int, seed: int):
        self.cfg = data_cfg
        self.shards, corpus_samples = resolve_corpora(data_cfg.corpora)
        weights = np.array([s.weight for s in self.shards], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.codec = codec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = max(1, data_cfg.workers)   # workers: 0 reads in-process, as one worker
        epoch_samples = data_cfg.epoch_samples or corpus_samples
        self.steps_per_epoch = epoch_samples // (batch_size * world_size)
        if data_cfg.resampled and self.steps_per_epoch == 0:
            raise ValueError(f"an epoch of {epoch_samples} samples makes no batch of {batch_size} "
                             f"on each of {world_size} ranks")
        self._state = self._epoch_start(0, dict.fromkeys(SKIP_COUNTERS + tuple(codec.skip_reasons), 0))

    # ---- position ------------------------------------------------------------------------

    def _epoch_start(self, epoch: int, stats: dict) -> dict:
        positions = [[0, 0, 0] for _ in range(self.num_workers)]     # [draw, offset, batches]
        return {"epoch": epoch, "next_worker": 0, "positions": positions, "stats": stats}

    def _identity(self) -> dict:
        """What a saved position is only valid for."""
        data = json.dumps([[s.name, s.weight] for s in self.shards]
                          + [self.cfg.resampled, self.cfg.shuffle_buffer, self.steps_per_epoch])
        return {"rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "seed": self.seed,
                "data": hashlib.sha1(data.encode()).hexdigest()[:16]}

    def state_dict(self) -> dict:
        """JSON-serialisable position after the last batch handed out, per rank."""
        return {**copy.deepcopy(self._state), **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"data position saved with {key}={state.get(key)!r} cannot resume "
                                 f"a stream with {key}={value!r} (same ranks, workers, batch size, "
                                 "seed and corpora needed)")
        self._state = copy.deepcopy({key: state[key] for key in ("epoch", "next_worker", "positions", "stats")})

    def stats(self) -> dict[str, int]:
        return dict(self._state["stats"])

    # ---- main process ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        while True:
            # Its own generator: the DataLoader draws worker seeds from it, not from the training
            # process' global RNG (whose state a resumed run must find where it was saved).
            loader = DataLoader(_EpochReader(self, self._state), batch_size=None,
                                num_workers=self.cfg.workers, pin_memory=torch.cuda.is_available(),
                                generator=torch.Generator().manual_seed(self.seed))
            for batch in loader:
                if self._consume(batch):
                    yield batch
            if not self.cfg.resampled:
                self._state = self._epoch_start(self._state["epoch"] + 1, self._state["stats"])
                return

    def _consume(self, batch: dict) -> bool:
        """Moves the position past `batch`; False for a batch that only carries skip counts."""
        state = self._state
        worker = batch.pop("_worker")
        draw, offset = batch.pop("_position")
        for name, count in batch.pop("_skipped").items():
            state["stats"][name] += count
        state["positions"][worker] = [draw, offset, state["positions"][worker][2] + 1]
        state["next_worker"] = (worker + 1) % self.num_workers
        if self.cfg.resampled and sum(p[2] for p in state["positions"]) == self.steps_per_epoch:
            self._state = self._epoch_start(state["epoch"] + 1, state["stats"])
        return bool(batch["keys"])

    # ---- worker process --------------------------------------------------------------------

    def _draws(self, epoch: int, worker: int) -> Iterator[tuple[int, int]]:
        """(shard index, draw seed) of this rank's `worker` in `epoch`."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        if self.cfg.resampled:
            while True:
                yield int(rng.choice(len(self.shards), p=self.probs)), int(rng.integers(2**63))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        for index in order[self.rank * self.num_workers + worker::self.world_size * self.num_workers]:
            yield int(index), int(rng.integers(2**63))

    def _worker_batches(self, epoch: int, worker: int, start_draw: int, start_offset: int,
                        done: int) -> Iterator[dict]:
        # Resampled: this worker's share of the epoch's batches, less those already consumed.
        quota = None
        if self.cfg.resampled:
            quota = len(range(worker, self.steps_per_epoch, self.num_workers)) - done
        if quota is not None and quota <= 0:
            return
        samples, skipped, position, empty_draws = [], Counter(), [start_draw, start_offset], 0
        for draw, (shard_index, draw_seed) in enumerate(self._draws(epoch, worker)):
            if draw < start_draw:
                continue                        # consumed draws are not even opened
            shard = self.shards[shard_index]
            first = start_offset if draw == start_draw else 0
            used = False
            items = shuffled(open_shard(shard), random.Random(draw_seed), self.cfg.shuffle_buffer)
            for offset, raw in enumerate(items):
                if offset < first:
                    continue                    # consumed samples are not decoded
                position = [draw, offset + 1]
                sample = self._prepare(raw, shard, random.Random(f"{draw_seed}:{offset}"))
                if isinstance(sample, str):
                    skipped[sample] += 1
                    continue
                used = True
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield self._collate(samples, worker, position, skipped)
                    samples, skipped = [], Counter()
                    if quota is not None:
                        quota -= 1
                        if quota == 0:
                            return
            empty_draws = 0 if used else empty_draws + 1
            if quota is not None and empty_draws == MAX_EMPTY_DRAWS:
                raise RuntimeError(f"rank {self.rank} worker {worker}: {MAX_EMPTY_DRAWS} shard draws "
                                   f"in a row gave no usable sample (last: {shard.url}; skipped since "
                                   f"the last batch: {dict(skipped)})")
        if samples or skipped:                  # end of a non-resampled pass
            yield self._collate(samples, worker, position, skipped)

    def _prepare(self, raw: dict, shard, rng: random.Random):
        """(key, decoded sample), or the name of the counter the sample is skipped under."""
        if ERROR_KEY in raw:
            return raw[ERROR_KEY]
        key = f"{shard.name}/{raw['__key__']}"
        sample = self.codec.decode(raw, key, rng)
        return sample if isinstance(sample, str) else (key, sample)

    def _collate(self, samples: list, worker: int, position: list, skipped: Counter) -> dict:
        keys = [key for key, _ in samples]
        batch = {"keys": keys, "_worker": worker, "_position": position, "_skipped": dict(skipped)}
        if samples:
            batch.update(self.codec.collate([sample for _, sample in samples], keys))
        return batch

    def __repr__(self) -> str:
        return (f"ShardStream({len(self.shards)} shards, rank {self.rank}/{self.world_size}, "
                f"{self.num_workers} workers, {self.steps_per_epoch} steps/epoch)")

