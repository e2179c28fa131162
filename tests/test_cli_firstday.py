"""A user's first day with the CLI: lerobot's option names, --config files and the options file every run writes,
progress lines in a log file, W&B logging, the threads row, help without type placeholders, "next:" lines, and clear
errors for damaged JSON files that train reads."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import typer
import yaml
from rich.console import Console

from reflowpairs.cli import app
from reflowpairs.cli.lerobot_names import translate_args
from reflowpairs.cli.progress import LineProgress, line_interval, make_progress, progress_mode
from reflowpairs.cli.ui import parse_episodes
from reflowpairs.errors import ReflowPairsError

from .helpers import assert_identical_pairs, read_plain, runner

ENV = {"COLUMNS": "200", "OMP_NUM_THREADS": "1"}  # wide tables; OMP_NUM_THREADS keeps the suite's one thread
COMMANDS = ("tiny-world", "generate", "validate", "inspect", "train", "eval", "merge", "pipeline")


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def _command(name: str):
    return typer.main.get_command(app).commands[name]


def _translate(name: str, *args: str) -> list[str]:
    command = _command(name)
    return translate_args(command, command.make_context(name, [], resilient_parsing=True), list(args))


# --- lerobot's option names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "given", "ours"),
    [
        ("generate", ["--output_dir=o"], ["--out=o"]),
        ("generate", ["--output_dir", "o"], ["--out", "o"]),
        ("generate", ["--dataset.repo_id", "a/b"], ["--dataset", "a/b"]),
        ("generate", ["--dataset.root=d"], ["--dataset-root=d"]),
        ("generate", ["--dataset.episodes", "[0,1]"], ["--episodes", "[0,1]"]),
        ("generate", ["--batch_size", "8"], ["--batch-size", "8"]),
        ("generate", ["--policy.device=cpu"], ["--device=cpu"]),
        ("generate", ["--policy.num_steps", "3"], ["--num-steps", "3"]),
        ("generate", ["--log_freq", "5"], ["--log-every", "5"]),
        ("generate", ["--exact=true", "--resume=false"], ["--exact", "--no-resume"]),
        ("train", ["--output_dir", "o"], ["--out", "o"]),
        ("train", ["--batch_size=4"], ["--batch-size=4"]),
        ("train", ["--save_freq", "2"], ["--save-every", "2"]),
        ("train", ["--log_freq", "2"], ["--log-every", "2"]),
        ("train", ["--steps=3"], ["--steps=3"]),
        ("train", ["--dataset.root", "d"], ["--dataset-root", "d"]),
        ("train", ["--policy.optimizer_lr", "1e-4"], ["--lr", "1e-4"]),
        ("train", ["--wandb.enable=true"], ["--wandb"]),
        ("train", ["--wandb.enable", "true", "--steps", "2"], ["--wandb", "--steps", "2"]),
        ("train", ["--wandb.enable=false"], ["--no-wandb"]),
        (
            "train",
            ["--wandb.project=p", "--wandb.entity", "e", "--wandb.mode", "offline", "--wandb.notes=n"],
            ["--wandb-project=p", "--wandb-entity", "e", "--wandb-mode", "offline", "--wandb-notes=n"],
        ),
        (
            "eval",
            ["--output_dir=r", "--dataset.repo_id=a/b", "--dataset.root", "d", "--dataset.episodes=[8,9]"],
            ["--out=r", "--dataset=a/b", "--dataset-root", "d", "--episodes=[8,9]"],
        ),
        (
            "validate",
            ["--dataset.root", "d", "--spot_check", "4"],
            ["--dataset-root", "d", "--spot-check", "4"],
        ),
        ("merge", ["a", "--output_dir", "m"], ["a", "--out", "m"]),
        ("train", ["--out", "o", "--", "--output_dir"], ["--out", "o", "--", "--output_dir"]),
    ],
)
def test_lerobot_names_mean_ours(command, given, ours):
    assert _translate(command, *given) == ours


def test_lerobot_names_reach_the_command(tmp_path):
    """Through the whole CLI: the run gets as far as reading --pairs (a clear error about it, not 'No such option')."""
    result = runner.invoke(
        app,
        [
            "train",
            "--pairs",
            str(tmp_path / "none"),
            "--output_dir",
            str(tmp_path / "o"),
            "--batch_size=4",
            "--save_freq",
            "2",
            "--log_freq=2",
            "--steps",
            "3",
        ],
        env=ENV,
    )
    assert result.exit_code == 1, result.output
    assert "is not a pair store" in result.output and "No such option" not in result.output


@pytest.mark.parametrize(
    ("command", "use"),
    [
        ("generate", "Here: --teacher."),
        ("train", "Here: --init."),
        ("eval", "as --student and its teacher as --teacher"),
        ("validate", "as --teacher"),
    ],
)
def test_policy_path_gets_a_hint(command, use):
    result = runner.invoke(
        app, [command, "--policy.path=outputs/train/x/checkpoints/last/pretrained_model"], env=ENV
    )
    assert result.exit_code == 2
    text = _flat(result.output)
    assert "No such option --policy.path: " in text and use in text


def test_other_lerobot_names_get_hints():
    result = runner.invoke(app, ["train", "--config_path", "train_config.json"], env=ENV)
    assert result.exit_code == 2 and "reads its own options file: --config FILE" in _flat(result.output)
    result = runner.invoke(app, ["train", "--policy.type=smolvla"], env=ENV)
    assert result.exit_code == 2 and "the policy's settings come from its checkpoint's config.json" in _flat(
        result.output
    )
    result = runner.invoke(app, ["train", "--dataset.repo_id=a/b"], env=ENV)
    assert result.exit_code == 2 and "train reads the dataset the pair store was generated from" in _flat(
        result.output
    )
    result = runner.invoke(app, ["generate", "--resume=maybe"], env=ENV)
    assert result.exit_code == 2 and "--resume takes true or false, got 'maybe'" in _flat(result.output)


def test_episodes_take_lerobots_list_form():
    assert parse_episodes("[0,1]") == [0, 1]
    assert parse_episodes("[3, 1, 2]") == [1, 2, 3]
    assert parse_episodes("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_episodes("5") == [5] and parse_episodes(None) is None
    for bad, words in (
        ("[]", "names no episodes"),
        ("3-1", "the range 3-1 is empty"),
        ("[0,x]", "is not a list of episode numbers"),
    ):
        with pytest.raises(typer.BadParameter, match=re.escape(words)):
            parse_episodes(bad)


def test_log_every_must_be_positive(tmp_path):
    result = runner.invoke(
        app,
        ["generate", "--teacher", "t", "--dataset", "d", "--out", str(tmp_path / "o"), "--log-every", "0"],
        env=ENV,
    )
    assert result.exit_code == 2 and "must be at least 1, got 0" in _flat(result.output)


# --- help ----------------------------------------------------------------------------------------------------------


def test_help_has_no_type_placeholders():
    for args in ([], *([c] for c in COMMANDS)):
        result = runner.invoke(app, [*args, "--help"], env=ENV)
        assert result.exit_code == 0, result.output
        for placeholder in ("<bool>", "<int>", "<str>", "<float>", "<path>", "<list", "{"):
            assert placeholder not in result.output, (args, placeholder)
    assert (
        "Usage: reflowpairs merge [OPTIONS] SLICE..."
        in runner.invoke(app, ["merge", "--help"], env=ENV).output
    )


def test_commands_are_listed_in_workflow_order():
    text = runner.invoke(app, ["--help"], env=ENV).output
    listed = [line.split()[1] for line in text.splitlines() if re.match(r"^│ [a-z][a-z-]* {2,}", line)]
    assert listed == list(COMMANDS)
    assert "REFLOWPAIRS_PROGRESS=bar|lines|off" in _flat(text)


def test_generate_and_train_options_are_grouped():
    generate = runner.invoke(app, ["generate", "--help"], env=ENV).output
    for panel in ("Inputs", "Sampling", "Output", "Performance", "Multi-process", "Options file and logs"):
        assert f"╭─ {panel} ─" in generate, panel
    assert (
        "Replace the pair store in --out (only its manifest.json, shards/ and parts/), or write a new store into a "
        "non-empty folder that is not a store (its files are left alone)."
    ) in _flat(generate)
    train = runner.invoke(app, ["train", "--help"], env=ENV).output
    for panel in ("Inputs", "Training", "Output", "Performance", "Options file and logs"):
        assert f"╭─ {panel} ─" in train, panel
    assert "--wandb.enable" in _flat(train) and "--output_dir" in _flat(train)


# --- progress lines --------------------------------------------------------------------------------------------


def test_progress_mode_follows_the_terminal_and_the_environment():
    log = Console(file=io.StringIO())  # like a SLURM log: not a terminal
    tty = Console(file=io.StringIO(), force_terminal=True)
    assert progress_mode(log, {}) == "lines" and progress_mode(tty, {}) == "bar"
    for value, mode in (
        ("1", "bar"),
        ("bar", "bar"),
        ("lines", "lines"),
        ("off", "off"),
        ("0", "off"),
        ("auto", "lines"),
        ("what", "lines"),
    ):
        assert progress_mode(log, {"REFLOWPAIRS_PROGRESS": value}) == mode, value
    assert progress_mode(tty, {"REFLOWPAIRS_PROGRESS": "lines"}) == "lines"
    assert isinstance(make_progress(log, "x"), LineProgress)
    assert not isinstance(make_progress(log, "x", main=False), LineProgress)


def test_line_interval():
    assert line_interval(10_000, None, 100) == 100  # a long run: the cap
    assert line_interval(400, None, 100) == 40  # a short one: a tenth
    assert line_interval(3, None, 100) == 1
    assert line_interval(10_000, 7, 100) == 7  # given: as is


def test_line_progress_prints_done_total_rate_and_eta():
    console = Console(file=io.StringIO(), width=40)
    with LineProgress(console=console, prefix="train", every=4) as bar:
        task = bar.add_task("steps", total=10, unit="step")
        for step in range(1, 11):
            bar.update(task, completed=step, info=f"loss {1 / step:.4f}")
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 3, lines  # steps 4 and 8, and the end; one line each however narrow the console
    assert re.fullmatch(
        r"train: step 4/10 \(40%\) loss 0\.2500, [\d,.]+ (steps/s|s/step), ETA \d+:\d\d:\d\d", lines[0]
    ), lines[0]
    assert lines[1].startswith("train: step 8/10 (80%) loss 0.1250, ")
    assert re.fullmatch(r"train: step 10/10 \(100%\) loss 0\.1000, .*, done in \d+:\d\d:\d\d", lines[2]), (
        lines[2]
    )


# --- options files: errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (
            "pairs: p\nout: o\nbogus_key: 3\n",
            "'bogus_key' is not an option of `reflowpairs train`. Valid keys: pairs, init,",
        ),
        ("- 1\n- 2\n", "holds a list, not a mapping of option names to values"),
        ("pairs: [unclosed\n", "is not valid YAML"),
        (b"pairs: \xff\n", "is not UTF-8 text"),
    ],
    ids=["unknown-key", "not-a-mapping", "not-yaml", "not-utf8"],
)
def test_bad_options_file_is_refused_naming_it(tmp_path, content, words):
    path = tmp_path / "options.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = runner.invoke(app, ["train", "--config", str(path)], env=ENV)
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    assert str(path) in text and words in text and "Traceback" not in result.output
    if words.startswith("'bogus_key'"):
        assert "wandb-project" in text and "save-every" in text  # every valid key is named


def test_options_file_takes_dashes_underscores_lerobot_names_and_nesting(tmp_path):
    path = tmp_path / "options.json"
    path.write_text(
        json.dumps(
            {
                "pairs": str(tmp_path / "none"),
                "output_dir": str(tmp_path / "o"),
                "batch_size": 4,
                "save-every": 2,
                "wandb": {"enable": False},
            }
        )
    )
    result = runner.invoke(app, ["train", "--config", str(path)], env=ENV)
    assert result.exit_code == 1 and "is not a pair store" in result.output, (
        result.output
    )  # every key was taken


# --- generate, validate, inspect, merge through the CLI -------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tiny_world, tmp_path_factory):
    """One generate run given lerobot's names, with progress lines every 16 frames (CliRunner's stderr is no terminal)."""
    out = tmp_path_factory.mktemp("firstday") / "pairs"
    args = [
        "generate",
        "--teacher",
        str(tiny_world.teacher_dir),
        f"--dataset.repo_id={tiny_world.repo_id}",
        "--dataset.root",
        str(tiny_world.dataset_root),
        "--output_dir",
        str(out),
        "--dataset.episodes",
        "[0,1]",
        "--samples-per-frame",
        "2",
        "--num-steps",
        "2",
        "--shard_size",
        "16",
        "--batch_size",
        "8",
        "--device",
        "cpu",
        "--log-every",
        "16",
    ]
    result = runner.invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    return out, result


def test_generate_takes_lerobot_names(generated):
    out, _ = generated
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["generation"]["episodes"] == [0, 1]
        and manifest["num_frames"] == 48
        and manifest["complete"] is True
    )


def test_generate_prints_progress_lines_to_a_log(generated):
    _, result = generated
    lines = [line for line in result.output.splitlines() if line.startswith("generate: ")]
    assert [line.split(" (")[0] for line in lines] == [
        "generate: frame 16/48",
        "generate: frame 32/48",
        "generate: frame 48/48",
    ]
    assert re.fullmatch(
        r"generate: frame 16/48 \(33%\) 32 pairs, [\d,.]+ pairs/s, [\d,.]+ (frames/s|s/frame), ETA \d+:\d\d:\d\d",
        lines[0],
    ), lines[0]
    assert "done in" in lines[-1]


def test_generate_says_what_is_next(generated):
    out, result = generated
    lines = result.output.splitlines()
    assert f"next: reflowpairs validate {out} --spot-check 64" in lines
    assert f"then: reflowpairs train --pairs {out} --out outputs/reflow/pairs" in lines
    assert "8 frames per call" in _flat(result.output)


def test_generate_writes_its_options_and_config_repeats_the_run(generated, tiny_world, tmp_path):
    out, _ = generated
    written = out / "generate_config.yaml"
    options = yaml.safe_load(written.read_text())
    assert written.read_text().startswith("# reflowpairs generate options of this run")
    assert options["episodes"] == "0-1" and options["samples-per-frame"] == 2 and options["num-steps"] == 2
    assert options["dataset-root"] == str(tiny_world.dataset_root.resolve()) and options["teacher"] == str(
        tiny_world.teacher_dir.resolve()
    )
    assert options["out"] == str(out.resolve()) and options["log-every"] == 16
    assert "resume" not in options and "overwrite" not in options and "config" not in options
    # Flags override the file: another --out and --log-every.
    again = tmp_path / "again"
    result = runner.invoke(
        app, ["generate", "--config", str(written), "--out", str(again), "--log-every", "48"], env=ENV
    )
    assert result.exit_code == 0, result.output
    assert [line.split(" (")[0] for line in result.output.splitlines() if line.startswith("generate: ")] == [
        "generate: frame 48/48"
    ]
    assert_identical_pairs(read_plain(out), read_plain(again))
    repeated = yaml.safe_load((again / "generate_config.yaml").read_text())
    assert repeated == {**options, "out": str(again.resolve()), "log-every": 48}


def test_generate_keeps_a_users_file_of_the_same_name(tiny_world, tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "generate_config.yaml").write_text("mine: true\n")
    result = runner.invoke(
        app,
        [
            "generate",
            "--teacher",
            str(tiny_world.teacher_dir),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(out),
            "--episodes",
            "0",
            "--samples-per-frame",
            "1",
            "--num-steps",
            "1",
            "--device",
            "cpu",
            "--overwrite",
        ],
        env=ENV,
    )
    assert result.exit_code == 0, result.output
    assert (out / "generate_config.yaml").read_text() == "mine: true\n"
    assert "exists and was not written by reflowpairs" in _flat(result.output)


def test_validate_and_inspect_say_what_is_next(generated, tmp_path):
    out, _ = generated
    result = runner.invoke(app, ["validate", str(out)], env=ENV)
    assert result.exit_code == 0, result.output
    assert (
        result.output.splitlines()[-1] == f"next: reflowpairs train --pairs {out} --out outputs/reflow/pairs"
    )
    result = runner.invoke(app, ["inspect", str(out)], env=ENV)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"next: reflowpairs validate {out}"
    # an interrupted store: the command that finishes it
    store = Path(shutil.copytree(out, tmp_path / "cut"))
    manifest = json.loads((store / "manifest.json").read_text())
    dropped = manifest["shards"].pop()
    manifest["num_pairs"] -= dropped["num_pairs"]
    manifest["num_frames"] -= dropped["num_frames"]
    manifest["complete"] = False
    (store / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["validate", str(store)], env=ENV)
    assert result.exit_code == 1 and "INCOMPLETE" in result.output
    last = result.output.splitlines()[-1]
    assert (
        last.startswith("next: reflowpairs generate ")
        and last.endswith(" --resume")
        and f"--out {store}" in last
    )


def test_partition_and_merge_say_what_is_next(tiny_world, tmp_path):
    part = tmp_path / "slice0"
    result = runner.invoke(
        app,
        [
            "generate",
            "--teacher",
            str(tiny_world.teacher_dir),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(part),
            "--episodes",
            "[0]",
            "--samples-per-frame",
            "1",
            "--num-steps",
            "1",
            "--device",
            "cpu",
            "--partition",
            "0/1",
        ],
        env=ENV,
    )
    assert result.exit_code == 0, result.output
    assert f"next: reflowpairs merge {part} --out MERGED_DIR" in result.output
    merged = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(part), "--output_dir", str(merged)], env=ENV)
    assert result.exit_code == 0, result.output
    assert f"merged 1 slice into {merged}: 24 pairs, 24 frames, complete" in _flat(result.output)
    assert result.output.splitlines()[-1] == f"next: reflowpairs validate {merged}"


def test_tiny_world_says_what_is_next(tiny_world, tmp_path, monkeypatch):
    """The command's own rendering, with the (tested elsewhere) world build replaced by the session's world."""
    import reflowpairs.tiny.world

    monkeypatch.setattr(reflowpairs.tiny.world, "build_tiny_world", lambda out, teacher_spec: tiny_world)
    result = runner.invoke(app, ["tiny-world", str(tmp_path / "w")], env=ENV)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (
        f"next: reflowpairs generate --teacher {tiny_world.teacher_dir} --dataset {tiny_world.repo_id} "
        f"--dataset-root {tiny_world.dataset_root} --out {tmp_path / 'w' / 'pairs'}"
    )


# --- train through the CLI -----------------------------------------------------------------------------------------


def _wandb_history(wandb_dir: Path) -> dict[int, dict[str, float]]:
    """The history records of the one offline run under ``wandb_dir`` (read from its run-*.wandb file)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(path))
    history: dict[int, dict[str, float]] = {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history[int(items["_step"])] = {k: v for k, v in items.items() if k.startswith("train/")}
    return history


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory):
    """A 4-step run given lerobot's names (a checkpoint and a log line every 2 steps), logged to W&B offline."""
    root = tmp_path_factory.mktemp("firstday_train")
    out, wandb_dir = root / "run", root / "wandb"
    args = [
        "train",
        "--pairs",
        str(tiny_store),
        "--output_dir",
        str(out),
        "--steps",
        "4",
        "--batch_size",
        "4",
        "--save_freq=2",
        "--log_freq",
        "2",
        "--num_workers",
        "0",
        "--policy.device",
        "cpu",
        "--policy.optimizer_lr",
        "1e-3",
        "--wandb.enable=true",
        "--wandb.project",
        "reflowpairs-tests",
    ]
    result = runner.invoke(app, args, env={**ENV, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)})
    assert result.exit_code == 0, result.output
    return out, wandb_dir, result


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_takes_lerobot_names(trained):
    out, _, _ = trained
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "000002",
        "000004",
        "last",
    ]  # --save_freq 2
    assert [r["step"] for r in _log(out)] == [2, 4]  # --log_freq 2
    assert (
        json.loads((out / "checkpoints/last/training_state/reflow_state.json").read_text())["settings"]["lr"]
        == 1e-3
    )


