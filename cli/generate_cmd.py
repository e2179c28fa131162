"""``reflowpairs generate`` (stage 1: teacher pairs into a store) and ``reflowpairs tiny-world`` (a world to try it on)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from reflowpairs.cli.options import (
    config_defaults,
    config_option,
    lerobot_names_text,
    resolved_options,
    tokenizer_option,
)
from reflowpairs.cli.ui import (
    INPUTS,
    MULTI,
    OUTPUT,
    PERFORMANCE,
    RUN,
    SAMPLING,
    check_at_least_one,
    console,
    out_console,
    parse_episodes,
    parse_partition,
    plural,
    print_next,
    progress,
    save_options,
    train_command,
    user_errors,
)
from reflowpairs.dataset import episodes_text
from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate import GenerateConfig
from reflowpairs.pairstore import GENERATE_OPTIONS

_DEFAULTS = config_defaults(GenerateConfig)  # the options' defaults are the library config's
GENERATE_EPILOG = lerobot_names_text("generate") + f" Each run writes its options to OUT/{GENERATE_OPTIONS}."


def generate(
    ctx: typer.Context,
    *,
    teacher: Annotated[
        str,
        typer.Option(
            metavar="CKPT",
            rich_help_panel=INPUTS,
            help="Teacher checkpoint: a pretrained_model/ directory or a hub repo id.",
        ),
    ],
    dataset: Annotated[
        str, typer.Option(metavar="REPO_ID", rich_help_panel=INPUTS, help="LeRobotDataset repo id.")
    ],
    dataset_root: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR", rich_help_panel=INPUTS, help="Local root of the dataset (lerobot's root=)."
        ),
    ] = _DEFAULTS.dataset_root,
    episodes: Annotated[
        str | None,
        typer.Option(
            metavar="LIST",
            rich_help_panel=INPUTS,
            help="Episodes to use, e.g. 0,2,5, 0-9 or [0,1] (default: all).",
        ),
    ] = _DEFAULTS.episodes,
    samples_per_frame: Annotated[
        int, typer.Option(metavar="K", rich_help_panel=SAMPLING, help="K: noise samples (pairs) per frame.")
    ] = _DEFAULTS.samples_per_frame,
    num_steps: Annotated[
        int | None,
        typer.Option(
            metavar="N", rich_help_panel=SAMPLING, help="ODE steps (default: the teacher config's num_steps)."
        ),
    ] = _DEFAULTS.num_steps,
    solver: Annotated[
        str,
        typer.Option(
            metavar="NAME",
            rich_help_panel=SAMPLING,
            help="euler (the teacher's own), midpoint, rk4 or dopri5.",
        ),
    ] = _DEFAULTS.solver,
    rtol: Annotated[
        float, typer.Option(metavar="X", rich_help_panel=SAMPLING, help="dopri5 relative tolerance.")
    ] = _DEFAULTS.rtol,
    atol: Annotated[
        float, typer.Option(metavar="X", rich_help_panel=SAMPLING, help="dopri5 absolute tolerance.")
    ] = _DEFAULTS.atol,
    seed: Annotated[
        int,
        typer.Option(metavar="N", rich_help_panel=SAMPLING, help="Seed of X_0 = f(seed, obs_index, sample)."),
    ] = _DEFAULTS.seed,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact/--no-exact",
            rich_help_panel=SAMPLING,
            help="X_1 from lerobot's own predict_action_chunk per frame, bit for bit (no prefix sharing: slower).",
        ),
    ] = _DEFAULTS.exact,
    x0: Annotated[
        str,
        typer.Option(
            "--x0",
            metavar="explicit|implicit",
            rich_help_panel=OUTPUT,
            help="How the store keeps X_0: explicit (default) stores it in every shard; implicit leaves it out (~84% of a pair's bytes at SmolVLA's shapes), records its generator, and every reader regenerates it bit for bit from (seed, obs_index, sample). A resumed store keeps its own mode.",
        ),
    ] = _DEFAULTS.x0,
    cache_features: Annotated[
        bool,
        typer.Option(
            "--cache-features/--no-cache-features",
            rich_help_panel=OUTPUT,
            help="Also store each frame's frozen image features (OUT/features/) so `reflowpairs train` skips decoding and the vision encoder (SmolVLA; docs/feature-cache.md). With --resume on a complete store it adds them without sampling.",
        ),
    ] = _DEFAULTS.cache_features,
    feature_dtype: Annotated[
        str,
        typer.Option(
            metavar="float32|float16|bfloat16",
            rich_help_panel=OUTPUT,
            help="Storage dtype of the cached features: float32 (exact) or half the bytes in float16/bfloat16.",
        ),
    ] = _DEFAULTS.feature_dtype,
    features_from: Annotated[
        str | None,
        typer.Option(
            metavar="STORE",
            rich_help_panel=OUTPUT,
            help="Read the frozen image features from STORE's feature cache instead of decoding images and running the vision encoder (a later reflow round whose teacher shares the frozen weights; X_1 unchanged). Implies --cache-features: the new store gets the same features. A cache made with other frozen weights or image settings is refused.",
        ),
    ] = _DEFAULTS.features_from,
    on_nonfinite: Annotated[
        str,
        typer.Option(
            metavar="WHAT", rich_help_panel=SAMPLING, help="error (stop) or skip (record and skip the frame)."
        ),
    ] = _DEFAULTS.on_nonfinite,
    out: Annotated[
        Path,
        typer.Option(metavar="DIR", rich_help_panel=OUTPUT, help="Directory of the pair store to write."),
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format", metavar="NAME", rich_help_panel=OUTPUT, help="Shard backend: zarr or parquet."
        ),
    ] = _DEFAULTS.backend,
    shard_size: Annotated[
        int,
        typer.Option(metavar="N", rich_help_panel=OUTPUT, help="Pairs per shard (rounded to whole frames)."),
    ] = _DEFAULTS.shard_size,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume", rich_help_panel=OUTPUT, help="Finish an interrupted store in --out."
        ),
    ] = _DEFAULTS.resume,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite/--no-overwrite",
            rich_help_panel=OUTPUT,
            help="Replace the pair store in --out (only its manifest.json, shards/ and parts/), or write a new store into a non-empty folder that is not a store (its files are left alone).",
        ),
    ] = _DEFAULTS.overwrite,
    batch_size: Annotated[
        int,
        typer.Option(
            metavar="N", rich_help_panel=PERFORMANCE, help="Frames loaded per batch (each samples K pairs)."
        ),
    ] = _DEFAULTS.batch_size,
    tokens_per_call: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            rich_help_panel=PERFORMANCE,
            help="Most suffix tokens (frames x K x chunk_size) per teacher call; 0: the whole batch (default: 1024 on CPU, no limit on GPU).",
        ),
    ] = _DEFAULTS.tokens_per_call,
    tokenizer: Annotated[Path | None, tokenizer_option(PERFORMANCE)] = None,
    device: Annotated[
        str, typer.Option(metavar="DEVICE", rich_help_panel=PERFORMANCE, help="auto, cpu, cuda[:N] or mps.")
    ] = _DEFAULTS.device,
    dtype: Annotated[
        str,
        typer.Option(
            metavar="DTYPE",
            rich_help_panel=PERFORMANCE,
            help="Teacher compute dtype: float32, bfloat16 or float16 (autocast; for CUDA).",
        ),
    ] = _DEFAULTS.dtype,
    num_workers: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=PERFORMANCE, help="DataLoader workers loading frames.")
    ] = _DEFAULTS.num_workers,
    partition: Annotated[
        str | None,
        typer.Option(
            metavar="I/P",
            rich_help_panel=MULTI,
            help="Run one slice i/P of the frames (obs_index % P == i); combine slices with `reflowpairs merge`.",
        ),
    ] = _DEFAULTS.partition,
    log_every: Annotated[
        int | None,
        typer.Option(
            metavar="FRAMES",
            rich_help_panel=RUN,
            help="When the output is not a terminal (a SLURM log), a progress line every N frames (default: every 1,000 frames, or every tenth of the run if that is fewer).",
        ),
    ] = None,
    config: Annotated[Path | None, config_option(RUN)] = None,
) -> None:
    """Run the teacher's sampler over every frame and store (X_0, X_1, obs_index) pairs."""
    from reflowpairs.generate import generate as run_generate

    main = os.environ.get("RANK", "0") == "0"
    check_at_least_one(log_every, "--log-every")
    episode_list = parse_episodes(episodes)
    cfg = GenerateConfig(
        teacher=teacher,
        dataset=dataset,
        out=out,
        dataset_root=dataset_root,
        episodes=episode_list,
        samples_per_frame=samples_per_frame,
        num_steps=num_steps,
        solver=solver,
        rtol=rtol,
        atol=atol,
        batch_size=batch_size,
        tokens_per_call=tokens_per_call,
        shard_size=shard_size,
        seed=seed,
        device=device,
        backend=format,
        num_workers=num_workers,
        resume=resume,
        overwrite=overwrite,
        on_nonfinite=on_nonfinite,
        dtype=dtype,
        partition=parse_partition(partition),
        exact=exact,
        x0=x0,
        cache_features=cache_features,
        feature_dtype=feature_dtype,
        features_from=features_from,
        threads="auto",  # the command line plans CPU threads around the workers (reflowpairs.threads)
    )
    options = resolved_options(
        ctx,
        skip=("resume", "overwrite"),
        values={"episodes": episodes_text(episode_list)},
        local_paths=("teacher",),
    )
    with user_errors(), progress(main=main, prefix="generate", cap=1000) as bar:
        task = bar.add_task("frames", total=None, rate="", unit="frame", every=log_every)

        def on_plan(plan) -> None:
            if plan.frames_done:
                console.print(
                    f"Resuming: {plural(plan.frames_done, 'frame')} already in the store, {plan.frames_to_do:,} to go."
                )
            console.print(
                f"{plural(plan.frames_to_do, 'frame')} x K={plan.samples_per_frame} on {plan.device} ({plan.solver}; "
                + (
                    f"{plan.sampler} sampler, {plural(plan.frames_per_call, 'frame')} per call"
                    if plan.sampler != "exact"
                    else "exact sampler: lerobot's own, per frame"
                )
                + f"; the teacher computes in {plan.compute_dtype}); threads: {plan.threads}",
                soft_wrap=True,
            )
            if (
                main
            ):  # the store exists now (and this run holds its lock): its options go beside manifest.json
                save_options(out / GENERATE_OPTIONS, "generate", options)
            bar.reset(task, total=plan.frames_to_do)  # the rate counts sampling time, as the summary does

        def on_batch(frames: int, pairs: int, seconds: float) -> None:
            rate = pairs / max(seconds, 1e-9)  # the library's clock, as the summary's speed row
            bar.update(
                task,
                completed=frames,
                rate=f"{rate:,.1f} pairs/s",
                info=f"{plural(pairs, 'pair')}, {rate:,.1f} pairs/s",
            )

        result = run_generate(cfg, progress=on_batch, on_plan=on_plan)
    if not main:
        return
    table = Table(title=f"pair store {result.out}", show_header=False)
    table.add_row("pairs", f"{result.num_pairs:,} ({result.new_pairs:,} new)")
    table.add_row("frames", f"{result.num_frames:,}")
    table.add_row("speed", _speed(result.new_pairs, result.seconds))
    if result.skipped:
        table.add_row("skipped (non-finite)", ", ".join(map(str, result.skipped)))
    table.add_row("options", str(out / GENERATE_OPTIONS))
    out_console.print(table)
    if cfg.partition is not None:
        index, count = cfg.partition
        others = " ..." if count > 1 else ""
        print_next(
            f"reflowpairs merge {shlex.quote(str(out))}{others} --out MERGED_DIR",
            why=f"this is slice {index}/{count}: once all {plural(count, 'slice')} are done, merge their --out "
            "directories, then validate and train on the merged store",
        )
        return
    print_next(["reflowpairs", "validate", str(out), "--spot-check", "64"], train_command(out))


