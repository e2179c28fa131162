"""``reflowpairs generate``: stage 1, the teacher's pairs into a store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from reflowpairs.cli.lerobot_names import lerobot_names_text
from reflowpairs.cli.options import (
    MULTI,
    OUTPUT,
    PERFORMANCE,
    RUN,
    SAMPLING,
    batch_size_option,
    config_defaults,
    config_from_params,
    config_option,
    dataset_option,
    dataset_root_option,
    device_option,
    episodes_option,
    num_workers_option,
    out_option,
    resolved_options,
    resume_option,
    samples_per_frame_option,
    seed_option,
    teacher_option,
    tokenizer_option,
)
from reflowpairs.cli.ui import (
    check_at_least_one,
    console,
    out_console,
    parse_episodes,
    parse_partition,
    plural,
    print_next,
    progress,
    save_options,
    user_errors,
)
from reflowpairs.dataset import episodes_text
from reflowpairs.generate.config import GenerateConfig
from reflowpairs.launcher import is_main_process
from reflowpairs.next_steps import merge_args, train_args, validate_args
from reflowpairs.store.layout import GENERATE_OPTIONS

_DEFAULTS = config_defaults(GenerateConfig)  # the options' defaults are the library config's
GENERATE_EPILOG = lerobot_names_text("generate") + f" Each run writes its options to OUT/{GENERATE_OPTIONS}."


def generate(
    ctx: typer.Context,
    *,
    teacher: Annotated[
        str, teacher_option("Teacher checkpoint: a pretrained_model/ directory or a hub repo id.")
    ],
    dataset: Annotated[str, dataset_option()],
    dataset_root: Annotated[Path | None, dataset_root_option()] = _DEFAULTS.dataset_root,
    episodes: Annotated[
        str | None, episodes_option("Episodes to use, e.g. 0,2,5, 0-9 or [0,1] (default: all).")
    ] = _DEFAULTS.episodes,
    samples_per_frame: Annotated[
        int, samples_per_frame_option("K: noise samples (pairs) per frame.", SAMPLING)
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
    seed: Annotated[int, seed_option("Seed of X_0 = f(seed, obs_index, sample).", SAMPLING)] = _DEFAULTS.seed,
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
    out: Annotated[Path, out_option("Directory of the pair store to write.")],
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
    resume: Annotated[bool, resume_option("Finish an interrupted store in --out.")] = _DEFAULTS.resume,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite/--no-overwrite",
            rich_help_panel=OUTPUT,
            help="Replace the pair store in --out (only its manifest.json, shards/ and parts/), or write a new store into a non-empty folder that is not a store (its files are left alone).",
        ),
    ] = _DEFAULTS.overwrite,
    batch_size: Annotated[
        int, batch_size_option("Frames loaded per batch (each samples K pairs).")
    ] = _DEFAULTS.batch_size,
    tokens_per_call: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            rich_help_panel=PERFORMANCE,
            help="Most suffix tokens (frames x K x chunk_size) per teacher call; 0: the whole batch (default: 1024 on CPU, no limit on GPU).",
        ),
    ] = _DEFAULTS.tokens_per_call,
    tokenizer: Annotated[str | None, tokenizer_option(PERFORMANCE)] = None,
    device: Annotated[str, device_option()] = _DEFAULTS.device,
    dtype: Annotated[
        str,
        typer.Option(
            metavar="DTYPE",
            rich_help_panel=PERFORMANCE,
            help="Teacher compute dtype: float32, bfloat16 or float16 (autocast; for CUDA).",
        ),
    ] = _DEFAULTS.dtype,
    num_workers: Annotated[
        int, num_workers_option("DataLoader workers loading frames.")
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
    from reflowpairs.generate.run import generate as run_generate  # imports torch: not for --help

    main = is_main_process()  # under torchrun only rank 0 reports
    check_at_least_one(log_every, "--log-every")
    episode_list = parse_episodes(episodes)
    cfg = config_from_params(
        GenerateConfig,
        ctx,
        backend=format,
        episodes=episode_list,
        partition=parse_partition(partition),
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
        print_next(
            merge_args(out, more_slices=count > 1),
            why=f"this is slice {index}/{count}: once all {plural(count, 'slice')} are done, merge their --out "
            "directories, then validate and train on the merged store",
        )
        return
    print_next(validate_args(out, spot_check=64), train_args(out))


def _speed(pairs: int, seconds: float) -> str:
    """``12.3 pairs/s over 4.0 s``, or seconds per pair when that reads better (under one pair a second)."""
    if pairs and seconds > pairs:
        return f"{seconds / pairs:,.1f} s/pair over {seconds:,.1f} s"
    rate = pairs / seconds if seconds > 0 else 0.0
    return f"{rate:,.1f} pairs/s over {seconds:,.1f} s"
