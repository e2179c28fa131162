"""``build_gap_world``: the gap world's dataset, a local SmolVLM and a SmolVLA teacher trained on the dataset with
lerobot's ordinary flow-matching loss (``reflowpairs.tiny.world.build_tiny_teacher``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reflowpairs.tiny.gapworld.env import CHUNK, TASK
from reflowpairs.tiny.gapworld.record import GAP_REPO_ID, GapDatasetSpec, record_gap_dataset
from reflowpairs.tiny.world import TinyTeacherSpec, TinyWorld, VLMSpec, build_tiny_teacher, build_tiny_vlm

# chunk_size = n_action_steps = CHUNK: lerobot runs each chunk whole, so the first chunk commits to a gap
GAP_TEACHER = TinyTeacherSpec(chunk_size=CHUNK, train_steps=600, batch_size=32, lr=2e-3)
GAP_DATASET = GapDatasetSpec()
GAP_VLM = VLMSpec()


def build_gap_world(
    root: str | Path,
    dataset_spec: GapDatasetSpec = GAP_DATASET,
    teacher_spec: TinyTeacherSpec = GAP_TEACHER,
    vlm_spec: VLMSpec = GAP_VLM,
) -> TinyWorld:
    """Build ``vlm/``, ``dataset/`` (``reflowpairs/tiny_gap``) and ``teacher/`` under ``root``.

    The teacher's ``chunk_size`` and ``n_action_steps`` are both ``teacher_spec.chunk_size`` (``CHUNK`` unless
    told otherwise): the world is calibrated for chunks run whole."""
    root = Path(root).resolve()
    vlm_dir = build_tiny_vlm(root / "vlm", vlm_spec, tasks=(TASK,))
    dataset = record_gap_dataset(root / "dataset", GAP_REPO_ID, dataset_spec)
    teacher_dir = build_tiny_teacher(vlm_dir, dataset, root / "teacher", teacher_spec)
    return TinyWorld(root, vlm_dir, root / "dataset", GAP_REPO_ID, teacher_dir)


@dataclass(frozen=True)
class GapReflowRecipe:
    """The reflow recipe calibrated on the gap world (benchmarks/RESULTS.md, "Closed loop (#24)"), for the demo:

    1. ``reflowpairs generate --samples-per-frame {samples_per_frame} --num-steps {teacher_steps} --cache-features``
       on every frame of ``reflowpairs/tiny_gap``;
    2. ``reflowpairs train --steps {train_steps} --batch-size {batch_size} --lr {lr}`` (init: the teacher);
    3. ``reflowpairs train --init <step 2's student> --allow-mismatch --time-sampling noise-end
       --steps {distill_steps} --batch-size {batch_size} --lr {distill_lr}`` on the same pairs (the stage
       ``pipeline --distill`` runs). Step 2 alone gave 80% at 1 step against the teacher's 93.5%; with step 3, 90.5%.
    """

    samples_per_frame: int = 8
    teacher_steps: int = 10
    train_steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    distill_steps: int = 200
    distill_lr: float = 3e-4


GAP_REFLOW = GapReflowRecipe()
