"""pi0 and pi05 teachers through the command line: generate -> validate --spot-check -> train -> eval, on tiny
teachers (``reflowpairs.tinypi``) built over the session's tiny world dataset.

A tiny checkpoint carries ``tinypi.TINY_MARKER``; ``load_policy`` applies its size patch for that checkpoint's
``from_pretrained`` only (the documented test-fixture route), so the CLI loads it in this process and in a fresh one
(``test_generate_in_a_fresh_process``). Everything runs in float32 on the CPU."""

from __future__ import annotations

import json
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch

from reflowpairs import tinypi
from reflowpairs.dataset import open_dataset
from reflowpairs.pairstore import Pairs, PairStore
from reflowpairs.policies._pi_common import check_weights_loaded
from reflowpairs.teacher import load_policy

from .helpers import cli

VARIANTS = ("pi0", "pi05")
GENERATE = ("--episodes", "0", "--samples-per-frame", "2", "--num-steps", "3", "--batch-size", "8")
GENERATE += ("--shard-size", "16", "--device", "cpu")


@pytest.fixture(scope="module")
def pi_teachers(tiny_world, tmp_path_factory) -> dict[str, Path]:
    """Tiny pi0 and pi05 teachers (2 training steps) for the tiny world's dataset: ``{variant: checkpoint dir}``."""
    root = tmp_path_factory.mktemp("pi_teachers")
    tokenizer = tinypi.build_pi_tokenizer(root / "tokenizer")
    return {
        variant: tinypi.build_tiny_pi_teacher(
            root / variant,
            variant,
            tiny_world.repo_id,
            tiny_world.dataset_root,
            tokenizer_dir=tokenizer,
            spec=tinypi.TinyPiSpec(train_steps=2),
        )
        for variant in VARIANTS
    }


def _policy_class(variant: str):
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy
    from lerobot.policies.pi05.modeling_pi05 import PI05Policy

    return PI0Policy if variant == "pi0" else PI05Policy


def _read(store: Path) -> Pairs:
    return Pairs.concat(list(PairStore(store).iter_shards()))


def assert_x1_is_lerobots(store: Path, teacher: Path, world, num_steps: int) -> None:
    """Every stored X_1 == ``policy.predict_action_chunk(batch, noise=X_0)`` of the teacher (fp32, 1e-5)."""
    pairs = _read(store)
    loaded = load_policy(str(teacher), "cpu")
    assert loaded.config.num_inference_steps != num_steps  # the store's count, not the config's, was used
    dataset = open_dataset(world.repo_id, world.dataset_root)
    position = {int(i): p for p, i in enumerate(np.asarray(dataset.hf_dataset["index"]))}
    frames = sorted({int(i) for i in pairs.obs_index})
    assert len(pairs.obs_index) == 2 * len(frames) > 0
    worst = 0.0
    for frame in frames:
        rows = np.flatnonzero(pairs.obs_index == frame)
        item = {k: v for k, v in dataset[position[frame]].items() if not k.startswith("action")}
        batch = loaded.preprocessor(torch.utils.data.default_collate([item] * len(rows)))
        loaded.policy.reset()
        with torch.no_grad():
            x1 = loaded.policy.predict_action_chunk(
                batch, noise=torch.from_numpy(pairs.x0[rows]), num_steps=num_steps
            )
        worst = max(worst, float(np.abs(x1.numpy() - pairs.x1[rows]).max()))
    assert worst < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_validate_train_eval_from_the_cli(pi_teachers, tiny_world, tmp_path, variant):
    teacher = pi_teachers[variant]
    data = ("--dataset", tiny_world.repo_id, "--dataset-root", str(tiny_world.dataset_root))
    store = tmp_path / "pairs"

    cli("generate", "--teacher", str(teacher), *data, "--out", str(store), *GENERATE)
    assert_x1_is_lerobots(store, teacher, tiny_world, num_steps=3)

    cli("validate", str(store), *data, "--teacher", str(teacher), "--spot-check", "2", "--device", "cpu")

    run = tmp_path / "run"
    train = ("--pairs", str(store), "--dataset-root", str(tiny_world.dataset_root), "--out", str(run))
    cli("train", *train, "--steps", "2", "--batch-size", "4", "--student-num-steps", "2", "--device", "cpu")
    student = run / "checkpoints" / "last" / "pretrained_model"
    teacher_json = json.loads((teacher / "config.json").read_text())
    student_json = json.loads((student / "config.json").read_text())
    assert student_json.pop("num_inference_steps") == 2 and teacher_json.pop("num_inference_steps") == 10
    assert (
        Path(student_json.pop("pretrained_path")) == teacher and teacher_json.pop("pretrained_path") is None
    )
    assert student_json == teacher_json
    with tinypi.tiny_gemma_patch(tinypi.read_marker(student)), redirect_stdout(StringIO()):
        reloaded = _policy_class(variant).from_pretrained(student)
    check_weights_loaded(reloaded, student)  # lerobot's own loader holds the student's weights
    assert reloaded.config.num_inference_steps == 2

    report_dir = tmp_path / "eval"
    cli(
        "eval",
        "--student",
        str(student),
        "--teacher",
        str(teacher),
        *data,
        "--episodes",
        "1",
        "--num-steps",
        "1,3",
        "--max-frames",
        "2",
        "--samples-per-frame",
        "2",
        "--latency-repeats",
        "1",
        "--out",
        str(report_dir),
        "--device",
        "cpu",
    )
    report = json.loads((report_dir / "report.json").read_text())
    assert {(r["model"], r["num_steps"]) for r in report["rows"]} == {
        (m, n) for m in ("teacher", "student") for n in (1, 3)
    }
    # lerobot's own sampler ran at each step count (set through num_inference_steps) and agrees with the engine
    assert report["engine_check"]["max_abs_diff"] < 1e-5
    assert report["settings"]["reference_num_steps"] == 10
    assert report["student"]["num_steps"] == 2 and report["student"]["step_field"] == "num_inference_steps"
    assert f"--policy.num_inference_steps={report['next']['num_steps']}" in report["next"]["command"]