@pytest.mark.slow
def test_train_prints_progress_lines_and_threads(trained):
    _, _, result = trained
    lines = [line for line in result.output.splitlines() if line.startswith("train: step ")]
    assert [line.split(" (")[0] for line in lines] == ["train: step 2/4", "train: step 4/4"]
    assert re.fullmatch(
        r"train: step 2/4 \(50%\) loss \d\.\d{4}, [\d,.]+ (steps/s|s/step), ETA \d+:\d\d:\d\d", lines[0]
    ), lines[0]
    assert re.search(
        r"│ threads +│ \d+ main threads? on \d+ cores? \(from OMP_NUM_THREADS\)", result.output
    ), result.output


@pytest.mark.slow
def test_train_logs_to_wandb(trained):
    out, wandb_dir, result = trained
    history = _wandb_history(wandb_dir)
    assert sorted(history) == [2, 4]
    for record in _log(out):
        logged = history[record["step"]]
        assert logged == pytest.approx(
            {
                "train/loss": record["loss"],
                "train/lr": record["lr"],
                "train/grad_norm": record["grad_norm"],
                "train/seconds": record["seconds"],
            }
        )
    assert "W&B run: " in result.output and str(wandb_dir) in _flat(result.output)


@pytest.mark.slow
def test_train_writes_its_options_and_config_repeats_the_run(trained, tiny_store, tmp_path):
    out, _, _ = trained
    written = out / "train_options.yaml"
    assert not list(
        (out / "checkpoints/last/pretrained_model").glob("*.yaml")
    )  # an ordinary lerobot checkpoint
    options = yaml.safe_load(written.read_text())
    assert options["pairs"] == str(tiny_store.resolve()) and options["out"] == str(out.resolve())
    assert (
        options["steps"],
        options["batch-size"],
        options["save-every"],
        options["log-every"],
        options["lr"],
    ) == (4, 4, 2, 2, 1e-3)
    assert (
        options["seed"],
        options["time-sampling"],
        options["shuffle-window"],
        options["student-num-steps"],
    ) == (0, "beta", 4, "1")
    assert (
        options["wandb"] is True
        and options["wandb-project"] == "reflowpairs-tests"
        and "resume" not in options
    )
    again = tmp_path / "again"
    result = runner.invoke(
        app, ["train", "--config", str(written), "--out", str(again), "--wandb=false"], env=ENV
    )
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in _log(again)] == [r["step"] for r in _log(out)]
    assert [r["loss"] for r in _log(again)] == pytest.approx([r["loss"] for r in _log(out)], rel=1e-5)
    repeated = yaml.safe_load((again / "train_options.yaml").read_text())
    assert repeated == {**options, "out": str(again.resolve()), "wandb": False}


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    result = runner.invoke(
        app, ["train", "--pairs", str(tmp_path / "p"), "--out", str(tmp_path / "o"), "--wandb"], env=ENV
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--wandb needs the wandb package" in _flat(
        result.output
    ) and "pip install 'reflowpairs[wandb]'" in _flat(result.output)
    assert not (tmp_path / "o").exists()


