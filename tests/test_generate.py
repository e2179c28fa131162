"""Stage 1: the pair-store contract read back with plain zarr/pyarrow, X_0 determinism, X_1 equal to the
teacher's own sampler, --episodes, both backends, resume, and the errors for bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import reflowpairs.generate.job as generate_job  # where generate loads the teacher
from reflowpairs.cli import app
from reflowpairs.dataset import open_dataset
from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate.config import GenerateConfig
from reflowpairs.generate.run import generate
from reflowpairs.noise import initial_noise
from reflowpairs.teacher import load_policy

from .helpers import assert_same_pairs, read_plain, runner, small_store

_generate = partial(small_store, samples_per_frame=3, batch_size=4, shard_size=20)
"""This file's stores: episodes 0 and 1, K=3, batches of 4 frames, shards of 20 pairs (each setting overridable)."""


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_store_contract_read_with_plain_libraries(tiny_world, tmp_path, backend):
    store = _generate(tiny_world, tmp_path / backend, backend=backend)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["format"] == "reflowpairs.pairs" and manifest["version"] == 2
    assert manifest["backend"] == backend and manifest["complete"] is True
    for key in ("teacher", "dataset", "generation", "software"):
        assert isinstance(manifest[key], dict)
    assert manifest["teacher"]["policy_type"] == "smolvla" and len(manifest["teacher"]["fingerprint"]) == 64
    want = {"num_steps": 10, "solver": "euler", "samples_per_frame": 3, "seed": 0, "episodes": [0, 1]}
    assert {k: manifest["generation"][k] for k in want} == want
    assert set(manifest["software"]) >= {"reflowpairs", "lerobot", "torch"}
    assert manifest["x0"] == {"shape": [8, 6], "dtype": "float32"}
    assert manifest["x1"] == {"shape": [8, 2], "dtype": "float32"}
    assert all(
        s["path"].startswith("shards/") and s["path"].endswith("." + backend) for s in manifest["shards"]
    )
    assert len(manifest["shards"]) > 1  # shard_size=20 with 48 frames x 3 samples

    pairs = read_plain(store)
    frames = open_dataset(tiny_world.repo_id, tiny_world.dataset_root, [0, 1])
    expected_index = np.sort(np.asarray(frames.hf_dataset.select_columns(["index"])["index"]))
    assert manifest["num_pairs"] == len(pairs["obs_index"]) == len(expected_index) * 3
    keys = set(zip(pairs["obs_index"].tolist(), pairs["sample"].tolist(), strict=True))
    assert keys == {(int(i), k) for i in expected_index for k in range(3)}  # each (obs_index, sample) once
    assert pairs["x0"].shape[1:] == (8, 6) and pairs["x1"].shape[1:] == (8, 2)
    for row in (0, len(pairs["obs_index"]) - 1):
        want = initial_noise(0, int(pairs["obs_index"][row]), int(pairs["sample"][row]), (8, 6)).numpy()
        np.testing.assert_array_equal(pairs["x0"][row], want)


@pytest.mark.slow
def test_backends_and_batch_sizes_store_identical_pairs(tiny_world, tmp_path):
    a = read_plain(_generate(tiny_world, tmp_path / "a", batch_size=1, shard_size=7, backend="zarr"))
    b = read_plain(_generate(tiny_world, tmp_path / "b", batch_size=5, shard_size=1000, backend="parquet"))
    assert_same_pairs(a, b)
    # engine calls of 2 frames (3 samples x chunk 8 = 24 suffix tokens a frame): batches of 5 go in calls of 2, 2, 1
    c = read_plain(_generate(tiny_world, tmp_path / "c", batch_size=5, tokens_per_call=48))
    assert_same_pairs(a, c)


