"""`reflowpairs eval`: numbers checked against lerobot's own call path, report files, bad inputs."""

from __future__ import annotations

import copy
import io
import json
import math
import shlex
import shutil
import statistics
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from reflowpairs.cli.app import app
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.config import EvalConfig, parse_num_steps
from reflowpairs.eval.metrics import ErrorSums, pick_positions, straightness
from reflowpairs.eval.open_loop import evaluate
from reflowpairs.eval.report import (
    COLUMNS,
    format_value,
    log_ticks,
    markdown,
    next_text,
    report_notes,
    steps_vs_error_figure,
    table_rows,
    write_report,
)
from reflowpairs.eval.summary import next_step, recommend_steps

from .helpers import run_child, runner

STEPS = [1, 2, 5, 10]  # the tiny teacher samples with 10 steps


def _save_checkpoint(loaded, out: Path, preprocessor=None, postprocessor=None) -> Path:
    loaded.policy.save_pretrained(out)
    (preprocessor or loaded.preprocessor).save_pretrained(out)
    (postprocessor or loaded.postprocessor).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def perturbed_student(tiny_world, tmp_path_factory) -> Path:
    """The tiny teacher with noise added to its action head: a student that differs from its teacher."""
    from reflowpairs.teacher import load_policy

    loaded = load_policy(tiny_world.teacher_dir, "cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in loaded.policy.model.action_out_proj.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return _save_checkpoint(loaded, tmp_path_factory.mktemp("perturbed") / "student")


@pytest.fixture(scope="module")
def main_run(tiny_world, perturbed_student, tiny_store, tmp_path_factory):
    """One evaluation of the perturbed student on held-out episodes 8, 9, with the training store."""
    cfg = EvalConfig(
        student=str(perturbed_student),
        teacher=str(tiny_world.teacher_dir),
        dataset=tiny_world.repo_id,
        dataset_root=tiny_world.dataset_root,
        out=tmp_path_factory.mktemp("eval") / "report",
        episodes=[8, 9],
        num_steps=STEPS,
        pairs=tiny_store,
        max_frames=3,
        samples_per_frame=2,
        latency_repeats=3,
        device="cpu",
    )
    phases: list[str] = []
    report = evaluate(cfg, progress=lambda phase, done, total: phases.append(phase))
    files = write_report(report, cfg.out)
    return cfg, report, files, phases


def _row(report, model: str, steps: int) -> dict:
    return next(r for r in report["rows"] if r["model"] == model and r["num_steps"] == steps)


# --- numbers ---------------------------------------------------------------------------------------


def test_teacher_at_full_steps_is_the_reference(main_run):
    _, report, _, _ = main_run
    assert report["settings"]["reference_num_steps"] == 10
    row = _row(report, "teacher", 10)
    assert (row["mse_ref_norm"], row["l1_ref_norm"], row["mse_ref_units"], row["l1_ref_units"]) == (
        0.0,
        0.0,
        0.0,
        0.0,
    )
    assert row["mse_data_norm"] > 0  # the recorded chunk is not the teacher's sample


def test_teacher_error_decreases_with_steps(main_run):
    _, report, _, _ = main_run
    for key in ("mse_ref_norm", "l1_ref_norm", "mse_ref_units"):
        errors = [_row(report, "teacher", n)[key] for n in STEPS]
        assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), (key, errors)


def test_perturbed_student_differs_from_teacher(main_run):
    _, report, _, _ = main_run
    assert report["student"]["fingerprint"] != report["teacher"]["fingerprint"]
    assert report["student"]["same_action_normalisation"] is True
    assert all(_row(report, "student", n)["mse_ref_norm"] > 0 for n in STEPS)
    head = report["headline"]
    assert head["num_steps"] == 1
    assert head["ratio"] == pytest.approx(
        _row(report, "student", 1)["mse_ref_norm"] / _row(report, "teacher", 1)["mse_ref_norm"]
    )


