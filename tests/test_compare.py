"""Several students in one report: ``reflowpairs.eval.compare`` (rows, verdict, refusals) and ``eval`` with repeated
``--student``."""

from __future__ import annotations

import copy
import json
import re

import pytest

from reflowpairs.cli import app
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.compare import compare_reports, verdict

from .helpers import runner


def _rows(model: str, ref: dict[int, float], data: dict[int, float]) -> list[dict]:
    return [
        {"model": model, "num_steps": n, "mse_ref_norm": ref[n], "mse_data_norm": data[n], "latency_ms": 1.0}
        for n in sorted(ref)
    ]


TEACHER = _rows("teacher", {1: 0.06, 4: 0.005, 10: 0.0}, {1: 0.09, 4: 0.03, 10: 0.025})


def _report(student_ref: dict[int, float], student_data: dict[int, float], source: str) -> dict:
    return {
        "teacher": {"fingerprint": "abc", "source": "t"},
        "student": {"source": source},
        "dataset": {"repo_id": "d"},
        "frames": {"obs_index": [1, 5, 9], "count": 3, "samples_per_frame": 2, "episodes": [9]},
        "settings": {"seed": 1, "samples_per_frame": 2, "reference_num_steps": 10, "num_steps": [1, 4, 10]},
        "rows": TEACHER + _rows("student", student_ref, student_data),
    }


def test_one_table_and_a_verdict_per_model():
    reports = {
        "round1": _report({1: 0.02, 4: 0.006, 10: 0.004}, {1: 0.04, 4: 0.03, 10: 0.028}, "r1"),
        "distill": _report({1: 0.004, 4: 0.01, 10: 0.02}, {1: 0.024, 4: 0.03, 10: 0.04}, "d"),
    }
    comparison = compare_reports(reports, {"round1": "r1/report.json", "distill": "d/report.json"})
    assert comparison["models"] == ["teacher", "round1", "distill"]
    assert [r["model"] for r in comparison["rows"]] == ["teacher"] * 3 + ["round1"] * 3 + ["distill"] * 3
    assert comparison["students"] == {"round1": "r1", "distill": "d"}
    assert comparison["verdict"] == {
        # as accurate on data as the teacher at 10 (0.025); as close to the reference as the teacher at 4 (0.005)
        "teacher": {"vs_teacher_best": 10, "vs_teacher_4": 4},
        "round1": {"vs_teacher_best": None, "vs_teacher_4": 10},
        "distill": {"vs_teacher_best": 1, "vs_teacher_4": 1},
    }


def test_without_the_reference_step_count_the_teachers_most_steps_set_the_bar():
    rows = _rows("teacher", {1: 0.06, 4: 0.005}, {1: 0.09, 4: 0.03}) + _rows(
        "s", {1: 0.01, 4: 0.004}, {1: 0.03, 4: 0.05}
    )
    assert verdict(rows, reference_steps=10)["s"] == {"vs_teacher_best": 1, "vs_teacher_4": 4}


@pytest.mark.parametrize(
    ("path", "what"),
    [
        (("frames", "obs_index"), "frames (obs_index)"),
        (("teacher", "fingerprint"), "teacher fingerprint"),
        (("settings", "seed"), "noise seed"),
    ],
)
def test_reports_that_measure_other_things_are_refused(path, what):
    a = _report({1: 0.02, 4: 0.006, 10: 0.004}, {1: 0.04, 4: 0.03, 10: 0.028}, "a")
    b = copy.deepcopy(a)
    b[path[0]][path[1]] = "other"
    with pytest.raises(ReflowPairsError, match=re.escape(f"differ in {what}")):
        compare_reports({"a": a, "b": b})


@pytest.mark.slow
def test_eval_with_two_students_writes_one_comparison(tiny_world, tmp_path):
    out = tmp_path / "cmp"
    teacher = str(tiny_world.teacher_dir)
    args = ["eval", "--student", f"a={teacher}", "--student", f"b={teacher}", "--teacher", teacher]
    args += [
        "--dataset",
        tiny_world.repo_id,
        "--dataset-root",
        str(tiny_world.dataset_root),
        "--out",
        str(out),
    ]
    args += [
        "--episodes",
        "9",
        "--max-frames",
        "2",
        "--num-steps",
        "1,2",
        "--latency-repeats",
        "1",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["models"] == ["teacher", "a", "b"]
    for label in ("a", "b"):
        assert (out / label / "report.json").exists()
    errors = {
        m: [(r["num_steps"], r["mse_ref_norm"]) for r in comparison["rows"] if r["model"] == m] for m in "ab"
    }
    assert errors["a"] == errors["b"]  # the same checkpoint, frames and noises: the same errors
    teacher_rows = [
        (r["num_steps"], r["mse_ref_norm"]) for r in comparison["rows"] if r["model"] == "teacher"
    ]
    assert errors["a"] == teacher_rows  # the teacher as its own student
    assert (out / "comparison.png").stat().st_size > 1000 and "## Verdict" in (
        out / "comparison.md"
    ).read_text()

    bad = runner.invoke(app, ["eval", "--student", f"a={teacher}", "--student", f"a={teacher}", *args[5:]])
    assert bad.exit_code == 2 and "the label 'a' is given twice" in " ".join(bad.output.split())
