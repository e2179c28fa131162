"""Rectified flow's recipe in one resumable run: R rounds of reflow, each round's student the next round's teacher.

    round r:  generate (teacher_r -> pairs) -> validate -> train (student_r) -> eval (student_r vs the teacher)
    teacher_1 = the given teacher, teacher_{r+1} = student_r (1-RF -> 2-RF -> 3-RF ...)
    distil (optional, last): the 1-step map x_0 -> x_1 fitted on round R's pairs, starting from student_R

Every artefact lives under ``out``:

    out/pipeline_state.json            the settings and every finished stage (with its result)
    out/round<r>/pairs/                 the round's pair store (``generate``) and its generate_config.yaml
    out/round<r>/validate.json          its validation report
    out/round<r>/student/               the round's training run (``train``; the student is checkpoints/last)
    out/round<r>/eval/                  the student against the ORIGINAL teacher (``eval``)
    out/distill/student/, out/distill/eval/
    out/comparison/                     every model side by side: comparison.json, .md, .png (``compare``)
    out/closed_loop/                    with ``env_type``: every student and the teacher in closed loop
                                        (``reflowpairs.eval.closed_loop``: closed_loop.json, .md, .png, cells/)

The feature cache (docs/feature-cache.md): round 1's generate caches each frame's frozen image embeddings whenever
the student's config allows it (``cached_features.student_cache_problems``, the check ``train`` applies: vision encoder
and projector frozen, ``train_expert_only``); every later round generates with ``features_from`` round 1's store (its
teacher, the previous student, shares those frozen weights), so no vision encoder runs in a later generate, and each
round's store carries the features on; every train stage then uses its store's cache. Each generate and train stage
records what it did (``feature_cache``), and ``pipeline_state.json``'s ``feature_cache`` sums it up
(``feature_cache_summary``).

Each generate, train and eval stage leaves the options file its command writes (``reflowpairs.options_file``:
``generate_config.yaml`` beside the store's manifest, ``train_options.yaml``, ``eval_options.yaml``), so that
``reflowpairs COMMAND --config FILE`` reruns that one stage on its own.

A stage is recorded in ``pipeline_state.json`` only once it has finished, so a crash at any point loses at most the
stage in progress, and that stage itself resumes where it stopped (``generate`` and ``train`` have their own resume):
running the same pipeline again skips every finished stage. Settings that would change what finished stages made
are refused on a rerun.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from reflowpairs.atomic import load_json_object, write_json_atomically
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.closed_loop import evaluate_closed_loop
from reflowpairs.eval.closed_loop_env import check_env_package, check_features, make_env_config
from reflowpairs.eval.closed_loop_report import write_closed_loop_report
from reflowpairs.eval.compare import add_closed_loop, compare_reports, read_report, write_comparison
from reflowpairs.eval.config import ClosedLoopConfig, EvalConfig
from reflowpairs.eval.open_loop import evaluate
from reflowpairs.eval.report import write_report
from reflowpairs.generate.config import GenerateConfig
from reflowpairs.generate.run import generate
from reflowpairs.next_steps import lerobot_command
from reflowpairs.options_file import EVAL_OPTIONS, TRAIN_OPTIONS, config_options, plain_value, write_options
from reflowpairs.pipeline_config import PIPELINE_STATE, STATE_VERSION, STUDENT, PipelineConfig
from reflowpairs.progress import PhaseProgress
from reflowpairs.store.layout import GENERATE_OPTIONS
from reflowpairs.store_features import read_index
from reflowpairs.train.config import TrainConfig
from reflowpairs.train.loop import train
from reflowpairs.validate.checks import validate
from reflowpairs.validate.config import ValidateConfig


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: ``name`` (``round2/train``) and ``run(progress)``, which returns its result."""

    name: str
    run: Callable[[PhaseProgress], dict[str, Any]]


def _prefixed(progress: PhaseProgress | None, stage: str, phase: str, done: int, total: int) -> None:
    if progress is not None:
        progress(f"{stage}: {phase}", done, total)


