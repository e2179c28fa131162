"""The Typer app: the root group and its options, and every command registered in one place.

Each command lives in its own module (``tiny_world_cmd``, ``generate_cmd``, ``store_cmds``, ``train_cmd``,
``eval_cmd``, ``pipeline_cmd``) as a plain function over the library; the options they share are declared once in
``options``, and what else they share is in ``ui``. Nothing here or there holds logic of its own.

Commands are registered lazily (``LazyCommand``): a command's module, and the library and torch behind it, is imported
only when that command runs or shows its help, so ``reflowpairs --help`` and ``reflowpairs inspect`` start in a
fraction of a second. The help each lists at the root is the first paragraph of its function's docstring.
"""

from __future__ import annotations

from typing import Annotated

import typer

from reflowpairs.cli.command import Group, LazyCommand
from reflowpairs.cli.lerobot_names import lerobot_names_text
from reflowpairs.cli.progress import PROGRESS_ENV
from reflowpairs.cli.ui import _state, command_flags
from reflowpairs.dataset import quiet_dataset_logs

ROOT_EPILOG = (
    "Workflow: tiny-world (a toy world to try it on) -> generate -> validate / inspect -> train -> eval; merge combines "
    "--partition slices. Progress: a bar on a terminal; with output to a file (a SLURM log) plain lines with done/total, "
    f"rate and ETA. {PROGRESS_ENV}=bar|lines|off overrides that choice."
)

_CLI = "reflowpairs.cli."


class RootGroup(Group):
    """The root group with every command, each imported on first use (in ``COMMAND_ORDER``, as the help lists them)."""

    LAZY = {
        "tiny-world": LazyCommand(
            _CLI + "tiny_world_cmd",
            "tiny_world",
            "Build the bundled tiny world offline: a SmolVLM dir, a LeRobotDataset and a trained SmolVLA teacher.",
        ),
        "generate": LazyCommand(
            _CLI + "generate_cmd",
            "generate",
            "Run the teacher's sampler over every frame and store (X_0, X_1, obs_index) pairs.",
            lambda m: {"epilog": m.GENERATE_EPILOG},
        ),
        "validate": LazyCommand(
            _CLI + "store_cmds",
            "validate",
            "Run every check on a pair store; exit 0 only if it is sound (1 if it is corrupt or incomplete).",
            lambda m: {"epilog": lerobot_names_text("validate")},
        ),
        "inspect": LazyCommand(
            _CLI + "store_cmds",
            "inspect",
            "Show what a pair store holds: layout, sizes and provenance from its manifest at once; with --stats, "
            "X_0/X_1\nstatistics too (streamed shard by shard).",
        ),
        "train": LazyCommand(
            _CLI + "train_cmd",
            "train",
            "Train a 1-2 step student on stored pairs (no teacher in memory); saves ordinary lerobot checkpoints.",
            lambda m: {"epilog": m.TRAIN_EPILOG},
        ),
        "eval": LazyCommand(
            _CLI + "eval_cmd",
            "eval_command",
            "Compare a student with its teacher at each step count: error, straightness, latency; write a report.\n"
            "With --env.type: success in closed loop, in that env, through lerobot's own rollout.",
            lambda m: {"epilog": m.EVAL_EPILOG},
        ),
        "merge": LazyCommand(
            _CLI + "store_cmds",
            "merge",
            "Combine partition slices into one pair store (shards are copied; slices are left as they are).",
            lambda m: {"epilog": lerobot_names_text("merge")},
        ),
        "pipeline": LazyCommand(
            _CLI + "pipeline_cmd",
            "pipeline",
            "Run rectified flow's recipe in one command: R reflow rounds (+ distillation), resumable, one summary.",
        ),
    }


app = typer.Typer(
    name="reflowpairs",
    cls=RootGroup,
    help="Offline reflow for LeRobot flow-matching policies: generate teacher pairs once, train a 1-2 step student.",
    epilog=ROOT_EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug
    _state["flags"] = command_flags(ctx.command.get_command(ctx, ctx.invoked_subcommand or ""))
    quiet_dataset_logs()  # logging is the CLI's to set


def main() -> None:
    app()
