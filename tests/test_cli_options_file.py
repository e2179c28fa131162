"""The library's options files (reflowpairs.options_file), next-command text (reflowpairs.next_steps) and process
rank (reflowpairs.launcher): what the command line and the pipeline write is what the commands read back."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import typer.main
import yaml

from reflowpairs.cli.app import app
from reflowpairs.cli.options import option_for_key
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.config import EvalConfig
from reflowpairs.eval.open_loop import evaluate
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
from reflowpairs.teacher import TOKENIZER_ENV
from reflowpairs.train.config import TrainConfig, TrainResult
from reflowpairs.train.loop import train
from reflowpairs.train.next_commands import next_commands

from .helpers import cli, generate_args

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


def test_train_next_commands_are_shell_quoted(tmp_path):
    """A finished run's next commands (``train.next_commands``) keep a path with a space as one argument."""
    run = tmp_path / "my run"
    result = TrainResult(
        out=run,
        checkpoint=run / "checkpoints" / "000010",
        start_step=0,
        step=10,
        final_loss=0.1,
        seconds=1.0,
        init_source="/the teacher",
        dataset_repo_id="user/data",
        held_out_episodes=[8, 9],
        pairs=tmp_path / "my pairs",
    )
    commands = next_commands(result)
    student = str(run / "checkpoints" / "last" / "pretrained_model")
    assert shlex.split(commands["lerobot_eval"]) == [
        "lerobot-eval",
        f"--policy.path={student}",
        "--env.type=...",
    ]
    assert shlex.split(commands["reflowpairs_eval"]) == [
        "reflowpairs",
        "eval",
        "--student",
        student,
        "--teacher",
        "/the teacher",
        "--dataset",
        "user/data",
        "--episodes",
        "8-9",
        "--pairs",
        str(tmp_path / "my pairs"),
        "--out",
        str(run / "eval"),
    ]


def test_process_rank_reads_the_launchers_environment():
    assert process_rank({}) == 0 and is_main_process({})
    assert process_rank({"RANK": "3"}) == 3 and not is_main_process({"RANK": "3"})
    assert is_main_process({"RANK": "0"})


class _StoppedAtLoadError(ReflowPairsError):
    """Raised by the stand-in ``load_policy``: the command stops where the checkpoint would load."""


@pytest.mark.parametrize("command", ["generate", "validate"])
def test_tokenizer_reaches_load_policy_as_an_argument(command, tiny_world, tiny_store, tmp_path, monkeypatch):
    """``--tokenizer DIR`` travels in the library config to ``load_policy(..., tokenizer=DIR)`` (absolute); the
    command leaves REFLOWPAIRS_TOKENIZER alone."""
    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    calls = []

    def stand_in(source, device="auto", fingerprint=None, tokenizer=None):
        calls.append(tokenizer)
        raise _StoppedAtLoadError("stopped at the load")

    module = "reflowpairs.generate.job" if command == "generate" else "reflowpairs.validate.spot"
    monkeypatch.setattr(f"{module}.load_policy", stand_in)
    (tmp_path / "tok").mkdir()
    monkeypatch.chdir(tmp_path)
    if command == "generate":
        args = generate_args(tiny_world, tmp_path / "pairs", "--tokenizer", "tok")
    else:
        args = ["validate", str(tiny_store), "--spot-check", "1", "--tokenizer", "tok"]
    result = cli(*args, exit_code=1)
    assert "stopped at the load" in result.output
    assert calls == [str(tmp_path / "tok")]
    assert TOKENIZER_ENV not in os.environ


@pytest.mark.parametrize("stage", ["train", "eval"])
def test_a_configs_tokenizer_reaches_load_policy(stage, tiny_world, tiny_store, tmp_path, monkeypatch):
    """Train's and eval's ``tokenizer`` (what the pipeline and the CLI fill) is ``load_policy``'s argument."""
    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    calls = []

    def stand_in(source, device="auto", fingerprint=None, tokenizer=None):
        calls.append(tokenizer)
        raise _StoppedAtLoadError("stopped at the load")

    teacher = str(tiny_world.teacher_dir)
    with pytest.raises(ReflowPairsError, match="stopped at the load"):
        if stage == "train":
            monkeypatch.setattr("reflowpairs.train.inputs.load_policy", stand_in)
            train(TrainConfig(pairs=tiny_store, out=tmp_path / "run", device="cpu", tokenizer="/tok"))
        else:
            monkeypatch.setattr("reflowpairs.eval.checkpoints.load_policy", stand_in)
            cfg = EvalConfig(
                student=teacher,
                teacher=teacher,
                dataset=tiny_world.repo_id,
                dataset_root=tiny_world.dataset_root,
                out=tmp_path / "eval",
                device="cpu",
                tokenizer="/tok",
            )
            evaluate(cfg)
    assert calls[0] == "/tok"