@dataclass
class PipelineResult:
    out: Path
    stages_run: list[str]  # stages this call ran (the others had finished before)
    stages_skipped: list[str]
    comparison: dict[str, Any]  # every model side by side (``reflowpairs.eval.compare``), out/comparison/
    feature_cache: dict[str, str] = field(default_factory=dict)  # stage -> what it did with the cache
    closed_loop: dict[str, Any] | None = None  # with ``env_type``: the closed-loop report, out/closed_loop/
    next_command: str = ""  # lerobot-eval on the recipe's student (``use_student_command``), shell-quoted


# Settings that decide what the finished stages made: a rerun must keep them.
_FIXED = (
    "teacher",
    "dataset",
    "episodes",
    "samples_per_frame",
    "num_steps",
    "train_steps",
    "batch_size",
    "lr",
)
_FIXED += ("loss", "seed", "distill_steps", "eval_num_steps", "eval_episodes", "eval_max_frames")


def _settings(cfg: PipelineConfig) -> dict[str, Any]:
    raw = dataclasses.asdict(cfg)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in raw.items()}


def check_config(cfg: PipelineConfig) -> None:
    """Refuse settings no stage could run with."""
    if cfg.rounds < 1:
        raise ReflowPairsError(
            f"`rounds` must be at least 1, got {cfg.rounds}.", "Set `rounds` to 1 or more."
        )
    for name in ("train_steps", "samples_per_frame", "eval_max_frames"):
        if getattr(cfg, name) < 1:
            raise ReflowPairsError(f"`{name}` must be at least 1, got {getattr(cfg, name)}.")
    if cfg.distill_steps is not None and cfg.distill_steps < 1:
        raise ReflowPairsError(f"`distill_steps` must be at least 1, got {cfg.distill_steps}.")
    if cfg.env_type is not None:
        check_closed_loop(cfg)


def closed_loop_config(cfg: PipelineConfig, students: dict[str, str]):
    """The ``ClosedLoopConfig`` of the pipeline's closed-loop stage (its own checks run as it is built): every
    student at ``eval_num_steps``, the teacher at 1 step and its full count, in ``out/closed_loop``."""

    return ClosedLoopConfig(
        env_type=cfg.env_type,
        env_options=cfg.env_options,
        teacher=cfg.teacher,
        students=students,
        out=Path(cfg.out) / "closed_loop",
        num_steps=tuple(cfg.eval_num_steps),
        teacher_num_steps=(1,),  # and its full step count, always added
        n_episodes=cfg.env_episodes,
        batch_size=cfg.env_batch_size,
        use_async_envs=cfg.env_use_async_envs,
        device=cfg.device,
        tokenizer=cfg.tokenizer,
    )


def check_closed_loop(cfg: PipelineConfig) -> None:
    """With ``env_type``: what the closed-loop stage needs, checked before any round runs (``ReflowPairsError``):
    its config, the env type and its ``--env.FIELD`` options, the simulator package (its pip extra named), and the
    teacher's inputs against the env's observations (the students share them)."""

    closed_loop_config(cfg, {})
    env_cfg = make_env_config(cfg.env_type, cfg.env_options)
    check_env_package(env_cfg)
    check_features(env_cfg, "teacher", cfg.teacher)


def read_state(out: Path) -> dict[str, Any] | None:
    """The pipeline state in ``out`` (None for a new pipeline)."""

    path = Path(out) / PIPELINE_STATE
    if not path.exists():
        return None
    return load_json_object(path)


def _check_rerun(cfg: PipelineConfig, state: dict[str, Any]) -> None:
    recorded = state.get("settings", {})
    changed = [k for k in _FIXED if recorded.get(k) != _settings(cfg).get(k)]
    if changed:
        detail = ", ".join(f"`{k}` {recorded.get(k)!r} -> {_settings(cfg).get(k)!r}" for k in changed)
        raise ReflowPairsError(
            f"`out` {cfg.out} holds a pipeline run with other settings ({detail}).",
            "Rerun it with its own settings to finish it (they are in its pipeline_state.json), or choose another "
            "`out`.",
        )


def teacher_of_round(cfg: PipelineConfig, r: int) -> str:
    """Round 1 samples the given teacher; round r > 1 the student of round r - 1."""
    return cfg.teacher if r == 1 else str(Path(cfg.out) / f"round{r - 1}" / "student" / STUDENT)


