"""Multi-rank plumbing kept apart from the model: process group, wrapping, reductions, state.

The draft model is single-device code; ``parallelize`` is the one place DDP or FSDP is applied.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

Mode = Literal["none", "ddp", "fsdp"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the trainer group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(
    device: str | None = None, timeout_s: float = 600.0, init_method: str | None = None
) -> DistContext:
    """Join the group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...).

    Without those variables this is a single process. NCCL on CUDA, gloo on CPU.
    ``init_method`` overrides the rendezvous (default: env://, MASTER_ADDR / MASTER_PORT).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # plain "cuda": this rank's own GPU
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, device=dev)


def parallelize(model: nn.Module, mode: Mode, ctx: DistContext) -> nn.Module:
    """Move ``model`` to the device and wrap it for data parallelism (``none`` when world is 1)."""
    model = model.to(ctx.device)
    if mode == "none" or not ctx.is_distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # Buffers are identical on every rank (frozen embedding, vocab map): no broadcasts.
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Shard each decoder layer on its own (EAGLE3 has one, the DFlash family a stack), then
        # the rest of the draft.
        layers = getattr(model, "layers", None) or [model.midlayer]
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"parallel mode {mode!r}: use 'none', 'ddp' or 'fsdp'")


def unwrap(model: nn.Module) -> nn.Module:
    """The single-device module inside a DDP wrapper (FSDP2 shards in place)."""
    return getattr(model, "module", model)


@contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for accumulation micro-batches that are not the last."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with nullcontext():
            yield


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op on one rank) and return it."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP (its full weights exist only after a gather)."""
    return _is_fsdp(model)


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on CPU (a collective under FSDP)."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    sd = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    return sd, optimizer.state_dict()


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict[str, Any],
    optim_sd: dict[str, Any],
) -> None:
    """Load unsharded state dicts written by ``full_state``."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=opts)
        return
    unwrap(model).load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()
