"""Everything distributed, wrapped around the single-device model from outside (DESIGN.md).

Build order (torchtitan): build on meta -> set_trainable -> activation checkpointing -> compile ->
`fully_shard` per block, then the root -> `to_empty` -> load weights (rank 0 reads them and
broadcasts). Frozen and trainable parameters share FSDP units (FSDP2 shards per parameter, so
mixed `requires_grad` is fine). Checkpoints use `torch.distributed.checkpoint` (DCP) with
`get_state_dict` / `set_state_dict`, so a run saved by N ranks resumes on M ranks or one process.

One process (no torchrun) goes through the same functions with `world_size == 1` and no process
group: no FSDP, autocast instead of FSDP mixed precision, DCP in its single-process mode.
This is the only module, besides the trainer entry, that imports torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._composable import checkpoint as checkpoint_module
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from mars.errors import MarsError


@dataclass
class DistEnv:
    """Where this process sits: rank, world size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Read the torchrun environment; start a process group (nccl on CUDA, gloo on CPU) if > 1 rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MarsError("device=cuda but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", device_id=dev if device == "cuda" else None)
    return DistEnv(rank, world, local_rank, dev)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a (small) tensor over ranks; returns it (on the CPU for gloo)."""
    if env.distributed:
        values = values.to(env.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- wrapping the model ------------------------------------------------------------------------


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (composable API: parameter names unchanged)."""
    for block in model.layers:
        checkpoint_module(block)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (`nn.Module.compile` keeps parameter names)."""
    for block in model.layers:
        block.compile()


def apply_fsdp(model: nn.Module, bf16: bool) -> None:
    """FSDP2: one unit per block, then the root (embedding, final norm, head).

    The model's training entry points `forward_hidden` and `logits` are registered as forward
    methods, so FSDP gathers the root's parameters for them as it does for `forward`."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for i, block in enumerate(model.layers):
        # The last block's parameters are gathered again by backward right away: keep them.
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    for method in ("forward_hidden", "logits"):
        register_fsdp_forward_method(model, method)


def set_grad_sync(model: nn.Module, on: bool) -> None:
    """Skip FSDP's reduce-scatter on all but the last micro-batch of a step (gradient accumulation)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(on)


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor] | None, env: DistEnv) -> None:
    """Load a full state dict held by rank 0 (others pass None) into a materialised model."""
    if not env.distributed:
        model.load_state_dict(state, strict=True)
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, state if env.is_main else {}, options=options)


def full_state_dict(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0, on the CPU (other ranks get an empty dict)."""
    if not env.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Total gradient norm over all ranks (clipped to max_norm when > 0); DTensor-aware."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return float(total)


# --- distributed checkpoints -------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when no process group exists: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_train_state(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model + optimizer into `directory` with DCP (each rank writes its shards)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)


def load_train_state(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a `save_train_state` folder into `model` (and `optimizer`), resharding as needed."""
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=directory)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