def test_errors_match_lerobots_own_call_path(main_run, tiny_world, perturbed_student):
    """Recompute some report numbers with `policy.predict_action_chunk(batch, noise=)` frame by frame."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from reflowpairs.dataset import frame_indices
    from reflowpairs.noise import batch_noise
    from reflowpairs.teacher import load_policy

    cfg, report, _, _ = main_run
    teacher = load_policy(tiny_world.teacher_dir, "cpu")
    student = load_policy(perturbed_student, "cpu")
    chunk = teacher.config.chunk_size
    dataset = LeRobotDataset(
        tiny_world.repo_id,
        root=tiny_world.dataset_root,
        delta_timestamps={"action": [i / 10 for i in range(chunk)]},
    )
    position = {int(i): p for p, i in enumerate(frame_indices(dataset))}
    obs_index = report["frames"]["obs_index"]
    assert len(obs_index) == 3 and {int(dataset[position[i]]["episode_index"]) for i in obs_index} == {8, 9}
    noise = batch_noise(cfg.seed, obs_index, cfg.samples_per_frame, (chunk, teacher.config.max_action_dim))

    def sample(loaded, frame, x0, steps):
        saved = loaded.policy.config.num_steps
        loaded.policy.config.num_steps = steps
        try:
            loaded.policy.reset()
            return loaded.policy.predict_action_chunk(loaded.preprocessor(dict(frame)), noise=x0[None])[0]
        finally:
            loaded.policy.config.num_steps = saved

    teacher_1, student_2_units, data_units = ErrorSums(), ErrorSums(), ErrorSums()
    for f, i in enumerate(obs_index):
        frame = torch.utils.data.default_collate([dataset[position[i]]])
        inside = ~frame["action_is_pad"][0][:, None]
        for k in range(cfg.samples_per_frame):
            reference = sample(teacher, frame, noise[f, k], 10)
            teacher_1.add(sample(teacher, frame, noise[f, k], 1), reference)
            ref_units = teacher.postprocessor(reference[None])[0]
            student_2_units.add(
                student.postprocessor(sample(student, frame, noise[f, k], 2)[None])[0], ref_units
            )
            data_units.add(ref_units, frame["action"][0], inside)
    tol = {"rel": 1e-4, "abs": 1e-8}
    assert _row(report, "teacher", 1)["mse_ref_norm"] == pytest.approx(teacher_1.mse, **tol)
    assert _row(report, "teacher", 1)["l1_ref_norm"] == pytest.approx(teacher_1.l1, **tol)
    assert _row(report, "student", 2)["mse_ref_units"] == pytest.approx(student_2_units.mse, **tol)
    assert _row(report, "teacher", 10)["mse_data_units"] == pytest.approx(data_units.mse, **tol)
    assert data_units.count < 3 * cfg.samples_per_frame * chunk * 2  # the last frame's chunk is padded
    assert report["engine_check"]["max_abs_diff"] < 1e-4


def test_straightness_and_latency(main_run):
    _, report, _, phases = main_run
    for model in ("teacher", "student"):
        assert (
            abs(_row(report, model, 1)["straightness"]) < 1e-10
        )  # one Euler step is straight by construction
        assert all(_row(report, model, n)["straightness"] > 0 for n in STEPS[1:])
        assert all(_row(report, model, n)["latency_ms"] > 0 for n in STEPS)
    assert {"held-out frames", "latency", "training pairs"} <= set(phases)


def test_latency_is_the_median_of_repeated_calls(main_run):
    """--latency-repeats 3: three timed calls per row (after a warm-up), the median reported."""
    _, report, _, _ = main_run
    for row in report["rows"]:
        runs = row["latency_ms_runs"]
        assert len(runs) == 3 and all(t > 0 for t in runs)
        assert row["latency_ms"] == statistics.median(runs)


def test_lerobot_sampling_steps_restores_the_policy_config():
    """lerobot reads the step count from the config (the family's field): it is set for the block and restored, even
    on error."""
    from reflowpairs.policies import lerobot_sampling_steps

    resets = []
    policy = SimpleNamespace(
        config=SimpleNamespace(type="smolvla", num_steps=10), reset=lambda: resets.append(1)
    )
    with lerobot_sampling_steps(policy, 2):
        assert policy.config.num_steps == 2
    with pytest.raises(RuntimeError), lerobot_sampling_steps(policy, 3):
        raise RuntimeError("sampling failed")
    assert policy.config.num_steps == 10 and len(resets) == 2
    # pi0/pi05 read num_inference_steps: that is the field set
    pi = SimpleNamespace(config=SimpleNamespace(type="pi0", num_inference_steps=10), reset=lambda: None)
    with lerobot_sampling_steps(pi, 1):
        assert pi.config.num_inference_steps == 1 and not hasattr(pi.config, "num_steps")
    assert pi.config.num_inference_steps == 10


def test_next_step_recommends_few_steps_or_more_training(main_run):
    _, report, _, _ = main_run
    rows = [
        {"model": "student", "num_steps": n, "mse_ref_norm": e}
        for n, e in ((1, 0.05), (2, 0.0105), (4, 0.01), (10, 0.011))
    ]
    assert recommend_steps(rows) == 2  # the fewest within 1.1x of the lowest (0.01 at 4 steps)
    assert recommend_steps([{**r, "mse_ref_norm": None} for r in rows]) is None
    n = recommend_steps(report["rows"])
    assert report["next"]["num_steps"] == n
    override = "" if n == report["student"]["num_steps"] else f" --policy.num_steps={n}"
    assert report["next"]["command"] == (
        f"lerobot-eval --policy.path={report['student']['source']}{override} "
        "--policy.device=cpu --env.type=ENV --eval.n_episodes=50"
    )
    for saved in (
        n,
        n + 1,
    ):  # no step-count flag when the checkpoint already samples in the recommended count
        other = copy.deepcopy(report)
        other["student"]["num_steps"] = saved
        assert (f"--policy.num_steps={n}" in next_step(other)["command"]) is (saved != n)
        assert (
            f"saved with num_steps {saved}" in next_step(other)["why"]
            or f"saved to sample in {n} step" in next_step(other)["why"]
        )
    assert next_text(report) == f"next: {report['next']['command']}"
    assert f"```\n{report['next']['command']}\n```" in markdown(report)
    worse = copy.deepcopy(report)  # a student no better than its teacher, with a recorded run: train longer
    worse["headline"]["ratio"] = 1.5
    worse["student"]["training"] = {"run": "/runs/a", "store": "/pairs/a", "steps": 800, "step": 800}
    assert (
        next_step(worse)["command"]
        == "reflowpairs train --pairs /pairs/a --out /runs/a --resume --steps 1600"
    )
    assert "no better than the teacher at 1 step(s) (ratio 1.5)" in next_step(worse)["why"]


def test_next_step_commands_quote_paths_with_a_space():
    """The commands ``next_step`` gives paste as whole arguments when a path holds a space."""
    report = {
        "rows": [{"model": "student", "num_steps": n, "mse_ref_norm": e} for n, e in ((1, 0.02), (2, 0.01))],
        "student": {"source": "/my runs/student", "num_steps": 1},
        "headline": {"ratio": 0.5, "num_steps": 1},
        "settings": {"device": "cpu"},
    }
    assert shlex.split(next_step(report)["command"]) == [
        "lerobot-eval",
        "--policy.path=/my runs/student",
        "--policy.num_steps=2",
        "--policy.device=cpu",
        "--env.type=ENV",
        "--eval.n_episodes=50",
    ]
    assert next_text({"next": next_step(report)}) == "next: " + next_step(report)["command"]
    report["headline"]["ratio"] = 1.5
    report["student"]["training"] = {"run": "/my runs/a", "store": "/my pairs/a", "steps": 800, "step": 800}
    assert shlex.split(next_step(report)["command"]) == [
        "reflowpairs",
        "train",
        "--pairs",
        "/my pairs/a",
        "--out",
        "/my runs/a",
        "--resume",
        "--steps",
        "1600",
    ]


def test_training_pairs_section(main_run, tiny_store):
    _, report, _, _ = main_run
    pairs = report["pairs"]
    assert pairs["path"] == str(Path(tiny_store).resolve())
    assert pairs["same_teacher"] is True
    assert (
        pairs["num_frames"] == 3 and pairs["num_pairs"] == 6
    )  # --max-frames frames, K=2 stored samples each
    assert [r["num_steps"] for r in pairs["rows"]] == STEPS
    assert all(r["mse_norm"] > 0 for r in pairs["rows"])
    assert report["frames"]["episodes_in_store"] == []  # 8, 9 are held out of episodes 0-5


def test_caveats_about_the_training_pairs_are_noted(main_run):
    """Evaluated episodes that are in the store, or a store from another teacher, get a note (markdown and console);
    so does a student with no recorded training state (the perturbed student is a plain lerobot checkpoint)."""
    _, report, _, _ = main_run
    plain = report_notes(report)  # held-out episodes, same teacher
    assert len(plain) == 1 and plain[0].startswith("the student has no recorded training state")
    assert report["student"]["training"] is None and report["frames"]["training"]["status"] == "unrecorded"
    caveat = copy.deepcopy(report)
    caveat["frames"]["episodes_in_store"] = [8]
    caveat["pairs"]["same_teacher"] = False
    notes = report_notes(caveat)[1:]
    assert (
        len(notes) == 2 and "another teacher" in notes[0] and "episodes [8] are also in the store" in notes[1]
    )
    text = markdown(caveat)
    assert all(f"Note: {note}" in text for note in report_notes(caveat))


# --- pure metric functions -------------------------------------------------------------------------


def test_straightness_of_a_straight_and_a_bent_path():
    x_start = torch.randn(3, 4, 2)
    x_end = torch.randn(3, 4, 2)
    direction = x_start - x_end
    assert torch.allclose(
        straightness([direction, direction], x_start, x_end), torch.zeros(3, dtype=torch.float64)
    )
    bent = [direction + 1.0, direction - 1.0]  # mean still the direction; each off by 1 in every dimension
    assert torch.allclose(straightness(bent, x_start, x_end), torch.ones(3, dtype=torch.float64))


def test_error_sums_mask_and_pick_positions():
    sums = ErrorSums()
    pred, target = torch.tensor([[1.0, 3.0], [5.0, 0.0]]), torch.zeros(2, 2)
    sums.add(pred, target, torch.tensor([[True], [False]]))
    assert (sums.mse, sums.l1, sums.count) == (5.0, 2.0, 2)
    assert ErrorSums().mse is None
    assert pick_positions(5, 10).tolist() == [0, 1, 2, 3, 4]
    picked = pick_positions(100, 4)
    assert picked[0] == 0 and picked[-1] == 99 and len(picked) == 4


# --- report files ----------------------------------------------------------------------------------


def _printed_rows(text: str) -> list[list[str]]:
    """The teacher/student rows of the printed table, cell by cell (cells hold no spaces)."""
    rows = [line.split() for line in text.splitlines()]
    return [r for r in rows if len(r) == len(COLUMNS) and r[0] in ("teacher", "student")]


def _markdown_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| teacher") or ln.startswith("| student")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_report_files_agree_with_the_table(main_run):
    from rich.console import Console

    from reflowpairs.cli.eval_cmd import report_table

    _, report, files, _ = main_run
    assert json.loads(files.json.read_text()) == json.loads(json.dumps(report))
    shown = table_rows(report)
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(report_table(report))
    assert _printed_rows(console.export_text()) == shown
    markdown = files.markdown.read_text()
    assert _markdown_rows(markdown)[: len(shown)] == shown
    for row, cells in zip(json.loads(files.json.read_text())["rows"], shown, strict=False):
        for (key, _), cell in zip(COLUMNS, cells, strict=False):
            if isinstance(row[key], float):
                assert float(cell) == pytest.approx(row[key], rel=5e-3, abs=1e-300)
    assert (
        "student 1-step error / teacher 1-step error = " + format_value(report["headline"]["ratio"])
        in markdown
    )
    assert "Fitting vs generalising" in markdown
    assert (
        sorted(p.name for p in files.json.parent.iterdir() if p.name.startswith(".tmp-")) == []
    )  # all renamed


def test_report_is_written_through_the_fsyncing_atomic_helper(main_run, tmp_path, monkeypatch):
    from reflowpairs import atomic

    synced = []
    real_fsync_tree = atomic.fsync_tree
    monkeypatch.setattr(atomic, "fsync_tree", lambda path: synced.append(path.name) or real_fsync_tree(path))
    _, report, _, _ = main_run
    files = write_report(report, tmp_path / "again")
    assert synced == [f".tmp-{files.json.name}", f".tmp-{files.markdown.name}", f".tmp-{files.plot.name}"]
    assert json.loads(files.json.read_text()) == json.loads(json.dumps(report))


def test_table_fits_in_80_columns(main_run):
    """Rendered 80 wide, the table is exactly what it is 200 wide: nothing folded or squeezed, every cell whole."""
    from rich.console import Console

    from reflowpairs.cli.eval_cmd import pairs_table, report_table
    from reflowpairs.eval.report import pairs_rows

    _, report, _, _ = main_run
    for make in (report_table, pairs_table):
        texts = {}
        for width in (80, 200):
            console = Console(width=width, record=True, file=io.StringIO())
            console.print(make(report))
            texts[width] = [line.rstrip() for line in console.export_text().splitlines()]
        assert texts[80] == texts[200], make.__name__
        assert max(len(line) for line in texts[80]) <= 80
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(report_table(report))
    assert _printed_rows(console.export_text()) == table_rows(report)
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(pairs_table(report))
    printed = [line.split() for line in console.export_text().splitlines()]
    assert [r for r in printed if r and r[0].isdigit()] == pairs_rows(report)


def test_one_progress_bar_for_all_stages():
    from rich.progress import Progress

    from reflowpairs.cli.eval_cmd import StageBar

    bar = Progress(disable=True)
    stages = StageBar(bar)
    for phase, total in (("held-out frames", 3), ("latency", 8), ("training pairs", 2)):
        for done in range(1, total + 1):
            stages(phase, done, total)
    assert len(bar.tasks) == 1
    task = bar.tasks[0]
    assert (task.description, task.completed, task.total) == ("3. training pairs", 2, 2)


def test_log_ticks():
    assert log_ticks(0.0025, 0.05) == [0.005, 0.01, 0.02, 0.05]  # about one decade: several labels, not one
    assert log_ticks(0.3, 0.31) == [0.2, 0.3, 0.5]  # padded either side
    wide = log_ticks(1e-12, 1.0)
    assert 3 <= len(wide) <= 8 and all(
        math.log10(v) == round(math.log10(v)) for v in wide
    )  # powers of ten, thinned
    assert log_ticks(0.0, 1.0) == []


def test_plot_legend_off_the_data_and_readable_log_axis(main_run):
    _, report, _, _ = main_run
    fig = steps_vs_error_figure(report)
    fig.canvas.draw()
    (ax,) = fig.axes
    assert len(fig.legends) == 1 and not ax.get_legend()
    renderer = fig.canvas.get_renderer()
    assert not fig.legends[0].get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    lo, hi = ax.get_ylim()
    shown = [t for t in ax.yaxis.get_major_ticks() if lo <= t.get_loc() <= hi and t.label1.get_text()]
    assert len(shown) >= 3
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(n) for n in STEPS]


def test_plot_is_a_valid_png(main_run):
    from matplotlib.image import imread

    _, _, files, _ = main_run
    raw = files.plot.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    image = imread(files.plot)
    assert image.shape[:2] == (height, width) and width > 300 and height > 200
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert not any(p.name.startswith(".tmp-") for p in files.plot.parent.iterdir())


# --- a student with other action statistics ---------------------------------------------------------


def test_student_with_other_action_statistics(tiny_world, tmp_path):
    """Same weights, action mean shifted by +1 in the student's processors: its chunks are exactly 1 off
    in dataset units, and 1/std off in the teacher's normalised space."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_pre_post_processors

    from reflowpairs.teacher import load_policy

    loaded = load_policy(tiny_world.teacher_dir, "cpu")
    stats = LeRobotDatasetMetadata(tiny_world.repo_id, root=tiny_world.dataset_root).stats
    stats = {k: dict(v) for k, v in stats.items()}
    stats["action"]["mean"] = np.asarray(stats["action"]["mean"]) + 1.0
    pre, post = make_pre_post_processors(loaded.config, dataset_stats=stats)
    student = _save_checkpoint(loaded, tmp_path / "shifted", pre, post)
    report = evaluate(
        EvalConfig(
            student=str(student),
            teacher=str(tiny_world.teacher_dir),
            dataset=tiny_world.repo_id,
            dataset_root=tiny_world.dataset_root,
            out=tmp_path / "report",
            episodes=[9],
            num_steps=[10],
            max_frames=2,
            samples_per_frame=1,
            latency_repeats=1,
            device="cpu",
        )
    )
    row = _row(report, "student", 10)
    std = np.asarray(stats["action"]["std"], dtype=np.float64)
    assert report["student"]["same_action_normalisation"] is False
    assert row["mse_ref_units"] == pytest.approx(1.0, rel=1e-4)
    assert row["mse_ref_norm"] == pytest.approx(float(np.mean(1.0 / std**2)), rel=1e-3)
    assert report["headline"]["ratio"] is None  # the teacher's 10-step error is 0
    assert "n/a" in write_report(report, tmp_path / "report").markdown.read_text()


# --- the CLI on another shape of world -------------------------------------------------------------


@pytest.fixture(scope="module")
def other_store(other_world, tmp_path_factory) -> Path:
    from reflowpairs.generate.config import GenerateConfig
    from reflowpairs.generate.run import generate

    out = tmp_path_factory.mktemp("other_store") / "pairs"
    generate(
        GenerateConfig(
            teacher=str(other_world.teacher_dir),
            dataset=other_world.repo_id,
            dataset_root=other_world.dataset_root,
            out=out,
            episodes=[0],
            samples_per_frame=1,
            device="cpu",
        )
    )
    return out


def test_cli_on_other_world_teacher_as_student(other_world, other_store, tmp_path):
    out = tmp_path / "report"
    args = [
        "eval",
        "--student",
        str(other_world.teacher_dir),
        "--teacher",
        str(other_world.teacher_dir),
        "--dataset",
        other_world.repo_id,
        "--dataset-root",
        str(other_world.dataset_root),
        "--episodes",
        "1,2",
        "--num-steps",
        "1,3,6",
        "--out",
        str(out),
        "--pairs",
        str(other_store),
        "--max-frames",
        "3",
        "--samples-per-frame",
        "2",
        "--latency-repeats",
        "1",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["reference_num_steps"] == 6
    assert report["frames"]["count"] == 3 and report["dataset"]["episodes"] == [1, 2]
    for n in (1, 3, 6):  # the same checkpoint as teacher and student: identical rows
        t, s = _row(report, "teacher", n), _row(report, "student", n)
        assert {k: v for k, v in t.items() if k not in ("model", "latency_ms", "latency_ms_runs")} == {
            k: v for k, v in s.items() if k not in ("model", "latency_ms", "latency_ms_runs")
        }
    assert _row(report, "teacher", 6)["mse_ref_norm"] == 0.0
    assert _row(report, "teacher", 1)["mse_ref_norm"] > _row(report, "teacher", 3)["mse_ref_norm"] > 0
    # the teacher reproduces its own stored pairs: obs_index lookup and stored X_0 are right
    pairs = {r["num_steps"]: r["mse_norm"] for r in report["pairs"]["rows"]}
    assert pairs[6] < 1e-10 < pairs[1]
    # every printed row's cells are the report's values
    assert _printed_rows(result.output) == table_rows(report)
    assert "student 1-step error / teacher 1-step error = 1" in result.output
    for name in ("report.json", "report.md", "steps_vs_error.png"):
        assert str(out / name) in result.output.replace("\n", "")
        assert (out / name).stat().st_size > 0


# --- bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,a", "not positive whole numbers: '0', 'a'"),
        ("", "`num_steps` is empty"),
        ("1,-2", "'-2'"),
        ("2.5", "'2.5'"),
    ],
)
def test_bad_num_steps(text, message):
    with pytest.raises(ReflowPairsError) as err:
        parse_num_steps(text)
    assert message in str(err.value)


