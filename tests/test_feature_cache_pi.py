"""The feature cache for pi0 and pi05 (docs/feature-cache.md): PaliGemma's image embeddings (SigLIP vision tower +
multi-modal projector) stand in for the images when the student's config freezes both (``train_expert_only``):
exact loss and gradients, the refusal otherwise (naming the flag), capture during ``generate --cache-features``
with no second vision pass, ``generate --features-from`` with no vision tower run (X_1 bit-identical), and
training with the cache equal to training without it.

Tiny pi0/pi05 teachers (``reflowpairs.tiny.pi``) over the session's tiny world, everything in float32 on the CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from reflowpairs import cached_features, store_features
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import FAMILIES
from reflowpairs.policies._pi_common import PiFamily
from reflowpairs.store.reader import PairStore

from .helpers import generate_store

VARIANTS = ("pi0", "pi05")
FRAMES = (0, 12, 30)
CAMERA = "observation.images.cam"


def configured(checkpoint: Path, out: Path, **config) -> Path:
    """A copy of ``checkpoint`` whose config.json has ``config`` set (e.g. ``train_expert_only``)."""
    shutil.copytree(checkpoint, out)
    path = out / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}, indent=2))
    return out


@pytest.fixture(scope="module")
def pi_teachers(pi_teachers, tmp_path_factory) -> dict[str, Path]:
    """``{variant: checkpoint}``: the session's tiny pi0/pi05 teachers (conftest) copied with ``train_expert_only:
    true`` (the whole PaliGemma frozen, the cache applies)."""
    root = tmp_path_factory.mktemp("pi_cache")
    return {
        variant: configured(pi_teachers[variant], root / variant, train_expert_only=True)
        for variant in VARIANTS
    }


def _load(checkpoint: Path):
    from reflowpairs.teacher import load_policy

    return load_policy(str(checkpoint), "cpu")


def _dataset(world):
    from reflowpairs.dataset import open_dataset

    return open_dataset(world.repo_id, world.dataset_root)


def _batch(loaded, world) -> dict:
    """The preprocessed observation batch of ``FRAMES`` (actions dropped)."""
    dataset = _dataset(world)
    raw = torch.utils.data.default_collate([dataset[i] for i in FRAMES])
    return loaded.preprocessor({k: v for k, v in raw.items() if not k.startswith("action")})


def _loss_and_grads(policy, fn):
    policy.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("empty_cameras", [0, 1])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_embeddings_give_the_same_loss_and_gradients(
    pi_teachers, tiny_world, tmp_path, variant, empty_cameras
):
    teacher = configured(pi_teachers[variant], tmp_path / "t", empty_cameras=empty_cameras)
    loaded = _load(teacher)
    policy, fam = loaded.policy, FAMILIES[variant]
    policy.train()
    batch = _batch(loaded, tiny_world)
    (chunk, max_dim), (_, action_dim) = fam.pair_shapes(policy.config)
    g = torch.Generator().manual_seed(3)
    x0, x1 = (
        torch.randn(len(FRAMES), chunk, max_dim, generator=g),
        torch.randn(len(FRAMES), chunk, action_dim, generator=g),
    )
    t = torch.rand(len(FRAMES), generator=g) * 0.999 + 0.001

    loss, grads = _loss_and_grads(policy, lambda: fam.reflow_loss(policy, batch, x0, x1, t))
    features, slots = fam.compute_features(policy, batch)
    assert slots == [CAMERA] + [""] * empty_cameras and features.shape[:2] == (len(FRAMES), 1 + empty_cameras)
    no_images = {k: v for k, v in batch.items() if not k.startswith("observation.images")}

    def cached():
        with fam.substituted_features(policy, features, slots):
            return fam.reflow_loss(policy, no_images, x0, x1, t)

    cached_loss, cached_grads = _loss_and_grads(policy, cached)
    assert loss.item() > 0.01
    torch.testing.assert_close(cached_loss, loss, rtol=1e-6, atol=0)
    assert grads.keys() == cached_grads.keys() and len(grads) > 10
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in grads)  # frozen by the config
    for name, grad in grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (cached_grads[name] - grad).abs().max() <= 1e-5 * scale, name
    # the substitution is scoped: outside the block the policy encodes images again
    assert "_preprocess_images" not in vars(policy)
    assert "embed_image" not in vars(policy.model.paligemma_with_expert)
    assert fam.feature_cache_problems(policy) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_trainable_vision_tower_or_projector_is_refused_naming_the_flag(pi_teachers, tmp_path, variant):
    """lerobot's ``freeze_vision_encoder`` freezes the vision tower only (the projector still trains);
    ``train_expert_only`` freezes both; neither freezes neither."""
    fam = FAMILIES[variant]
    cases = {
        "neither": ({"train_expert_only": False}, ["vision_tower", "multi_modal_projector"]),
        "tower": ({"train_expert_only": False, "freeze_vision_encoder": True}, ["multi_modal_projector"]),
    }
    for name, (config, trainable) in cases.items():
        policy = _load(configured(pi_teachers[variant], tmp_path / name, **config)).policy
        problems = fam.feature_cache_problems(policy)
        assert [p.split()[1] for p in problems] == trainable, problems


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_caches_reads_and_train_uses_the_cache(
    pi_teachers, tiny_world, tmp_path, monkeypatch, variant
):
    from safetensors.torch import load_file

    from reflowpairs.train.config import TrainConfig
    from reflowpairs.train.loop import train

    def not_again(*args, **kwargs):
        raise AssertionError("a vision pass ran that the cache should have saved")

    teacher = pi_teachers[variant]
    job = {"teacher": str(teacher), "episodes": [0], "samples_per_frame": 2, "num_steps": 2, "batch_size": 5}
    with monkeypatch.context() as patch:  # captured from the engine's prefix fills, not computed again
        patch.setattr(PiFamily, "compute_features", not_again)
        store = generate_store(tiny_world, tmp_path / "pairs", cache_features=True, **job)
    index = store_features.read_index(store)
    frames = np.unique(PairStore(store).index()[0])
    assert index["complete"] and index["kind"] == f"{variant}.image_embeddings"
    assert store_features.cached_frames(index) == len(frames) > 0 and index["slots"] == [CAMERA]
    recompute = cached_features.recompute_features(str(teacher), "cpu", _dataset(tiny_world))
    problems, summary = store_features.check(store, frames, recompute, spot=6)
    assert problems == [] and "6 frames recomputed match" in summary

    # a later round reads the cache: no image decoded, no vision tower run, X_1 bit-identical
    import importlib

    modeling = importlib.import_module(f"lerobot.policies.{variant}.modeling_{variant}")
    with monkeypatch.context() as patch:
        patch.setattr(modeling.PaliGemmaWithExpertModel, "embed_image", not_again)
        patch.setattr(PiFamily, "compute_features", not_again)
        again = generate_store(tiny_world, tmp_path / "round2", features_from=str(store), **job)
    first, second = PairStore(store), PairStore(again)
    assert len(first.shards) == len(second.shards)
    for i in range(len(first.shards)):
        a, b = first.read_stored(i, ("obs_index", "x1")), second.read_stored(i, ("obs_index", "x1"))
        assert np.array_equal(a["obs_index"], b["obs_index"]) and np.array_equal(a["x1"], b["x1"])
    assert store_features.read_index(again)["fingerprint"] == index["fingerprint"]

    # training with the cache is training without it (the student of train_expert_only)
    students = {}
    for name, off in (("cached", False), ("decoded", True)):
        plans = []
        settings = {"steps": 2, "batch_size": 4, "num_workers": 0, "device": "cpu", "no_feature_cache": off}
        train(TrainConfig(pairs=store, out=tmp_path / name, **settings), on_plan=plans.append)
        assert (plans[0].feature_cache is not None) is (not off)
        students[name] = load_file(
            tmp_path / name / "checkpoints" / "last" / "pretrained_model" / "model.safetensors"
        )
    for key, value in students["decoded"].items():
        assert torch.allclose(students["cached"][key], value, rtol=1e-5, atol=1e-7), key

    # a student whose projector trains is refused, with the reason, the flag and the way out
    unfrozen = _load(configured(teacher, tmp_path / "unfrozen", train_expert_only=False)).policy
    with pytest.raises(ReflowPairsError, match="multi_modal_projector has .* trainable") as err:
        cached_features.cache_for_training(store, unfrozen, PairStore(store).meta, disabled=False)
    assert "train_expert_only: true" in err.value.what and "`no_feature_cache`" in err.value.hint
