"""The benchmark scripts still run and print their side-by-side ratios (smoke runs at the tiny size: no timing is
asserted here), and each `make bench-*` target passes its whole default argument list."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(
    ("target", "arguments"),
    [
        ("bench-generate", "--size small --ks 1,4,16 --batch-size 32 --episodes 0,1,2,3"),
        (
            "bench-generate",
            "--size pi0-small,pi05-small --ks 4,16 --batch-size 16 --episodes 0,1 --skip-single",
        ),
        ("bench-train", "--size small --batch-size 16 --steps 5 --repeats 5"),
        ("bench-memory", "--size large --batch-size 8 --steps 3"),
        ("bench-store", "--size small --samples-per-frame 8 --batch-size 32"),
        ("bench-exact", "--size small --k 4 --episodes 0,1 --batch-size 16"),
        ("bench-x0", "--pairs 4000 --repeats 3"),
    ],
)
def test_make_targets_pass_their_default_arguments_whole(target, arguments):
    """A comma inside make's $(or ...) once cut bench-generate's `--episodes 0,1,2,3` to `--episodes 0`."""
    stamp = ROOT / ".venv" / ".installed"
    recipe = subprocess.run(
        ["make", "-n", "-o", str(stamp.relative_to(ROOT)), target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script = target.replace("bench-", "bench_")
    lines = [line for line in recipe.splitlines() if f"benchmarks/{script}.py" in line]
    assert any(line.endswith(f"benchmarks/{script}.py {arguments}") for line in lines), lines


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "arguments", "printed"),
    [
        (
            "bench_generate.py",
            "--size tiny,pi0-tiny --ks 2 --episodes 0 --batch-size 8 --repeats 1 --num-steps 2",
            [
                r"ratio reflowpairs / plain_batched: \d+\.\d+x",
                r"ratio reflowpairs / plain_single: \d+\.\d+x",
                r"teacher: pi0 pi0-tiny",
                r"prefix-sharing bound K\(P\+N\*S\)/\(P\+N\*K\*S\): \d+\.\d+x \(P \d",
            ],
        ),
        (
            "bench_train.py",
            "--size tiny --batch-size 4 --steps 1 --repeats 1",
            [
                r"ratio reflowpairs / ordinary: \d+\.\d+x",
                r"ratio cached / ordinary: +\d+\.\d+x",
                r"feature cache: [\d,]+ bytes/frame",
                r"ratio online / reflowpairs: +\d+\.\d+x",
                r"camera frames from MP4 video",  # the ordinary side decodes video, as on real datasets
            ],
        ),
        (
            "bench_memory.py",
            "--size tiny --batch-size 2 --steps 1",
            [
                r"live_tensors_mb: reflowpairs / ordinary \d+\.\d+x",
                r"peak_rss_mb: reflowpairs / ordinary \d+\.\d+x",
                r"peak_tensors_mb: .*cached / ordinary \d+\.\d+x \(goal <= 0\.8\)",
                r"the cached side still holds the frozen vision model \+ connector it never runs: \d+\.\d MB",
            ],
        ),
        (
            "bench_store.py",
            "--size tiny --samples-per-frame 2 --batch-size 8 --repeats 1",
            [
                r"zarr: \d+ bytes/pair",
                r"parquet: \d+ bytes/pair",
                r"training consumes \d+ pairs/s",
                r"feature cache of this store: [\d,]+ bytes/frame \(float32",
                # 2 cameras x 64 tokens x 960 values x 4 bytes; x 20,000 frames
                r"2 cameras x 64 tokens x 960, float32: 491,520 bytes/frame; 20,000 frames: 9\.8 GB",
            ],
        ),
        (
            "bench_exact.py",
            "--size tiny --k 2 --episodes 0 --batch-size 8 --repeats 1 --num-steps 2",
            [r"ratio prefix-cached / exact: \d+\.\d+x", r"\|X_1 prefix-cached - X_1 exact\|: max \d"],
        ),
        (
            "bench_x0.py",
            "--pairs 200 --repeats 1 --episodes 1 --samples-per-frame 2",
            [
                r"zarr +bytes/pair on disk: explicit +\d+\.\d, implicit +\d+\.\d, ratio \d\.\d+",
                r"one at a time: +[\d,]+ pairs/s",
            ],
        ),
    ],
    ids=["generate", "train", "memory", "store", "exact", "x0"],
)
def test_benchmark_runs_and_prints_its_ratios(script, arguments, printed):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *arguments.split()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for pattern in printed:
        assert re.search(pattern, result.stdout), (pattern, result.stdout[-3000:])
