"""The process group, when launched by ``torchrun`` or ``accelerate launch`` (both set RANK/WORLD_SIZE).

A single process needs none of this: ``DistContext.from_env()`` then has ``world == 1`` and its
collectives are no-ops, so the same code runs either way.

``generate`` uses this context (its processes share nothing but a few object collectives). ``train`` does not: it
runs its processes through accelerate's ``Accelerator``, as lerobot-train does (``reflowpairs.train.processes``).
``reflowpairs.launcher.process_rank``/``is_main_process`` say, before any group is joined, which process of a
launch this is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # from_env created the process group (so close() ends it)

    @staticmethod
    def from_env() -> DistContext:
        """Join the process group the launcher set up (gloo on CPU, nccl on CUDA), or a world of one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistContext()
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return DistContext(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """This process's device: ``cuda`` and ``auto`` (with CUDA) become ``cuda:<local rank>``."""
        if self.world > 1 and device in ("cuda", "auto") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """``value`` from rank 0, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        """After every rank's last collective: wait for all ranks, then end the process group this context created, so
        no rank exits with its peers' gloo/nccl connections still open (a rank can otherwise abort at exit)."""
        if self.world > 1 and self.owns_group:
            dist.barrier()
            dist.destroy_process_group()