def test_wandb_resume_finds_the_previous_run(tmp_path):
    """--resume continues the W&B run in wandb/latest-run, found as lerobot-train finds it."""
    from reflowpairs.wandb_log import _previous_run_id

    assert _previous_run_id(tmp_path) is None
    (tmp_path / "wandb" / "latest-run").mkdir(parents=True)
    (tmp_path / "wandb" / "latest-run" / "run-ab12cd34.wandb").write_bytes(b"")
    assert _previous_run_id(tmp_path) == "ab12cd34"


def test_wandb_settings_are_checked(tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            "--pairs",
            str(tmp_path / "p"),
            "--out",
            str(tmp_path / "o"),
            "--wandb",
            "--wandb.mode=sometimes",
        ],
        env=ENV,
    )
    assert (
        result.exit_code == 1
        and "--wandb-mode must be one of online, offline, disabled, got 'sometimes'" in _flat(result.output)
    )
    result = runner.invoke(
        app,
        ["train", "--pairs", str(tmp_path / "p"), "--out", str(tmp_path / "o"), "--wandb.project=p"],
        env=ENV,
    )
    assert result.exit_code == 1 and "--wandb-project is for W&B logging, which is off. Add --wandb" in _flat(
        result.output
    )


@pytest.mark.slow
def test_train_sets_and_reports_its_threads(tiny_store, tmp_path, monkeypatch):
    """With `threads="auto"` (the command line's setting), train gives the main process the cores its DataLoader
    workers leave (reflowpairs/threads.py); tests/test_threads.py checks the library default keeps the caller's."""
    import torch

    from reflowpairs.threads import plan_threads
    from reflowpairs.train.config import TrainConfig
    from reflowpairs.train.loop import train

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    plans = []
    try:
        train(
            TrainConfig(
                pairs=tiny_store,
                out=tmp_path / "o",
                steps=1,
                batch_size=2,
                num_workers=0,
                device="cpu",
                threads="auto",
            ),
            on_plan=plans.append,
        )
        expected = plan_threads(0)
        assert plans[0].threads == expected.describe() and torch.get_num_threads() == expected.main
    finally:
        torch.set_num_threads(before)


