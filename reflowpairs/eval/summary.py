"""What an open-loop report concludes: the headline ratio (student error / teacher error at the fewest steps), the
labels of a report that is not a plain held-out comparison, and the command to run next."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reflowpairs.eval.metrics import ratio
from reflowpairs.next_steps import lerobot_command, reflowpairs_command

NEXT_TOLERANCE = 1.1  # "next:" recommends the fewest steps within this factor of the student's lowest error


def headline(rows: list[dict[str, Any]], key: str = "mse_ref_norm") -> dict[str, Any]:
    """Student error / teacher error at the fewest steps evaluated (1 when asked for)."""
    fewest = min(r["num_steps"] for r in rows)
    pick = {r["model"]: r[key] for r in rows if r["num_steps"] == fewest}
    return {
        "num_steps": fewest,
        "metric": key,
        "student": pick.get("student"),
        "teacher": pick.get("teacher"),
        "ratio": ratio(pick.get("student"), pick.get("teacher")),
    }


def recommend_steps(
    rows: list[dict[str, Any]], tolerance: float = NEXT_TOLERANCE, key: str = "mse_ref_norm"
) -> int | None:
    """The fewest step counts at which the student's error is within ``tolerance`` times its lowest error
    over the evaluated counts: more steps than that buy little accuracy for their latency. None when the
    student has no error figures."""
    errors = {r["num_steps"]: r[key] for r in rows if r["model"] == "student" and r[key] is not None}
    if not errors:
        return None
    best = min(errors.values())
    return min(n for n, e in errors.items() if e <= best * tolerance)


def next_step(report: dict[str, Any]) -> dict[str, Any]:
    """What to run after this evaluation: the lerobot-eval command for the student at the recommended step
    count (``recommend_steps``), or, when the student is no better than the teacher at the fewest steps,
    more training. ``{"num_steps", "rule", "command", "why"}``."""
    n = recommend_steps(report["rows"])
    student = report["student"]["source"]
    rule = (
        f"the fewest steps with the student's MSE to the reference within {NEXT_TOLERANCE:g}x of its lowest"
    )
    head = report["headline"]
    training = report["student"].get("training") or {}
    if head["ratio"] is not None and head["ratio"] >= 1 and training.get("run") and training.get("store"):
        return {
            "num_steps": n,
            "rule": rule,
            "why": f"the student is no better than the teacher at {head['num_steps']} step(s) (ratio "
            f"{head['ratio']:.3g}): train it longer",
            "command": reflowpairs_command(
                "train",
                pairs=training["store"],
                out=training["run"],
                resume=True,
                steps=2 * int(training["steps"] or training["step"] or 1),
            ),
        }
    saved = report["student"].get("num_steps")
    field = report["student"].get("step_field", "num_steps")  # the policy family's step-count field
    if n == saved:  # the checkpoint already samples in n steps: lerobot-eval needs no step-count flag
        why, override = f"the student is saved to sample in {n} step{'s' if n != 1 else ''}, {rule}", None
    else:
        why, override = f"--policy.{field}={n}: {rule} (the checkpoint is saved with {field} {saved})", n
    return {
        "num_steps": n,
        "saved_num_steps": saved,
        "rule": rule,
        "why": f"{why}; set ENV to your lerobot env type",
        "command": lerobot_command(
            "lerobot-eval",
            **{
                "policy.path": student,
                f"policy.{field}": override,
                "policy.device": report["settings"]["device"],
                "env.type": "ENV",
                "eval.n_episodes": 50,
            },
        ),
    }


def labels(teacher_check: dict[str, Any], training: dict[str, Any], evaluated: Sequence[int]) -> list[str]:
    """Short labels for a report that is not a plain held-out comparison with the student's own teacher
    (shown on the console, in report.md and on the plot)."""
    out = []
    if teacher_check["matches"] is False:
        out.append("TEACHER MISMATCH (--allow-mismatch)")
    if training["episodes"] and set(evaluated) & set(training["episodes"]):
        out.append("TRAINING FRAMES INCLUDED (--include-training-frames)")
    return out
