"""``build_gap_world``: the gap world's dataset, a local SmolVLM and a SmolVLA teacher trained on the dataset with
lerobot's ordinary flow-matching loss (``reflowpairs.tinyworld.build_tiny_teacher``)."""

from __future__ import annotations

from pathlib import Path

from reflowpairs.gapworld.env import CHUNK, TASK
from reflowpairs.gapworld.record import GAP_REPO_ID, GapDatasetSpec, record_gap_dataset
from reflowpairs.tinyworld import TinyTeacherSpec, TinyWorld, VLMSpec, build_tiny_teacher, build_tiny_vlm

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
