"""Writing a run's checkpoints (``CheckpointSaver``): ordinary lerobot checkpoints plus the training state that
``resume`` continues from (``reflowpairs.checkpoint``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from reflowpairs.checkpoint import save_checkpoint
from reflowpairs.train.config import INHERITED
from reflowpairs.train.logfile import write_failed
from reflowpairs.train.optim import Optimisation
from reflowpairs.train.planning import PlannedRun, RunStart

TEST_SAVED_FD = "REFLOWPAIRS_TEST_SAVED_FD"
"""Test hook: an inherited file descriptor (a pipe's write end) to which the main process writes ``"<step>\\n"``
after each checkpoint it saves, so a test can interrupt a run once a checkpoint exists without polling for it
(``tests/test_train.py``'s Ctrl-C and SIGKILL tests). Unset in normal use."""


class CheckpointSaver:
    """Writes checkpoints (``save``) and remembers the last complete one."""

    def __init__(self, run: PlannedRun, opt: Optimisation, start: RunStart):
        self.run, self.opt, self.start = run, opt, start
        self.checkpoint, self.saved_at = run.resume_from, start.step
        inputs = run.inputs
        manifest = inputs.store.manifest
        self.store_info = {
            "path": str(Path(run.cfg.pairs).resolve()),
            "store_id": manifest.get("store_id"),
            "teacher_fingerprint": manifest.get("teacher", {}).get("fingerprint"),
            "dataset_fingerprint": manifest.get("dataset", {}).get("fingerprint"),
            "num_pairs": len(inputs.store),
        }
        hook = os.environ.get(TEST_SAVED_FD)
        self._hook_fd = int(hook) if hook else None

    def state_for(self, step: int) -> dict[str, Any]:
        """The training state of checkpoint ``step`` (what ``--resume`` continues from)."""
        run = self.run
        done = (step - self.start.step) * run.batch_size * run.world
        return {
            "samples_seen": self.start.samples_seen + done,
            "world": run.world,  # processes: a resume must use as many (``resume.check_world``)
            "settings": {name: run.settings[name] for name in INHERITED},
            "effective": self.opt.plan.describe(),
            "store": self.store_info,
            "init": {"source": run.inputs.init_source, "fingerprint": run.inputs.init_fingerprint},
            "init_config": run.inputs.init_config,
            "steps": run.cfg.steps,
            "warnings": run.inputs.warnings,
        }

    def save(self, step: int) -> None:
        """Checkpoint ``step`` (the main process only); ``checkpoints/last`` moves to it once it is complete."""
        run = self.run
        try:
            self.checkpoint = save_checkpoint(
                run.out,
                step,
                run.cfg.steps,
                run.policy,  # the unwrapped student (the loop runs its DDP wrapper in several processes)
                run.preprocessor,
                run.inputs.loaded.postprocessor,
                run.config_json,
                self.opt.optimizer,
                self.opt.scheduler,
                self.state_for(step),
                batch_size=run.batch_size,
                master_params=self.opt.masters.state_dict(),
                extra_files=run.inputs.loaded.extra_files,
            )
        except OSError as err:
            raise write_failed(run.out, f"checkpoint {step}", err, self.checkpoint) from err
        self.saved_at = step
        if self._hook_fd is not None:
            os.write(self._hook_fd, f"{step}\n".encode())
