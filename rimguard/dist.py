"""Thin helpers over ``torch.distributed`` that are no-ops in a single process.

Every collective here is called by all ranks at the same point, with the same shapes, so a
rank-dependent branch can never leave one rank waiting.

Probe passes split their prompts over ranks (:func:`shard`, summed back by :func:`sum_shards`).
Under sharded parameters (FSDP2, ZeRO-3) every module forward is a collective, so every rank must run
the same passes: :func:`replicate_probes` makes every rank run every probe instead, and the sums
are then each rank's own (the same numbers as one process, with no speed-up from more ranks).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

S = TypeVar("S", bound=Sequence)  # a sliceable probe set: a list, a range, SpanPrompts
_replicated = False  # every rank runs every probe (sharded parameters): see replicate_probes


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
    rank as itself (not as a broken collective on the others). Under :func:`replicate_probes` every rank runs
    ``fn`` (its forwards are collectives) and the main rank's result is kept."""
    try:
        result: Any = fn() if is_main() or _replicated else None
    except Exception as err:  # noqa: BLE001 - carried to every rank, then raised
        result = _Failed(err)
    result = broadcast(result)
    if isinstance(result, _Failed):
        raise result.error
    return result


class _Failed:
    def __init__(self, error: Exception) -> None:
        self.error = error


# -- probes over ranks --------------------------------------------------------------------------
def replicate_probes(on: bool) -> None:
    """Whether every rank runs every probe (set at the guard's set-up: on under sharded parameters)."""
    global _replicated
    _replicated = on and active()


def shard(items: S) -> S:
    """This rank's share of a probe set, sliced in its own type (all of it under :func:`replicate_probes`)."""
    return items if _replicated else items[rank() :: world_size()]


def sum_shards(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a statistic each rank computed on its :func:`shard` (its own under replication)."""
    return tensor if _replicated else all_reduce_sum(tensor)


# -- sharded parameters (FSDP2, DeepSpeed ZeRO-3) -------------------------------------------------------
# FSDP2's parameters are DTensors (``to_local()`` is the rank's shard along a dimension); ZeRO-3's are empty
# tensors outside a gather, with the rank's flat partition in ``ds_tensor`` (the flattened parameter, padded to
# a multiple of the world size, split in equal runs by rank) and their shape in ``ds_shape``.
def sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded over ranks (FSDP2's ``fully_shard`` or DeepSpeed ZeRO-3)."""
    return any(is_sharded(p) for p in model.parameters())


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a sharded parameter (or an FSDP2 gradient): a DTensor, or a ZeRO-3 parameter."""
    return isinstance(tensor, DTensor) or _zero3(tensor)


def _zero3(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def gathers(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ZeRO-3 parameter, whose forward reads a gathered copy besides the rank's partition."""
    return _zero3(tensor)


def backend_of(model: nn.Module, declared: str) -> str:
    """How ``model`` is trained, read off its parameters where they tell: ``"fsdp"`` for FSDP2's DTensors, ``"zero3"`` for
    DeepSpeed ZeRO-3's partitioned parameters, else ``declared`` (what the integration knows: ``"single"``, ``"ddp"``,
    ``"deepspeed"``). FSDP1's flattened parameters are refused with the alternative (a RuntimeError)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    params = list(model.parameters())
    if any(_zero3(p) for p in params):
        return "zero3"
    if any(isinstance(p, DTensor) for p in params):
        return "fsdp"
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise RuntimeError("rimguard: FSDP1 (FullyShardedDataParallel, flattened parameters) is not supported: use FSDP2, "
                           "fsdp_config={'fsdp_version': 2} in TrainingArguments or torch.distributed.fsdp.fully_shard")
    return declared


def interruptible(model: nn.Module) -> bool:
    """Whether a forward of ``model`` may be cut short by an exception (a probe pass stops after the last layer it
    reads): not under ZeRO-3, whose parameter coordinator must see every module it gathered for finish."""
    return not any(_zero3(p) for p in model.parameters())


def shape(tensor: torch.Tensor) -> torch.Size:
    """The global shape of a parameter, sharded or not."""
    return tensor.ds_shape if _zero3(tensor) else tensor.shape


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every rank calls it), else ``tensor`` itself."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    if _zero3(tensor):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if tensor.ds_status == ZeroParamStatus.AVAILABLE:  # gathered already (a persistent small parameter)
            return tensor.data.clone()
        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.data.clone()
    return tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter (a plain tensor the rank may read and write: ZeRO-3's is flat), else
    ``tensor``."""
    if isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor.ds_tensor if _zero3(tensor) else tensor


def local_part(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of ``whole`` (the global shape of ``like``) that this rank holds of the sharded ``like``, in the shape
    of :func:`local`: ``torch.chunk`` along each ``Shard`` dimension, as DTensor splits it; ZeRO-3's run of the
    flattened tensor, padded with zeros. ``whole`` itself when not sharded."""
    if _zero3(like):
        size = like.ds_tensor.numel()
        flat = whole.reshape(-1)
        flat = torch.cat([flat, flat.new_zeros(size * world_size() - flat.numel())])
        return flat[rank() * size : (rank() + 1) * size]
    if not isinstance(like, DTensor):
        return whole
    mesh = like.device_mesh
    for mesh_dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard):
            pieces = whole.chunk(mesh.size(mesh_dim), placement.dim)
            at = mesh.get_local_rank(mesh_dim)
            whole = pieces[at] if at < len(pieces) else whole.narrow(placement.dim, 0, 0)
    local_shape = like.to_local().shape
    if whole.shape != local_shape:
        raise RuntimeError(f"rimguard: cannot map a sharded parameter's slices onto its local shard (expected {tuple(local_shape)}, "
                           f"got {tuple(whole.shape)} from placements {like.placements})")
    return whole


def set_local(param: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` at the flat positions ``index`` of this rank's shard of ``param``. Under ZeRO-3 the optimizer's
    fp32 partition is written too (the optimizer steps it, then copies it into the parameter)."""
    local(param).view(-1)[index] = values.to(local(param).dtype)
    if _zero3(param) and getattr(param, "_z3_optimizer", None) is not None:
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        master = safe_get_local_fp32_param(param)
        if master is not None:
            master = master.clone()
            master.view(-1)[index] = values.to(master.dtype)
            safe_set_local_fp32_param(param, master)
