"""The README's "A first day, by hand" block runs exactly as written, from a fresh folder, and ends with a student
saved to sample in 1 step and an eval report on the held-out episodes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## A first day, by hand", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
    script = walkthrough()
    assert "reflowpairs train" in script and "reflowpairs eval" in script
    # the block's first line puts the project's venv on PATH from the repo root; here the venv is this interpreter's
    script = script.replace(
        'export PATH="$PWD/.venv/bin:$PATH"', f'export PATH="{Path(sys.executable).parent}:$PATH"'
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "student samples in 1 step" in done.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["frames"]["episodes"] == [8, 9]
    config = json.loads(
        (tmp_path / "student" / "checkpoints" / "last" / "pretrained_model" / "config.json").read_text()
    )
    teacher = json.loads((tmp_path / "world" / "teacher" / "config.json").read_text())
    assert config["num_steps"] == 1 and teacher["num_steps"] == 10
    assert {k for k in config if config[k] != teacher.get(k)} == {"num_steps", "pretrained_path"}