@pytest.mark.slow
def test_eval_settings_import_without_torch_or_lerobot():
    """The CLI builds EvalConfig and ClosedLoopConfig at start-up: reflowpairs.eval.config must not pull torch or
    lerobot in (a fresh interpreter, since this one has both)."""
    code = (
        "import sys, reflowpairs.eval, reflowpairs.eval.config, reflowpairs.progress; "
        "print(sorted(m for m in ('torch', 'lerobot') if m in sys.modules))"
    )
    result = run_child([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_num_steps_are_sorted_and_unique():
    assert parse_num_steps(" 10,1, 2,1") == [1, 2, 10]


def _cfg(world, tmp_path, **overrides) -> EvalConfig:
    settings = {
        "student": str(world.teacher_dir),
        "teacher": str(world.teacher_dir),
        "dataset": world.repo_id,
        "dataset_root": world.dataset_root,
        "out": tmp_path / "report",
        "episodes": [8, 9],
        "device": "cpu",
    }
    settings.update(overrides)
    return EvalConfig(**settings)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"samples_per_frame": 0}, "`samples_per_frame` must be at least 1, got 0"),
        ({"max_frames": 0}, "`max_frames` must be at least 1, got 0"),
        ({"latency_repeats": -1}, "`latency_repeats` must be at least 1, got -1"),
        ({"num_steps": [0, 2]}, "`num_steps` must be positive whole numbers"),
        (
            {"episodes": [3, 10, 42]},
            "`episodes` 10, 42 out of range: dataset reflowpairs/tiny_reach has 10 episodes",
        ),
        ({"episodes": []}, "`episodes` selects no episode"),
    ],
)
def test_bad_settings(tiny_world, tmp_path, overrides, message):
    with pytest.raises(ReflowPairsError) as err:
        evaluate(_cfg(tiny_world, tmp_path, **overrides))
    assert message in str(err.value)


