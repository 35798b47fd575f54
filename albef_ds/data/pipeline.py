"""The pretraining stream: tar shards -> decoded, augmented, tokenized batches, with exact resume.

Order. Each DataLoader worker reads a sequence of shard *draws*; a draw is (shard, draw seed) and
the sequence is a pure function of (seed, epoch, rank, worker) and the shard list:
- resampled: shards drawn with replacement (probability from corpus sizes or weights), so every
  worker of every rank has data whatever the shard count, and each worker makes its share of the
  epoch's `steps_per_epoch` batches (DataLoader hands batch n to worker n % workers);
- not resampled: the shards shuffled once per epoch and dealt out over all ranks x workers, each
  shard read once, every worker to its end (ranks may then make different numbers of batches).
A draw's samples are shuffled with a buffer that lives inside the draw, seeded by the draw seed,
and each sample's caption choice and augmentation use an RNG seeded by (draw seed, position).

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
import io
import json
import random
import tarfile
from collections import Counter
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from albef_ds.config import DataConfig
from albef_ds.data.shards import Shard, resolve_corpora
from albef_ds.data.transforms import build_transform
from albef_ds.tokenizer import clean_caption, tokenize

SKIP_COUNTERS = ("corrupt_image", "missing_image", "empty_caption", "bad_text", "truncated_tar",
                 "shard_error")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
ERROR_KEY = "__error__"
# Resampled draws in a row without one usable sample before a worker gives up: the data is
# unreadable, and waiting for a batch that cannot come would hang every rank.
MAX_EMPTY_DRAWS = 100


class _EndCheckingReader:
    """A file wrapper noting whether the tar reader asked for bytes past the end of the file: a
    complete tar ends with zero blocks that the reader stops at, so only a truncated one does
    (also one cut between two members, which the tar reader alone takes for a complete file)."""

    def __init__(self, stream):
        self.stream = stream
        self.read_past_end = False

    def read(self, size=-1):
        data = self.stream.read(size)
        self.read_past_end |= size != 0 and not data
        return data


def read_shard(url: str) -> Iterator[dict]:
    """Raw samples of one shard ({"__key__", extension: bytes}) through webdataset's tar reader; a
    shard that cannot be opened or read to its end yields what it could, then one
    {ERROR_KEY: counter name} item."""
    errors = []

    def keep_going(exn):
        errors.append(exn)
        return True

    try:
        stream = _EndCheckingReader(gopen(url))
    except OSError:                             # a missing file; failing commands fail on read
        yield {ERROR_KEY: "shard_error"}
        return
    yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=keep_going),
                             handler=keep_going)
    if stream.read_past_end or any(isinstance(e, tarfile.TarError) for e in errors):
        yield {ERROR_KEY: "truncated_tar"}
    elif errors:
        yield {ERROR_KEY: "shard_error"}


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


def decode_image(source: Union[bytes, str]) -> Image.Image:
    """An RGB image from encoded bytes (a shard member) or a file path (an annotation's image)."""
    # convert() forces the full decode, so a truncated file fails here.
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).convert("RGB")


def sample_captions(sample: dict) -> list[str]:
    """json's "caption" (a string or a list) when present, else txt (the whole file, one caption).
    Raises ValueError on text that is not UTF-8 or json that does not parse."""
    if "json" in sample:
        meta = json.loads(sample["json"].decode("utf-8"))
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(caption, str):
            return [caption]
        if isinstance(caption, list):
            return [c for c in caption if isinstance(c, str)]
    if "txt" in sample:
        return [sample["txt"].decode("utf-8")]
    return []


class _EpochReader(IterableDataset):
    """What one DataLoader runs: every worker resumes its own position in one epoch."""

    def __init__(self, stream: "PretrainStream", state: dict):
        self.stream = stream
        self.state = copy.deepcopy(state)

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.state["next_worker"]) % self.stream.num_workers
        draw, offset, batches = self.state["positions"][worker]
        return self.stream._worker_batches(self.state["epoch"], worker, draw, offset, batches)


class PretrainStream:
    """Batches {"image", "input_ids", "attention_mask", "keys"} for one rank; see the module doc.

    Iterating goes on over epochs in resampled mode, and makes one pass otherwise (a new
    iteration then starts the next epoch). state_dict() / load_state_dict() save and restore the
    position of what was consumed; load before iterating."""

    def __init__(self, data_cfg: DataConfig, img_size: int, tokenizer, batch_size: int,
                 rank: int, world_size: int, seed: int):
        self.cfg = data_cfg
        self.shards, corpus_samples = resolve_corpora(data_cfg.corpora)
        weights = np.array([s.weight for s in self.shards], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = max(1, data_cfg.workers)   # workers: 0 reads in-process, as one worker
        self.transform = build_transform(img_size, data_cfg.augment)
        epoch_samples = data_cfg.epoch_samples or corpus_samples
        self.steps_per_epoch = epoch_samples // (batch_size * world_size)
        if data_cfg.resampled and self.steps_per_epoch == 0:
            raise ValueError(f"an epoch of {epoch_samples} samples makes no batch of {batch_size} "
                             f"on each of {world_size} ranks")
        self._state = self._epoch_start(0, dict.fromkeys(SKIP_COUNTERS, 0))

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
            items = shuffled(read_shard(shard.url), random.Random(draw_seed), self.cfg.shuffle_buffer)
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

    def _prepare(self, raw: dict, shard: Shard, rng: random.Random) -> Union[tuple, str]:
        """(key, image tensor, caption), or the name of the counter the sample is skipped under."""
        if ERROR_KEY in raw:
            return raw[ERROR_KEY]
        try:
            captions = sample_captions(raw)
        except ValueError:                      # UnicodeDecodeError, JSONDecodeError
            return "bad_text"
        captions = [c for c in (clean_caption(c, self.cfg.max_words) for c in captions) if c]
        if not captions:
            return "empty_caption"
        caption = rng.choice(captions)
        data = next((raw[key] for key in IMAGE_KEYS if key in raw), None)
        if data is None:
            return "missing_image"
        try:
            image = decode_image(data)
        except Exception:                       # PIL raises many types on broken files
            return "corrupt_image"
        return f"{shard.name}/{raw['__key__']}", self.transform(image, rng), caption

    def _collate(self, samples: list, worker: int, position: list, skipped: Counter) -> dict:
        batch = {"keys": [key for key, _, _ in samples], "_worker": worker, "_position": position,
                 "_skipped": dict(skipped)}
        if samples:
            # default_collate stacks straight into shared memory in a worker process (torch.stack
            # would leave the DataLoader a second copy to make).
            batch["image"] = default_collate([image for _, image, _ in samples])
            batch["input_ids"], batch["attention_mask"] = tokenize(
                self.tokenizer, [caption for _, _, caption in samples], self.cfg.max_tokens)
        return batch

    def __repr__(self) -> str:
        return (f"PretrainStream({len(self.shards)} shards, rank {self.rank}/{self.world_size}, "
                f"{self.num_workers} workers, {self.steps_per_epoch} steps/epoch)")

