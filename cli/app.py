"""The Typer app: the root group and its options, and every command registered in one place.

Each command lives in its own module (``generate_cmd``, ``store_cmds``, ``train_cmd``, ``eval_cmd``) as a plain
function over the library; what they share is in ``ui``. Nothing here or there holds logic of its own.
"""

from __future__ import annotations

from typing import Annotated

import typer

from reflowpairs.cli import eval_cmd, generate_cmd, pipeline_cmd, store_cmds, train_cmd
from reflowpairs.cli.options import Command, Group, lerobot_names_text
from reflowpairs.cli.progress import PROGRESS_ENV
from reflowpairs.cli.ui import _state, command_flags
from reflowpairs.dataset import quiet_dataset_logs

ROOT_EPILOG = (
    "Workflow: tiny-world (a toy world to try it on) -> generate -> validate / inspect -> train -> eval; merge combines "
    "--partition slices. Progress: a bar on a terminal; with output to a file (a SLURM log) plain lines with done/total, "
    f"rate and ETA. {PROGRESS_ENV}=bar|lines|off overrides that choice."
)

app = typer.Typer(
    name="reflowpairs",
    cls=Group,
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


app.command("tiny-world", cls=Command)(generate_cmd.tiny_world)
app.command(cls=Command, epilog=generate_cmd.GENERATE_EPILOG)(generate_cmd.generate)
app.command(cls=Command, epilog=lerobot_names_text("validate"))(store_cmds.validate)
app.command(cls=Command)(store_cmds.inspect)
app.command(cls=Command, epilog=train_cmd.TRAIN_EPILOG)(train_cmd.train)
app.command("eval", cls=eval_cmd.EnvCommand, epilog=eval_cmd.EVAL_EPILOG)(eval_cmd.eval_command)
app.command(cls=Command, epilog=lerobot_names_text("merge"))(store_cmds.merge)
app.command(cls=pipeline_cmd.PipelineCommand)(pipeline_cmd.pipeline)


def main() -> None:
    app()
