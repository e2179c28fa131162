"""The processes of a run: one, or several launched by ``torchrun`` / ``accelerate launch``.

Several processes run through an ``accelerate.Accelerator`` (as ``lerobot-train``): it wraps the student in DDP, says
which process is the main one (the only one that saves and logs) and reduces the loss across processes. A run of one
process needs none of that and gets ``OneProcess``, which answers the same few questions; it creates no accelerate
state, so nothing lingers in the Python process for a later run (tests, ``pipeline``) to inherit.

Several processes share one process group: a run that finds none creates it (``torch.distributed.init_process_group``,
gloo on CPU, nccl on CUDA) and ends it when it is done (``release``), so no process exits with its peers'
connections open; accelerate's process state, created with the first ``Accelerator`` of the Python process, describes
the same processes for every later run and is kept.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed

from reflowpairs.teacher import resolve_device


class OneProcess:
    """The part of ``accelerate.Accelerator``'s interface a run uses, for a run of one process."""

    num_processes = 1
    process_index = 0
    is_main_process = True

    def wait_for_everyone(self) -> None:
        """Nothing to wait for."""

    def prepare_model(self, model: torch.nn.Module, device_placement: bool | None = None) -> torch.nn.Module:
        """The model itself (no DDP wrapper in one process)."""
        return model


def several_processes() -> bool:
    """True when a launcher started several processes (``WORLD_SIZE`` > 1) or a process group of several exists."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_processes(device_setting: str) -> tuple[Any, str, bool]:
    """``(accelerator, device, owns_group)``: ``OneProcess`` in a run of one process; otherwise an
    ``accelerate.Accelerator`` on the process group (created here when there is none: ``owns_group``), and this
    process's device (``cuda`` becomes ``cuda:<local rank>``). ``mixed_precision="no"``: ``train_step`` keeps its own
    precision handling (float32 master copies of bfloat16 parameters, which accelerate's ``bf16`` does not make, and
    autocast only where ``precision`` says); the scheduler steps once per optimiser step whatever the process count,
    as in lerobot-train."""
    device = resolve_device(device_setting)
    if not several_processes():
        return OneProcess(), device, False
    from accelerate import Accelerator, DistributedDataParallelKwargs  # heavy: only runs of several processes

    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision="no",
        step_scheduler_with_optimizer=False,
        # as lerobot-train: pi0/pi05's loss leaves parts of the VLM unused (its last layer's output, lm_head)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if device.startswith("cuda"):
        device = str(accelerator.device)
    return accelerator, device, owns_group


def release(accelerator: Any, owns_group: bool) -> None:
    """After every process's last collective: wait for all, and end the process group this run created."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    if owns_group:
        torch.distributed.destroy_process_group()
