"""CPU threads for a run: a default that does not oversubscribe the cores when the user set none.

torch gives the main process one intra-op thread per core and each DataLoader worker one thread (torch sets that in
its workers). With ``W`` busy workers beside a main process using every core, the ``C`` cores run ``C + W`` busy
threads: on a shared 2-core machine ``train`` took 67-150 s for 100 steps instead of 15 s. When neither
``OMP_NUM_THREADS`` nor ``MKL_NUM_THREADS`` is set, the main process gets the cores the workers leave (at least one),
divided among the processes of a multi-process launch on this node.

That plan is the command line's (``threads="auto"``). ``generate()`` and ``train()`` called from Python take a
``threads`` setting (``apply_threads``): ``None`` (their default) leaves the caller's torch thread count as it is, a
number sets it, ``"auto"`` applies the plan above.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from reflowpairs.errors import ReflowPairsError

AUTO = "auto"
"""``threads="auto"``: the command line's plan (``configure_threads``)."""

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadPlan:
    """Intra-op threads of the main process (``main``), of each DataLoader worker (1, torch's own setting), on how many
    ``cores``; ``source`` says whether reflowpairs chose ``main`` or the user's environment did."""

    main: int
    workers: int
    cores: int
    source: str  # "default" | the environment variable that set it | "threads" (the setting) | "caller"

    def describe(self) -> str:
        workers = (
            f", {self.workers} DataLoader worker{'s' if self.workers != 1 else ''} x 1 thread"
            if self.workers
            else ""
        )
        chosen = {
            "default": "",
            "caller": " (the caller's torch setting)",
            "threads": " (from `threads`)",
        }.get(self.source, f" (from {self.source})")
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


def check_threads(threads: int | str | None) -> None:
    """``ReflowPairsError`` unless ``threads`` is None, ``"auto"`` or a whole number of at least 1."""
    if threads is None or threads == AUTO:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ReflowPairsError(
            f"`threads` must be a number of at least 1, 'auto' or None, got {threads!r}.",
            "Set `threads` to the torch threads the run should use, 'auto' for the command line's plan, or leave "
            "it None to keep the torch thread count you set.",
        )


def apply_threads(threads: int | str | None, num_workers: int) -> ThreadPlan:
    """The main process's torch threads for a library run: ``None`` leaves ``torch.get_num_threads()`` as the caller
    set it, a number ``n`` calls ``torch.set_num_threads(n)``, ``"auto"`` is ``configure_threads`` (the command
    line's plan). Returns what the run uses."""
    check_threads(threads)
    if threads == AUTO:
        return configure_threads(num_workers)
    if threads is None:
        return ThreadPlan(torch.get_num_threads(), num_workers, available_cores(), "caller")
    torch.set_num_threads(int(threads))
    return ThreadPlan(int(threads), num_workers, available_cores(), "threads")
