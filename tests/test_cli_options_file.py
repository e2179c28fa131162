"""The library's options files (reflowpairs.options_file), next-command text (reflowpairs.next_steps) and process
rank (reflowpairs.launcher): what the command line and the pipeline write is what the commands read back."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import typer.main
import yaml

from reflowpairs.cli.app import app
from reflowpairs.cli.options import option_for_key
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.config import EvalConfig
from reflowpairs.generate.config import GenerateConfig
from reflowpairs.launcher import is_main_process, process_rank
from reflowpairs.next_steps import (
    command_text,
    lerobot_command,
    merge_args,
    next_lines,
    reflowpairs_command,
    train_args,
    validate_args,
)
from reflowpairs.options_file import (
    CONFIG_HEADER,
    config_options,
    read_options_file,
    write_options,
)
from reflowpairs.train.config import TrainConfig

from .helpers import cli

_CONFIGS = {
    "generate": GenerateConfig(teacher="t", dataset="d", out=Path("o"), partition=(1, 4), episodes=[0, 1]),
    "train": TrainConfig(pairs=Path("p"), out=Path("o")),
    "eval": EvalConfig(student="s", teacher="t", dataset="d", out=Path("o")),
}


@pytest.mark.parametrize("command", list(_CONFIGS))
def test_a_library_config_is_written_as_its_commands_options(command):
    """Every key ``config_options`` writes is an option of the command (``--config`` that file is accepted)."""
    click_command = typer.main.get_command(app).commands[command]
    options = config_options(command, _CONFIGS[command])
    unknown = [key for key in options if option_for_key(click_command, key) is None]
    assert unknown == []
    assert {"out", "device", "seed"} <= set(options)  # the shared options, by their long names
    assert not any("_" in key for key in options)  # dashes, as --config writes them


def test_config_options_words_values_as_the_command_line_takes_them(tmp_path):
    options = config_options("generate", _CONFIGS["generate"])
    assert options["format"] == "zarr" and "backend" not in options  # --format fills `backend`
    assert options["partition"] == "1/4" and options["out"] == str(Path("o").resolve())
    assert "writer-id" not in options and "threads" not in options


def test_a_written_options_file_is_read_back_by_its_command(tmp_path):
    path = tmp_path / "a dir" / "generate_config.yaml"
    path.parent.mkdir()
    options = config_options("generate", _CONFIGS["generate"])
    assert write_options(path, "generate", options) == path
    text = path.read_text()
    assert text.startswith(CONFIG_HEADER)
    rerun = shlex.split(text.splitlines()[1].removeprefix("#"))  # the path with a space stays one argument
    assert rerun == ["reflowpairs", "generate", "--config", str(path.resolve())]
    assert read_options_file(path) == yaml.safe_load(text)
    cli("generate", "--config", str(path), "--help")  # every key is accepted


def test_a_file_of_the_users_is_not_overwritten_and_bad_files_are_named(tmp_path):
    mine = tmp_path / "train_options.yaml"
    mine.write_text("steps: 5\n")
    assert write_options(mine, "train", {"steps": 6}) is None
    assert mine.read_text() == "steps: 5\n"
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ReflowPairsError, match="holds a list, not a mapping"):
        read_options_file(listed)
    with pytest.raises(ReflowPairsError, match="cannot read"):
        read_options_file(tmp_path / "missing.yaml")


def test_next_commands_are_shell_quoted(tmp_path):
    store = tmp_path / "my pairs"
    assert shlex.split(command_text(validate_args(store, spot_check=64))) == [
        "reflowpairs",
        "validate",
        str(store),
        "--spot-check",
        "64",
    ]
    args = train_args(store, dataset_root=tmp_path / "data set")
    assert args[:4] == ["reflowpairs", "train", "--pairs", str(store)]
    assert args[4:] == ["--out", "outputs/reflow/my pairs", "--dataset-root", str(tmp_path / "data set")]
    text = reflowpairs_command("eval", student="a b", episodes=[8, 9], allow_mismatch=True, pairs=None)
    assert shlex.split(text) == [
        "reflowpairs",
        "eval",
        "--student",
        "a b",
        "--episodes",
        "8,9",
        "--allow-mismatch",
    ]
    assert lerobot_command("lerobot-eval", **{"policy.path": "/x y", "env.type": "pusht"}) == (
        "lerobot-eval '--policy.path=/x y' --env.type=pusht"
    )
    assert merge_args(store, more_slices=True)[-3:] == ["...", "--out", "MERGED_DIR"]
    assert next_lines(["a", "b c"], "d") == ["next: a 'b c'", "then: d"]


def test_process_rank_reads_the_launchers_environment():
    assert process_rank({}) == 0 and is_main_process({})
    assert process_rank({"RANK": "3"}) == 3 and not is_main_process({"RANK": "3"})
    assert is_main_process({"RANK": "0"})
