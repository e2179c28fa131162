"""``reflowpairs eval``: how close a student gets to its teacher at few ODE steps, and how fast.

For frames of the chosen episodes and fixed noises X_0 = f(seed, obs_index, sample)
(``reflowpairs.noise``), the *reference* is the teacher's own Euler sampler at its config's full
``num_steps``. For the teacher and the student at each requested step count this measures:

- the error of the action chunk to the reference: MSE and L1 in the teacher's normalised action
  space and in dataset units (through the checkpoints' own postprocessors);
- the error to the dataset's recorded action chunk (``delta_timestamps`` chunks, padded positions
  past the episode end masked out with ``action_is_pad``);
- straightness of the sampled Euler path (``straightness``, documented in ``docs/eval.md``);
- latency of one action chunk through lerobot's plain ``policy.predict_action_chunk(batch, noise=)``
  with ``config.num_steps`` set to the step count (median over interleaved repeats after one warm-up).

A student written by ``reflowpairs train`` records its teacher and pair store in
``training_state/reflow_state.json``: another ``--teacher`` is refused (``--allow-mismatch``), and by
default only the episodes its store does not cover are evaluated (``--include-training-frames``).

Sampling for the error and straightness columns goes through ``reflowpairs.engine``: the prefix
(images, language, state) is computed once per frame and shared by every sample and step count.

``evaluate`` runs in four steps: ``check_inputs`` (everything, before any weights load), ``load_models``,
``measure`` (``sampling.measure_held_out``, ``latency.measure_latencies``, ``training_pairs``) and
``build_report`` (with ``summary``'s headline, labels and next command).

Conventions are lerobot's: t=1 is noise, t=0 the action, ``x_t = t*noise + (1-t)*action``, and the
velocity ``v = dx/dt`` points from action to noise (``u = noise - action``); Euler steps
``x <- x - v / n``. Shapes: B frames, K samples per frame, T = chunk_size, D0 = max_action_dim
(the noise), A = action dimension (the output, cropped from D0).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflowpairs.dataset import (
    check_episodes,
    check_features,
    dataset_fingerprint,
    dataset_provenance,
    frame_indices,
    open_dataset,
    open_metadata,
)
from reflowpairs.eval.checkpoints import (
    check_checkpoint_files,
    check_compatible,
    checkpoint_fingerprint,
    load_checkpoint,
    read_checkpoint_config,
)
from reflowpairs.eval.config import MODELS, EvalConfig, check_config
from reflowpairs.eval.latency import measure_latencies
from reflowpairs.eval.metrics import pick_positions
from reflowpairs.eval.sampling import ModelUnderEval, action_normalizer, measure_held_out, same_action_units
from reflowpairs.eval.student_training import (
    check_teacher,
    choose_episodes,
    read_student_state,
    student_state_file,
    training_frames,
    training_info,
)
from reflowpairs.eval.summary import headline, labels, next_step
from reflowpairs.eval.training_pairs import check_store_fits_student_and_dataset, measure_training_pairs
from reflowpairs.generate.job import software_versions
from reflowpairs.policies import config_num_steps, pair_shapes, step_field
from reflowpairs.progress import PhaseProgress
from reflowpairs.store.reader import PairStore
from reflowpairs.teacher import rename_map

REPORT_FORMAT = "reflowpairs.eval"
REPORT_VERSION = 1


@dataclass
class CheckedInputs:
    """What ``check_inputs`` found, before any weights are loaded."""

    steps: list[int]  # sorted, unique step counts
    store: PairStore | None  # ``--pairs``
    meta: Any  # the dataset's LeRobotDatasetMetadata
    dataset_fp: str
    state_file: Path | None  # the student's reflow_state.json (None: not written by ``reflowpairs train``)
    state: dict[str, Any] | None
    teacher_fp: dict[str, str]  # ``fingerprint_checkpoint`` of ``--teacher``
    teacher_check: dict[str, Any]  # the report's ``checks.teacher``
    training: dict[str, Any]  # ``training_frames``: the episodes the student trained on
    episodes: list[int]  # the episodes to evaluate on


@dataclass
class LoadedModels:
    """Both models, and the frames they are scored on."""

    teacher: ModelUnderEval
    student: ModelUnderEval
    same_units: bool  # both postprocessors unnormalise actions identically
    ref_steps: int  # the teacher's own step count: its sample there is the reference
    dataset: Any  # the evaluated episodes, with ``chunk_size`` action chunks (``delta_timestamps``)


@dataclass
class Measurements:
    """Every figure of the report's rows, its engine check and its ``--pairs`` section."""

    positions: np.ndarray  # dataset positions of the evaluated frames
    obs_index: np.ndarray  # their global frame indices
    rows: list[dict[str, Any]]  # one per (model, step count), ``MODELS`` order
    engine_gap: float  # largest |engine sample - the policy's own call| on the latency frame
    pairs: dict[str, Any] | None  # ``measure_training_pairs`` (None without ``--pairs``)


