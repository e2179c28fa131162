"""The feature cache (reflowpairs.cached_features, docs/feature-cache.md): exact loss and gradients with cached image
embeddings, the store's cache written by ``generate --cache-features --resume``, training with and without it, the
refusals, and validate's checks."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from reflowpairs import atomic, cached_features, store_features
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import smolvla
from reflowpairs.policies.interface import FEATURE_KEY
from reflowpairs.store.reader import PairStore
from tests.helpers import cli, generate_args


def _policy_and_batch(world, cameras: int, batch: int = 3):
    """A random tiny SmolVLA with ``cameras`` cameras and a preprocessed batch with padded language."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from reflowpairs.dataset import open_metadata
    from reflowpairs.tiny.world import tiny_smolvla_config

    cfg = tiny_smolvla_config(world.vlm_dir, open_metadata(world.repo_id, world.dataset_root))
    keys = ["observation.images.cam"] + [f"observation.images.cam{i}" for i in range(2, cameras + 1)]
    for key in keys[1:]:
        cfg.input_features[key] = copy.deepcopy(cfg.input_features[keys[0]])
    torch.manual_seed(cameras)
    policy = SmolVLAPolicy(cfg)
    policy.train()
    g = torch.Generator().manual_seed(cameras)
    data = {key: torch.rand(batch, 3, 32, 32, generator=g) for key in keys}
    data["observation.state"] = torch.randn(batch, 2, generator=g)
    data["observation.language.tokens"] = torch.randint(0, 8, (batch, 5), generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[1, 3:], mask[2, 2:] = False, False  # padded language
    data["observation.language.attention_mask"] = mask
    x0 = torch.randn(batch, cfg.chunk_size, cfg.max_action_dim, generator=g)
    x1 = torch.randn(batch, cfg.chunk_size, 2, generator=g)
    t = torch.rand(batch, generator=g)
    return policy, data, (x0, x1, t), keys


def _loss_and_grads(policy, fn):
    policy.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("cameras", [1, 2])
def test_cached_embeddings_give_the_same_loss_and_gradients(tiny_world, cameras):
    policy, batch, (x0, x1, t), keys = _policy_and_batch(tiny_world, cameras)
    loss, grads = _loss_and_grads(policy, lambda: smolvla.reflow_loss(policy, batch, x0, x1, t))
    features, slots = smolvla.compute_image_features(policy, batch)
    assert slots == keys and features.shape[:2] == (3, cameras)
    no_images = {k: v for k, v in batch.items() if k not in keys}

    def cached():
        with smolvla.substituted_image_features(policy, features, slots):
            return smolvla.reflow_loss(policy, no_images, x0, x1, t)

    cached_loss, cached_grads = _loss_and_grads(policy, cached)
    assert torch.allclose(cached_loss, loss, rtol=1e-5, atol=0)
    assert grads.keys() == cached_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (cached_grads[name] - grad).abs().max() <= 1e-5 * scale, name
    # the substitution is scoped: outside the block the policy encodes images again
    assert "prepare_images" not in vars(policy) and "embed_image" not in vars(policy.model.vlm_with_expert)
    # the cache's preconditions: frozen vision model and connector; a trainable connector is named
    assert smolvla.feature_cache_problems(policy) == []
    for p in smolvla.frozen_feature_modules(policy)["connector"].parameters():
        p.requires_grad_(True)
    assert "connector" in smolvla.feature_cache_problems(policy)[0]


def test_bf16_and_fp16_storage_round_trip_within_their_rounding():
    features = torch.randn(4, 2, 3, 8)
    for dtype, tol in (("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3)):
        back = store_features.from_storage(store_features.to_storage(features, dtype), dtype)
        assert (back - features).abs().max() <= tol * features.abs().max(), dtype


@pytest.mark.slow
def test_cache_added_to_a_store_trains_like_decoding(tiny_world, tiny_store, tmp_path):
    from safetensors.torch import load_file

    from reflowpairs.train.config import TrainConfig
    from reflowpairs.train.loop import train

    store = tmp_path / "pairs"
    shutil.copytree(tiny_store, store)
    # a complete store gains its cache without sampling: generate --resume --cache-features
    before = json.loads((store / "manifest.json").read_text())["num_pairs"]
    same = ("--episodes", "0-5", "--samples-per-frame", "2", "--batch-size", "8", "--shard-size", "64")
    cli(*generate_args(tiny_world, store, *same, "--device", "cpu", "--resume", "--cache-features"))
    index = store_features.read_index(store)
    frames = np.unique(PairStore(store).index()[0])
    assert index["complete"] and store_features.cached_frames(index) == len(frames)
    assert json.loads((store / "manifest.json").read_text())["num_pairs"] == before
    assert index["shape"] == [1, 4, 64] and index["bytes_per_frame"] == 4 * 64 * 4
    from reflowpairs.store.inspect import summarize
    from reflowpairs.validate.checks import validate
    from reflowpairs.validate.config import ValidateConfig

    assert summarize(store, statistics=False)["feature_cache"]["frames"] == len(frames)
    shown = cli("inspect", str(store), "--no-stats").stdout  # the terminal table, not only --json
    table = shown[shown.index("feature cache") :]
    for text in ("float32 (1, 4, 64)", "bytes per frame", "1,024", f"{len(frames)} in 1 shards", "True"):
        assert text in table, shown
    report = validate(ValidateConfig(store=store, spot_check=2, device="cpu"))
    assert report.ok and report.checks[-1].name == "features", report.checks
    assert "2 frames recomputed match" in report.checks[-1].detail

    assert index["store_pairs"] == before
    students = {}
    for name, off in (("cached", False), ("decoded", True)):
        plans = []
        settings = {"steps": 2, "batch_size": 4, "num_workers": 0, "device": "cpu", "no_feature_cache": off}
        with pytest.MonkeyPatch.context() as patch:  # start-up reads no pair shard's obs_index (issue #15)
            patch.setattr(PairStore, "index", lambda self: pytest.fail("train read every shard's obs_index"))
            train(TrainConfig(pairs=store, out=tmp_path / name, **settings), on_plan=plans.append)
        assert (plans[0].feature_cache is not None) is (not off)
        students[name] = load_file(
            tmp_path / name / "checkpoints" / "last" / "pretrained_model" / "model.safetensors"
        )
    for key, value in students["decoded"].items():
        assert torch.allclose(students["cached"][key], value, rtol=1e-5, atol=1e-7), key

    # refusals: other frozen weights, missing frames
    from reflowpairs.teacher import load_policy

    policy = load_policy(str(tiny_world.teacher_dir), "cpu").policy
    meta = PairStore(store).meta
    assert cached_features.cache_for_training(store, policy, meta, disabled=False) is not None  # applies
    # frames missing: pairs added after the cache (known from the manifest), or a frame found missing when read
    atomic.write_json_atomically(
        store_features.features_dir(store) / "index.json", {**index, "store_pairs": 1}
    )
    with pytest.raises(ReflowPairsError, match="had 1 pairs, the store has") as err:
        cached_features.cache_for_training(store, policy, meta, disabled=False)
    assert "generate --resume --cache-features" in err.value.hint
    atomic.write_json_atomically(store_features.features_dir(store) / "index.json", index)
    assert "incomplete" in store_features.coverage_problem({**index, "complete": False}, meta)
    from reflowpairs.dataset import frame_indices
    from reflowpairs.pairdata import REFUSED, PairDataset, position_lookup

    dataset = _dataset(tiny_world)
    pairs = PairDataset(
        PairStore(store),
        cached_features.AppliedFeatureCache(store, index).frames(dataset),
        position_lookup(frame_indices(dataset)),
    )
    first = pairs[0]
    assert first["observation"][FEATURE_KEY].shape == (1, 4, 64)
    pairs.dataset.reader.where[first["obs_index"]] = -1
    what, hint = pairs[0][REFUSED]
    assert f"lacks 1 of its frames (obs_index {first['obs_index']})" in what
    assert "generate --resume --cache-features" in hint
    with torch.no_grad():
        next(smolvla.frozen_feature_modules(policy)["vision_model"].parameters()).add_(1.0)
    with pytest.raises(ReflowPairsError, match="frozen weights") as err:
        cached_features.cache_for_training(store, policy, meta, disabled=False)
    assert "`no_feature_cache`" in err.value.hint
    assert cached_features.cache_for_training(store, policy, meta, disabled=True) is None
    # a damaged feature shard is found by its checksum
    shard = store / index["shards"][0]["path"]
    import zarr

    group = zarr.open_group(str(shard), mode="r+")
    group["features"][0, 0, 0, 0] = 123.0
    problems, _ = store_features.check(store, frames)
    assert any("checksum" in p for p in problems)
    assert validate(ValidateConfig(store=store)).checks[-1].result == "fail"


@pytest.mark.slow
def test_generate_keeps_the_features_its_prefix_fills_compute(tiny_world, tmp_path, monkeypatch):
    from tests.helpers import generate_store

    def not_again(*args):
        raise AssertionError("generate computed features its prefix fills had computed")

    job = {"episodes": [0], "samples_per_frame": 1, "num_steps": 2, "batch_size": 5}
    with monkeypatch.context() as patch:
        patch.setattr(smolvla.SmolVLAFamily, "compute_features", not_again)
        store = generate_store(tiny_world, tmp_path / "pairs", cache_features=True, **job)
    index = store_features.read_index(store)
    frames = np.unique(PairStore(store).index()[0])
    assert index["complete"] and store_features.cached_frames(index) == len(frames) == 24
    # captured from the engine's (padded) calls, they are the features computed afresh, frame by frame
    recompute = cached_features.recompute_features(str(tiny_world.teacher_dir), "cpu", _dataset(tiny_world))
    problems, summary = store_features.check(store, frames, recompute, spot=6)
    assert problems == [] and "6 frames recomputed match" in summary

    # a later round whose teacher shares the frozen weights reads the cache: no image decoded, no vision encoder
    # run, X_1 unchanged, and the new store gets the same features
    from lerobot.policies.smolvla.smolvlm_with_expert import SmolVLMWithExpertModel

    with monkeypatch.context() as patch:
        patch.setattr(SmolVLMWithExpertModel, "embed_image", not_again)
        patch.setattr(smolvla.SmolVLAFamily, "compute_features", not_again)
        again = generate_store(tiny_world, tmp_path / "round2", features_from=str(store), **job)
    first, second = PairStore(store), PairStore(again)
    for i in range(len(first.shards)):
        a, b = first.read_stored(i, ("obs_index", "x1")), second.read_stored(i, ("obs_index", "x1"))
        assert np.array_equal(a["obs_index"], b["obs_index"]) and np.array_equal(
            a["x1"], b["x1"]
        )  # bit-identical
    copied = store_features.read_index(again)
    assert copied["complete"] and copied["fingerprint"] == index["fingerprint"]
    reader, copy_reader = (
        store_features.FeatureReader(s, store_features.read_index(s)) for s in (store, again)
    )
    assert all(torch.equal(reader[int(o)], copy_reader[int(o)]) for o in frames)
    # partition slices made so carry their caches into the merged store, which training accepts
    slices = [
        generate_store(tiny_world, tmp_path / f"s{i}", partition=(i, 2), features_from=str(store), **job)
        for i in range(2)
    ]
    out = cli("merge", *map(str, slices), "--out", str(tmp_path / "merged")).stdout
    merged = store_features.read_index(tmp_path / "merged")
    assert "feature cache not merged" not in out and merged["complete"] and merged["num_frames"] == 24
    assert store_features.check(tmp_path / "merged", frames)[0] == []
    assert store_features.coverage_problem(merged, PairStore(tmp_path / "merged").meta) is None
    # a cache merged before entries kept their origin (no store_id/written_as per entry) is still accepted, and a
    # damaged shard of it is still caught by its checksum
    legacy = {
        **merged,
        "shards": [
            {k: v for k, v in e.items() if k not in ("store_id", "written_as")} for e in merged["shards"]
        ],
    }
    (tmp_path / "merged" / "features" / "index.json").write_text(json.dumps(legacy))
    assert store_features.check(tmp_path / "merged", frames)[0] == []
    assert all(
        store_features.read_checked_shard(tmp_path / "merged", legacy, i) is not None
        for i in range(len(legacy["shards"]))
    )
    shutil.rmtree(slices[1] / "features")  # a slice without one: said, and the merged store has none
    out = cli("merge", *map(str, slices), "--out", str(tmp_path / "merged2")).stdout
    assert "feature cache not merged" in " ".join(out.split()) and "--cache-features" in out
    assert store_features.read_index(tmp_path / "merged2") is None

    # a teacher with other frozen weights is refused
    from reflowpairs.teacher import load_policy

    policy = load_policy(str(tiny_world.teacher_dir), "cpu").policy
    with torch.no_grad():
        next(smolvla.frozen_feature_modules(policy)["connector"].parameters()).add_(1.0)
    with pytest.raises(ReflowPairsError, match="other frozen weights than the teacher's") as err:
        cached_features.source_cache(store, policy)
    assert "`features_from`" in err.value.hint


def _dataset(world):
    from reflowpairs.dataset import open_dataset

    return open_dataset(world.repo_id, world.dataset_root)


@pytest.mark.slow
def test_damaged_feature_shard_stops_training_before_a_step_uses_it(tiny_world, tiny_store, tmp_path):
    """A feature shard damaged after ``validate`` passed is checked (sha256, shape, dtype, frames, store id) when a
    loader worker first reads it, and refused like a damaged pair shard: the run stops with the error naming the
    shard, before any step (no log record, no checkpoint)."""
    from reflowpairs.train.logfile import LOG_FILE
    from reflowpairs.validate.checks import validate
    from reflowpairs.validate.config import ValidateConfig

    store = tmp_path / "pairs"
    shutil.copytree(tiny_store, store)
    same = ("--episodes", "0-5", "--samples-per-frame", "2", "--batch-size", "8", "--shard-size", "64")
    cli(*generate_args(tiny_world, store, *same, "--device", "cpu", "--resume", "--cache-features"))
    report = validate(ValidateConfig(store=store))
    assert report.ok and report.checks[-1].name == "features" and report.checks[-1].result == "pass"
    index = store_features.read_index(store)
    shard = index["shards"][0]["path"]
    chunk = next(
        p for p in sorted((store / shard / "features").rglob("*")) if p.is_file() and p.name != "zarr.json"
    )
    sound = chunk.read_bytes()
    data = bytearray(sound)
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    out = tmp_path / "student"
    args = ("train", "--pairs", str(store), "--out", str(out), "--device", "cpu", "--num-workers", "1")
    result = cli(*args, "--steps", "3", "--batch-size", "4", "--save-every", "1", exit_code=1)
    said = " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert f"feature cache of store {store} is corrupt: feature shard {shard}" in said, said
    assert "features does not match its checksum" in said or "cannot be read" in said
    assert "--cache-features" in said
    log = out / LOG_FILE
    assert not log.exists() or log.read_text().strip() == ""  # no step trained
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert validate(ValidateConfig(store=store)).checks[-1].result == "fail"

    # the reader's other checks: a shard copied in from another store, and a damaged obs_index column
    chunk.write_bytes(sound)
    assert store_features.FeatureReader(store, index).shard(0).shape[0] == index["shards"][0]["num_frames"]
    reader = store_features.FeatureReader(store, {**index, "store_id": "another"})
    with pytest.raises(ReflowPairsError, match="not this cache's"):
        reader.shard(0)
    import zarr

    zarr.open_group(str(store / shard), mode="r+")["obs_index"][0] = 10**6
    with pytest.raises(
        ReflowPairsError, match=f"feature shard {shard}: obs_index does not match its checksum"
    ):
        store_features.FeatureReader(store, index).has(np.array([0]))


@pytest.mark.slow
def test_pipeline_caches_in_round_one_and_later_rounds_read_it(tiny_world, tmp_path, monkeypatch):
    """``reflowpairs pipeline``: round 1's generate caches the features (the tiny SmolVLA's ``train_expert_only``
    lets its student use them), round 2's generate reads round 1's cache (its vision encoder patched to fail for that
    stage), every train stage uses its store's cache, and the state JSON and the CLI summary say so."""
    from lerobot.policies.smolvla.smolvlm_with_expert import SmolVLMWithExpertModel

    from reflowpairs.pipeline import PIPELINE_STATE, PipelineConfig, run_pipeline

    def not_again(*args, **kwargs):
        raise AssertionError("round 2's generate ran the vision encoder")

    settings = {"teacher": str(tiny_world.teacher_dir), "dataset": tiny_world.repo_id}
    settings |= {
        "dataset_root": tiny_world.dataset_root,
        "out": tmp_path / "recipe",
        "episodes": [0],
        "rounds": 2,
    }
    settings |= {"samples_per_frame": 2, "num_steps": 2, "train_steps": 2, "batch_size": 4, "spot_check": 2}
    settings |= {"eval_num_steps": [1], "eval_episodes": [9], "eval_max_frames": 2, "device": "cpu"}
    patched = []

    def on_stage(name: str, skipped: bool) -> None:  # the vision encoder fails during round 2's generate only
        if name == "round2/generate":
            patched.append(monkeypatch.context())
            patched[-1].__enter__().setattr(SmolVLMWithExpertModel, "embed_image", not_again)
        elif patched:
            patched.pop().__exit__(None, None, None)

    result = run_pipeline(PipelineConfig(**settings), on_stage=on_stage)
    first = tmp_path / "recipe" / "round1" / "pairs"
    assert result.feature_cache == {
        "round1/generate": "computed and cached",
        "round1/train": f"used ({first / 'features'})",
        "round2/generate": f"read from {first}",
        "round2/train": f"used ({tmp_path / 'recipe' / 'round2' / 'pairs' / 'features'})",
    }
    state = json.loads((tmp_path / "recipe" / PIPELINE_STATE).read_text())
    assert state["feature_cache"] == result.feature_cache
    second = store_features.read_index(tmp_path / "recipe" / "round2" / "pairs")
    assert second["complete"] and second["fingerprint"] == store_features.read_index(first)["fingerprint"]
    # the CLI's summary (a rerun: every stage finished, skipped) shows the same
    args = ["pipeline", "--teacher", settings["teacher"], "--dataset", tiny_world.repo_id, "--out"]
    args += [str(tmp_path / "recipe"), "--dataset-root", str(tiny_world.dataset_root), "--episodes", "0"]
    args += ["--samples-per-frame", "2", "--num-steps", "2", "--train-steps", "2", "--batch-size", "4"]
    args += ["--spot-check", "2", "--eval-num-steps", "1", "--eval-episodes", "9", "--eval-max-frames", "2"]
    shown = " ".join(cli(*args, "--device", "cpu").stdout.split())
    assert "feature cache" in shown and "round2/generate" in shown and "read from" in shown

    # a teacher whose student would train its vision encoder: round 1 does not cache (the check train applies)
    teacher = tmp_path / "trainable"
    shutil.copytree(tiny_world.teacher_dir, teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "train_expert_only": False}))
    from tests.helpers import generate_store

    store = generate_store(
        tiny_world,
        tmp_path / "plain",
        teacher=str(teacher),
        episodes=[0],
        samples_per_frame=1,
        num_steps=2,
        cache_features_if_allowed=True,
    )
    assert store_features.read_index(store) is None
