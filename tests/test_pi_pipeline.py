"""pi0 and pi05 teachers through the command line: generate -> validate --spot-check -> train -> eval, on tiny
teachers (``reflowpairs.tiny.pi``) built over the session's tiny world dataset (conftest's ``pi_teachers``).

A tiny checkpoint carries ``pi_patch.TINY_MARKER``; ``load_policy`` applies its size patch for that checkpoint's
``from_pretrained`` only (the documented test-fixture route), so the CLI loads it in this process and in a fresh one
(``test_generate_in_a_fresh_process``). Everything runs in float32 on the CPU."""

from __future__ import annotations

import json
import shutil
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch

from reflowpairs.dataset import open_dataset
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.summary import next_step
from reflowpairs.policies._pi_common import check_weights_loaded
from reflowpairs.store.pairs import Pairs
from reflowpairs.store.reader import PairStore
from reflowpairs.teacher import TOKENIZER_ENV, load_policy
from reflowpairs.tiny import pi_patch

from .helpers import assert_same_pairs, cli, read_plain, reflowpairs_cmd, run_child

VARIANTS = ("pi0", "pi05")
GENERATE = ("--episodes", "0", "--samples-per-frame", "2", "--num-steps", "3", "--batch-size", "8")
GENERATE += ("--shard-size", "16", "--device", "cpu")


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
    with pi_patch.tiny_gemma_patch(pi_patch.read_marker(student)), redirect_stdout(StringIO()):
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
    # the lerobot-eval command it recommends (once the student beats the teacher) sets the same field
    better = next_step({**report, "headline": {**report["headline"], "ratio": 0.5}})
    assert f"--policy.num_inference_steps={better['num_steps']}" in better["command"]


