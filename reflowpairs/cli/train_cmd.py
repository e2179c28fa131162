"""``reflowpairs train``: stage 2, a student trained on stored pairs into an ordinary lerobot checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from reflowpairs.cli.app import _progress, app, console, out_console, user_errors


SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def trainable_text(plan: dict[str, Any]) -> str:
    """``"1,200 of 5,000 parameters (24.0%): 1,000 bf16 (fp32 master copies), 200 fp32"``."""
    share = plan["trainable_params"] / max(plan["total_params"], 1)
    parts = []
    for dtype, count in sorted(plan["trainable_dtypes"].items(), key=lambda item: -item[1]):
        low = dtype in ("bfloat16", "float16")
        parts.append(f"{count:,} {SHORT_DTYPES.get(dtype, dtype)}" + (" (fp32 master copies)" if low else ""))
    return f"{plan['trainable_params']:,} of {plan['total_params']:,} parameters ({share:.1%}): " + ", ".join(parts)


def num_steps_text(saved: int | None, teacher: int | None) -> str:
    """The student's saved num_steps next to the teacher's."""
    if saved == teacher:
        return f"{saved} (the teacher's)"
    return f"{saved} (teacher: {teacher})"


def _plan_table(plan: dict[str, Any]) -> Table:
    table = Table(title="reflowpairs train", show_header=False)
    start = f"resuming {plan['resumed_from']} at step {plan['start_step']}" if plan["resumed_from"] else "new run"
    table.add_row("student init", escape(str(plan["init"])))
    table.add_row("run", f"{start}; {plan['steps']:,} steps, batch {plan['batch_size']}, seed {plan['seed']}")
    table.add_row("pairs", f"{plan['num_pairs']:,} (window of {plan['shuffle_window']} shards)")
    table.add_row("device", f"{plan['device']} ({plan['precision']})")
    table.add_row("trainable", trainable_text(plan))
    table.add_row("optimizer", f"{plan['optimizer']} lr {plan['lr']:g}, weight decay {plan['weight_decay']:g}, grad clip {plan['grad_clip']:g}")
    if plan["scheduler"] is not None:
        preset = ""
        if plan["preset_decay_steps"] is not None and (plan["warmup_steps"], plan["decay_steps"]) != (plan["preset_warmup_steps"], plan["preset_decay_steps"]):
            preset = f" (preset: warmup {plan['preset_warmup_steps']:,}, decay {plan['preset_decay_steps']:,})"
        table.add_row(
            "schedule",
            f"{plan['scheduler']}: warmup {plan['warmup_steps']:,} steps, decay over {plan['decay_steps']:,} "
            f"steps to {plan['decay_lr']:g}{preset}",
        )
    if plan["schedule_change"] is not None:
        table.add_row("[yellow]schedule change[/]", escape(plan["schedule_change"]["text"]) + " (--allow-schedule-change)")
    table.add_row("time sampling", str(plan["time_sampling"]))
    table.add_row("saved num_steps", num_steps_text(plan["saved_num_steps"], plan["teacher_num_steps"]))
    for warning in plan["warnings"]:
        table.add_row("[yellow]warning[/]", escape(warning))
    return table


@app.command()
def train(
    pairs: Annotated[Path, typer.Option(help="Pair store written by `reflowpairs generate`.")],
    out: Annotated[Path, typer.Option(help="Run directory: checkpoints/<step>/pretrained_model, checkpoints/last, train_log.jsonl.")],
    steps: Annotated[int, typer.Option(help="Optimiser steps in all (a resumed run continues up to this).")] = 10_000,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per step (default: 32; on --resume: the run's).")] = None,
    init: Annotated[str | None, typer.Option(help="Student init checkpoint (default: the teacher the store's manifest names).")] = None,
    dataset_root: Annotated[Path | None, typer.Option(help="Where the dataset is (default: the root the manifest records).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: the policy preset's optimizer_lr).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Warmup steps, taken as is (default: the preset's, rescaled as lerobot does for short runs).")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Gradient clipping norm (default: the preset's grad_clip_norm).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of data order, times and init RNG (default: 0).")] = None,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers loading pairs and observations.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda[:N] or mps.")] = "auto",
    save_every: Annotated[int, typer.Option(help="Save a checkpoint every N steps (and always at the end).")] = 1000,
    log_every: Annotated[int, typer.Option(help="Write a train_log.jsonl line every N steps.")] = 1,
    time_sampling: Annotated[str | None, typer.Option(help="beta (lerobot's), uniform, u-shaped or logit-normal (default: beta).")] = None,
    student_num_steps: Annotated[str | None, typer.Option(help="The saved student's num_steps (its default step count in lerobot-eval): K, or 'teacher' to keep the teacher's (default: 1; on --resume: the run's).")] = None,
    precision: Annotated[str, typer.Option(help="auto (bfloat16 autocast on CUDA, float32 elsewhere), float32 or bfloat16.")] = "auto",
    shuffle_window: Annotated[int | None, typer.Option(help="Shards shuffled together (and cached per worker) (default: 4).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from checkpoints/last.")] = False,
    allow_mismatch: Annotated[bool, typer.Option(help="Train even if the init checkpoint or dataset differ from the store's fingerprints.")] = False,
    allow_schedule_change: Annotated[bool, typer.Option(help="On --resume, accept a --steps that changes the lr schedule mid-run.")] = False,
) -> None:
    """Train a 1-2 step student on stored pairs (no teacher in memory); saves ordinary lerobot checkpoints."""
    from reflowpairs.train import TrainConfig, TrainingInterrupted, next_commands, parse_student_num_steps
    from reflowpairs.train import train as run_train

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun/accelerate only rank 0 reports
    with user_errors(), _progress(main=main_process) as bar:
        cfg = TrainConfig(
            pairs=pairs, out=out, steps=steps, batch_size=batch_size, init=init, dataset_root=dataset_root, lr=lr,
            warmup_steps=warmup_steps, grad_clip=grad_clip, seed=seed, num_workers=num_workers, device=device,
            save_every=save_every, log_every=log_every, time_sampling=time_sampling,
            student_num_steps=parse_student_num_steps(student_num_steps), precision=precision,
            shuffle_window=shuffle_window, resume=resume, allow_mismatch=allow_mismatch,
            allow_schedule_change=allow_schedule_change,
        )
        task = bar.add_task("loading", total=None, rate="")
        first: dict[str, int] = {}

        def on_plan(plan: dict[str, Any]) -> None:
            if main_process:
                bar.console.print(_plan_table(plan))
            first["step"] = plan["start_step"]
            bar.reset(task, total=steps, completed=plan["start_step"], rate="", description="steps")

        def on_verify(done: int, total: int) -> None:
            bar.update(task, description="verifying shards", total=total, completed=done)

        def on_step(step: int, total: int, loss: float) -> None:
            elapsed = bar.tasks[task].elapsed or 1e-9
            rate = (step - first.get("step", 0)) / elapsed
            bar.update(task, completed=step, rate=f"loss {loss:.4f}  {rate:.2f} steps/s")

        try:
            result = run_train(cfg, progress=on_step, on_plan=on_plan, on_verify=on_verify)
        except TrainingInterrupted as stop:
            bar.stop()
            if stop.checkpoint is None:
                where = "; no checkpoint had been written yet"
            else:
                where = f"; the last checkpoint is {stop.checkpoint} (step {stop.saved_step})"
            console.print(
                f"[yellow]Interrupted[/] at step {stop.step}{escape(where)}. "
                "Rerun the same command with --resume to continue.",
                soft_wrap=True,
            )
            raise typer.Exit(130) from None
    if not main_process:
        return
    table = Table(title=f"student {result.out}", show_header=False)
    table.add_row("steps", f"{result.start_step:,} -> {result.step:,} ({result.steps_per_second:.2f} steps/s)")
    table.add_row("final loss", f"{result.final_loss:.5f}")
    table.add_row("checkpoint", str(result.checkpoint / "pretrained_model"))
    table.add_row("saved num_steps", num_steps_text(result.saved_num_steps, result.teacher_num_steps)
                  + ": lerobot-eval and predict_action_chunk sample with this many steps")
    table.add_row("log", str(result.out / "train_log.jsonl"))
    out_console.print(table)
    commands = next_commands(result)
    out_console.print(f"use it: {escape(commands['lerobot_eval'])}", soft_wrap=True)
    out_console.print(f"next: {escape(commands['reflowpairs_eval'])}", soft_wrap=True)
