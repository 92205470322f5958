"""Several processes training one run on torch.distributed (host-free; imports no ComfyUI).

Every rank executes the same workflow.  Outside a process group (the ComfyUI page, one process)
every function here is the identity of the single-process run: rank 0 of 1.

* Groups are rank-disjoint and deterministic: with ``n`` groups per rank, rank ``r`` samples the
  groups ``r*n .. r*n+n-1`` of the global iteration (:func:`group_offset`; their prompts are
  :func:`rank_slice` of the global prompt draw, their noise ``rollout_generator(seed, iteration,
  offset + g)``), so K ranks x n groups sample exactly what one process with K*n groups samples.
  A group never spans ranks; advantages are per group, hence rank-local.
* :func:`average_gradients` (the trainer's ``reduce_gradients``): one all-reduce SUM of all LoRA
  gradients, divided by the world size, before unscaling and clipping.  Each rank's loss is
  normalised by its own pairs, so the average is the single-process gradient over all groups.
* The trainer draws each micro-batch's trained timesteps from the run's generator, group by group:
  :func:`skip_timestep_draws` advances it over the other ranks' groups, so every rank keeps the
  generator of the single-process run.
* :func:`reduce_stats`: iteration stats over all ranks (reward mean/std over all samples,
  pair-weighted loss / clip fraction / KL, summed group counts).
* Rank 0 alone writes files (:func:`is_writer`); every rank keeps the same run state.
* Failures: a rank that fails posts its error in the process group's store
  (:func:`report_failure`) and leaves the group, so peers waiting in a collective fail at once
  (or at the collective timeout) and name that error (:func:`peer_failure`).
"""
from __future__ import annotations

import datetime
import math
import os
import time
from typing import Optional

import torch

ERROR_KEY = "pcpo/error"
ACK_KEY = "pcpo/error_acks"
DEFAULT_TIMEOUT_S = 900.0
# seconds this process spent in the training collectives (gradient average, stats), waiting for the
# other ranks included; read by the runner's --timings log and benchmarks/scaling.py
COLLECTIVE_SECONDS = [0.0]


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() else None


def active() -> bool:
    dist = _dist()
    return dist is not None and dist.is_initialized() and dist.get_world_size() > 1


def context() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_writer() -> bool:
    """True on the rank that writes checkpoints, exports and logs (rank 0, or a single process)."""
    return context()[0] == 0


def group_offset(groups_per_rank: int) -> int:
    """Global index of this rank's first group."""
    rank, _ = context()
    return rank * int(groups_per_rank)


def rank_slice(items: list, rank: Optional[int] = None, world: Optional[int] = None) -> list:
    """This rank's share of a global list of ``world * n`` items (contiguous, rank-ordered)."""
    if rank is None or world is None:
        rank, world = context()
    items = list(items)
    if len(items) % world:
        raise ValueError(f"{len(items)} items cannot be split evenly over {world} ranks")
    n = len(items) // world
    return items[rank * n:(rank + 1) * n]


def skip_timestep_draws(generator: torch.Generator, draws: int, candidates: int) -> None:
    """Advance ``generator`` by ``draws`` of the trainer's per-micro-batch draw
    (``torch.randperm(candidates, generator=...)``, see :meth:`PCPOTrainer.update`)."""
    for _ in range(int(draws)):
        torch.randperm(int(candidates), generator=generator)


def timestep_draws_around(groups_per_rank: int, chunks_per_group: int) -> tuple[int, int]:
    """(draws of the ranks before this one, draws of the ranks after it) in one iteration."""
    rank, world = context()
    per_rank = int(groups_per_rank) * int(chunks_per_group)
    return rank * per_rank, (world - 1 - rank) * per_rank


# --------------------------------------------------------------------------- collectives

