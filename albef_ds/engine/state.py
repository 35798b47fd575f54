"""The training state a checkpoint keeps besides DeepSpeed's engine and the momentum model, as
stateful parts: each gives `state_dict()` and takes it back with `load_state_dict()`, and the
checkpoint room saves and restores them through one mapping (albef_ds.checkpoint.training), so the
loop does not know what is saved.

Shared parts (the same on every rank, written once in DeepSpeed's client state): the loop's
counters and the task's checkpoint buffers (queues). Per-rank parts (each rank's own file): the RNG
states and the data stream's position; taken over from another number of ranks with `take_over`
(every saved rank's states, in rank order)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import distributed as dist


@dataclass
class TrainState:
    """The loop's counters. Its state is flat in the client state (the keys checkpoints have had
    from the start)."""
    step: int = 0                   # optimizer steps applied
    micro_seen: int = 0             # micro-batches drawn: the seed of their masks and negatives
    bad_total: int = 0              # micro-batches skipped for a non-finite loss
    best: Optional[tuple] = None    # (metric value, tag) of the best evaluation so far

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_seen": self.micro_seen, "bad_total": self.bad_total, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro_seen, self.bad_total = state["step"], state["micro_seen"], state["bad_total"]
        # the best as of the resumed step (best.json may name a later tag of an abandoned branch)
        self.best = state.get("best")


class TaskBuffers:
    """The task's checkpoint buffers (feature queues), fp32 on the CPU."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        buffers = dict(self.model.named_buffers())
        return {"buffers": {k: buffers[k].detach().cpu() for k in self.model.checkpoint_buffers()}}

    def load_state_dict(self, state: dict) -> None:
        buffers = dict(self.model.named_buffers())
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)


class RandomState:
    """Every RNG of the process, in tensors and plain containers (a rank file loads weights-only)."""

    def state_dict(self) -> dict:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(),
                 "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                 "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def take_over(self, states: list) -> None:
        """Rank r continues the RNGs of saved rank r modulo the saved ranks."""
        self.load_state_dict(states[dist.rank() % len(states)])


class DataPosition:
    """The data stream's position (None: the run reads batches of the caller's, nothing to keep)."""

    def __init__(self, stream):
        self.stream = stream

    def state_dict(self) -> Optional[dict]:
        return self.stream.state_dict() if self.stream is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.stream is not None and state is not None:
            self.stream.load_state_dict(state)

    def take_over(self, states: list) -> None:
        """The epoch continues from every saved rank's position (ShardStream.resume_from)."""
        if self.stream is not None and states[0] is not None:
            self.stream.resume_from(states)