def check_inputs(cfg: EvalConfig) -> CheckedInputs:
    """Every input checked before any weights are loaded: settings, both checkpoints' configs, files and
    compatibility, the dataset and ``--episodes``, the ``--pairs`` store, the teacher the student was trained from,
    and which episodes it trained on (hence which to evaluate on)."""
    steps = check_config(cfg)
    store = PairStore(cfg.pairs) if cfg.pairs is not None else None
    teacher_config = read_checkpoint_config("`teacher`", cfg.teacher)
    student_config = read_checkpoint_config("`student`", cfg.student)
    check_checkpoint_files("`teacher`", cfg.teacher)
    check_checkpoint_files("`student`", cfg.student)
    check_compatible(teacher_config, student_config, cfg.teacher, cfg.student)
    meta = open_metadata(cfg.dataset, cfg.dataset_root)
    check_episodes(cfg.episodes, meta.total_episodes, cfg.dataset)
    dataset_fp = dataset_fingerprint(meta)
    if store is not None:
        check_store_fits_student_and_dataset(store, student_config, dataset_fp, cfg.dataset)
    state_file = student_state_file(cfg.student)
    state = read_student_state(cfg.student)
    teacher_fp = checkpoint_fingerprint("`teacher`", cfg.teacher)
    teacher_check = check_teacher(state, teacher_fp["fingerprint"], cfg)
    training = training_frames(state, cfg.pairs, meta, dataset_fp)
    episodes = choose_episodes(cfg, meta.total_episodes, training)
    return CheckedInputs(
        steps, store, meta, dataset_fp, state_file, state, teacher_fp, teacher_check, training, episodes
    )


def load_models(cfg: EvalConfig, checked: CheckedInputs) -> LoadedModels:
    """Load both checkpoints, check they read this dataset's features, and open the evaluated episodes with
    ``chunk_size`` action chunks. The student's actions are mapped into the teacher's normalised space unless both
    unnormalise identically."""
    teacher_loaded = load_checkpoint("`teacher`", cfg.teacher, cfg.device, checked.teacher_fp, cfg.tokenizer)
    student_loaded = load_checkpoint("`student`", cfg.student, cfg.device, tokenizer=cfg.tokenizer)
    check_features(teacher_loaded.config, checked.meta, rename_map(teacher_loaded.preprocessor))
    check_features(student_loaded.config, checked.meta, rename_map(student_loaded.preprocessor))
    chunk_size = pair_shapes(teacher_loaded.config)[0][0]
    ref_steps = config_num_steps(teacher_loaded.config)
    dataset = open_dataset(
        cfg.dataset,
        cfg.dataset_root,
        checked.episodes,
        delta_timestamps={"action": [i / checked.meta.fps for i in range(chunk_size)]},
    )
    teacher = ModelUnderEval("teacher", teacher_loaded)
    action_shape = (1, chunk_size, teacher.engine.action_dim)
    same_units = same_action_units(teacher_loaded, student_loaded, action_shape)
    student = ModelUnderEval(
        "student", student_loaded, None if same_units else action_normalizer(teacher_loaded.preprocessor)
    )
    return LoadedModels(teacher, student, same_units, ref_steps, dataset)


def measure(
    cfg: EvalConfig, checked: CheckedInputs, models: LoadedModels, progress: PhaseProgress | None
) -> Measurements:
    """Errors and straightness on the held-out frames, latencies on the first of them (and the engine checked
    against the policy's own call there), and with ``--pairs`` the student's error on its training pairs."""
    teacher, student, steps = models.teacher, models.student, checked.steps
    positions = pick_positions(len(models.dataset), cfg.max_frames)
    obs_index = frame_indices(models.dataset)[positions]
    with torch.no_grad():
        acc, first = measure_held_out(
            teacher, student, models.dataset, positions, steps, models.ref_steps, cfg, progress
        )
        latency, plain = measure_latencies(
            {"teacher": teacher, "student": student},
            first["raw"],
            first["noise"],
            steps,
            cfg.latency_repeats,
            progress,
        )
        engine_gap = max(float((plain[key] - first["engine"][key]).abs().max()) for key in plain)
        pairs = None
        if checked.store is not None:
            pairs = measure_training_pairs(
                student, checked.store, cfg, steps, teacher.loaded.fingerprint["fingerprint"], progress
            )
    rows = [acc[(m, n)].row(m, n, latency[(m, n)]) for m in MODELS for n in steps]
    return Measurements(positions, obs_index, rows, engine_gap, pairs)


