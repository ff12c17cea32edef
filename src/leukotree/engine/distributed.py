"""Multi-process training through ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node N -m leukotree train ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; the process group uses NCCL on GPUs and gloo
on CPUs. Without those variables everything runs in one process. :func:`resolve_device`
turns the ``device`` option into this rank's device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from leukotree.errors import LeukotreeError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collective tensors live

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; an
    unknown or absent device is an error that says what this machine has."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise LeukotreeError(f"The 'device' parameter must be auto, cpu, cuda or cuda:N; got "
                             f"{spec!r}.") from None
    if device.type == "cuda" and device.index is None:  # under torchrun: this rank's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if (device.index is not None and device.index >= n) or n == 0:
            raise LeukotreeError(f"--device {spec}: this machine has {n} CUDA device(s); use "
                                 "--device cpu or auto.")
    elif device.type != "cpu":
        raise LeukotreeError(f"The 'device' parameter must be auto, cpu, cuda or cuda:N; got "
                             f"{spec!r}.")
    return device


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group announced by torchrun's environment variables, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives run on this rank's own GPU
    info = DistInfo(int(os.environ["RANK"]), world, local, device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def running_under_torchrun() -> bool:
    """True when torchrun started several processes (``WORLD_SIZE`` above 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_flag(info: DistInfo, flag: bool) -> bool:
    """Rank 0's decision, shared with every rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=info.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