@pytest.mark.slow
def test_dopri5_pairs_do_not_depend_on_the_batching(tiny_world, tmp_path):
    """An adaptive solver's steps depend on everything integrated together; the engine solves one frame per call.
    Every 4th frame of episode 1 (``partition`` 0/4: 6 frames): dopri5 solves each frame on its own, so more frames
    would only repeat the check."""
    settings = {"episodes": [1], "samples_per_frame": 2, "solver": "dopri5", "rtol": 1e-3, "atol": 1e-3}
    settings["partition"] = (0, 4)
    a = read_plain(_generate(tiny_world, tmp_path / "a", batch_size=1, **settings))
    b = read_plain(_generate(tiny_world, tmp_path / "b", batch_size=24, **settings))
    assert len(a["obs_index"]) == 6 * 2
    assert_same_pairs(a, b)


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"tokens_per_call": -1}, "`tokens_per_call` must be 0 (no limit) or more, got -1"),
        ({"num_steps": 0}, "`num_steps` must be at least 1, got 0"),  # not taken as "the teacher's default"
        ({"num_workers": -1}, "`num_workers` must be 0 (load in the main process) or more, got -1"),
        ({"shard_size": 0}, "`shard_size` must be at least 1, got 0"),
        ({"solver": "dopri5", "rtol": -1.0}, "`rtol` and `atol` must be positive, got -1.0 and 1e-05"),
        ({"solver": "heun"}, "Unknown solver 'heun'"),
        (
            {"episodes": [0, 12]},
            "`episodes` 12 out of range: dataset reflowpairs/tiny_reach has 10 episodes (0 to 9)",
        ),
        ({"episodes": []}, "`episodes` selects no episode"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tiny_world, tmp_path, setting, words):
    with pytest.raises(ReflowPairsError) as caught:
        _generate(tiny_world, tmp_path / "out", **setting)
    assert words in caught.value.what
    assert not (tmp_path / "out").exists()


def test_cli_episodes_out_of_range_names_them(tiny_world, tmp_path):
    """lerobot would look for the missing episode on the hub and fail with a network error."""
    text = _cli_error(
        [
            "--teacher",
            str(tiny_world.teacher_dir),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(tmp_path / "o"),
            "--episodes",
            "0,10-11",
            "--device",
            "cpu",
        ]
    )
    assert "--episodes 10, 11 out of range" in text and "ConnectError" not in text
    assert not (tmp_path / "o").exists()


def test_x1_equals_predict_action_chunk_from_stored_x0(other_world, tmp_path):
    """For a differently shaped teacher/dataset: every X_1 is the teacher's own sampler output from X_0."""
    store = _generate(other_world, tmp_path / "s", episodes=None, samples_per_frame=2, batch_size=3)
    pairs = read_plain(store)
    teacher = load_policy(str(other_world.teacher_dir), "cpu")
    dataset = open_dataset(other_world.repo_id, other_world.dataset_root)
    position = {
        int(i): p for p, i in enumerate(np.asarray(dataset.hf_dataset.select_columns(["index"])["index"]))
    }
    assert len(pairs["obs_index"]) == len(position) * 2
    worst = 0.0
    for row in range(len(pairs["obs_index"])):
        item = dataset[position[int(pairs["obs_index"][row])]]
        batch = teacher.preprocessor(torch.utils.data.default_collate([item]))
        teacher.policy.reset()
        x1 = teacher.policy.predict_action_chunk(batch, noise=torch.from_numpy(pairs["x0"][row])[None])
        worst = max(worst, float((x1[0].numpy() - pairs["x1"][row]).__abs__().max()))
    assert worst < 1e-4


def test_episodes_select_frames(tiny_world, tmp_path):
    store = _generate(tiny_world, tmp_path / "e", episodes=[3], samples_per_frame=1)
    pairs = read_plain(store)
    dataset = open_dataset(tiny_world.repo_id, tiny_world.dataset_root)
    episode_of = dict(
        zip(
            np.asarray(dataset.hf_dataset["index"]).tolist(),
            np.asarray(dataset.hf_dataset["episode_index"]).tolist(),
            strict=True,
        )
    )
    assert {episode_of[int(i)] for i in pairs["obs_index"]} == {3}
    assert len(pairs["obs_index"]) == 24


