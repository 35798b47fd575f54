"""A run folder belongs to one run. A run started without --resume in a folder that holds
checkpoints stops (it would write over another run's steps); --start_over moves them aside first
(never deletes them). Two runs started into one folder at once (a job submitted twice) do not both
write: rank 0 holds an exclusive lock on `<output_dir>/.albef_run.lock` for the run's lifetime (the
operating system releases it when the process ends, however it ends: a requeued job takes it
again). Tags that failed their check at resume are moved into `checkpoints/damaged/`.

Rank 0 decides and acts; every rank learns the outcome (a collective), so all stop together."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

from .. import distributed as dist
from ..checkpoint import training as ckpt
from ..config import ConfigError

LOCK = ".albef_run.lock"
MOVED_ASIDE = ("checkpoints", "metrics.jsonl", "tb")      # what a run writes that a new start would mix with


class RunFolder:
    """The claim on a run folder: the lock's file handle on rank 0 (None elsewhere)."""

    def __init__(self, handle=None):
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()            # closing the file releases the lock
            self.handle = None


def claim(output_dir: str, resume: Optional[str], start_over: bool, damaged: dict, resume_tag: Optional[str]) -> RunFolder:
    """Takes the run folder for this run (a collective, after every other start-up check): the
    lock, the one-run rule, then the moves (old runs' files with start_over; damaged tags)."""
    outcome, handle = (_claim(output_dir, resume, start_over, damaged, resume_tag) if dist.rank() == 0
                       else (None, None))
    outcome = dist.gather_objects(outcome)[0]
    if outcome is not None:
        if handle is not None:
            handle.close()
        raise ConfigError(outcome)
    return RunFolder(handle)


def _claim(output_dir, resume, start_over, damaged, resume_tag) -> tuple[Optional[str], object]:
    """(the error, None) or (None, the lock's handle): rank 0's part of claim()."""
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    saved = ckpt.tags(ckpt_dir)
    if start_over and resume is not None:
        return "--start_over and --resume ask for opposite things: drop one", None
    if saved and resume is None and not start_over:
        return (f"output_dir {output_dir} holds the checkpoints of {_describe(ckpt_dir, saved)}: continue "
                f"that run with --resume, start this one in another --output_dir, or start over in this one "
                f"with --start_over (moves the old run's files aside, deletes nothing)"), None
    try:
        os.makedirs(output_dir, exist_ok=True)
        handle = open(os.path.join(output_dir, LOCK), "a+")
    except OSError as exc:
        return f"cannot use output_dir {output_dir}: {exc.strerror or exc}", None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that left no note"
        handle.close()
        return (f"another run is writing into output_dir {output_dir} ({holder}): wait for it to end, or "
                "give this one another --output_dir"), None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    if start_over and any(os.path.exists(os.path.join(output_dir, n)) for n in MOVED_ASIDE):
        aside = os.path.join(output_dir, f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(aside)
        for name in MOVED_ASIDE:
            if os.path.exists(os.path.join(output_dir, name)):
                os.rename(os.path.join(output_dir, name), os.path.join(aside, name))
        print(f"--start_over: the previous run's files are in {aside}", flush=True)
    for tag in damaged:
        os.makedirs(os.path.join(ckpt_dir, "damaged"), exist_ok=True)
        os.rename(os.path.join(ckpt_dir, tag), os.path.join(ckpt_dir, "damaged", f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if damaged:
        tmp = os.path.join(ckpt_dir, f"{ckpt.LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(resume_tag)
        os.replace(tmp, os.path.join(ckpt_dir, ckpt.LATEST))
    return None, handle


def _describe(ckpt_dir: str, saved: list) -> str:
    """'a <task> run (latest step N)' from the newest tag's run.json."""
    latest = ckpt.latest_tag(ckpt_dir) or saved[-1]
    try:
        with open(os.path.join(ckpt_dir, latest, ckpt.RUN_INFO)) as f:
                run = f"a {json.load(f)['config'].get('task', 'pretrain')} run"
    except (OSError, ValueError, KeyError, AttributeError):
        run = "a run"
    return f"{run} (latest checkpoint {latest}, step {int(latest[len('step'):])}; {len(saved)} in all)"