# --- eval through the CLI --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_writes_its_options_and_config_repeats_the_run(trained, tiny_world, tmp_path):
    out, _, _ = trained
    student = out / "checkpoints/last/pretrained_model"
    report_dir = tmp_path / "report"
    args = [
        "eval",
        "--student",
        str(student),
        "--teacher",
        str(tiny_world.teacher_dir),
        f"--dataset.repo_id={tiny_world.repo_id}",
        "--dataset.root",
        str(tiny_world.dataset_root),
        "--dataset.episodes",
        "[9]",
        "--num-steps",
        "1,2",
        "--max-frames",
        "2",
        "--samples-per-frame",
        "1",
        "--latency-repeats",
        "1",
        "--policy.device",
        "cpu",
        "--output_dir",
        str(report_dir),
    ]
    result = runner.invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    written = report_dir / "eval_options.yaml"
    options = yaml.safe_load(written.read_text())
    assert (
        options["episodes"] == "9"
        and options["num-steps"] == "1,2"
        and options["student"] == str(student.resolve())
    )
    again = tmp_path / "again"
    result = runner.invoke(app, ["eval", "--config", str(written), "--out", str(again)], env=ENV)
    assert result.exit_code == 0, result.output

    def rows(path: Path) -> list[dict]:
        return [
            {k: v for k, v in row.items() if not k.startswith("latency")}
            for row in json.loads((path / "report.json").read_text())["rows"]
        ]

    assert rows(again) == rows(report_dir)