@pytest.mark.slow
def test_resume_finishes_an_interrupted_store_identically(tiny_world, tmp_path):
    full = read_plain(_generate(tiny_world, tmp_path / "full"))
    partial = _generate(tiny_world, tmp_path / "partial")
    manifest = json.loads((partial / "manifest.json").read_text())
    dropped = manifest["shards"][3:]
    manifest["shards"] = manifest["shards"][:3]
    manifest["num_pairs"] = sum(s["num_pairs"] for s in manifest["shards"])
    manifest["complete"] = False
    (partial / "manifest.json").write_text(json.dumps(manifest))
    (partial / "shards" / (".tmp-" + Path(dropped[0]["path"]).name)).mkdir()  # a half-written leftover
    _generate(tiny_world, partial, resume=True)
    assert_same_pairs(full, read_plain(partial))
    assert json.loads((partial / "manifest.json").read_text())["complete"] is True
    assert not list((partial / "shards").glob(".tmp-*"))


def test_resume_with_other_settings_names_the_difference(tiny_world, tmp_path):
    store = _generate(tiny_world, tmp_path / "s")
    before = (store / "manifest.json").read_text()
    with pytest.raises(ReflowPairsError, match="samples_per_frame"):
        _generate(tiny_world, store, resume=True, samples_per_frame=2)
    assert (store / "manifest.json").read_text() == before


