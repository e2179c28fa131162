"""``reflowpairs tiny-world``: the bundled tiny world, built offline, to try every other command on."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from reflowpairs.cli.ui import console, out_console, print_next, user_errors
from reflowpairs.errors import ReflowPairsError
from reflowpairs.next_steps import lerobot_command, reflowpairs_args


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
    # the tiny worlds import torch and lerobot: here, not at the top, so that `tiny-world --help` starts without them
    from reflowpairs.tiny.gapworld.teacher import GAP_TEACHER, build_gap_world
    from reflowpairs.tiny.world import TinyTeacherSpec, build_tiny_world

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
    generate_next = reflowpairs_args(
        "generate",
        teacher=world.teacher_dir,
        dataset=world.repo_id,
        dataset_root=world.dataset_root,
        out=out / "pairs",
    )
    if world_name == "gap":  # the teacher in closed loop, through lerobot's own rollout
        lerobot_eval = lerobot_command(
            "lerobot-eval",
            **{
                "policy.path": world.teacher_dir,
                "env.type": "gapworld",
                "eval.n_episodes": 50,
                "eval.batch_size": 50,
            },
            **{"policy.device": "cpu"},
        )
        print_next(generate_next, lerobot_eval)
    else:
        print_next(generate_next)
