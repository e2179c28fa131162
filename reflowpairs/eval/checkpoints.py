"""The two checkpoints of an open-loop evaluation: their configs, files, fingerprints and weights, with every error
naming the setting at fault (``student`` or ``teacher``), and whether the student can be compared with the teacher."""

from __future__ import annotations

from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import pair_shapes
from reflowpairs.teacher import (
    POSTPROCESSOR_FILE,
    PREPROCESSOR_FILE,
    checkpoint_file,
    fingerprint_checkpoint,
    load_policy,
    read_policy_config,
)


def _feature_text(feature) -> str:
    return f"{feature.type.name.lower()} {tuple(feature.shape)}"


def compatibility_problems(teacher_config, student_config) -> list[str]:
    """What stops the student from being compared with the teacher on the same frames and noises.

    Both must read the same input features (names, kinds and, for non-image inputs, shapes), write the
    same action, and take noise of the same ``(chunk_size, max_action_dim)``."""
    from lerobot.configs.types import FeatureType  # lerobot lazily: importing it takes seconds

    problems: list[str] = []
    for kind, t_features, s_features in (
        ("input", teacher_config.input_features, student_config.input_features),
        ("output", teacher_config.output_features, student_config.output_features),
    ):
        for key in sorted(set(t_features) | set(s_features)):
            t, s = t_features.get(key), s_features.get(key)
            if t is None:
                problems.append(f"the student has {kind} {key} ({_feature_text(s)}), the teacher has none")
            elif s is None:
                problems.append(f"the teacher has {kind} {key} ({_feature_text(t)}), the student has none")
            elif t.type != s.type or (t.type is not FeatureType.VISUAL and tuple(t.shape) != tuple(s.shape)):
                problems.append(
                    f"{key} is {_feature_text(s)} in the student and {_feature_text(t)} in the teacher"
                )
    # the noise shape by the family (the VLAs: (chunk_size, max_action_dim); multi_task_dit: (horizon, action dim))
    (t_noise, _), (s_noise, _) = pair_shapes(teacher_config), pair_shapes(student_config)
    for name, t, s in (("chunk_size", t_noise[0], s_noise[0]), ("max_action_dim", t_noise[1], s_noise[1])):
        if t != s:
            problems.append(f"{name} is {s} in the student and {t} in the teacher")
    return problems


def check_compatible(teacher_config, student_config, teacher: str, student: str) -> None:
    problems = compatibility_problems(teacher_config, student_config)
    if problems:
        raise ReflowPairsError(
            f"The student {student} and the teacher {teacher} do not have the same features: "
            + "; ".join(problems)
            + ".",
            "Evaluate a student trained from this teacher (same robot, cameras, action space and chunk size).",
        )


def read_checkpoint_config(flag: str, source: str):
    """The checkpoint's config, with errors that say whether the student or the teacher (``flag``) is at fault."""
    import lerobot.policies.factory  # noqa: F401 - lerobot lazily (seconds); registers the config types parsed here

    try:
        return read_policy_config(source)
    except ReflowPairsError as err:
        raise ReflowPairsError(f"{flag}: {err.what}", err.hint) from err


def check_checkpoint_files(flag: str, source: str) -> None:
    """Every file ``load_policy`` needs is there (weights and both processors), before anything loads."""
    for name in ("model.safetensors", PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        try:
            checkpoint_file(source, name)
        except ReflowPairsError as err:
            raise ReflowPairsError(f"{flag}: {err.what}", err.hint) from err


def load_checkpoint(
    flag: str,
    source: str,
    device: str,
    fingerprint: dict[str, str] | None = None,
    tokenizer: str | None = None,
):
    """``load_policy(source, device, fingerprint=..., tokenizer=...)``, its errors naming ``flag``."""
    try:
        return load_policy(source, device, fingerprint=fingerprint, tokenizer=tokenizer)
    except ReflowPairsError as err:
        raise ReflowPairsError(f"{flag}: {err.what}", err.hint) from err


def checkpoint_fingerprint(flag: str, source: str) -> dict[str, str]:
    """``fingerprint_checkpoint(source)``, its errors naming ``flag``."""
    try:
        return fingerprint_checkpoint(source)
    except ReflowPairsError as err:
        raise ReflowPairsError(f"{flag}: {err.what}", err.hint) from err
