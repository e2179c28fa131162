"""``reflowpairs pipeline``: rounds chained (each student teaches the next), resumable after a crash at any stage,
one summary; refuses a rerun with settings that would change what finished stages made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reflowpairs.cli import app
from reflowpairs.errors import ReflowPairsError
from reflowpairs.pipeline import PIPELINE_STATE, STUDENT, PipelineConfig, run_pipeline

from .helpers import runner

pytestmark = pytest.mark.slow


def _cfg(world, out: Path, **overrides) -> PipelineConfig:
    settings = {
        "teacher": str(world.teacher_dir),
        "dataset": world.repo_id,
        "dataset_root": world.dataset_root,
        "out": out,
        "episodes": [0],
        "rounds": 2,
        "samples_per_frame": 2,
        "num_steps": 4,
        "train_steps": 2,
        "batch_size": 4,
        "spot_check": 2,
        "eval_num_steps": [1, 4],
        "eval_episodes": [9],
        "eval_max_frames": 2,
        "device": "cpu",
    }
    settings.update(overrides)
    return PipelineConfig(**settings)


class CrashError(RuntimeError):
    pass


def _crash_at(stage: str):
    def on_stage(name: str, skipped: bool) -> None:
        if name == stage and not skipped:
            raise CrashError(name)

    return on_stage


def test_rounds_chain_and_a_crash_loses_only_the_stage_in_progress(tiny_world, tmp_path):
    out = tmp_path / "recipe"
    with pytest.raises(CrashError):
        run_pipeline(_cfg(tiny_world, out, distill=True), on_stage=_crash_at("round2/train"))
    state = json.loads((out / PIPELINE_STATE).read_text())
    assert list(state["stages"]) == [
        "round1/generate",
        "round1/validate",
        "round1/train",
        "round1/eval",
        "round2/generate",
        "round2/validate",
    ]
    round1_manifest = (out / "round1" / "pairs" / "manifest.json").read_bytes()

    result = run_pipeline(_cfg(tiny_world, out, distill=True))
    assert result.stages_skipped == list(state["stages"])
    assert result.stages_run == ["round2/train", "round2/eval", "distill/train", "distill/eval"]
    assert (out / "round1" / "pairs" / "manifest.json").read_bytes() == round1_manifest  # not made again

    # round 2's teacher is round 1's student; each round's store has its own noises
    m1 = json.loads(round1_manifest)
    m2 = json.loads((out / "round2" / "pairs" / "manifest.json").read_text())
    assert m1["teacher"]["source"] == str(tiny_world.teacher_dir)
    assert Path(m2["teacher"]["source"]).resolve() == (out / "round1" / "student" / STUDENT).resolve()
    assert m1["generation"]["seed"] != m2["generation"]["seed"]

    # one comparison: the teacher and both students at each step count, with a verdict each
    comparison = result.comparison
    assert comparison["models"] == ["teacher", "round1", "round2", "distill"]
    assert {p.name for p in (out / "comparison").iterdir()} == {
        "comparison.json",
        "comparison.md",
        "comparison.png",
    }
    ref, data = {}, {}
    for row in comparison["rows"]:
        ref.setdefault(row["model"], {})[row["num_steps"]] = row["mse_ref_norm"]
        data.setdefault(row["model"], {})[row["num_steps"]] = row["mse_data_norm"]
    assert set(ref) == set(data) == {"teacher", "round1", "round2", "distill"}
    for model in ref:
        assert set(ref[model]) == set(data[model]) == {1, 4}
        assert all(e > 0 for e in [*ref[model].values(), *data[model].values()])
    # the teacher's rows are the same in every round's report (the same frames, noises and reference)
    rows = [json.loads(Path(state_stage["report"]).read_text())["rows"] for state_stage in _evals(out)]
    teacher_rows = [[r for r in rs if r["model"] == "teacher"] for rs in rows]
    assert _same_errors(teacher_rows[0], teacher_rows[1])
    verdict = comparison["verdict"]
    assert set(verdict) == set(ref)
    for model in ref:  # the fewest steps at which the model is within the teacher's bar
        within_ref = [n for n in (1, 4) if ref[model][n] <= ref["teacher"][4]]
        within_data = [n for n in (1, 4) if data[model][n] <= data["teacher"][4]]
        assert verdict[model]["vs_teacher_4"] == (min(within_ref) if within_ref else None)
        assert verdict[model]["vs_teacher_best"] == (min(within_data) if within_data else None)
    assert verdict["teacher"]["vs_teacher_4"] is not None  # the teacher at 4 meets its own bar

    # the distilled student starts from round 2's and fits round 2's pairs at t = 1 only
    distill_state = json.loads(
        (
            out / "distill" / "student" / "checkpoints" / "last" / "training_state" / "reflow_state.json"
        ).read_text()
    )
    assert distill_state["settings"]["time_sampling"] == "noise-end"
    assert Path(distill_state["store"]["path"]).resolve() == (out / "round2" / "pairs").resolve()

    # a third run has nothing left to do
    again = run_pipeline(_cfg(tiny_world, out, distill=True))
    assert again.stages_run == [] and again.comparison["rows"] == comparison["rows"]


def _evals(out: Path) -> list[dict]:
    state = json.loads((out / PIPELINE_STATE).read_text())
    return [done for name, done in state["stages"].items() if name.endswith("/eval")]


def _same_errors(a: list[dict], b: list[dict]) -> bool:
    keys = ("num_steps", "mse_ref_norm", "mse_data_norm")
    return [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


def test_a_rerun_with_other_settings_is_refused(tiny_world, tmp_path):
    out = tmp_path / "recipe"
    with pytest.raises(CrashError):
        run_pipeline(_cfg(tiny_world, out, rounds=1), on_stage=_crash_at("round1/validate"))
    before = (out / PIPELINE_STATE).read_bytes()
    with pytest.raises(ReflowPairsError) as err:
        run_pipeline(_cfg(tiny_world, out, rounds=1, samples_per_frame=3))
    assert "`samples_per_frame` 2 -> 3" in err.value.what
    assert (out / PIPELINE_STATE).read_bytes() == before


def test_the_cli_prints_one_summary(tiny_world, tmp_path):
    out = tmp_path / "recipe"
    args = ["pipeline", "--teacher", str(tiny_world.teacher_dir), "--dataset", tiny_world.repo_id]
    args += ["--dataset-root", str(tiny_world.dataset_root), "--out", str(out), "--episodes", "0"]
    args += ["--rounds", "1", "--samples-per-frame", "2", "--num-steps", "4", "--train-steps", "2"]
    args += ["--batch-size", "4", "--spot-check", "2", "--eval-num-steps", "1,4", "--eval-episodes", "9"]
    args += ["--eval-max-frames", "2", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    state = json.loads((out / PIPELINE_STATE).read_text())
    assert list(state["stages"]) == ["round1/generate", "round1/validate", "round1/train", "round1/eval"]
    assert json.loads((out / "comparison" / "comparison.json").read_text())["models"] == ["teacher", "round1"]
    assert "round1" in result.output and "teacher" in result.output
    student = out / "round1" / "student" / STUDENT
    assert (
        f"next: lerobot-eval --policy.path={student} --env.type=..." in result.output
    )  # the recipe's student

    # every generate, train and eval stage left its command's options file, and the file reruns that stage alone
    files = {
        "generate": out / "round1" / "pairs" / "generate_config.yaml",
        "train": out / "round1" / "student" / "train_options.yaml",
        "eval": out / "round1" / "eval" / "eval_options.yaml",
    }
    for command, path in files.items():
        assert path.read_text().startswith(f"# reflowpairs {command} options"), command
        assert runner.invoke(app, [command, "--config", str(path), "--help"]).exit_code == 0, command
    rerun = runner.invoke(
        app, ["eval", "--config", str(files["eval"]), "--out", str(tmp_path / "eval_again")]
    )
    assert rerun.exit_code == 0, rerun.output
    again = json.loads((tmp_path / "eval_again" / "report.json").read_text())["rows"]
    first = json.loads((out / "round1" / "eval" / "report.json").read_text())["rows"]
    assert _same_errors(again, first)

    bad = runner.invoke(app, [*args[:-2], "--device", "cpu", "--samples-per-frame", "3"])
    assert bad.exit_code == 1
    assert "--samples-per-frame 2 -> 3" in bad.output  # the library's setting, worded as the flag


def test_a_bad_eval_steps_list_is_named_by_its_own_flag(tmp_path):
    """`--eval-num-steps` is parsed before anything loads; its error names that flag, not eval's `--num-steps`."""
    out = tmp_path / "recipe"
    args = ["pipeline", "--teacher", "t", "--dataset", "d", "--out", str(out), "--eval-num-steps", "1,a"]
    result = runner.invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "--eval-num-steps '1,a' has entries that are not positive whole numbers: 'a'." in text
    assert "Set --eval-num-steps to step counts of at least 1" in text and "Traceback" not in result.output
    assert not out.exists()