# --- damaged files train reads ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\xff\xfe{}", "is not UTF-8 text (byte 0 is 0xff)"),
        (b"[1, 2]", "holds a JSON list, not an object"),
        (b'{"format": ', "is not valid JSON"),
    ],
    ids=["not-utf8", "not-an-object", "not-json"],
)
def test_damaged_reflow_state_is_named(tmp_path, content, words):
    from reflowpairs.checkpoint import read_state

    path = tmp_path / "000002" / "training_state" / "reflow_state.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ReflowPairsError) as caught:
        read_state(tmp_path / "000002")
    assert str(path) in caught.value.what and words in caught.value.what
    assert "resume from an earlier one" in caught.value.hint


def test_train_log_with_damage_is_trimmed_or_refused(tmp_path):
    from reflowpairs.train.logfile import trim_log

    log = tmp_path / "train_log.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    log.write_bytes(
        ("\n".join(good) + "\n").encode() + b'{"step": 4, "lo\xff'
    )  # a torn, undecodable last line
    trim_log(log, 2)
    assert log.read_text().splitlines() == good[:2]
    for damage in (b"\xff\xfe\n", b"[1]\n", b'{"step": "two"}\n'):
        log.write_bytes(good[0].encode() + b"\n" + damage + good[1].encode() + b"\n")
        with pytest.raises(ReflowPairsError) as caught:
            trim_log(log, 2)
        assert (
            f"{log} line 2 is not a train_log record" in caught.value.what
            and "Move train_log.jsonl aside" in caught.value.hint
        )


