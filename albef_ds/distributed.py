"""Everything that talks to other ranks.

Each helper degrades to the identity in one process (torch.distributed not initialised), so the
model runs unchanged on one CPU or GPU, and tests can compare one process with several.
Every rank must call these in the same order: they are collectives.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Waits for every rank (nothing to wait for in a single process)."""
    if is_distributed():
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order: [obj] in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _env_from_slurm() -> None:
    """srun starts one task per GPU and describes it in SLURM_* variables; torch wants RANK etc."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("LOCAL_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if "MASTER_ADDR" not in env:
        raise RuntimeError("running under srun without MASTER_ADDR: launch through slurm/common.sh, "
                           "which sets MASTER_ADDR and MASTER_PORT from the allocation")
    env.setdefault("MASTER_PORT", "29500")


def _env_from_mpi() -> None:
    """mpirun: rank and size from mpi4py; rank 0's address is broadcast as MASTER_ADDR."""
    env = os.environ
    if "RANK" in env:
        return
    mpi_vars = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
    if not any(v in env for v in mpi_vars):
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    env["RANK"] = str(comm.Get_rank())
    env["WORLD_SIZE"] = str(comm.Get_size())
    host = socket.gethostname()
    hosts = comm.allgather(host)
    env["LOCAL_RANK"] = str(hosts[:comm.Get_rank()].count(host))
    master = comm.bcast(socket.gethostbyname(host) if comm.Get_rank() == 0 else None, root=0)
    env.setdefault("MASTER_ADDR", master)
    env.setdefault("MASTER_PORT", "29500")


def init_distributed() -> bool:
    """Initialises torch.distributed from whichever launcher started us: the deepspeed launcher
    or torchrun (RANK/WORLD_SIZE), srun (SLURM_*), or mpirun (mpi4py). NCCL on GPU, gloo on CPU.
    A plain `python train.py` runs as a single process of world size 1. Returns whether this
    call started the process group (whoever started it ends it: shutdown())."""
    if is_distributed():
        return False
    _env_from_slurm()
    _env_from_mpi()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    # torch's own process group (DeepSpeed's engine takes it over when training builds one): a
    # command that does not train does not import DeepSpeed
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="env://")
    return True


class _Unsaid(logging.Filter):
    """Drops the records that start with one of `starts`."""

    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def import_deepspeed():
    """DeepSpeed, imported without the start-up lines it and torch's extension builder log on a
    machine without a GPU ("Setting accelerator to CPU", "No CUDA runtime is found"): they read
    like errors, on every rank, and say nothing a user can act on. The trainer says once that it
    runs on the CPU (albef_ds.engine.build)."""
    if not torch.cuda.is_available():
        logging.getLogger("DeepSpeed").addFilter(_Unsaid("Setting accelerator to CPU"))
        logging.getLogger("torch.utils.cpp_extension").addFilter(_Unsaid("No CUDA runtime is found"))
    import deepspeed

    return deepspeed


def shutdown() -> None:
    """Ends the process group init_distributed() started, after every user of it has closed."""
    if is_distributed():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of equally shaped tensors; no gradient."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    traffic["gather_bytes"] += (world_size() - 1) * x.numel() * x.element_size()
    return torch.cat(out)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(x)
    return x


# Bytes this rank has received, for benchmarks and tests: through fetch_rows (hard-negative rows,
# their gradients, row ids) and through all_gather_nograd (the global batch's ITC features).
traffic = {"fetch_bytes": 0, "gather_bytes": 0}


