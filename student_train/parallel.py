"""Process group, device, FSDP2 and activation checkpointing.

One process per device. Under torchrun (RANK / WORLD_SIZE in the environment)
the process group is NCCL on GPUs and gloo on CPU; a plain `python` run is a
single process with no process group, and every collective here is then a
no-op, so the trainer has one code path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from common.causal_lm import TORCH_DTYPES, decoder_layers
from student_train.config import FROZEN_PLACEMENTS


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """torchrun env -> process group; otherwise one process on `device`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no GPU is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if "RANK" in os.environ and world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if device == "cuda" else None)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown(clean: bool = True) -> None:
    """Ends the process group; after an error skip the barrier, other ranks may never reach it."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------- wrapping


@dataclass
class ParallelConfig:
    compute_dtype: str = "bf16"  # FSDP2 parameter dtype on GPU
    activation_checkpointing: bool = False
    compile: bool = False
    # replicate: every rank keeps the whole frozen weights; FSDP2 shards only what trains, so a
    # micro batch all-gathers 0.64B trained parameters instead of 21B (GPT-OSS-20B phase 1).
    # shard: FSDP2 shards frozen weights too (1/N of their memory, two all-gathers per micro batch).
    frozen: str = "replicate"


def frozen_params(module: nn.Module) -> set[nn.Parameter]:
    return {p for p in module.parameters() if not p.requires_grad}


def parallelize(wrapper: nn.Module, env: DistEnv, cfg: ParallelConfig) -> nn.Module:
    """Activation checkpointing, compile and FSDP2 on a DistillModel whose trainable flags are final.

    Every rank holds the same whole model (built from the same seed or files on its own device).
    FSDP2 units: each decoder block, then the root (embeddings, final norm, lm_head,
    projections). The root keeps its parameters unsharded from forward through backward, which
    the fused loss inside forward relies on. With `frozen: replicate` frozen parameters are left
    out of every unit (`ignored_params`): they stay plain tensors, resident on every rank.
    """
    assert cfg.frozen in FROZEN_PLACEMENTS, cfg.frozen
    student = wrapper.student
    layers = decoder_layers(student)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(student)
    if cfg.compile:
        allow_shape_recompiles()
        for layer in layers:
            layer.compile()
    wrapper.to(env.device)
    if not dist.is_initialized():
        return wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    if env.device.type == "cuda":
        mp_dtype = TORCH_DTYPES[cfg.compute_dtype]
        block_mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
        # The root must not cast its inputs: teacher logits and log-sum-exps stay float32.
        root_mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:  # gloo reduces in the parameters' own dtype
        block_mp = root_mp = MixedPrecisionPolicy()
    ignored = frozen_params(wrapper) if cfg.frozen == "replicate" else None
    # With frozen weights replicated a block's gathered trained weights are small (0.64B in all
    # for GPT-OSS-20B phase 1): keep them from forward to backward instead of gathering twice.
    reshard = cfg.frozen != "replicate"
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=block_mp, ignored_params=ignored, reshard_after_forward=reshard)
    fully_shard(wrapper, mesh=mesh, mp_policy=root_mp, ignored_params=ignored)
    for module in wrapper.modules():
        if isinstance(module, FSDPModule):
            # The loss is already divided by the global token count: gradients must be summed over
            # ranks, not averaged.
            module.set_gradient_divide_factor(1.0)
            if env.device.type == "cpu":  # gloo has no PREMUL_SUM: plain SUM, then a division by 1
                module.set_force_sum_reduction_for_comms(True)
    return wrapper


# Compiled frames may compile once per micro-batch shape: up to seq_len / data.pad_to_multiple of
# them (16 at 4096 / 256). transformers compiles flex attention with static shapes, and past
# dynamo's default limit of 8 a frame runs eagerly for good: unfused flex attention, a tenth of
# the speed (seen at 24 layers with lengths 256..4096 padded to 128).
RECOMPILE_LIMIT = 64


def allow_shape_recompiles() -> None:
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)


def sync_after_micro_batch(model: nn.Module, last: bool, frozen: str) -> None:
    """Within one optimizer step FSDP2 reduces gradients once, after the last micro batch.

    Earlier micro batches accumulate unsharded gradients (in the fp32 reduce dtype) and, with
    frozen weights replicated, keep the trained weights gathered, so a step all-gathers and
    reduce-scatters the trained weights once instead of once per micro batch.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last, recurse=True)
        if frozen == "replicate":
            model.set_reshard_after_backward(last, recurse=True)


def apply_activation_checkpointing(student: nn.Module) -> None:
    """Recompute each decoder block in backward (HF's own per-layer checkpointing keeps parameter names)."""
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise ValueError(f"activation_checkpointing: {type(student).__name__} does not support gradient "
                         "checkpointing")
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def autocast_context(env: DistEnv, compute_dtype: str):
    """bf16 autocast for a single GPU process (no FSDP to cast parameters); a no-op elsewhere."""
    import contextlib

    if env.device.type == "cuda" and not dist.is_initialized() and compute_dtype != "fp32":
        return torch.autocast("cuda", dtype=TORCH_DTYPES[compute_dtype])
    return contextlib.nullcontext()