def test_missing_checkpoints(tiny_world, tmp_path):
    with pytest.raises(ReflowPairsError) as err:
        evaluate(_cfg(tiny_world, tmp_path, student=str(tmp_path / "no_student")))
    assert str(err.value).startswith("`student`: Checkpoint") and "does not exist" in str(err.value)
    with pytest.raises(ReflowPairsError) as err:
        evaluate(_cfg(tiny_world, tmp_path, teacher=str(tmp_path / "no_teacher")))
    assert str(err.value).startswith("`teacher`: Checkpoint") and "no_teacher" in str(err.value)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(Path(tiny_world.teacher_dir) / "config.json", incomplete / "config.json")
    with pytest.raises(ReflowPairsError) as err:
        evaluate(_cfg(tiny_world, tmp_path, student=str(incomplete), latency_repeats=1, max_frames=1))
    assert "`student`" in str(err.value) and "model.safetensors" in str(err.value)


def test_student_with_other_features(tiny_world, other_world, tmp_path):
    with pytest.raises(ReflowPairsError) as err:
        evaluate(_cfg(tiny_world, tmp_path, student=str(other_world.teacher_dir)))
    message = str(err.value)
    assert "do not have the same features" in message
    assert "action is action (3,) in the student and action (2,) in the teacher" in message
    assert "observation.state is state (3,) in the student and state (2,) in the teacher" in message
    assert "chunk_size is 5 in the student and 8 in the teacher" in message