def average_gradients(params) -> None:
    """All-reduce the gradients of ``params`` (missing ones count as zero) and divide by the world
    size: one flat buffer, one collective.  A no-op outside a process group."""
    if not active():
        return
    dist = _dist()
    params = [p for p in params]
    if not params:
        return
    t0 = time.perf_counter()
    dev = params[0].device
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float().to(dev)
                      for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    i = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            g = flat[i:i + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            i += n
    COLLECTIVE_SECONDS[0] += time.perf_counter() - t0


def _all_reduce(values: list, op: str = "sum") -> list:
    dist = _dist()
    t0 = time.perf_counter()
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    out = t.cpu().tolist()
    COLLECTIVE_SECONDS[0] += time.perf_counter() - t0
    return out


def reduce_stats(stats: dict, samples: int) -> dict:
    """The trainer's stats of this rank's ``samples`` samples, over all ranks (a copy).  Identical
    on every rank afterwards.  Gradient norms need no reduction (gradients are already averaged)."""
    if not active():
        return stats
    out = dict(stats)
    n, mean, std = float(samples), float(stats["reward_mean"]), float(stats["reward_std"])
    pairs = float(stats["pairs"])
    per_step = stats.get("clip_fraction_per_step") or []
    sums = [n, n * mean, n * (std * std + mean * mean), pairs,
            pairs * stats["loss"], pairs * stats["clip_fraction"], pairs * stats["approx_kl"],
            pairs * stats["log_approx_error"], stats["zero_std_groups"], stats["groups"]]
    sums += [0.0 if v is None else float(v) for v in per_step] + [0.0 if v is None else 1.0 for v in per_step]
    tot = _all_reduce(sums, "sum")
    mx = _all_reduce([stats["first_update_log_ratio"]], "max")[0]
    N, P = tot[0], tot[3]
    gmean = tot[1] / N
    out.update(reward_mean=gmean, reward_std=math.sqrt(max(tot[2] / N - gmean * gmean, 0.0)),
               pairs=int(round(P)), loss=tot[4] / P, clip_fraction=tot[5] / P, approx_kl=tot[6] / P,
               log_approx_error=tot[7] / P, zero_std_groups=int(round(tot[8])), groups=int(round(tot[9])),
               first_update_log_ratio=mx)
    k = len(per_step)
    if k:
        vals, cnt = tot[10:10 + k], tot[10 + k:10 + 2 * k]
        out["clip_fraction_per_step"] = [v / c if c > 0 else None for v, c in zip(vals, cnt)]
    return out


def broadcast_object(obj):
    """``obj`` of rank 0 on every rank (identity outside a process group)."""
    if not active():
        return obj
    dist = _dist()
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- process group life

def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str = "auto") -> tuple[int, int]:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``); a no-op for a single process.  ``backend``
    auto: NCCL when CUDA is available (one GPU per process: ``LOCAL_RANK``), else gloo.
    Collectives time out after ``timeout_s``.  Returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dist = _dist()
    if world <= 1 or dist is None:
        return 0, 1
    if dist.is_initialized():
        return context()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if torch.cuda.is_available():  # one GPU per process, before the host picks its device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    return context()


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store
        return _get_default_store()
    except Exception:
        return None


def report_failure(message: str, linger_s: float = 30.0) -> None:
    """Tell the other ranks that this one failed with ``message`` and leave the process group, so
    that peers blocked in a collective fail now.  Waits up to ``linger_s`` for the peers to read
    the message (the store may live in this process)."""
    if not active():
        return
    dist = _dist()
    world = dist.get_world_size()
    store = _store()
    try:
        if store is not None and not store.check([ERROR_KEY]):
            store.set(ERROR_KEY, message)
    except Exception:
        pass
    try:
        dist.destroy_process_group()
    except Exception:
        pass
    if store is None:
        return
    end = time.monotonic() + float(linger_s)
    while time.monotonic() < end:
        try:
            if store.add(ACK_KEY, 0) >= world - 1:
                return
        except Exception:
            return
        time.sleep(0.05)


def peer_failure() -> Optional[str]:
    """The error another rank reported (and acknowledge it), or None."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return None
    store = _store()
    if store is None:
        return None
    try:
        if not store.check([ERROR_KEY]):
            return None
        msg = store.get(ERROR_KEY).decode("utf-8", "replace")
        store.add(ACK_KEY, 1)
        return msg
    except Exception:
        return None


def shutdown() -> None:
    """Leave the process group (after a clean end)."""
    dist = _dist()
    if dist is not None and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
