"""pi0/pi05 families: the prefix-cached engine reproduces lerobot's sampler, reflow_loss reproduces lerobot's
training loss, a teacher whose weights did not load is caught, and tiny teachers build without a network.

Tiny pi0 and pi05 teachers (``reflowpairs.tiny.pi``, ~41 M parameters, mostly PaliGemma's vocabulary) are built once
for the session (conftest's ``pi_teachers``, over the tiny world's dataset) with every socket connection refused,
and loaded back through lerobot's own ``from_pretrained`` and ``make_pre_post_processors``. Everything runs in
float32."""

from __future__ import annotations

import json
import shutil
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import FAMILIES, family, lerobot_version_ok, require_lerobot_version
from reflowpairs.policies._pi_common import check_weights_loaded
from reflowpairs.solvers import SolverConfig
from reflowpairs.tiny import pi as tiny_pi
from reflowpairs.tiny import pi_patch
from reflowpairs.tiny.world import TINY_REPO_ID

from .helpers import no_network

VARIANTS = ("pi0", "pi05")
FRAMES = (0, 24, 25)  # episode 0 ("reach up") and episode 1 ("reach sideways"): two prompts in one batch


def load_teacher(checkpoint: Path, strict: bool = True):
    """The checkpoint's policy (via lerobot's ``from_pretrained`` under its tiny patch) and preprocessor."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    with pi_patch.tiny_gemma_patch(pi_patch.read_marker(checkpoint) or pi_patch.TinyGemmaSpec()):
        config = PreTrainedConfig.from_pretrained(checkpoint)
        with redirect_stdout(StringIO()):  # lerobot prints its loading notes
            policy = get_policy_class(config.type).from_pretrained(checkpoint, config=config, strict=strict)
    policy.eval()
    preprocessor, _ = make_pre_post_processors(config, pretrained_path=str(checkpoint))
    return policy, preprocessor


def _raw_frames(dataset_root: Path) -> dict:
    """The collated dataset frames ``FRAMES`` without their action keys (an observation batch)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset(TINY_REPO_ID, root=dataset_root)
    raw = torch.utils.data.default_collate([dataset[i] for i in FRAMES])
    return {k: v for k, v in raw.items() if not k.startswith("action")}


@pytest.fixture(scope="module")
def pi_world(pi_teachers, tiny_world):
    """``{variant: (checkpoint_dir, policy, preprocessed batch of FRAMES)}`` for the session's tiny pi0 and pi05
    teachers, loaded with the network refused."""
    world = {}
    with no_network():
        raw = _raw_frames(tiny_world.dataset_root)
        for variant in VARIANTS:
            policy, preprocessor = load_teacher(pi_teachers[variant])
            world[variant] = (pi_teachers[variant], policy, preprocessor(dict(raw)))
    return world