class _RowExchange:
    """The routing of one fetch: which rows each rank asks of each other rank.

    `index` holds global row ids (rank * rows_per_rank + local row). Requests are grouped by
    owner; one all_to_all of counts and one of row ids tell every owner what to send.
    """

    def __init__(self, index: torch.Tensor, rows_per_rank: int):
        world = world_size()
        owner = index // rows_per_rank
        self.order = torch.argsort(owner, stable=True)          # requests grouped by owner
        recv_counts = torch.bincount(owner, minlength=world)
        send_counts = torch.empty_like(recv_counts)
        dist.all_to_all_single(send_counts, recv_counts)
        # all_to_all takes its split sizes as Python ints: read them once, two host syncs per
        # exchange rather than two per use (a GPU waits through each)
        self.recv_splits, self.send_splits = recv_counts.tolist(), send_counts.tolist()
        wanted = (index % rows_per_rank)[self.order]
        self.rows_to_send = torch.empty(sum(self.send_splits), dtype=index.dtype, device=index.device)
        dist.all_to_all_single(self.rows_to_send, wanted, self.send_splits, self.recv_splits)
        # (plus world_size request counts of 8 bytes, the only part that grows with the world)
        traffic["fetch_bytes"] += self.rows_to_send.numel() * index.element_size()

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        payload = local[self.rows_to_send].flatten(1).contiguous()
        received = payload.new_empty((sum(self.recv_splits), payload.shape[1]))
        dist.all_to_all_single(received, payload, self.recv_splits, self.send_splits)
        traffic["fetch_bytes"] += received.numel() * received.element_size()
        out = torch.empty_like(received)
        out[self.order] = received
        return out.view(-1, *local.shape[1:])

    def backward(self, grad: torch.Tensor, local_shape) -> torch.Tensor:
        grouped = grad[self.order].flatten(1).contiguous()
        returned = grouped.new_empty((self.rows_to_send.numel(), grouped.shape[1]))
        dist.all_to_all_single(returned, grouped, self.send_splits, self.recv_splits)
        traffic["fetch_bytes"] += returned.numel() * returned.element_size()
        out = grad.new_zeros((local_shape[0], grouped.shape[1]))
        out.index_add_(0, self.rows_to_send, returned)
        return out.view(local_shape)


class _FetchRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, exchange):
        ctx.exchange, ctx.local_shape = exchange, local.shape
        return exchange.forward(local)

    @staticmethod
    def backward(ctx, grad):
        return ctx.exchange.backward(grad.contiguous(), ctx.local_shape), None


def fetch_rows(index: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Rows of the global batch, by global row id, from whichever rank holds them.

    Each tensor is this rank's rows [b, ...] (b equal on every rank); `index` [n] holds global row
    ids. Only the requested rows travel (an all_to_all), so a rank sends and receives n rows per
    tensor whatever the world size. Gradients flow back to the rank that owns each row.
    """
    if world_size() == 1:
        return [t.index_select(0, index) for t in tensors]
    exchange = _RowExchange(index, tensors[0].shape[0])
    return [_FetchRows.apply(t, exchange) if t.requires_grad else exchange.forward(t) for t in tensors]


# ---- work split of evaluations ------------------------------------------------------------
# Items (images, texts) go in batches of batch_size in dataset order; batch b is encoded by rank
# b % world. Every batch then holds the same items on any number of ranks, so each feature is
# computed exactly as one process computes it, and the gathered result is identical.

def owner_of(i: int, batch_size: int, world: int) -> int:
    """The rank that encodes item i: batches of batch_size items are dealt round-robin."""
    return (i // batch_size) % world


def my_batches(n: int, batch_size: int, rank: int, world: int) -> list[range]:
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size) if owner_of(s, batch_size, world) == rank]


def local_row(i: int, batch_size: int, world: int) -> int:
    """Where item i sits among its owner's rows (the owner's batches concatenated in order)."""
    b = i // batch_size
    return (b // world) * batch_size + i - b * batch_size


def gather_rows(local: torch.Tensor, n: int, batch_size: int, world: int) -> torch.Tensor:
    """[n, ...] of all items from each rank's rows of its own batches."""
    if world == 1:
        return local
    batches = -(-n // batch_size)
    most = -(-batches // world) * batch_size
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[:local.shape[0]] = local
    gathered = all_gather_nograd(padded).view(world, most, *local.shape[1:])
    parts = []
    for b in range(batches):
        start = (b // world) * batch_size
        parts.append(gathered[b % world, start:start + min(batch_size, n - b * batch_size)])
    return torch.cat(parts)


def work_split(split_ranks: Optional[bool]) -> tuple[int, int]:
    """(rank, world) of the work split: all ranks of the process group, or this process alone."""
    if split_ranks is None:
        split_ranks = is_distributed()
    return (rank(), world_size()) if split_ranks else (0, 1)


def sum_over_split(x: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """`x` summed over the ranks of a work split (the identity in a split of one); the collective
    runs on `device`, where the backend wants it (CUDA for NCCL)."""
    return all_reduce_sum(x.to(device)) if world > 1 else x