def features_source(cfg: PipelineConfig, r: int) -> str | None:
    """The store round ``r`` reads its image embeddings from (``features_from``): round 1's, when r > 1 and round 1
    cached them; else None (round 1 computes them itself, caching them when the student allows)."""

    first = Path(cfg.out) / "round1" / "pairs"
    return str(first) if r > 1 and read_index(first) is not None else None


_CHECKPOINTS = ("teacher", "init", "student", "features_from")  # text settings that may name a local path


def _local(source: str | None) -> str | Path | None:
    """``source`` as a path when it names a local one (written absolute), else as it is (a hub repo id)."""
    return Path(source) if source is not None and Path(source).expanduser().exists() else source


def write_stage_options(cfg: PipelineConfig, command: str, config: Any, path: Path, **values: Any) -> None:
    """The options file ``reflowpairs COMMAND`` writes, for a stage that ran ``config`` (``GenerateConfig``,
    ``TrainConfig``, ``EvalConfig``) with ``values`` (field -> value) replacing some: ``--config path`` reruns the
    stage on its own. Local checkpoint paths are written absolute; a file of the user's at ``path`` is left alone."""
    fields = {field.name for field in dataclasses.fields(config)}
    for name in fields.intersection(_CHECKPOINTS):
        values.setdefault(name, _local(getattr(config, name)))
    options = config_options(command, config, values)
    options["tokenizer"] = plain_value(_local(cfg.tokenizer))
    write_options(path, command, options)


def _generate(cfg: PipelineConfig, r: int, progress: PhaseProgress) -> dict[str, Any]:
    pairs = Path(cfg.out) / f"round{r}" / "pairs"
    source = features_source(cfg, r)
    gen = GenerateConfig(
        teacher=teacher_of_round(cfg, r),
        dataset=cfg.dataset,
        out=pairs,
        dataset_root=cfg.dataset_root,
        episodes=cfg.episodes,
        samples_per_frame=cfg.samples_per_frame,
        num_steps=cfg.num_steps,
        seed=cfg.seed + r - 1,  # fresh noises each round
        device=cfg.device,
        tokenizer=cfg.tokenizer,
        resume=(pairs / "manifest.json").exists(),  # a crash mid-store: finish it
        # the feature cache: computed once, in round 1, when train can use it; later rounds run no vision encoder
        cache_features_if_allowed=r == 1,
        features_from=source,
        threads=cfg.threads,
    )
    total = [0]

    def on_plan(plan) -> None:
        total[0] = plan.frames_to_do

    result = generate(
        gen, progress=lambda frames, _pairs, _s: progress("frames", frames, total[0]), on_plan=on_plan
    )
    cached = read_index(pairs) is not None
    write_stage_options(cfg, "generate", gen, pairs / GENERATE_OPTIONS, cache_features=cached)
    how = f"read from {source}" if source else ("computed and cached" if cached else "not cached")
    return {
        "pairs": str(pairs),
        "num_pairs": result.num_pairs,
        "seconds": round(result.seconds, 3),
        "feature_cache": how,
    }


def _validate(cfg: PipelineConfig, r: int, progress: PhaseProgress) -> dict[str, Any]:
    round_dir = Path(cfg.out) / f"round{r}"
    report = validate(
        ValidateConfig(
            store=round_dir / "pairs",
            dataset_root=cfg.dataset_root,
            spot_check=cfg.spot_check,
            seed=cfg.seed,
            device=cfg.device,
            tokenizer=cfg.tokenizer,
        ),
        progress=progress,
    )
    write_json_atomically(round_dir / "validate.json", report.to_dict() | {"summary": report.summary()})
    if not report.ok:
        raise ReflowPairsError(
            f"Round {r}'s pair store is {report.status}: {report.summary()}",
            f"See {round_dir / 'validate.json'}; remove {round_dir} and rerun the pipeline to make it again.",
        )
    return {"status": report.status}


