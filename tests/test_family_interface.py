"""The policy-family interface (``reflowpairs.policies.interface``) and the registry, the version gate every family
calls before lerobot's private methods, and the checkpoint-load hooks (``reflowpairs.load_hooks``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from contextlib import contextmanager
from importlib import metadata

import pytest
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Policy
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from lerobot.policies.pi05.modeling_pi05 import PI05Policy
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from reflowpairs import load_hooks
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import (
    FAMILIES,
    SUPPORTED_POLICIES,
    family,
    feature_cache_family,
    make_engine,
    version,
)
from reflowpairs.policies.interface import TIME_DIRECTIONS, FeatureCacheFamily, PolicyFamily
from reflowpairs.teacher import load_policy
from reflowpairs.tiny import pi_patch

LEROBOT_CLASSES = {
    "smolvla": (SmolVLAConfig, SmolVLAPolicy),
    "pi0": (PI0Config, PI0Policy),
    "pi05": (PI05Config, PI05Policy),
}


def test_the_registry_is_the_supported_list():
    assert SUPPORTED_POLICIES == tuple(FAMILIES) == ("smolvla", "pi0", "pi05", "eo1", "multi_task_dit")
    for policy_type, fam in FAMILIES.items():
        assert family(policy_type) is fam and fam.policy_type == policy_type
    with pytest.raises(
        ReflowPairsError, match="No policy family for act.*smolvla, pi0, pi05, eo1, multi_task_dit"
    ):
        family("act")


@pytest.mark.parametrize("policy_type", sorted(LEROBOT_CLASSES))
def test_each_family_satisfies_the_protocol_against_lerobots_classes(policy_type):
    fam = FAMILIES[policy_type]
    config_cls, policy_cls = LEROBOT_CLASSES[policy_type]
    assert isinstance(fam, PolicyFamily) and isinstance(fam, FeatureCacheFamily)
    assert feature_cache_family(policy_type) is fam
    assert fam.time_direction in TIME_DIRECTIONS
    assert fam.step_field in {f.name for f in dataclasses.fields(config_cls)}
    assert fam.chunk_methods and all(callable(getattr(policy_cls, name)) for name in fam.chunk_methods)


def test_an_object_missing_a_member_is_not_a_family():
    @dataclasses.dataclass
    class Partial:
        policy_type: str = "x"
        step_field: str = "num_steps"

        def pair_shapes(self, config):
            return (1, 1), (1, 1)

    assert not isinstance(Partial(), PolicyFamily) and not isinstance(Partial(), FeatureCacheFamily)
    assert feature_cache_family("act") is None


@pytest.mark.parametrize("policy_type", ["smolvla", "pi0", "pi05"])
def test_the_families_refuse_lerobots_internals_outside_the_tested_series(policy_type, monkeypatch):
    monkeypatch.setattr(version, "lerobot_version", lambda: "0.7.0")
    with pytest.raises(ReflowPairsError, match=r"lerobot 0\.7\.0 is installed.*lerobot==0\.6"):
        FAMILIES[policy_type].make_engine(None)
    assert version.lerobot_version_ok("0.6.9") and not version.lerobot_version_ok("0.60")


def test_exact_engine_runs_the_familys_sample_chunk(tiny_world):
    """``make_engine(exact=True)`` is ``ExactSampler`` on the family's ``sample_chunk``: one call per frame, on the
    frame's K noises."""
    import torch

    from reflowpairs.dataset import open_dataset
    from reflowpairs.engine import ExactSampler
    from reflowpairs.solvers import SolverConfig

    teacher = load_policy(str(tiny_world.teacher_dir), "cpu")
    dataset = open_dataset(tiny_world.repo_id, tiny_world.dataset_root)
    batch = teacher.preprocessor(torch.utils.data.default_collate([dataset[i] for i in (0, 5)]))
    calls = []

    @dataclasses.dataclass
    class Counting:
        inner: object
        step_field: str = "num_steps"

        def pair_shapes(self, config):
            return self.inner.pair_shapes(config)

        def sample_chunk(self, policy, frame, noise):
            calls.append(tuple(noise.shape))
            return self.inner.sample_chunk(policy, frame, noise)

        def frame_batch(self, batch):
            return self.inner.frame_batch(batch)

    engine = make_engine(teacher.policy, exact=True)
    assert isinstance(engine, ExactSampler) and engine.family is FAMILIES["smolvla"]
    (chunk, d0), (_, d1) = FAMILIES["smolvla"].pair_shapes(teacher.config)
    noise = torch.randn(2, 3, chunk, d0, generator=torch.Generator().manual_seed(0))
    solver = SolverConfig(num_steps=2)
    counted = ExactSampler(teacher.policy, Counting(FAMILIES["smolvla"])).sample(batch, noise, solver)
    assert calls == [(3, chunk, d0)] * 2
    assert counted.shape == (2, 3, chunk, d1) and torch.equal(counted, engine.sample(batch, noise, solver))


# --- checkpoint-load hooks ------------------------------------------------------------------------------------------


def test_the_tiny_size_patch_is_an_installed_entry_point():
    names = {e.name: e.value for e in metadata.entry_points(group=load_hooks.ENTRY_POINT_GROUP)}
    assert names.get("tiny_pi") == "reflowpairs.tiny.pi_patch:load_hook"
    assert load_hooks.load_hooks()["tiny_pi"] is pi_patch.load_hook


def test_the_tiny_hook_patches_only_a_marked_checkpoint(tmp_path):
    assert pi_patch.load_hook(tmp_path) is None
    assert load_hooks.checkpoint_load_patch(tmp_path).carried_files == {}
    spec = pi_patch.TinyGemmaSpec(depth=1)
    (tmp_path / pi_patch.TINY_MARKER).write_text(json.dumps(dataclasses.asdict(spec)))
    patch = load_hooks.checkpoint_load_patch(tmp_path)
    assert patch.carried_files == {pi_patch.TINY_MARKER: (tmp_path / pi_patch.TINY_MARKER).read_text()}
    assert pi_patch.active_spec() is None
    with patch.context:
        assert pi_patch.active_spec() == spec
    assert pi_patch.active_spec() is None


def test_load_policy_holds_a_registered_hooks_context_and_carries_its_files(tiny_world, tmp_path):
    checkpoint = tmp_path / "teacher"
    shutil.copytree(tiny_world.teacher_dir, checkpoint)
    events = []

    @contextmanager
    def around():
        events.append("enter")
        yield
        events.append("exit")

    def hook(path):
        return load_hooks.LoadPatch(around(), {"note.json": "{}"}) if path == checkpoint else None

    load_hooks.register_load_hook("test", hook)
    try:
        loaded = load_policy(str(checkpoint), "cpu")
        other = load_policy(str(tiny_world.teacher_dir), "cpu")
    finally:
        load_hooks.unregister_load_hook("test")
    assert events == ["enter", "exit"]
    assert loaded.extra_files == {"note.json": "{}"} and other.extra_files == {}
    assert "test" not in load_hooks.load_hooks()


def test_a_broken_entry_point_is_skipped_with_a_warning(monkeypatch):
    broken = metadata.EntryPoint("broken", "reflowpairs.no_such_module:hook", load_hooks.ENTRY_POINT_GROUP)
    monkeypatch.setattr(load_hooks, "_from_entry_points", None)
    monkeypatch.setattr(load_hooks.metadata, "entry_points", lambda group: [broken])
    with pytest.warns(UserWarning, match="hook broken .*no_such_module.* cannot be loaded"):
        assert load_hooks.load_hooks() == {}
    monkeypatch.setattr(load_hooks, "_from_entry_points", None)