def evaluate(cfg: EvalConfig, progress: PhaseProgress | None = None) -> dict[str, Any]:
    """Run the evaluation and return the report (a JSON-able dict; ``reflowpairs.eval.report`` writes it).

    Every input is checked (settings, both checkpoints' configs and their compatibility, the teacher the
    student was trained from, the dataset, and which episodes it trained on) before any weights are
    loaded. Without ``--episodes`` the student is scored on the episodes its training store does not cover."""
    checked = check_inputs(cfg)
    started = time.perf_counter()
    models = load_models(cfg, checked)
    measured = measure(cfg, checked, models, progress)
    return build_report(cfg, checked, models, measured, started)


def report_settings(cfg: EvalConfig, steps: list[int], ref_steps: int, device: str) -> dict[str, Any]:
    """The report's ``settings``: ``cfg`` as JSON, with the resolved step counts, reference and device."""
    settings = asdict(cfg)
    settings.update(
        out=str(Path(cfg.out).resolve()),
        dataset_root=str(cfg.dataset_root) if cfg.dataset_root is not None else None,
        pairs=str(cfg.pairs) if cfg.pairs is not None else None,
        num_steps=steps,
        reference_num_steps=ref_steps,
        solver="euler",
        device=device,
    )
    return settings


def frames_section(
    cfg: EvalConfig, training: dict[str, Any], evaluated: list[int], measured: Measurements
) -> dict[str, Any]:
    """The report's ``frames``: how many, from which episodes, how chosen, and which the student trained on."""
    trained = training["episodes"]
    return {
        "count": int(len(measured.positions)),
        "samples_per_frame": cfg.samples_per_frame,
        "episodes": evaluated,
        "selection": "given"
        if cfg.episodes is not None
        else ("held_out" if trained is not None and not cfg.include_training_frames else "all"),
        "training": {
            **training,
            "included": sorted(set(evaluated) & set(trained)) if trained is not None else None,
        },
        "obs_index": [int(i) for i in measured.obs_index],
    }


def build_report(
    cfg: EvalConfig, checked: CheckedInputs, models: LoadedModels, measured: Measurements, started: float
) -> dict[str, Any]:
    """The report dict (``docs/eval.md``); ``seconds`` counts from ``started`` (before the weights loaded)."""
    teacher_loaded, student_loaded = models.teacher.loaded, models.student.loaded
    evaluated = sorted(int(e) for e in checked.episodes)
    rows = measured.rows
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": report_settings(cfg, checked.steps, models.ref_steps, str(models.teacher.engine.device)),
        "teacher": {**teacher_loaded.provenance(), "num_steps": models.ref_steps},
        "student": {
            **student_loaded.provenance(),
            "num_steps": config_num_steps(student_loaded.config),
            "step_field": step_field(student_loaded.config.type),
            "same_action_normalisation": models.same_units,
            "training": training_info(checked.state, checked.state_file, checked.teacher_check),
        },
        "dataset": dataset_provenance(models.dataset, evaluated),
        "frames": frames_section(cfg, checked.training, evaluated, measured),
        "checks": {
            "teacher": checked.teacher_check,
            "allow_mismatch": cfg.allow_mismatch,
            "include_training_frames": cfg.include_training_frames,
        },
        "labels": labels(checked.teacher_check, checked.training, evaluated),
        "rows": rows,
        "headline": headline(rows),
        "pairs": measured.pairs,
        "engine_check": {
            "max_abs_diff": measured.engine_gap,
            "note": "largest |engine sample - policy.predict_action_chunk(batch, noise=)| over the latency frame, "
            "every model and step count (normalised units)",
        },
        "software": software_versions(),
        "seconds": time.perf_counter() - started,
    }
    pairs = measured.pairs
    if pairs is not None:
        total = checked.meta.total_episodes
        stored = set(pairs["episodes"] if pairs["episodes"] is not None else range(total))
        report["frames"]["episodes_in_store"] = sorted(set(evaluated) & stored)  # [] when truly held out
    report["next"] = next_step(report)
    return report