def test_existing_store_is_refused_and_untouched(tiny_world, tmp_path):
    store = _generate(tiny_world, tmp_path / "s")
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    result = runner.invoke(
        app,
        [
            "generate",
            "--teacher",
            str(tiny_world.teacher_dir),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(store),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1
    assert "already holds a pair store" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before


def test_cli_generate_end_to_end(tiny_world, tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(
        app,
        [
            "generate",
            "--teacher",
            str(tiny_world.teacher_dir),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(out),
            "--episodes",
            "0,2",
            "--samples-per-frame",
            "2",
            "--num-steps",
            "3",
            "--format",
            "parquet",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_pairs"] == 2 * 24 * 2 and manifest["generation"]["num_steps"] == 3
    assert "96" in result.output  # the summary table names the pair count


def _cli_error(args: list[str]) -> str:
    result = runner.invoke(app, ["generate", *args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_missing_teacher_path(tiny_world, tmp_path):
    text = _cli_error(
        [
            "--teacher",
            str(tmp_path / "nope" / "pretrained_model"),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    assert "does not exist" in text and "nope" in text
    assert not (tmp_path / "o").exists()


def test_a_directory_that_is_not_a_policy_checkpoint(tiny_world, tmp_path):
    """The tiny world's VLM directory has a config.json too, but no policy type."""
    text = _cli_error(
        [
            "--teacher",
            str(tiny_world.vlm_dir),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    assert (
        'has no policy "type"' in text
        and "not a lerobot policy checkpoint" in text
        and "smolvlm model config" in text
    )
    assert "None" not in text


@pytest.mark.parametrize("policy_type", ["act", "diffusion"])
def test_non_flow_matching_policy_is_refused(tiny_world, tmp_path, policy_type):
    from lerobot.configs.policies import PreTrainedConfig

    config_cls = PreTrainedConfig.get_choice_class(policy_type)
    ckpt = tmp_path / policy_type
    config_cls().save_pretrained(ckpt)
    text = _cli_error(
        [
            "--teacher",
            str(ckpt),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    reason = {"act": "not a flow-matching policy: it regresses", "diffusion": "without a timestep spacing"}
    assert f"'{policy_type}' policy" in text and reason[policy_type] in text


def test_checkpoint_without_processor_files_is_refused(tiny_world, tmp_path):
    ckpt = tmp_path / "bare"
    shutil.copytree(tiny_world.teacher_dir, ckpt)
    for path in ckpt.glob("policy_*processor*"):
        path.unlink()
    text = _cli_error(
        [
            "--teacher",
            str(ckpt),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    assert "has no policy_preprocessor.json" in text


def test_dataset_that_does_not_match_the_teacher(tiny_world, other_world, tmp_path):
    text = _cli_error(
        [
            "--teacher",
            str(other_world.teacher_dir),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    assert "does not match the policy's features" in text
    assert "observation.state has shape (2,), the policy expects (3,)" in text
    assert not (tmp_path / "o").exists()


def test_missing_dataset_root(tiny_world, tmp_path):
    text = _cli_error(
        [
            "--teacher",
            str(tiny_world.teacher_dir),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tmp_path / "nodata"),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    assert "is not a LeRobotDataset" in text and "nodata" in text


def _nan_teacher(world, tmp_path) -> Path:
    """A copy of the teacher whose action output bias is NaN for the first action dimension."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "nan_teacher"
    shutil.copytree(world.teacher_dir, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    weights["model.action_out_proj.bias"][0] = float("nan")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


def test_nonfinite_teacher_output_stops_naming_the_frame(tiny_world, tmp_path):
    ckpt = _nan_teacher(tiny_world, tmp_path)
    with pytest.raises(ReflowPairsError, match=r"non-finite X_1 .* obs_index \[0, 1, 2, 3\]"):
        _generate(tiny_world, tmp_path / "o", teacher=str(ckpt))
    result = generate(
        GenerateConfig(
            teacher=str(ckpt),
            dataset=tiny_world.repo_id,
            dataset_root=tiny_world.dataset_root,
            out=tmp_path / "skip",
            episodes=[0],
            samples_per_frame=1,
            device="cpu",
            on_nonfinite="skip",
        )
    )
    assert result.num_pairs == 0 and result.skipped == list(range(24))
    assert json.loads((tmp_path / "skip" / "manifest.json").read_text())["skipped_frames"] == list(range(24))


def test_usage_error_exit_code_2(tiny_world, tmp_path):
    result = runner.invoke(app, ["generate", "--teacher", str(tiny_world.teacher_dir)])
    assert result.exit_code == 2


@pytest.mark.slow
def test_hub_ids_while_offline_get_a_clear_error(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = _cli_error(
        [
            "--teacher",
            "nobody-here/no-such-policy",
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    assert (
        "'nobody-here/no-such-policy' is not a local directory and could not be fetched from the Hugging Face hub"
        in text
    )
    assert "HF_HUB_OFFLINE" in text
    text = _cli_error(
        [
            "--teacher",
            str(tiny_world.teacher_dir),
            "--dataset",
            "nobody-here/no-such-dataset",
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    assert (
        "Could not open dataset 'nobody-here/no-such-dataset' in the local cache or on the Hugging Face hub"
        in text
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_higher_order_solvers_buy_accuracy_per_step(tiny_world, tmp_path):
    """midpoint/rk4 at 4 steps land closer to a tight dopri5 solution than Euler at 4 steps; all share one engine.
    On every 4th frame of episode 1 (``partition`` 0/4: 6 frames, which dopri5 solves one by one)."""
    stores = {}
    for solver, steps in (("euler", 4), ("midpoint", 4), ("rk4", 4), ("dopri5", 1)):
        out = _generate(
            tiny_world,
            tmp_path / solver,
            episodes=[1],
            partition=(0, 4),
            samples_per_frame=1,
            solver=solver,
            num_steps=steps,
            rtol=1e-5,
            atol=1e-5,
        )
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["generation"]["solver"] == solver
        stores[solver] = read_plain(out)
    assert len(stores["dopri5"]["obs_index"]) == 6
    exact = stores["dopri5"]["x1"]
    error = {s: float(np.abs(stores[s]["x1"] - exact).mean()) for s in ("euler", "midpoint", "rk4")}
    assert error["rk4"] < error["midpoint"] < error["euler"], error
    for solver in ("euler", "midpoint", "rk4"):
        np.testing.assert_array_equal(stores[solver]["x0"], stores["dopri5"]["x0"])


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--episodes", "0,99"], "--episodes 99 out of range"),
        (["--dataset-root", "NODATA"], "is not a LeRobotDataset"),
    ],
)
def test_bad_dataset_inputs_are_reported_before_the_teacher_loads(
    tiny_world, tmp_path, monkeypatch, bad, message
):
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the dataset inputs were checked")

    monkeypatch.setattr(generate_job, "load_policy", no_teacher)
    args = [
        "--teacher",
        str(tiny_world.teacher_dir),
        "--dataset",
        tiny_world.repo_id,
        "--dataset-root",
        str(tiny_world.dataset_root),
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    ]
    args += [a.replace("NODATA", str(tmp_path / "nodata")) for a in bad]
    assert message in _cli_error(args)


def test_a_run_or_checkpoint_directory_as_teacher_suggests_its_pretrained_model(tiny_world, tmp_path):
    """``--teacher .../checkpoints/last`` (lerobot-train's layout) is a common slip: the error names the checkpoint."""
    step = tmp_path / "run" / "checkpoints" / "000200"
    shutil.copytree(tiny_world.teacher_dir, step / "pretrained_model")
    (step.parent / "last").symlink_to("000200")
    for given, meant in (
        (step.parent / "last", step.parent / "last" / "pretrained_model"),
        (tmp_path / "run", tmp_path / "run" / "checkpoints" / "last" / "pretrained_model"),
    ):
        text = _cli_error(
            [
                "--teacher",
                str(given),
                "--dataset",
                tiny_world.repo_id,
                "--dataset-root",
                str(tiny_world.dataset_root),
                "--out",
                str(tmp_path / "o"),
                "--device",
                "cpu",
            ]
        )
        assert "has no config.json" in text and f"Did you mean {meant}?" in text


def test_resume_does_not_sample_skipped_frames_again(tiny_world, tmp_path):
    """Frames skipped for non-finite X_1 count as done: a run interrupted after skipping them resumes without sampling
    them again, and each is listed once (they were once re-sampled and appended a second time)."""
    ckpt = _nan_teacher(tiny_world, tmp_path)
    cfg = GenerateConfig(
        teacher=str(ckpt),
        dataset=tiny_world.repo_id,
        dataset_root=tiny_world.dataset_root,
        out=tmp_path / "skip",
        episodes=[0],
        samples_per_frame=1,
        batch_size=4,
        device="cpu",
        on_nonfinite="skip",
    )
    generate(cfg)
    manifest_path = tmp_path / "skip" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["complete"] = False  # as a run killed after its last skipped frame leaves it
    manifest_path.write_text(json.dumps(manifest))
    plans = []
    result = generate(replace(cfg, resume=True), on_plan=plans.append)
    assert plans[0].frames_to_do == 0 and plans[0].frames_done == 24
    assert result.skipped == list(range(24))
    assert json.loads(manifest_path.read_text())["skipped_frames"] == list(range(24))
    assert json.loads(manifest_path.read_text())["complete"] is True


def test_skipped_frames_are_in_the_manifest_before_the_next_shard(tiny_world, tmp_path, monkeypatch):
    """A skipped frame is recorded in the manifest when it is skipped (by the writer thread, the manifest's only
    writer during sampling), not only with the next shard: a kill in between loses no skip."""
    from reflowpairs.store.manifest import StoreManifest
    from reflowpairs.store.writer import PairStoreWriter

    ckpt = _nan_teacher(tiny_world, tmp_path)
    seen = []
    real = PairStoreWriter.skip

    def spy(self, obs_index):
        real(self, obs_index)
        seen.append(StoreManifest.read(self.out).skipped_frames)  # manifest.json + its journal

    monkeypatch.setattr(PairStoreWriter, "skip", spy)
    generate(
        GenerateConfig(
            teacher=str(ckpt),
            dataset=tiny_world.repo_id,
            dataset_root=tiny_world.dataset_root,
            out=tmp_path / "skip",
            episodes=[0],
            samples_per_frame=1,
            batch_size=8,
            device="cpu",
            on_nonfinite="skip",
        )
    )
    assert seen == [list(range(8)), list(range(16)), list(range(24))]


def test_the_last_progress_line_and_the_summary_give_the_same_rate(tiny_world, tmp_path):
    """The live rate is on the summary's clock, and the last batch is reported once its shard is written."""
    import re

    result = runner.invoke(
        app,
        [
            "generate",
            "--teacher",
            str(tiny_world.teacher_dir),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(tmp_path / "o"),
            "--episodes",
            "0",
            "--samples-per-frame",
            "2",
            "--batch-size",
            "8",
            "--device",
            "cpu",
        ],
        env={"REFLOWPAIRS_PROGRESS": "lines", "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    last = [line for line in result.output.splitlines() if line.startswith("generate: frame")][-1]
    assert "24/24 (100%)" in last
    live = re.search(r"([\d,.]+) pairs/s,", last).group(1)
    summary = re.search(r"speed\s*│\s*([\d,.]+) pairs/s", result.output).group(1)
    assert live == summary
