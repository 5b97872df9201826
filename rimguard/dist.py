"""Thin helpers over ``torch.distributed`` that are no-ops in a single process.

Every collective here is called by all ranks at the same point, with the same shapes, so a
rank-dependent branch can never leave one rank waiting.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as torch_dist


def active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if active() else 1


def rank() -> int:
    return torch_dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def _backend_device(tensor: torch.Tensor) -> torch.device:
    if active() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (a new tensor on the input's device)."""
    if not active():
        return tensor
    buf = tensor.detach().to(_backend_device(tensor)).clone()
    torch_dist.all_reduce(buf, op=torch_dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small objects)."""
    if not active():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on the main rank, its result on every rank. An exception on the main rank is raised on every
    rank as itself (not as a broken collective on the others)."""
    try:
        result: Any = fn() if is_main() else None
    except Exception as err:  # noqa: BLE001 - carried to every rank, then raised
        result = _Failed(err)
    result = broadcast(result)
    if isinstance(result, _Failed):
        raise result.error
    return result


class _Failed:
    def __init__(self, error: Exception) -> None:
        self.error = error