def _train(
    cfg: PipelineConfig,
    progress: PhaseProgress,
    run_dir: Path,
    pairs: Path,
    init: str | None,
    steps: int,
    **extra,
) -> dict:
    plans: list = []  # train's plans (reflowpairs.train.planning.TrainPlan) says whether it uses the store's feature cache
    train_cfg = TrainConfig(
        pairs=pairs,
        out=run_dir,
        steps=steps,
        init=init,
        dataset_root=cfg.dataset_root,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        device=cfg.device,
        tokenizer=cfg.tokenizer,
        num_workers=cfg.num_workers,
        threads=cfg.threads,
        save_every=steps,
        resume=(run_dir / "checkpoints" / "last").exists(),  # a crash mid-run: continue it
        **extra,
    )
    result = train(
        train_cfg,
        progress=lambda step, total, _loss: progress("steps", step, total),
        on_plan=lambda plan: plans.append(plan),
    )
    write_stage_options(cfg, "train", train_cfg, run_dir / TRAIN_OPTIONS)
    cache = plans[0].feature_cache if plans else None
    return {
        "student": str(run_dir / STUDENT),
        "final_loss": result.final_loss,
        "seconds": round(result.seconds, 3),
        "feature_cache": f"used ({cache['path']})" if cache else "not used",
    }


def _eval(cfg: PipelineConfig, student: Path, out: Path, progress: PhaseProgress) -> dict[str, Any]:
    eval_cfg = EvalConfig(
        student=str(student),
        teacher=cfg.teacher,  # every model is scored against the ORIGINAL teacher's full-step sample
        dataset=cfg.dataset,
        out=out,
        num_steps=cfg.eval_num_steps,
        dataset_root=cfg.dataset_root,
        episodes=cfg.eval_episodes,
        max_frames=cfg.eval_max_frames,
        device=cfg.device,
        tokenizer=cfg.tokenizer,
        allow_mismatch=True,  # a later round's student was trained from the previous student, by design
    )
    report = evaluate(eval_cfg, progress=progress)
    files = write_report(report, out)
    write_stage_options(cfg, "eval", eval_cfg, out / EVAL_OPTIONS)
    return {"report": str(files.json)}


def final_student(cfg: PipelineConfig) -> Path:
    """The recipe's student: the distilled one with ``distill``, else the last round's."""
    last = Path(cfg.out) / ("distill" if cfg.distill else f"round{cfg.rounds}")
    return last / "student" / STUDENT


def use_student_command(cfg: PipelineConfig) -> str:
    """``lerobot-eval --policy.path=STUDENT --env.type=ENV``: lerobot's own evaluation of the recipe's student at its
    saved step count (``ENV``: ``env_type``, or ``...`` for the user to fill in)."""
    return lerobot_command(
        "lerobot-eval", **{"policy.path": final_student(cfg), "env.type": cfg.env_type or "..."}
    )


def stages(cfg: PipelineConfig) -> list[Stage]:
    """Every stage of the pipeline, in order."""
    out = Path(cfg.out)
    todo: list[Stage] = []
    for r in range(1, cfg.rounds + 1):
        run_dir, pairs = out / f"round{r}" / "student", out / f"round{r}" / "pairs"
        todo += [
            Stage(f"round{r}/generate", partial(_generate, cfg, r)),
            Stage(f"round{r}/validate", partial(_validate, cfg, r)),
            Stage(
                f"round{r}/train",
                lambda p, d=run_dir, s=pairs: _train(cfg, p, d, s, None, cfg.train_steps, loss=cfg.loss),
            ),
            Stage(
                f"round{r}/eval",
                lambda p, d=run_dir, r=r: _eval(cfg, d / STUDENT, out / f"round{r}" / "eval", p),
            ),
        ]
    if cfg.distill:
        last, run_dir = out / f"round{cfg.rounds}", out / "distill" / "student"
        distill = {
            "time_sampling": "noise-end",  # the 1-step map x_0 -> x_1 (timesampling.py)
            "loss": cfg.loss,
            "allow_mismatch": True,  # starts from round R's student, fits round R's teacher's pairs
        }
        steps = cfg.distill_steps or cfg.train_steps
        init = str(last / "student" / STUDENT)
        todo += [
            Stage("distill/train", lambda p: _train(cfg, p, run_dir, last / "pairs", init, steps, **distill)),
            Stage("distill/eval", lambda p: _eval(cfg, run_dir / STUDENT, out / "distill" / "eval", p)),
        ]
    return todo


