"""The EO-1 family: the prefix-cached engine reproduces lerobot's own sampler with the noise pinned, reflow_loss is
lerobot's own training loss for the same noise and time, a teacher whose weights did not load is caught, the tiny
teacher builds without a network, and the whole CLI runs on it.

A tiny EO-1 teacher (``reflowpairs.tiny.eo1``: a ~0.1 M-parameter Qwen2.5-VL with a local processor directory,
trained briefly on the tiny world's dataset) is built once for this module's session with every socket connection
refused, and loaded back through lerobot's own ``from_pretrained`` and ``make_pre_post_processors``. Float32."""

from __future__ import annotations

import json
import shutil
from contextlib import redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import pytest
import torch

from reflowpairs.engine import repeat_frames, slice_frames
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import FAMILIES, family, lerobot_sampling_steps
from reflowpairs.policies.eo1 import FRAME_PIXELS, frame_batch, lerobot_batch
from reflowpairs.solvers import SolverConfig
from reflowpairs.teacher import SUPPORTED_POLICIES, load_policy
from reflowpairs.tiny.eo1 import TinyEO1Spec, build_tiny_eo1_teacher
from reflowpairs.tiny.world import TINY_REPO_ID, TinyDatasetSpec, build_tiny_dataset

from .helpers import cli, no_network

FRAMES = (0, 24, 25, 50)  # episodes 0, 1 and 2: both tasks in one batch


@dataclass(frozen=True)
class EO1World:
    """A tiny world's dataset and a tiny EO-1 teacher trained on it."""

    dataset_root: Path
    teacher_dir: Path
    repo_id: str = TINY_REPO_ID


@pytest.fixture(scope="session")
def eo1_world(tmp_path_factory) -> EO1World:
    """The tiny world's dataset (6 episodes) and a tiny EO-1 teacher trained 40 steps on it, built offline."""
    root = tmp_path_factory.mktemp("eo1")
    with no_network():
        build_tiny_dataset(root / "dataset", TINY_REPO_ID, TinyDatasetSpec(num_episodes=6))
        teacher = build_tiny_eo1_teacher(
            root / "teacher", TINY_REPO_ID, root / "dataset", spec=TinyEO1Spec(train_steps=40)
        )
    return EO1World(root / "dataset", teacher)


@pytest.fixture(scope="module")
def loaded(eo1_world):
    """The tiny teacher loaded as the CLI loads it (``reflowpairs.teacher.load_policy``), network refused."""
    with no_network(), redirect_stdout(StringIO()):
        return load_policy(eo1_world.teacher_dir, device="cpu")


