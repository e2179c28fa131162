"""What the launcher (``torchrun``, ``accelerate launch``, SLURM's ``srun`` through either) says about this process,
read from its environment without starting anything (no torch import: ``reflowpairs.distributed`` joins the group).

Only the main process (rank 0) prints tables, writes options files and logs to W&B; the others work silently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

RANK_ENV = "RANK"  # set by torchrun and accelerate launch for every process (0 for the main one)


def process_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank in a launched group: ``RANK`` (0 when unset or empty: a single process)."""
    environ = os.environ if environ is None else environ
    text = environ.get(RANK_ENV, "").strip()
    return int(text) if text else 0


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is the one that reports (rank 0, or no launcher at all)."""
    return process_rank(environ) == 0
