"""Data-parallel calibration over several processes with ``torch.distributed`` (no scheduler of our own).

Launch with ``torchrun --nproc-per-node N -m layerprune.cli prune ...``. Every rank loads the model and
draws the same calibration set (same seed); rank r runs the samples ``r, r+N, r+2N, …`` through each
block. Pruner statistics are sums over tokens, so one ``all_reduce`` per linear makes every rank hold the
statistics of the whole calibration set (Wanda's Σx², SparseGPT's Hessian); the linears (or groups of
linears sharing one input) of a block are dealt over the ranks by cost, each rank prunes its share and
broadcasts it, so all ranks continue with identical weights. Evaluation, export and printing happen
on rank 0 only. Without an initialised process group every function here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

_ALONE = 0  # > 0 inside alone(): this process acts as if it were the only one


def active() -> bool:
    return _ALONE == 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def alone() -> Iterator[None]:
    """Inside, this process works as if alone (rank 0 of 1: all samples, no collectives). Ranks that run the
    same work inside get the one-process result bit for bit, at the one-process cost."""
    global _ALONE
    _ALONE += 1
    try:
        yield
    finally:
        _ALONE -= 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(ids: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's calibration samples (strided, so every rank gets the same count ±1)."""
    if ids is None or not active():
        return ids
    part = ids[rank()::world_size()]
    if part.shape[0] == 0:
        from layerprune.errors import UserError

        raise UserError(f"--nsamples {ids.shape[0]} is smaller than the {world_size()} processes: raise it")
    return part


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (gloo needs CPU tensors; NCCL device tensors)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_count(n: int, device: torch.device) -> int:
    if not active():
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def deal(costs: list[float], ranks: int) -> list[int]:
    """The rank that does each job: longest first, each to the least-loaded rank (ties: lowest rank, then
    the job's order). Deterministic, so every rank computes the same deal without talking."""
    load = [0.0] * ranks
    out = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(ranks), key=lambda q: (load[q], q))
        out[j] = r
        load[r] += costs[j]
    return out


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> None:
    """Give every rank ``src``'s ``t`` (in place; no-op in one process)."""
    if active():
        dist.broadcast(t, src)


def explain_failure(e: BaseException) -> str | None:
    """One line for an error raised by a collective (another rank died, or hung past the timeout); ``None`` for
    any other error, or outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    dist_error = getattr(dist, "DistError", None)
    known = ("timed out", "timeout", "connection closed", "connection reset", "nccl", "gloo", "watchdog", "peer")
    if not ((dist_error is not None and isinstance(e, dist_error)) or any(k in text.lower() for k in known)):
        return None
    t = os.environ.get("LAYERPRUNE_DIST_TIMEOUT", "900")
    return (f"rank {rank()} of {world_size()}: a collective with the other ranks failed ({text}). Another rank "
            f"stopped or is stuck (see every rank's log), or one step takes longer than LAYERPRUNE_DIST_TIMEOUT={t} s: "
            "raise it if so")


def init_from_env(device: str) -> str:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group and pick this rank's device.
    Returns the device string to use (``cuda:LOCAL_RANK`` with NCCL, else the given one with gloo)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    # a collective that waits longer than this fails with an error instead of hanging (NCCL watchdog)
    timeout = datetime.timedelta(seconds=int(os.environ.get("LAYERPRUNE_DIST_TIMEOUT", "900")))
    if use_cuda:
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(f"cuda:{local}"))
        return f"cuda:{local}"
    dist.init_process_group("gloo", timeout=timeout)
    return device
