"""Atomic file writes: a temporary file in the same folder, fsynced, then renamed into place, so a crash leaves
the old file or the new one, never a torn one."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def save_atomic(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write ``path`` through ``write(fh)`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb" if binary else "w") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_torch(obj: Any, path: Path) -> None:
    save_atomic(path, lambda fh: torch.save(obj, fh))


def save_json(obj: Any, path: Path) -> None:
    save_atomic(path, lambda fh: json.dump(obj, fh, indent=1, default=float), binary=False)


@contextmanager
def locked(lock_path: Path, shared: bool = False) -> Iterator[None]:
    """An flock on ``lock_path`` (created if missing), across processes: exclusive for writers, shared for
    readers that must not interleave with one."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
