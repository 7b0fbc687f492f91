"""One process or many: torchrun's environment in, a process group (or none) and this rank's device out.

    torchrun --standalone --nproc_per_node=4 -m bcnn.train ...     # 4 ranks on one machine
    python -m bcnn.train ...                                         # 1 process, no process group at all

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for each process it starts. A rank uses GPU LOCAL_RANK with
NCCL, or the CPU with gloo (which is how the distributed tests run on a machine without GPUs). Whatever
torchrun starts runs distributed, one process included (`torchrun --nproc_per_node=1` is the multi-GPU code
path, NCCL and DDP, on a machine with one GPU). The helpers below are no-ops without a process group, so the
training and evaluation code reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bcnn.errors import UserError


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, TensorBoard events and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Started by torchrun: a process group, DDP, sharded evaluation (with one process too)."""
        return dist.is_initialized()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def setup(device_name: str) -> Context:
    """Start the process group when torchrun launched us (or WORLD_SIZE says there are several processes); pick
    this rank's device."""
    world_size = _env_int("WORLD_SIZE") or 1
    rank, local_rank = _env_int("RANK") or 0, _env_int("LOCAL_RANK") or 0
    want_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError(f"device {device_name!r} was asked for but CUDA is not available; use --device cpu or auto.")
    if world_size > 1 or launched_by_torchrun():
        if want_cuda:
            if local_rank >= torch.cuda.device_count():
                raise UserError(
                    f"rank {rank} wants GPU {local_rank} but this machine has {torch.cuda.device_count()}; "
                    "lower --nproc_per_node to the number of GPUs."
                )
            device = torch.device("cuda", local_rank)  # one GPU per rank, whatever cuda:N the config says
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            _init_process_group("nccl" if want_cuda else "gloo")
        return Context(rank, local_rank, world_size, device)
    try:
        device = torch.device("cuda" if device_name == "auto" and want_cuda else
                              "cpu" if device_name == "auto" else device_name)
    except RuntimeError:
        raise UserError(f"device {device_name!r} is not a device; use cpu, cuda, cuda:N or auto.") from None
    return Context(0, 0, 1, device)


def _init_process_group(backend: str) -> None:
    """init_process_group("env://"), with the keys of each torchrun attempt apart: after --max-restarts brings
    a crashed job back, torchrun's store still holds the dead attempt's addresses, and a rank that read them
    would fail to connect (pytorch/pytorch#167288)."""
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"bcnn/attempt{attempt}/", store), rank=rank,
                            world_size=world_size)


def backend() -> str:
    """The process group's backend (nccl, gloo), or "none" for a single process without torchrun."""
    return dist.get_backend() if dist.is_initialized() else "none"


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch_size(global_batch: int, world_size: int, accum_steps: int) -> int:
    """The config's batch size is the global one (what the optimizer steps on); split it over ranks and
    accumulation steps, exactly, or say how to fix it."""
    parts = world_size * accum_steps
    if global_batch % parts:
        raise UserError(
            f"train.batch_size {global_batch} must be divisible by the number of processes ({world_size}) "
            f"times train.accum_steps ({accum_steps}); use a batch size that is a multiple of {parts}."
        )
    return global_batch // parts


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce over ranks in place (sum, min or max); the tensor itself with one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                    "max": dist.ReduceOp.MAX}[op])
    return tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel: its state dict has no `module.` prefix."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