def feature_cache_summary(state: dict[str, Any]) -> dict[str, str]:
    """What each generate and train stage did with the feature cache (stage -> "computed and cached", "read from
    ...", "used (...)", "not used", ...), in stage order; stages recorded before the cache was wired are left out."""
    return {name: done["feature_cache"] for name, done in state["stages"].items() if "feature_cache" in done}


def _compare(state: dict[str, Any], out: Path) -> dict[str, Any]:
    """Every model's eval report side by side (``reflowpairs.eval.compare``) in ``out/comparison``."""

    sources = {
        name.split("/")[0]: done["report"] for name, done in state["stages"].items() if name.endswith("/eval")
    }
    comparison = compare_reports({label: read_report(path) for label, path in sources.items()}, sources)
    files = write_comparison(comparison, out / "comparison")
    return {"comparison": str(files["json"]), "verdict": comparison["verdict"]}


def _closed_loop(
    cfg: PipelineConfig, state: dict[str, Any], out: Path, progress: PhaseProgress | None
) -> dict:
    """Every student of ``state`` and the teacher in closed loop (``reflowpairs.eval.closed_loop``) in ``out/closed_loop``;
    finished cells are kept there, so a rerun (or one with more rounds) runs only the new ones."""

    students = {
        name.split("/")[0]: done["student"]
        for name, done in state["stages"].items()
        if name.endswith("/train")
    }
    report = evaluate_closed_loop(
        closed_loop_config(cfg, students), progress=partial(_prefixed, progress, "closed_loop")
    )
    files = write_closed_loop_report(report, out / "closed_loop")
    return {"report": str(files.json), "verdict": report["verdict"], "reference": report["reference"]}


def run_pipeline(
    cfg: PipelineConfig,
    progress: PhaseProgress | None = None,
    on_stage: Callable[[str, bool], None] | None = None,
) -> PipelineResult:
    """Run every stage not finished yet; ``on_stage(name, skipped)`` is called as each one starts (or is skipped),
    ``progress(f"{stage}: {phase}", done, total)`` as its work goes (``frames``, ``steps``, validate's and eval's
    own phases)."""
    check_config(cfg)
    out = Path(cfg.out)
    state = read_state(out)
    if state is None:
        out.mkdir(parents=True, exist_ok=True)
        state = {"version": STATE_VERSION, "settings": _settings(cfg), "stages": {}}
    else:
        _check_rerun(cfg, state)
        state["settings"] = _settings(cfg)  # the settings not in _FIXED (device, workers...) may change
    ran, skipped = [], []
    for stage in stages(cfg):
        if stage.name in state["stages"]:
            skipped.append(stage.name)
            if on_stage:
                on_stage(stage.name, True)
            continue
        if on_stage:
            on_stage(stage.name, False)
        state["stages"][stage.name] = stage.run(partial(_prefixed, progress, stage.name))
        write_json_atomically(out / PIPELINE_STATE, state)
        ran.append(stage.name)
    state["comparison"] = _compare(state, out)  # always anew: a rerun with more rounds adds models
    state["feature_cache"] = feature_cache_summary(state)
    write_json_atomically(out / PIPELINE_STATE, state)

    comparison = read_report(state["comparison"]["comparison"])
    closed_loop = None
    if cfg.env_type is not None:
        state["closed_loop"] = _closed_loop(cfg, state, out, progress)
        write_json_atomically(out / PIPELINE_STATE, state)
        closed_loop = read_report(state["closed_loop"]["report"])
        # the one comparison the pipeline prints and writes: closed-loop success beside the open-loop error
        comparison = add_closed_loop(comparison, closed_loop, state["closed_loop"]["report"])
        write_comparison(comparison, out / "comparison")
    return PipelineResult(
        out=out,
        stages_run=ran,
        stages_skipped=skipped,
        comparison=comparison,
        feature_cache=state["feature_cache"],
        closed_loop=closed_loop,
        next_command=use_student_command(cfg),
    )
