"""One prepared GPU run (`make gpu-check`): the CUDA tests, the benchmarks on CUDA, and the tiny world end to end.

GPU time is scarce and short, so everything a CUDA machine should tell us runs from this one command, within about 8
minutes on one GPU:

- the CUDA tests (``pytest -k "(cuda or gpu) and not gpu_check"``: the tests that skip without CUDA, by name or
  by the ``gpu`` marker);
- the tiny world through the command line on CUDA: ``tiny-world``, ``generate``, ``train`` and ``eval``;
- ``bench_generate.py``, ``bench_train.py`` and ``bench_exact.py`` with ``--device cuda`` at the ``small`` and
  ``smolvla-shaped`` sizes, in float32 and bfloat16 (``bench_generate --dtype`` and ``bench_train --dtype``: the
  autocast dtype; ``bench_exact --dtypes float32,bfloat16``: both teacher parameter dtypes in one run), each cut
  short (few episodes, steps and repeats), the small size first.

Each step runs in its own process with its own timeout (and never past the overall budget), so a failing or hanging
step costs at most its own time; the run goes on after a failure. Every step's command, output, return code and
seconds go to ``OUT/<nn>-<step>.log``, and ``OUT/summary.md`` collects the status of each step and the figures each
benchmark printed, ready to paste into ``benchmarks/RESULTS.md``. Exit status: 0 when every step passed (or when
there is no GPU: it says so and stops at once), 1 otherwise.

    python benchmarks/gpu_check.py                 # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py --dry-run       # print the plan (the commands), run nothing
    python benchmarks/gpu_check.py --check-flags   # every planned command's flags accepted (runs each with --help)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 450  # all steps together: 7.5 minutes, so the whole run ends within 8
RESERVE_S = 10  # kept back for writing the summary
MIN_STEP_S = 15  # a step with less time than this left is not started (recorded as "not run")


@dataclass(frozen=True)
class Step:
    """One command of the plan: ``name`` (its log file's stem), ``cmd`` (argv, run in the repository root),
    ``timeout`` (seconds), and ``figures``: a regular expression picking the lines of its output that the summary
    quotes (None: the last lines)."""

    name: str
    cmd: list[str]
    timeout: int
    figures: str | None = None


def plan(out: Path, python: str = sys.executable, device: str = "cuda") -> list[Step]:
    """The steps, in order. ``device`` is ``cuda`` for the real run; the flag check passes the same commands."""
    bench = ROOT / "benchmarks"
    rp = [python, "-m", "reflowpairs"]
    world = out / "tiny_world"
    steps = [
        Step(
            "cuda-tests",
            [
                python,
                "-m",
                "pytest",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "tests",
                "-k",
                "(cuda or gpu) and not gpu_check",
            ],
            90,
            r"passed|failed|skipped|error",
        )
    ]
    steps += [
        Step("tiny-world", [*rp, "tiny-world", str(world), "--train-steps", "60"], 60),
        Step(
            "cli-generate",
            [*rp, "generate", "--teacher", str(world / "teacher"), "--dataset", "reflowpairs/tiny_reach"]
            + ["--dataset-root", str(world / "dataset"), "--episodes", "0-3", "--samples-per-frame", "4"]
            + ["--out", str(out / "tiny_pairs"), "--device", device],
            45,
            r"pairs|threads|error",
        ),
        Step(
            "cli-train",
            [*rp, "train", "--pairs", str(out / "tiny_pairs"), "--out", str(out / "tiny_student")]
            + [
                "--steps",
                "50",
                "--batch-size",
                "32",
                "--lr",
                "1e-3",
                "--num-workers",
                "2",
                "--device",
                device,
            ],
            45,
            r"device|steps/s|loss|error",
        ),
        Step(
            "cli-eval",
            [
                *rp,
                "eval",
                "--student",
                str(out / "tiny_student" / "checkpoints" / "last" / "pretrained_model"),
            ]
            + ["--teacher", str(world / "teacher"), "--dataset", "reflowpairs/tiny_reach"]
            + [
                "--dataset-root",
                str(world / "dataset"),
                "--num-steps",
                "1,2,10",
                "--out",
                str(out / "tiny_report"),
            ]
            + ["--device", device],
            45,
            None,
        ),
    ]
    bench_figures = r"ratio|ms/step|pairs/s|x \(|goal|median|speed|MB|:\s+\d"
    for size, big in (("small", False), ("smolvla-shaped", True)):
        for dtype in ("float32", "bfloat16"):
            steps.append(
                Step(
                    f"bench-generate-{size}-{dtype}",
                    [
                        python,
                        str(bench / "bench_generate.py"),
                        "--device",
                        device,
                        "--size",
                        size,
                        "--dtype",
                        dtype,
                    ]
                    + ["--ks", "4", "--episodes", "0", "--batch-size", "8" if big else "16"]
                    + ["--repeats", "1", "--skip-single"],
                    45 if big else 30,
                    bench_figures,
                )
            )
        for dtype in ("float32", "bfloat16"):
            steps.append(
                Step(
                    f"bench-train-{size}-{dtype}",
                    [
                        python,
                        str(bench / "bench_train.py"),
                        "--device",
                        device,
                        "--size",
                        size,
                        "--dtype",
                        dtype,
                    ]
                    + ["--batch-size", "8", "--steps", "2", "--repeats", "2", "--episodes", "0"]
                    + ["--sides", "ordinary,reflowpairs,cached"],
                    45 if big else 30,
                    bench_figures,
                )
            )
        steps.append(
            Step(
                f"bench-exact-{size}",
                [python, str(bench / "bench_exact.py"), "--device", device, "--size", size]
                + ["--dtypes", "float32,bfloat16", "--k", "4", "--episodes", "0", "--batch-size", "8"]
                + ["--repeats", "1"],
                45 if big else 30,
                bench_figures,
            )
        )
    return steps


def gpu_present() -> str | None:
    """The CUDA device's name, or None: no NVIDIA device node or driver tool (decided without importing torch),
    or torch sees no CUDA device."""
    if not (Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi")):
        return None
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return None
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        return None
    return torch.cuda.get_device_name(0)


def run_step(step: Step, log: Path, timeout: float) -> tuple[str, float, str]:
    """Run ``step`` with at most ``timeout`` seconds; write its log. Returns (status, seconds, output)."""
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        step.cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a timeout ends its workers too
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
        status = "pass" if rc == 0 else f"FAIL (exit {rc})"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        rc, status = None, f"TIMEOUT ({timeout:.0f} s)"
    seconds = time.monotonic() - start
    log.write_text(
        f"$ {shlex.join(step.cmd)}\n# status: {status}; {seconds:.1f} s (timeout {timeout:.0f} s); rc {rc}\n\n{output}"
    )
    return status, seconds, output


def figures(step: Step, output: str, lines: int = 25) -> list[str]:
    """The lines of ``output`` the summary quotes: those matching ``step.figures`` (at most ``lines``, the last ones),
    or the last ``lines`` lines."""
    text = [line.rstrip() for line in output.splitlines() if line.strip() and not line.startswith(" File ")]
    if step.figures is not None:
        pattern = re.compile(step.figures)
        picked = [line for line in text if pattern.search(line)]
        text = picked or text
    return text[-lines:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "gpu_check_out", help="folder for the logs and summary"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the planned commands and exit")
    parser.add_argument(
        "--check-flags",
        action="store_true",
        help="run each planned command with --help and check it accepts every flag the plan gives it (no GPU needed)",
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps together")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    steps = plan(out)
    if args.dry_run:
        for i, step in enumerate(steps, 1):
            print(f"{i:02d} {step.name} (timeout {step.timeout} s): {shlex.join(step.cmd)}")
        print(
            f"{len(steps)} steps, {sum(s.timeout for s in steps)} s of timeouts, budget {args.budget:.0f} s"
        )
        return 0
    if args.check_flags:
        return check_flags(steps)
    device = gpu_present()
    if device is None:
        print("gpu-check: no CUDA GPU on this machine; nothing to run (exit 0).")
        return 0
    import torch

    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    rows, quoted = [], []
    for i, step in enumerate(steps, 1):
        left = deadline - time.monotonic() - RESERVE_S
        log = out / f"{i:02d}-{step.name}.log"
        if left < MIN_STEP_S:
            rows.append((step.name, f"not run ({left:.0f} s left of the budget)", 0.0, log.name))
            continue
        status, seconds, output = run_step(step, log, min(step.timeout, left))
        print(f"gpu-check: {step.name}: {status} in {seconds:.1f} s", flush=True)
        rows.append((step.name, status, seconds, log.name))
        quoted.append((step, status, figures(step, output)))
    summary = [
        f"## GPU check: {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "`make gpu-check` (`python benchmarks/gpu_check.py`); each step's full output is in its log.",
        "",
        "| step | status | seconds | log |",
        "|---|---|---|---|",
        *(f"| {name} | {status} | {seconds:.1f} | {log} |" for name, status, seconds, log in rows),
        "",
    ]
    for step, status, lines in quoted:
        summary += [
            f"### {step.name} ({status})",
            "",
            f"`{shlex.join(step.cmd[1:])}`",
            "",
            "```",
            *lines,
            "```",
            "",
        ]
    (out / "summary.md").write_text("\n".join(summary))
    failed = [name for name, status, _, _ in rows if status != "pass"]
    print(
        f"gpu-check: {len(rows) - len(failed)} of {len(rows)} steps passed; summary in {out / 'summary.md'}"
    )
    return 1 if failed else 0


def check_flags(steps: list[Step]) -> int:
    """Run every planned command with ``--help`` appended (its flag values are parsed, choices checked, up to
    the help) and check the help names each ``--flag`` the plan passes. Returns 0 when all are accepted."""
    bad = []
    for step in steps:
        if step.name == "cuda-tests":
            continue  # pytest's own options
        flags = [a for a in step.cmd if a.startswith("--")]
        proc = subprocess.run(
            [*step.cmd, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        missing = [f for f in flags if f not in proc.stdout]
        if proc.returncode != 0 or missing:
            bad.append(
                f"{step.name}: exit {proc.returncode}, flags not in its help: {missing}\n{proc.stderr[-1500:]}"
            )
        print(
            f"gpu-check flags: {step.name}: {'ok' if proc.returncode == 0 and not missing else 'BAD'}",
            flush=True,
        )
    for problem in bad:
        print(problem)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