def raw_frames(world: EO1World, indices=FRAMES, with_action: bool = False) -> dict:
    """The collated dataset frames at ``indices`` (with ``with_action``, their action chunks ``(B, 8, 2)`` too)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    chunk = {"action": [i / 10 for i in range(8)]} if with_action else None  # the teacher's chunk, at 10 fps
    dataset = LeRobotDataset(world.repo_id, root=world.dataset_root, delta_timestamps=chunk)
    raw = torch.utils.data.default_collate([dataset[i] for i in indices])
    return raw if with_action else {k: v for k, v in raw.items() if not k.startswith("action")}


def test_registered_with_its_members():
    fam = family("eo1")
    assert FAMILIES["eo1"] is fam and "eo1" in SUPPORTED_POLICIES
    assert (fam.policy_type, fam.step_field, fam.time_direction) == ("eo1", "num_denoise_steps", "noise_at_1")
    assert fam.chunk_methods == ("predict_action_chunk",)
    for member in ("pair_shapes", "make_engine", "sample_chunk", "reflow_loss", "check_loaded"):
        assert callable(getattr(fam, member))


def test_tiny_teacher_is_an_ordinary_offline_checkpoint(eo1_world, loaded):
    """Built with sockets refused (the fixture); its preprocessor names the local Qwen directory by absolute path,
    its config carries the tiny backbone, and the pair shapes come from it."""
    config = json.loads((eo1_world.teacher_dir / "config.json").read_text())
    assert config["type"] == "eo1" and config["vlm_config"]["text_config"]["hidden_size"] == 32
    steps = json.loads((eo1_world.teacher_dir / "policy_preprocessor.json").read_text())["steps"]
    names = [
        s.get("config", {}).get("processor_name") for s in steps if "processor_name" in s.get("config", {})
    ]
    assert names == [str(eo1_world.teacher_dir / "vlm")] and Path(names[0]).is_dir()
    assert family("eo1").pair_shapes(loaded.config) == ((8, 6), (8, 2))
    assert json.loads((eo1_world.teacher_dir / "tiny_training.json").read_text())["steps"] == 40


def test_tokenizer_overrides_load_a_local_processor(eo1_world, tmp_path):
    """The family's ``tokenizer_overrides`` point the saved pipeline's Qwen processor step at another local
    directory (``load_policy``'s ``tokenizer_processor`` override does not exist for EO-1)."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import make_pre_post_processors

    moved = tmp_path / "qwen"
    shutil.copytree(eo1_world.teacher_dir / "vlm", moved)
    config = PreTrainedConfig.from_pretrained(eo1_world.teacher_dir)
    overrides = family("eo1").tokenizer_overrides(moved)
    preprocessor, _ = make_pre_post_processors(
        config, pretrained_path=str(eo1_world.teacher_dir), preprocessor_overrides=overrides
    )
    step = next(s for s in preprocessor.steps if hasattr(s, "processor_name"))
    assert step.processor_name == str(moved)


def reference(loaded, world: EO1World, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """lerobot's own sampler per frame: ``sample_chunk`` on the frame repeated K times (preprocessed as one batch)
    with its K noises ``noise[f]``; ``(B, K, T, A)``."""
    fam = family("eo1")
    out = []
    with lerobot_sampling_steps(loaded.policy, num_steps):
        for f, index in enumerate(FRAMES):
            frame = loaded.preprocessor(raw_frames(world, [index] * noise.shape[1]))
            out.append(fam.sample_chunk(loaded.policy, frame, noise[f]))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("samples", "num_steps", "frames_per_call"), [(1, 10, None), (3, 10, 3), (4, 2, None)]
)
def test_engine_matches_lerobots_sampler(eo1_world, loaded, samples, num_steps, frames_per_call):
    """X_1 of the prefix-cached engine (the prompt's cache filled once per frame, shared by its K samples and all
    steps) equals lerobot's ``predict_action_chunk`` with the model's noise draw pinned, to 1e-5 in float32."""
    torch.manual_seed(samples)
    noise = torch.randn(len(FRAMES), samples, 8, 6)
    engine = family("eo1").make_engine(loaded.policy, frames_per_call)
    batch = loaded.preprocessor(raw_frames(eo1_world))
    x1 = engine.sample(batch, noise, SolverConfig("euler", num_steps))
    expected = reference(loaded, eo1_world, noise, num_steps)
    assert x1.shape == (len(FRAMES), samples, 8, 2)
    torch.testing.assert_close(x1, expected, rtol=0, atol=1e-5)
    assert expected.abs().max() > 0.1  # a real ODE, not zeros
    # the pinned draw is gone and lerobot draws again: another call differs
    loaded.policy.reset()
    drawn = loaded.policy.predict_action_chunk(lerobot_batch(batch))
    assert not torch.allclose(drawn, expected[:, 0], atol=1e-3)


def test_exact_sampler_matches_the_engine(eo1_world, loaded):
    """``--exact`` (lerobot's own sampler per frame) and the prefix-cached engine give the same X_1."""
    from reflowpairs.policies import make_engine

    noise = torch.randn(len(FRAMES), 2, 8, 6)
    batch = loaded.preprocessor(raw_frames(eo1_world))
    solver = SolverConfig("euler", 10)
    exact = make_engine(loaded.policy, exact=True).sample(batch, noise, solver)
    cached = make_engine(loaded.policy).sample(batch, noise, solver)
    torch.testing.assert_close(exact, cached, rtol=0, atol=1e-5)


def test_engine_leaves_the_cache_reusable_and_runs_every_solver(eo1_world, loaded):
    """Each step crops the chunk's keys and values off the shared cache again: the same velocity twice is equal;
    midpoint and rk4 reuse the cache and land near the 10-step Euler reference."""
    engine = family("eo1").make_engine(loaded.policy)
    batch = loaded.preprocessor(raw_frames(eo1_world))
    velocity = engine.velocity_field(batch, 2)
    x = torch.randn(2 * len(FRAMES), 8, 6)
    t = torch.full((2 * len(FRAMES),), 0.7)
    torch.testing.assert_close(velocity(x, t), velocity(x, t), rtol=0, atol=0)
    noise = torch.randn(len(FRAMES), 2, 8, 6)
    euler = engine.sample(batch, noise, SolverConfig("euler", 10))
    for name in ("midpoint", "rk4"):
        other = engine.sample(batch, noise, SolverConfig(name, 5))
        assert (other - euler).abs().max() < 0.5 * euler.abs().max()


def test_frame_layout(eo1_world, loaded):
    """The preprocessor's flattened images reshaped frame-first slice and repeat per frame like every other tensor;
    ``lerobot_batch`` undoes it; frames with different image sizes are refused."""
    batch = loaded.preprocessor(raw_frames(eo1_world))
    frames = frame_batch(batch)
    assert frames[FRAME_PIXELS].shape[0] == len(FRAMES)
    back = lerobot_batch(frames)
    torch.testing.assert_close(back["pixel_values"], batch["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(back["image_grid_thw"], batch["image_grid_thw"], rtol=0, atol=0)
    one = lerobot_batch(repeat_frames(slice_frames(frames, 1, 2, len(FRAMES)), 1, 3))
    alone = loaded.preprocessor(raw_frames(eo1_world, [FRAMES[1]] * 3))
    torch.testing.assert_close(one["pixel_values"], alone["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(one["image_grid_thw"], alone["image_grid_thw"], rtol=0, atol=0)
    odd = dict(batch, image_grid_thw=batch["image_grid_thw"][:-1])
    with pytest.raises(ReflowPairsError, match="images for"):
        frame_batch(odd)
    with pytest.raises(ValueError, match="pinned noise has shape"):
        family("eo1").sample_chunk(loaded.policy, batch, torch.zeros(len(FRAMES), 8, 5))


def test_reflow_loss_is_lerobots_loss(eo1_world, loaded):
    """``reflow_loss`` with the noise and time lerobot's own ``EO1Policy.forward`` drew (regenerated from the same
    seed, in its order: time, then noise) equals that forward's loss; per-sample losses average to it; it is
    differentiable; the pinned draws are removed after."""
    policy = loaded.policy
    fam = family("eo1")
    raw = raw_frames(eo1_world, with_action=True)
    batch = loaded.preprocessor(raw)  # normalised action chunk (B, T, A), as lerobot trains
    torch.manual_seed(11)
    expected, _ = policy.forward(batch)
    torch.manual_seed(11)
    t = policy.model.sample_time(len(FRAMES), "cpu")
    x0 = policy.model.sample_noise((len(FRAMES), 8, 6), "cpu")
    x1 = batch["action"]
    loss = fam.reflow_loss(policy, batch, x0, x1, t)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=0, atol=1e-6)
    per_sample = fam.reflow_loss(policy, batch, x0, x1, t, reduction="none")
    assert per_sample.shape == (len(FRAMES),)
    torch.testing.assert_close(per_sample.mean().detach(), expected.detach(), rtol=0, atol=1e-6)
    assert per_sample.std() > 0
    loss.backward()
    assert policy.model.action_out_proj[0].weight.grad is not None
    policy.zero_grad(set_to_none=True)
    assert "sample_noise" not in vars(policy.model) and "sample_time" not in vars(policy.model)
    with pytest.raises(ValueError, match="reduction"):
        fam.reflow_loss(policy, batch, x0, x1, t, reduction="sum")


def test_reflow_loss_through_a_wrapper(eo1_world, loaded):
    """A ``.module``-holding wrapper (as DistributedDataParallel is) is called through its own forward, with the
    draws pinned on the wrapped policy's model: the same loss."""
    policy = loaded.policy
    fam = family("eo1")

    class Wrapper(torch.nn.Module):
        calls = 0

        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            Wrapper.calls += 1
            return self.module(*args, **kwargs)

    batch = loaded.preprocessor(raw_frames(eo1_world))
    torch.manual_seed(3)
    x0, x1, t = torch.randn(len(FRAMES), 8, 6), torch.randn(len(FRAMES), 8, 2), torch.rand(len(FRAMES))
    with torch.no_grad():
        plain = fam.reflow_loss(policy, batch, x0, x1, t)
        wrapped = fam.reflow_loss(Wrapper(policy), batch, x0, x1, t)
    assert Wrapper.calls == 1
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)


def test_check_loaded(eo1_world, loaded, tmp_path):
    """The loaded teacher passes; a model.safetensors missing a tensor (``from_pretrained`` loads non-strictly and
    leaves that layer random) is caught."""
    from lerobot.policies.eo1.modeling_eo1 import EO1Policy
    from safetensors.torch import load_file, save_file

    fam = family("eo1")
    fam.check_loaded(loaded.policy, eo1_world.teacher_dir)
    broken = tmp_path / "broken"
    shutil.copytree(eo1_world.teacher_dir, broken, ignore=shutil.ignore_patterns("vlm"))
    tensors = load_file(eo1_world.teacher_dir / "model.safetensors")
    tensors.pop("model.state_proj.weight")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with redirect_stdout(StringIO()):
        partial = EO1Policy.from_pretrained(broken)
    with pytest.raises(ReflowPairsError, match="lacks 1 of"):
        fam.check_loaded(partial, broken)


@dataclass(frozen=True)
class CliRun:
    store: Path
    student: Path
    validate_output: str


@pytest.fixture(scope="module")
def cli_run(eo1_world, tmp_path_factory) -> CliRun:
    """From the CLI: a store generated from the tiny EO-1 teacher, validated with a spot check (the teacher re-run on
    stored pairs), and a 1-step student trained one step on it."""
    root = tmp_path_factory.mktemp("eo1_cli")
    store, out = root / "pairs", root / "student"
    cli("generate", "--teacher", str(eo1_world.teacher_dir), *world_args(eo1_world), "--episodes", "0-1",
        "--out", str(store), "--samples-per-frame", "2", "--batch-size", "8", "--device", "cpu")  # fmt: skip
    report = cli("validate", str(store), "--spot-check", "6", "--teacher", str(eo1_world.teacher_dir),
                 *world_args(eo1_world))  # fmt: skip
    cli("train", "--pairs", str(store), "--out", str(out), "--steps", "1", "--student-num-steps", "1",
        "--batch-size", "4", "--device", "cpu")  # fmt: skip
    return CliRun(store, out / "checkpoints" / "last" / "pretrained_model", report.output)


def world_args(world: EO1World) -> tuple[str, ...]:
    return ("--dataset", world.repo_id, "--dataset-root", str(world.dataset_root))


@pytest.mark.slow
def test_cli_generate_validate_train(eo1_world, cli_run):
    """The store validates (every check, the spot check included); the student's config.json equals the teacher's
    except pretrained_path and num_denoise_steps, and lerobot's ``EO1Policy.from_pretrained`` loads it at 1 step with
    every weight from its file."""
    from lerobot.policies.eo1.modeling_eo1 import EO1Policy

    assert "spot check" in cli_run.validate_output and "SOUND" in cli_run.validate_output
    teacher_config = json.loads((eo1_world.teacher_dir / "config.json").read_text())
    student_config = json.loads((cli_run.student / "config.json").read_text())
    keys = teacher_config.keys() | student_config.keys()
    assert {k for k in keys if teacher_config.get(k) != student_config.get(k)} == {
        "pretrained_path",
        "num_denoise_steps",
    }
    assert student_config["num_denoise_steps"] == 1
    with no_network(), redirect_stdout(StringIO()):
        policy = EO1Policy.from_pretrained(cli_run.student)
    assert policy.config.num_denoise_steps == 1
    family("eo1").check_loaded(policy, cli_run.student)


@pytest.mark.slow
def test_cli_eval(eo1_world, cli_run, tmp_path):
    """``reflowpairs eval`` scores the EO-1 student against its teacher and writes its report."""
    out = tmp_path / "eval"
    cli("eval", "--student", str(cli_run.student), "--teacher", str(eo1_world.teacher_dir), *world_args(eo1_world),
        "--episodes", "2-3", "--max-frames", "4", "--num-steps", "1,10", "--latency-repeats", "1",
        "--out", str(out))  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report