def test_out_is_a_file(tiny_world, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReflowPairsError) as err:
        evaluate(_cfg(tiny_world, tmp_path, out=tmp_path / "file"))
    assert "exists and is not a directory" in str(err.value)


def test_bad_pairs(tiny_world, tiny_store, other_store, tmp_path):
    with pytest.raises(ReflowPairsError) as err:
        evaluate(_cfg(tiny_world, tmp_path, pairs=tmp_path))
    assert "is not a pair store" in str(err.value)
    with pytest.raises(ReflowPairsError) as err:
        evaluate(_cfg(tiny_world, tmp_path, pairs=other_store))
    assert "holds X_0 (5, 4) and X_1 (5, 3), but the student samples noise (8, 6) into actions (8, 2)" in str(
        err.value
    )
    copy = tmp_path / "copy"
    shutil.copytree(tiny_store, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["dataset"]["fingerprint"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReflowPairsError) as err:
        evaluate(_cfg(tiny_world, tmp_path, pairs=copy))
    assert "was generated from another dataset than reflowpairs/tiny_reach" in str(err.value)


def test_cli_reports_bad_input_as_one_paragraph(tiny_world, tmp_path):
    args = [
        "eval",
        "--student",
        str(tiny_world.teacher_dir),
        "--teacher",
        str(tiny_world.teacher_dir),
        "--dataset",
        tiny_world.repo_id,
        "--out",
        str(tmp_path / "r"),
        "--num-steps",
        "0,a",
    ]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 1
    # the library names the setting (`num_steps`), the CLI prints its flag
    assert "--num-steps '0,a' has entries that are not positive whole numbers" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()
