"""CPU threads for a run: a default that does not oversubscribe the cores when the user set none.

torch gives the main process one intra-op thread per core and each DataLoader worker one thread (torch sets that in
its workers). With ``W`` busy workers beside a main process using every core, the ``C`` cores run ``C + W`` busy
threads: on a shared 2-core machine ``train`` took 67-150 s for 100 steps instead of 15 s. When neither
``OMP_NUM_THREADS`` nor ``MKL_NUM_THREADS`` is set, the main process gets the cores the workers leave (at least one),
divided among the processes of a multi-process launch on this node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadPlan:
    """Intra-op threads of the main process (``main``), of each DataLoader worker (1, torch's own setting), on how many
    ``cores``; ``source`` says whether reflowpairs chose ``main`` or the user's environment did."""

    main: int
    workers: int
    cores: int
    source: str  # "default" | the environment variable that set it

    def describe(self) -> str:
        workers = (
            f", {self.workers} DataLoader worker{'s' if self.workers != 1 else ''} x 1 thread"
            if self.workers
            else ""
        )
        chosen = "" if self.source == "default" else f" (from {self.source})"
        return f"{self.main} main thread{'s' if self.main != 1 else ''}{workers} on {self.cores} core{'s' if self.cores != 1 else ''}{chosen}"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, as a container or SLURM sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_threads(
    num_workers: int, cores: int | None = None, processes_on_node: int = 1, environ: dict | None = None
) -> ThreadPlan:
    """Threads for a process that runs ``num_workers`` DataLoader workers beside ``processes_on_node - 1`` others."""
    environ = os.environ if environ is None else environ
    cores = available_cores() if cores is None else cores
    for name in THREAD_ENV_VARS:
        if environ.get(name, "").strip():
            return ThreadPlan(torch.get_num_threads(), num_workers, cores, name)
    share = max(1, cores // max(1, processes_on_node))
    return ThreadPlan(max(1, share - num_workers), num_workers, cores, "default")


def configure_threads(num_workers: int) -> ThreadPlan:
    """Apply ``plan_threads`` to this process (a torchrun/accelerate launch's ``LOCAL_WORLD_SIZE`` shares the node)."""
    plan = plan_threads(num_workers, processes_on_node=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if plan.source == "default":
        torch.set_num_threads(plan.main)
    return plan