def reference_x1(policy, batch: dict, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """lerobot's own sampler: ``predict_action_chunk`` on each frame repeated K times with its K noises."""
    frames, k = noise.shape[:2]
    out = []
    for f in range(frames):
        frame = {}
        for key, value in batch.items():
            if torch.is_tensor(value) and value.ndim > 0 and len(value) == frames:
                frame[key] = value[f : f + 1].repeat_interleave(k, dim=0)
            elif isinstance(value, list) and len(value) == frames:
                frame[key] = [value[f]] * k
            else:
                frame[key] = value
        out.append(policy.predict_action_chunk(frame, noise=noise[f], num_steps=num_steps))
    return torch.stack(out)


def loss_inputs(policy, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(x0 (B, T, max_action_dim), x1 (B, T, action_dim), t (B,) in (0.001, 1])`` for the B=len(FRAMES)
    frames of a loss test."""
    (chunk, max_dim), (_, action_dim) = FAMILIES[policy.config.type].pair_shapes(policy.config)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(FRAMES), chunk, max_dim, generator=gen)
    x1 = torch.randn(len(FRAMES), chunk, action_dim, generator=gen)
    return x0, x1, torch.rand(len(FRAMES), generator=gen) * 0.999 + 0.001


def test_registry_and_version():
    assert set(FAMILIES) == {"smolvla", "pi0", "pi05", "eo1", "multi_task_dit"}
    assert all(FAMILIES[name].step_field == "num_inference_steps" for name in VARIANTS)
    assert FAMILIES["smolvla"].step_field == "num_steps"
    assert lerobot_version_ok()  # the installed lerobot is the tested 0.6.x
    assert lerobot_version_ok("0.6.9") and not lerobot_version_ok("0.7.0") and not lerobot_version_ok("0.60")
    with pytest.raises(ReflowPairsError, match="0.6.x"):
        require_lerobot_version("0.7.0")
    with pytest.raises(ReflowPairsError, match="Supported: smolvla, pi0, pi05, eo1, multi_task_dit"):
        family("act")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("num_steps", [1, 10])
def test_engine_matches_predict_action_chunk(pi_world, variant, samples, num_steps):
    """X_1 of the prefix-cached engine == ``predict_action_chunk(batch, noise=x0)`` (normalised actions cropped to
    the action dimension: pi's predict_action_chunk returns the model output, the postprocessor unnormalises), for
    one call of all frames, calls of 2 frames (the second one padded with a copy of its last frame) and one call
    padded from 3 frames to 4."""
    _, policy, batch = pi_world[variant]
    fam = FAMILIES[variant]
    (chunk, max_dim), (_, action_dim) = fam.pair_shapes(policy.config)
    noise = torch.randn(
        len(FRAMES), samples, chunk, max_dim, generator=torch.Generator().manual_seed(samples)
    )
    expected = reference_x1(policy, batch, noise, num_steps)
    assert expected.shape == (len(FRAMES), samples, chunk, action_dim)
    for frames_per_call in (None, 2, 4):
        engine = fam.make_engine(policy, frames_per_call)
        assert engine.noise_shape == (chunk, max_dim) and engine.action_dim == action_dim
        x1 = engine.sample(batch, noise, SolverConfig("euler", num_steps))
        assert x1.shape == expected.shape
        torch.testing.assert_close(x1, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_leaves_the_cache_reusable(pi_world, variant):
    """The velocity field's cache is cropped back after every step: the same (x_t, t) twice gives the same v."""
    _, policy, batch = pi_world[variant]
    engine = FAMILIES[variant].make_engine(policy)
    velocity = engine.velocity_field(batch, 2)
    x = torch.randn(len(FRAMES) * 2, *engine.noise_shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((len(FRAMES) * 2,), 0.5)
    first = velocity(x, t)
    torch.testing.assert_close(velocity(x, t), first, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reflow_loss_is_lerobots_loss(pi_world, variant):
    """reflow_loss == ``policy.forward`` (lerobot's policy-level training loss: model-level loss, padded action dims
    cropped, mean) with the model's noise and time draws replaced by x0 and t."""
    from lerobot.utils.constants import ACTION

    _, policy, batch = pi_world[variant]
    fam = FAMILIES[variant]
    x0, x1, t = loss_inputs(policy, seed=2)
    action_dim = x1.shape[-1]
    loss = fam.reflow_loss(policy, batch, x0, x1, t)
    per_sample = fam.reflow_loss(policy, batch, x0, x1, t, reduction="none")

    model = policy.model
    model.sample_noise = lambda shape, device: x0.to(device)
    model.sample_time = lambda bsize, device: t.to(device)
    try:
        with torch.no_grad():
            expected, info = policy.forward({**batch, ACTION: x1})
            expected_none, _ = policy.forward({**batch, ACTION: x1}, reduction="none")
    finally:
        del model.sample_noise, model.sample_time
    assert loss.ndim == 0 and loss.item() > 0.01  # not trivially zero
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(per_sample.detach(), expected_none, rtol=0, atol=1e-6)
    assert len(info["loss_per_dim"]) == action_dim
    loss.backward()  # differentiable, as training needs
    assert policy.model.action_out_proj.weight.grad is not None
    policy.zero_grad(set_to_none=True)


def test_reflow_loss_through_a_ddp_wrapper(pi_world, tmp_path):
    """Under data parallelism the loop hands the family loss the ``DistributedDataParallel`` wrapper: the loss runs
    through the wrapper's ``forward`` (so DDP averages the gradients), equals the plain policy's, and gives the same
    gradients (one process, gloo), step after step; ``reflowpairs.train.loss.reflow_loss`` finds the family through the
    wrapper. The wrapper needs ``find_unused_parameters=True``, as lerobot-train sets it: pi's loss never uses the
    VLM's last-layer attention output and MLP, its final norm and the lm_heads."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from reflowpairs.train.loss import reflow_loss

    class CountingDDP(DistributedDataParallel):
        calls = 0

        def forward(self, *args, **kwargs):
            CountingDDP.calls += 1
            return super().forward(*args, **kwargs)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for variant in VARIANTS:
            _, policy, batch = pi_world[variant]
            fam = FAMILIES[variant]
            x0, x1, t = loss_inputs(policy, seed=5)
            head = policy.model.action_out_proj.weight
            plain = fam.reflow_loss(policy, batch, x0, x1, t)
            plain.backward()
            expected_grad = head.grad.clone()
            policy.zero_grad(set_to_none=True)

            # lerobot-train's DDP setting: pi's loss leaves the VLM's last-layer output path and lm_heads unused
            wrapped = CountingDDP(policy, find_unused_parameters=True)
            with torch.no_grad():
                per_sample = fam.reflow_loss(wrapped, batch, x0, x1, t, reduction="none")
            for _ in range(2):  # a second forward fails if the first left a parameter without its gradient
                calls = CountingDDP.calls
                loss = fam.reflow_loss(wrapped, batch, x0, x1, t)
                assert CountingDDP.calls == calls + 1  # through the wrapper's forward
                loss.backward()
                torch.testing.assert_close(loss.detach(), plain.detach(), rtol=0, atol=1e-6)
                torch.testing.assert_close(head.grad, expected_grad, rtol=0, atol=1e-6)
                policy.zero_grad(set_to_none=True)
            torch.testing.assert_close(per_sample.mean(), plain.detach(), rtol=0, atol=1e-6)
            assert "sample_noise" not in vars(policy.model)  # the pinned draws are gone again
            generic, _ = reflow_loss(wrapped, dict, batch, x0, x1, t)  # batch is preprocessed already
            torch.testing.assert_close(generic.detach(), plain.detach(), rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant", VARIANTS)
def test_check_weights_loaded(pi_world, variant, tmp_path):
    """A properly loaded teacher passes; a missing, corrupt or incomplete model.safetensors (from_pretrained then
    returns random weights, or leaves layers random) is caught."""
    checkpoint, policy, _ = pi_world[variant]
    check_weights_loaded(policy, checkpoint)
    check_weights_loaded(policy, checkpoint, max_tensors=None)

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").unlink()
    random_policy, _ = load_teacher(broken)  # lerobot prints a note and returns random weights
    with pytest.raises(ReflowPairsError, match="no model.safetensors"):
        check_weights_loaded(random_policy, broken)
    with pytest.raises(ReflowPairsError, match="differ"):  # and against the real file: not its weights
        check_weights_loaded(random_policy, checkpoint)
    FAMILIES[variant].check_loaded(policy, checkpoint)  # the family member load_policy calls is this check
    with pytest.raises(ReflowPairsError, match="differ"):
        FAMILIES[variant].check_loaded(random_policy, checkpoint)

    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    random_policy, _ = load_teacher(broken)
    with pytest.raises(ReflowPairsError, match="cannot be read"):
        check_weights_loaded(random_policy, broken)

    from safetensors.torch import load_file, save_file

    tensors = load_file(checkpoint / "model.safetensors")
    tensors.pop("model.action_out_proj.weight")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    partial_policy, _ = load_teacher(broken, strict=False)
    with pytest.raises(ReflowPairsError, match="lacks 1 of"):
        check_weights_loaded(partial_policy, broken)


def test_tiny_build_is_offline_and_self_describing(pi_world):
    """The build ran with sockets refused (the fixture); the saved preprocessor names the local tokenizer, the
    checkpoint carries its tiny spec, pi05's prompt tokenises to real words, and the patch is gone afterwards."""
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    for variant in VARIANTS:
        checkpoint, policy, batch = pi_world[variant]
        steps = json.loads((checkpoint / "policy_preprocessor.json").read_text())["steps"]
        names = [
            s["config"].get("tokenizer_name") for s in steps if s["registry_name"] == "tokenizer_processor"
        ]
        assert names == [str(checkpoint / "tokenizer")]
        assert pi_patch.read_marker(checkpoint) == pi_patch.TinyGemmaSpec()
        assert sum(p.numel() for p in policy.parameters()) < 60_000_000
        tokens = batch[OBS_LANGUAGE_TOKENS][batch[OBS_LANGUAGE_ATTENTION_MASK]]
        assert tokens.max() < pi_patch.PALIGEMMA_VOCAB
        assert (tokens == 1).float().mean() < 0.2  # id 1 is build_pi_tokenizer's <unk>
        assert batch[OBS_LANGUAGE_TOKENS].shape[1] == policy.config.tokenizer_max_length
    assert pi_patch.active_spec() is None
    assert modeling_pi0.get_gemma_config("gemma_2b").width == 2048
    assert modeling_pi05.get_gemma_config("gemma_300m").width == 1024


@pytest.mark.parametrize("variant", VARIANTS)
def test_other_solvers_reuse_the_cache(pi_world, variant):
    """midpoint and dopri5 run on the engine's velocity field; dopri5 solves each frame on its own, so a frame's X_1
    does not depend on which frames share its call."""
    _, policy, batch = pi_world[variant]
    engine = FAMILIES[variant].make_engine(policy, 2)
    noise = torch.randn(len(FRAMES), 2, *engine.noise_shape, generator=torch.Generator().manual_seed(3))
    midpoint = engine.sample(batch, noise, SolverConfig("midpoint", 4))
    assert midpoint.shape == (len(FRAMES), 2, engine.noise_shape[0], engine.action_dim)
    assert torch.isfinite(midpoint).all()
    dopri = engine.sample(batch, noise, SolverConfig("dopri5", rtol=1e-3, atol=1e-3))
    alone = (
        FAMILIES[variant]
        .make_engine(policy)
        .sample(
            {k: v[2:] if torch.is_tensor(v) and v.ndim > 0 else v for k, v in batch.items()},
            noise[2:],
            SolverConfig("dopri5", rtol=1e-3, atol=1e-3),
        )
    )
    torch.testing.assert_close(dopri[2:], alone, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_matches_in_bfloat16(pi_world, tiny_world, variant, tmp_path):
    """A teacher built with ``dtype: bfloat16`` (Gemma layers in bfloat16, as real pi checkpoints run): the engine's
    X_1 still equals ``predict_action_chunk``'s (bit for bit on the CPU)."""
    checkpoint = pi_world[variant][0]
    dataset_root = tiny_world.dataset_root
    bf16 = tiny_pi.build_tiny_pi_teacher(
        tmp_path / variant,
        variant,
        TINY_REPO_ID,
        dataset_root,
        tokenizer_dir=checkpoint / "tokenizer",
        spec=tiny_pi.TinyPiSpec(train_steps=0, dtype="bfloat16"),
    )
    policy, preprocessor = load_teacher(bf16)
    check_weights_loaded(policy, bf16)
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16, torch.float32}
    batch = preprocessor(_raw_frames(dataset_root))
    engine = FAMILIES[variant].make_engine(policy, 2)
    noise = torch.randn(len(FRAMES), 3, *engine.noise_shape, generator=torch.Generator().manual_seed(4))
    x1 = engine.sample(batch, noise, SolverConfig("euler", 10))
    torch.testing.assert_close(x1, reference_x1(policy, batch, noise, 10), rtol=0, atol=1e-5)


def test_install_for_checkpoint(pi_world):
    """A fresh process (a CLI subprocess) installs the patch a tiny checkpoint names before loading it; an ordinary
    checkpoint installs nothing."""
    checkpoint = pi_world["pi0"][0]
    assert pi_patch.active_spec() is None
    try:
        assert pi_patch.install_for_checkpoint(checkpoint)
        assert pi_patch.active_spec() == pi_patch.read_marker(checkpoint)
        policy, _ = load_teacher(checkpoint)  # the context manager inside restores the installed spec after
        assert pi_patch.active_spec() == pi_patch.read_marker(checkpoint)
        check_weights_loaded(policy, checkpoint)
    finally:
        pi_patch.uninstall()
    assert not pi_patch.install_for_checkpoint(checkpoint / "tokenizer")
    assert pi_patch.active_spec() is None
