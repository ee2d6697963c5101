"""Process-group setup from torchrun's environment, model wrapping (DDP / FSDP2), and launching torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llmctl.errors import UserError


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_request: str, backend: str) -> DistributedContext:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun); one process without them."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank tears down while another still has collectives in flight
        dist.destroy_process_group()


def _all_reduce(value: torch.Tensor, context: DistributedContext, op: dist.ReduceOp) -> torch.Tensor:
    if context.is_distributed:
        value = value.clone()
        dist.all_reduce(value, op=op)
    return value


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    return _all_reduce(value, context, dist.ReduceOp.SUM) / context.world_size


def all_reduce_sum(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    return _all_reduce(value, context, dist.ReduceOp.SUM)


def all_reduce_max(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    return _all_reduce(value, context, dist.ReduceOp.MAX)


def any_rank(flag: bool, context: DistributedContext) -> bool:
    """True when the flag is set on any rank (used so every rank stops at the same step)."""
    tensor = torch.tensor([1.0 if flag else 0.0], device=context.device)
    return bool(all_reduce_sum(tensor, context).item() > 0)


def wrap_model(model: nn.Module, strategy: str, precision: str, context: DistributedContext) -> nn.Module:
    """DDP: a wrapper; FSDP2: shards each block and the root in place. Returns the module to call."""
    if strategy == "ddp":
        if not context.is_distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if precision in ("bf16", "fp16"):
            compute = torch.bfloat16 if precision == "bf16" else torch.float16
            policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    return model


def launch_torchrun(
    nproc: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None, command: list[str]
) -> int:
    """Re-run this llmctl command under torchrun; returns its exit code."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--nnodes={nnodes}",
    ]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        launcher += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--node-rank={node_rank}"]
    else:
        launcher += ["--standalone"]
    return subprocess.call([*launcher, "-m", "llmctl", *command])