@pytest.mark.slow
def test_generate_in_a_fresh_process(pi_teachers, tiny_world, tmp_path):
    """``reflowpairs generate`` as its own process loads the tiny teacher (its marker's size patch is applied by the
    loader, not by this test process) and stores lerobot's own X_1."""
    teacher, store = pi_teachers["pi0"], tmp_path / "pairs"
    data = ("--dataset", tiny_world.repo_id, "--dataset-root", str(tiny_world.dataset_root))
    done = run_child(
        reflowpairs_cmd("generate", "--teacher", str(teacher), *data, "--out", str(store), *GENERATE)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_x1_is_lerobots(store, teacher, tiny_world, num_steps=3)


def test_damaged_weights_are_refused_naming_the_file(pi_teachers, tiny_world, tmp_path):
    """lerobot returns random weights (or leaves a layer random) when model.safetensors does not load: reflowpairs
    refuses the teacher with the file named, from the library and from the CLI."""
    from safetensors.torch import load_file, save_file

    truncated = tmp_path / "truncated"
    shutil.copytree(pi_teachers["pi0"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ReflowPairsError) as err:
        load_policy(str(truncated), "cpu")
    assert str(weights) in err.value.what
    result = cli(
        "generate",
        "--teacher",
        str(truncated),
        "--dataset",
        tiny_world.repo_id,
        "--dataset-root",
        str(tiny_world.dataset_root),
        "--out",
        str(tmp_path / "pairs"),
        *GENERATE,
        exit_code=1,
    )
    assert "model.safetensors" in result.output and not (tmp_path / "pairs" / "manifest.json").exists()

    incomplete = tmp_path / "incomplete"
    shutil.copytree(pi_teachers["pi05"], incomplete)
    tensors = load_file(incomplete / "model.safetensors")
    dropped = next(k for k in tensors if "action_out_proj" in k)
    save_file({k: v for k, v in tensors.items() if k != dropped}, incomplete / "model.safetensors")
    with pytest.raises(ReflowPairsError, match="lacks 1 of") as err:
        load_policy(str(incomplete), "cpu")
    assert str(incomplete / "model.safetensors") in err.value.what


@pytest.mark.slow
def test_the_tokenizer_override(pi_teachers, tiny_world, tmp_path, monkeypatch):
    """A saved preprocessor that names a tokenizer this machine cannot load (the gated hub one, offline) loads with
    ``tokenizer`` / REFLOWPAIRS_TOKENIZER / ``--tokenizer DIR`` pointing at a local copy."""
    monkeypatch.setenv(TOKENIZER_ENV, "")  # restored (unset) after the test: --tokenizer sets it
    source = pi_teachers["pi05"]
    copy = tmp_path / "teacher"
    shutil.copytree(source, copy)
    path = copy / "policy_preprocessor.json"
    pipeline = json.loads(path.read_text())
    local = None
    for step in pipeline["steps"]:
        if step.get("registry_name") == "tokenizer_processor":
            local = step["config"]["tokenizer_name"]
            step["config"]["tokenizer_name"] = str(tmp_path / "no-such-tokenizer")
    path.write_text(json.dumps(pipeline))
    assert local is not None and Path(local).is_dir()

    with pytest.raises(ReflowPairsError, match="could not load the processors"):
        load_policy(str(copy), "cpu")
    reference = load_policy(str(source), "cpu")
    overridden = load_policy(str(copy), "cpu", tokenizer=local)
    dataset = open_dataset(tiny_world.repo_id, tiny_world.dataset_root)
    item = {k: v for k, v in dataset[0].items() if not k.startswith("action")}
    ours = overridden.preprocessor(torch.utils.data.default_collate([item]))
    theirs = reference.preprocessor(torch.utils.data.default_collate([item]))
    key = "observation.language.tokens"
    assert torch.equal(ours[key], theirs[key])
    monkeypatch.setenv(TOKENIZER_ENV, local)
    load_policy(str(copy), "cpu")
    monkeypatch.setenv(TOKENIZER_ENV, "")
    with pytest.raises(ReflowPairsError, match="`tokenizer`"):
        load_policy(str(copy), "cpu", tokenizer=tmp_path / "missing")

    data = ("--dataset", tiny_world.repo_id, "--dataset-root", str(tiny_world.dataset_root))
    store = tmp_path / "pairs"
    fast = ("--episodes", "0", "--samples-per-frame", "1", "--num-steps", "1", "--device", "cpu")
    cli("generate", "--teacher", str(copy), *data, "--out", str(store), *fast, "--tokenizer", local)
    assert (store / "manifest.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_partitions_parquet_and_midpoint(pi_teachers, tiny_world, tmp_path, variant):
    """One midpoint store (a non-Euler solver) of episode 0, K=2, in the parquet backend, and what must equal it: the
    store resumed after an interruption (its manifest cut to 2 shards, marked incomplete) and ``partition`` 0/2 + 1/2
    in zarr, merged. Its X_1 is ``predict_action_chunk``'s with lerobot's own Euler loop (``euler_integrate``, looked up by
    ``sample_actions``) replaced by the same midpoint integration: the same solver semantics on lerobot's velocity."""
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    from reflowpairs.generate.config import GenerateConfig
    from reflowpairs.generate.run import generate
    from reflowpairs.solvers import SolverConfig, integrate
    from reflowpairs.store.merge import merge_stores

    teacher = pi_teachers[variant]
    settings = {
        "teacher": str(teacher),
        "dataset": tiny_world.repo_id,
        "dataset_root": tiny_world.dataset_root,
        "device": "cpu",
        "episodes": [0],
        "samples_per_frame": 2,
        "num_steps": 2,
        "solver": "midpoint",
        "backend": "parquet",
        "batch_size": 8,
        "shard_size": 8,
    }

    def run(out: Path, **overrides) -> Path:
        generate(GenerateConfig(**{**settings, "out": out, **overrides}))
        return out

    single = read_plain(run(tmp_path / "single"))
    assert len(single["obs_index"]) == 2 * 24
    assert json.loads((tmp_path / "single" / "manifest.json").read_text())["backend"] == "parquet"

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "single", resumed)
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert len(manifest["shards"]) == 6
    manifest["shards"] = manifest["shards"][:2]
    manifest["num_pairs"] = sum(s["num_pairs"] for s in manifest["shards"])
    manifest["complete"] = False
    (resumed / "manifest.json").write_text(json.dumps(manifest))
    run(resumed, resume=True)
    assert json.loads((resumed / "manifest.json").read_text())["complete"] is True
    assert_same_pairs(single, read_plain(resumed))

    slices = [run(tmp_path / f"slice{i}", partition=(i, 2), backend="zarr") for i in range(2)]
    merge_stores(slices, tmp_path / "merged")
    assert_same_pairs(single, read_plain(tmp_path / "merged"))

    # X_1 of a few frames == lerobot's sampler, its Euler loop swapped for the midpoint solver
    loaded = load_policy(str(teacher), "cpu")
    module = modeling_pi0 if variant == "pi0" else modeling_pi05
    dataset = open_dataset(tiny_world.repo_id, tiny_world.dataset_root)
    position = {int(i): p for p, i in enumerate(np.asarray(dataset.hf_dataset["index"]))}
    original = module.euler_integrate
    module.euler_integrate = lambda velocity, noise, num_steps, **_: integrate(
        velocity, noise, SolverConfig("midpoint", num_steps)
    )
    try:
        for frame in sorted(set(single["obs_index"].tolist()))[::8]:
            rows = np.flatnonzero(single["obs_index"] == frame)
            item = {k: v for k, v in dataset[position[frame]].items() if not k.startswith("action")}
            batch = loaded.preprocessor(torch.utils.data.default_collate([item] * len(rows)))
            with torch.no_grad():
                x1 = loaded.policy.predict_action_chunk(
                    batch, noise=torch.from_numpy(single["x0"][rows]), num_steps=2
                )
            np.testing.assert_allclose(x1.numpy(), single["x1"][rows], atol=1e-5, rtol=0)
    finally:
        module.euler_integrate = original
