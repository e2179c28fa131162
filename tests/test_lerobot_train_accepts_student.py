"""`lerobot-train --policy.path=<student>` fine-tunes a reflowpairs student unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reflowpairs.cli import app

from .helpers import runner


@pytest.mark.slow
def test_lerobot_train_fine_tunes_the_student(tiny_world, tiny_store, tmp_path):
    run = tmp_path / "student"
    result = runner.invoke(
        app,
        [
            "train",
            "--pairs",
            str(tiny_store),
            "--out",
            str(run),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    student = run / "checkpoints" / "last" / "pretrained_model"
    lerobot_train = Path(sys.executable).with_name("lerobot-train")
    out = tmp_path / "lerobot_run"
    proc = subprocess.run(
        [
            str(lerobot_train),
            f"--policy.path={student}",
            f"--dataset.repo_id={tiny_world.repo_id}",
            f"--dataset.root={tiny_world.dataset_root}",
            "--steps=2",
            "--batch_size=4",
            f"--output_dir={out}",
            "--policy.push_to_hub=false",
            "--wandb.enable=false",
            "--save_freq=2",
            "--num_workers=0",
            "--policy.device=cpu",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "End of training" in proc.stdout + proc.stderr
    assert (out / "checkpoints" / "000002" / "pretrained_model" / "model.safetensors").is_file()
