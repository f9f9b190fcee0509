"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun``): the few collective helpers the
trainer, the loader and the SIF codebooks use. Every helper is a no-op in a single process, so the same code
runs unchanged on one CPU, one GPU or N ranks.

``torchrun --nproc-per-node 2 -m sampletok.cli train ...`` sets ``RANK``/``WORLD_SIZE``; :func:`init` joins
the process group (``gloo`` on CPU, ``nccl`` on CUDA).

Example:
    >>> world_size(), rank(), is_main()
    (1, 0, True)
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init(backend: str | None = None) -> bool:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); True when distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place."""
    if active():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_(*tensors: torch.Tensor, src: int = 0) -> None:
    """Every rank's tensors become rank ``src``'s, in place."""
    if active():
        for t in tensors:
            dist.broadcast(t, src=src)


def all_gather_objects(obj: Any) -> list[Any]:
    """[rank 0's obj, rank 1's, ...] on every rank (``[obj]`` in a single process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