@pytest.mark.parametrize(
    ("content", "words"), [(b"\xff\xfe", "is not UTF-8 text"), (b"[]", "holds a JSON list, not an object")]
)
def test_damaged_init_config_is_named(tiny_world, tiny_store, tmp_path, content, words):
    init = Path(shutil.copytree(tiny_world.teacher_dir, tmp_path / "teacher"))
    (init / "config.json").write_bytes(content)
    result = runner.invoke(
        app,
        [
            "train",
            "--pairs",
            str(tiny_store),
            "--out",
            str(tmp_path / "o"),
            "--init",
            str(init),
            "--device",
            "cpu",
            "--num-workers",
            "0",
        ],
        env=ENV,
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = _flat(result.output)
    assert f"{init / 'config.json'} {words}" in text and "set --init to a good copy" in text
    assert not (tmp_path / "o").exists()


def test_damaged_train_config_of_the_teacher_is_ignored(tmp_path):
    from reflowpairs.train.next_commands import teacher_env_type

    (tmp_path / "train_config.json").write_bytes(b"\xff\xfe")
    assert teacher_env_type(str(tmp_path)) is None
    (tmp_path / "train_config.json").write_text("[1]")
    assert teacher_env_type(str(tmp_path)) is None
    (tmp_path / "train_config.json").write_text(json.dumps({"env": {"type": "pusht"}}))
    assert teacher_env_type(str(tmp_path)) == "pusht"