def _speed(pairs: int, seconds: float) -> str:
    """``12.3 pairs/s over 4.0 s``, or seconds per pair when that reads better (under one pair a second)."""
    if pairs and seconds > pairs:
        return f"{seconds / pairs:,.1f} s/pair over {seconds:,.1f} s"
    rate = pairs / seconds if seconds > 0 else 0.0
    return f"{rate:,.1f} pairs/s over {seconds:,.1f} s"


def tiny_world(
    out: Annotated[
        Path, typer.Argument(metavar="DIR", help="Directory to build the tiny VLM, dataset and teacher in.")
    ],
    train_steps: Annotated[
        int | None,
        typer.Option(metavar="N", help="Teacher training steps [default: 200 for reach, 600 for gap]."),
    ] = None,
    world_name: Annotated[
        str,
        typer.Option(
            "--world",
            metavar="NAME",
            help="reach: the open-loop tiny world (no environment; fast, used by the tests). gap: the closed-loop "
            "gap world (dataset of scripted-expert rollouts, a teacher for lerobot-eval --env.type=gapworld).",
        ),
    ] = "reach",
) -> None:
    """Build the bundled tiny world offline: a SmolVLM dir, a LeRobotDataset and a trained SmolVLA teacher."""
    from dataclasses import replace

    from reflowpairs.tinyworld import TinyTeacherSpec, build_tiny_world

    with user_errors():
        if world_name not in ("reach", "gap"):
            raise ReflowPairsError(
                f"--world {world_name!r} is not a bundled world.",
                "Use --world reach (open loop, the default) or --world gap (closed loop, --env.type=gapworld).",
            )
        if (out / "teacher" / "config.json").exists():
            raise ReflowPairsError(
                f"{out} already holds a tiny world.", "Remove it or choose another directory."
            )
        with console.status(f"building the {world_name} world (VLM dir, dataset, teacher training)..."):
            if world_name == "gap":
                from reflowpairs.gapworld.teacher import GAP_TEACHER, build_gap_world

                spec = GAP_TEACHER if train_steps is None else replace(GAP_TEACHER, train_steps=train_steps)
                world = build_gap_world(out, teacher_spec=spec)
            else:
                steps = 200 if train_steps is None else train_steps
                world = build_tiny_world(out, teacher_spec=TinyTeacherSpec(train_steps=steps))
    table = Table(title="tiny world", show_header=False)
    table.add_row("VLM dir", str(world.vlm_dir))
    table.add_row("dataset", f"{world.repo_id} at {world.dataset_root}")
    table.add_row("teacher", str(world.teacher_dir))
    out_console.print(table)
    generate_next = [
        "reflowpairs",
        "generate",
        "--teacher",
        str(world.teacher_dir),
        "--dataset",
        world.repo_id,
        "--dataset-root",
        str(world.dataset_root),
        "--out",
        str(out / "pairs"),
    ]
    if world_name == "gap":  # the teacher in closed loop, through lerobot's own rollout
        lerobot_eval = ["lerobot-eval", f"--policy.path={world.teacher_dir}", "--env.type=gapworld"]
        lerobot_eval += ["--eval.n_episodes=50", "--eval.batch_size=50", "--policy.device=cpu"]
        print_next(generate_next, lerobot_eval)
    else:
        print_next(generate_next)
