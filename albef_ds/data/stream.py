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
A worker keeps `data.open_shards` draws open at once (its lanes) and takes each sample from a lane
chosen uniformly at random, a draw replacing its lane's exhausted one: a batch mixes the corpora in
proportion to their weights (a lane is held for as long as its draw lasts, so the lanes' share of
a corpus is its share of samples) and spans many shards. Within a draw, samples are shuffled with a
buffer of shuffle_buffer // open_shards (the open draws share the memory), seeded by the draw seed;
the lane of the t-th sample comes from an RNG seeded by (seed, epoch, rank, worker, t); each
sample's decoding (caption choice, augmentation) uses an RNG seeded by (draw seed, position).

Resume. A worker's position is its open draws (draw index, samples of it passed), the next draw to
open, the samples taken and the batches made. Every batch carries its worker's position after it;
the main process keeps, per worker, the position of the last batch handed to the caller.
Resuming, a worker reopens only its open draws and skips their passed samples without decoding
them (earlier draws are not opened: the cost is bounded by the open draws); the new DataLoader's
worker i plays worker (i + next_worker) % workers so batches come in the order an uninterrupted
run gives.

Bad input (undecodable image, missing or empty caption, non UTF-8 text, truncated or unreadable
tar) is skipped; the counts travel with the batches, so stats() covers what was consumed.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
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


class _Lane:
    """An open draw: its index in the worker's draw sequence, its shard, its samples (shuffled,
    positioned after `offset` of them) and whether it has given a usable sample."""

    def __init__(self, draw: int, shard, seed: int, items: Iterator, offset: int):
        self.draw, self.shard, self.seed, self.items, self.offset = draw, shard, seed, items, offset
        self.used = False


class _DrawSequence:
    """A worker's draws by index, generated as far as asked (the sequence is a pure function of
    the config, so draw i is the same whenever it is asked for)."""

    def __init__(self, draws: Iterator):
        self._draws, self._seen = draws, []

    def has(self, index: int) -> bool:
        while len(self._seen) <= index:
            draw = next(self._draws, None)
            if draw is None:
                return False
            self._seen.append(draw)
        return True

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not self.has(index):
            raise IndexError(index)
        return self._seen[index]


class _EpochReader(IterableDataset):
    """What one DataLoader runs: every worker resumes its own position in one epoch."""

    def __init__(self, stream: "ShardStream", state: dict):
        self.stream = stream
        self.state = copy.deepcopy(state)

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.state["next_worker"]) % self.stream.num_workers
        return self.stream._worker_batches(self.state["epoch"], worker, self.state["positions"][worker])


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
        positions = [{"lanes": [], "next_draw": 0, "taken": 0, "batches": 0} for _ in range(self.num_workers)]
        return {"epoch": epoch, "next_worker": 0, "positions": positions, "stats": stats}

    def _identity(self) -> dict:
        """What a saved position is only valid for."""
        data = json.dumps([[s.name, s.weight] for s in self.shards]
                          + [self.cfg.resampled, self.cfg.shuffle_buffer, self.cfg.open_shards, self.steps_per_epoch])
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
        position = batch.pop("_position")
        for name, count in batch.pop("_skipped").items():
            state["stats"][name] += count
        state["positions"][worker] = {**position, "batches": state["positions"][worker]["batches"] + 1}
        state["next_worker"] = (worker + 1) % self.num_workers
        if self.cfg.resampled and sum(p["batches"] for p in state["positions"]) == self.steps_per_epoch:
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

    def _open(self, draws: list, index: int, offset: int) -> "_Lane":
        """Draw `index` as a lane, its first `offset` samples passed without decoding."""
        shard_index, draw_seed = draws[index]
        shard = self.shards[shard_index]
        buffer = max(1, self.cfg.shuffle_buffer // self.cfg.open_shards)
        items = shuffled(open_shard(shard), random.Random(draw_seed), buffer)
        for _ in itertools.islice(items, offset):
            pass
        return _Lane(index, shard, draw_seed, items, offset)

    def _worker_batches(self, epoch: int, worker: int, position: dict) -> Iterator[dict]:
        # Resampled: this worker's share of the epoch's batches, less those already consumed.
        quota = None
        if self.cfg.resampled:
            quota = len(range(worker, self.steps_per_epoch, self.num_workers)) - position["batches"]
        if quota is not None and quota <= 0:
            return
        draws = _DrawSequence(self._draws(epoch, worker))
        lanes = [self._open(draws, index, offset) for index, offset in position["lanes"]]
        next_draw, taken = position["next_draw"], position["taken"]
        while len(lanes) < self.cfg.open_shards and draws.has(next_draw):     # a fresh start
            lanes.append(self._open(draws, next_draw, 0))
            next_draw += 1
        samples, skipped, empty_draws, last_url = [], Counter(), 0, None

        def where() -> dict:
            return {"lanes": [[lane.draw, lane.offset] for lane in lanes], "next_draw": next_draw, "taken": taken}

        while lanes:
            slot = random.Random(f"{self.seed}:{epoch}:{self.rank}:{worker}:{taken}").randrange(len(lanes))
            taken += 1
            lane = lanes[slot]
            raw = next(lane.items, None)
            if raw is None:                     # this draw is done: the next one takes its lane
                empty_draws = 0 if lane.used else empty_draws + 1
                last_url = lane.shard.url
                if quota is not None and empty_draws == MAX_EMPTY_DRAWS:
                    raise RuntimeError(f"rank {self.rank} worker {worker}: {MAX_EMPTY_DRAWS} shard draws "
                                       f"in a row gave no usable sample (last: {last_url}; skipped since "
                                       f"the last batch: {dict(skipped)})")
                if draws.has(next_draw):
                    lanes[slot] = self._open(draws, next_draw, 0)
                    next_draw += 1
                else:
                    del lanes[slot]
                continue
            sample = self._prepare(raw, lane.shard, random.Random(f"{lane.seed}:{lane.offset}"))
            lane.offset += 1
            if isinstance(sample, str):
                skipped[sample] += 1
                continue
            lane.used = True
            empty_draws = 0
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield self._collate(samples, worker, where(), skipped)
                samples, skipped = [], Counter()
                if quota is not None:
                    quota -= 1
                    if quota == 0:
                        return
        if samples or skipped:                  # end of a non-resampled pass
            yield self._collate(samples, worker, where(), skipped)

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

