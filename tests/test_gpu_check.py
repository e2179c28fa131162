"""`make gpu-check` (benchmarks/gpu_check.py): without a GPU it says so and exits 0 at once, writing nothing; its plan
holds every step the issue asks for, each with a timeout that fits the budget; every planned command accepts the flags
the plan gives it; a failing or hanging step is recorded and the run goes on."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_without_a_gpu_it_says_so_and_exits_0_at_once(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU" in done.stdout
    assert time.monotonic() - start < 30 and not out.exists()


@pytest.mark.slow
def test_the_make_target_runs_the_script():
    done = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "benchmarks/gpu_check.py" in done.stdout


@pytest.mark.slow
def test_the_plan_covers_the_issue(tmp_path):
    gpu_check = _module()
    steps = gpu_check.plan(tmp_path)
    names = [s.name for s in steps]
    assert len(set(names)) == len(names)
    for bench in ("generate", "train"):
        for size in ("small", "smolvla-shaped"):
            for dtype in ("float32", "bfloat16"):
                step = steps[names.index(f"bench-{bench}-{size}-{dtype}")]
                args = step.cmd
                assert args[args.index("--device") + 1] == "cuda" and args[args.index("--size") + 1] == size
                assert args[args.index("--dtype") + 1] == dtype
    for size in ("small", "smolvla-shaped"):
        args = steps[names.index(f"bench-exact-{size}")].cmd
        assert (
            args[args.index("--device") + 1] == "cuda"
            and args[args.index("--dtypes") + 1] == "float32,bfloat16"
        )
    for command in ("generate", "train", "eval"):
        args = steps[names.index(f"cli-{command}")].cmd
        assert command in args and args[args.index("--device") + 1] == "cuda"
    assert "cuda" in " ".join(steps[names.index("cuda-tests")].cmd)
    assert all(0 < s.timeout <= gpu_check.BUDGET_S for s in steps) and gpu_check.BUDGET_S < 8 * 60
    dry = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert dry.returncode == 0 and all(name in dry.stdout for name in names)


@pytest.mark.slow
def test_every_planned_command_accepts_its_flags():
    """Each benchmark's argparse and each CLI command's options take the flags and values the plan passes."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check-flags"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    planned = len(_module().plan(Path("out"))) - 1  # all but pytest's
    assert done.stdout.count(": ok") == planned and "BAD" not in done.stdout


@pytest.mark.slow
def test_a_failing_or_hanging_step_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    gpu_check = _module()
    steps = [
        gpu_check.Step("fails", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30),
        gpu_check.Step("hangs", [sys.executable, "-c", "import time; time.sleep(60)"], 2),
        gpu_check.Step(
            "passes", [sys.executable, "-c", "print('ratio cached / ordinary: 0.5x')"], 30, r"ratio"
        ),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda out, **_: steps)
    monkeypatch.setattr(gpu_check, "gpu_present", lambda: "a test device")
    pytest.importorskip("torch")
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    logs = sorted(p.name for p in tmp_path.glob("*.log"))
    assert logs == ["01-fails.log", "02-hangs.log", "03-passes.log"]
    assert (
        "exit 3" in (tmp_path / "01-fails.log").read_text()
        and "boom" in (tmp_path / "01-fails.log").read_text()
    )
    assert "TIMEOUT" in (tmp_path / "02-hangs.log").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert (
        "| fails | FAIL (exit 3)" in summary
        and "| hangs | TIMEOUT" in summary
        and "| passes | pass" in summary
    )
    assert "ratio cached / ordinary: 0.5x" in summary
