"""The Multi-task DiT family (``reflowpairs.policies.multi_task_dit``, lerobot's ``multi_task_dit`` with
``objective="flow_matching"``) on a tiny offline teacher (``reflowpairs.tiny.dit``: a local tiny CLIP directory, the
tiny world's dataset, a briefly trained DiT), built once for this module.

DiT integrates t=0 (noise) -> 1 (action); the family exposes it in lerobot's convention (tau=1 noise), so the engine
run by ``reflowpairs.solvers`` must equal DiT's own loop from the same noise, and ``reflow_loss`` at tau must equal
DiT's own ``forward`` loss at its time ``1 - tau``. Everything runs in float32 on the CPU."""

from __future__ import annotations

import copy
import json
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from reflowpairs.dataset import open_dataset
from reflowpairs.engine import repeat_frames, slice_frames
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import FAMILIES, configured_num_steps, family
from reflowpairs.policies.multi_task_dit import (
    FAMILY,
    PinnedDraws,
    check_loaded,
    check_supported,
    with_observation_history,
)
from reflowpairs.solvers import SolverConfig
from reflowpairs.store.pairs import Pairs
from reflowpairs.store.reader import PairStore
from reflowpairs.teacher import SUPPORTED_POLICIES, load_policy
from reflowpairs.tiny.dit import TinyDitSpec, build_tiny_dit_world

from .helpers import cli

FRAMES = (0, 5, 30, 101)  # dataset positions: both tasks, several episodes


@pytest.fixture(scope="module")
def dit_world(tmp_path_factory):
    """A tiny flow-matching DiT teacher (100 Euler steps, horizon 8) on the tiny world (tests need a real ODE, not a
    good one)."""
    return build_tiny_dit_world(
        tmp_path_factory.mktemp("dit") / "world", teacher_spec=TinyDitSpec(train_steps=40)
    )


@pytest.fixture(scope="module")
def dit_teacher(dit_world):
    with redirect_stdout(StringIO()):
        return load_policy(str(dit_world.teacher_dir), "cpu")


def _batch(loaded, world, positions=FRAMES) -> dict:
    """A preprocessed observation batch of the dataset frames at ``positions``."""
    dataset = open_dataset(world.repo_id, world.dataset_root)
    items = [{k: v for k, v in dataset[p].items() if not k.startswith("action")} for p in positions]
    return loaded.preprocessor(torch.utils.data.default_collate(items))


def _sample_chunks(policy, batch: dict, noise: torch.Tensor) -> torch.Tensor:
    """``FAMILY.sample_chunk`` per frame on the frame repeated K times: ``(B, K, T, A)`` from noise ``(B, K, T, A)``."""
    frames, samples = noise.shape[:2]
    return torch.stack(
        [
            FAMILY.sample_chunk(
                policy, repeat_frames(slice_frames(batch, f, f + 1, frames), 1, samples), noise[f]
            )
            for f in range(frames)
        ]
    )


def test_the_family_is_registered_with_its_interface():
    assert FAMILIES["multi_task_dit"] is FAMILY and family("multi_task_dit") is FAMILY
    assert "multi_task_dit" in SUPPORTED_POLICIES
    assert (FAMILY.policy_type, FAMILY.step_field, FAMILY.time_direction) == (
        "multi_task_dit",
        "num_integration_steps",
        "noise_at_0",
    )
    assert FAMILY.chunk_methods == ("predict_action_chunk",)


def test_pair_shapes_are_the_whole_horizon(dit_teacher):
    config = dit_teacher.config
    action = config.action_feature.shape[0]
    assert FAMILY.pair_shapes(config) == ((config.horizon, action), (config.horizon, action))


@pytest.mark.parametrize("num_steps", [100, 2])
def test_engine_x1_equals_dits_own_sampler(dit_teacher, dit_world, num_steps):
    """The conditioning-shared engine (3 frames per call, so the last call is padded), integrated by our Euler from
    tau=1 to 0, equals DiT's own ``conditional_sample`` (t=0 -> 1) from the same noise, K=3 samples per frame."""
    policy = dit_teacher.policy
    batch = _batch(dit_teacher, dit_world)
    (horizon, width), _ = FAMILY.pair_shapes(policy.config)
    noise = torch.randn(len(FRAMES), 3, horizon, width, generator=torch.Generator().manual_seed(num_steps))
    engine = FAMILY.make_engine(policy, frames_per_call=3)
    x1 = engine.sample(batch, noise, SolverConfig("euler", num_steps))
    with configured_num_steps(policy, num_steps):
        reference = _sample_chunks(policy, batch, noise)
    assert x1.shape == reference.shape == noise.shape
    assert float((x1 - reference).abs().max()) < 1e-5
    assert float((reference[:, 0] - reference[:, 1]).abs().max()) > 1e-3  # the samples do differ


def test_engine_rk4_matches_dits_rk4(dit_teacher, dit_world):
    """Our rk4 (torchdiffeq's, the 3/8-rule variant) against DiT's ``integration_method="rk4"`` (classic RK4) on the
    same grid: both 4th order, so they agree far more closely than either agrees with Euler at that step count."""
    policy = dit_teacher.policy
    batch = _batch(dit_teacher, dit_world, FRAMES[:2])
    (horizon, width), _ = FAMILY.pair_shapes(policy.config)
    noise = torch.randn(2, 2, horizon, width, generator=torch.Generator().manual_seed(1))
    engine = FAMILY.make_engine(policy)
    ours = engine.sample(batch, noise, SolverConfig("rk4", 4))
    euler = engine.sample(batch, noise, SolverConfig("euler", 4))
    saved = policy.config.integration_method
    policy.config.integration_method = "rk4"
    try:
        with configured_num_steps(policy, 4):
            dits = _sample_chunks(policy, batch, noise)
    finally:
        policy.config.integration_method = saved
    gap, euler_gap = float((ours - dits).abs().max()), float((euler - dits).abs().max())
    assert gap < 1e-4 and gap < 0.05 * euler_gap


def _dits_own_loss(policy, batch: dict, actions: torch.Tensor, seed: int):
    """``policy.forward`` with lerobot drawing the noise and time itself (seeded), and what it drew:
    ``(loss, noise (B, T, A), t_dit (B,))``."""
    drawn = {}
    objective = policy.objective
    sample_timesteps = objective._sample_timesteps

    def recording(batch_size, device):
        drawn["t"] = sample_timesteps(batch_size, device)
        return drawn["t"]

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.randn_like:
                drawn["noise"] = out
            return out

    objective._sample_timesteps = recording
    torch.manual_seed(seed)
    try:
        with Spy():
            loss = policy.forward({**with_observation_history(policy.config, batch), "action": actions})[0]
    finally:
        del objective._sample_timesteps
    return loss, drawn["noise"], drawn["t"]


def test_reflow_loss_is_dits_own_loss_at_the_mapped_time(dit_teacher, dit_world):
    """``reflow_loss(x0, x1, tau)`` == DiT's own ``forward`` loss when DiT draws noise x0 and time 1 - tau; with
    ``reduction="none"`` the per-sample losses, whose mean is that loss."""
    policy = dit_teacher.policy
    batch = _batch(dit_teacher, dit_world)
    (horizon, width), _ = FAMILY.pair_shapes(policy.config)
    actions = torch.randn(len(FRAMES), horizon, width, generator=torch.Generator().manual_seed(2))
    policy.train()
    try:
        own, noise, t_dit = _dits_own_loss(policy, batch, actions, seed=3)
        tau = 1.0 - t_dit  # lerobot's convention
        ours = FAMILY.reflow_loss(policy, batch, noise, actions, tau)
        per_sample = FAMILY.reflow_loss(policy, batch, noise, actions, tau, reduction="none")
        first = FAMILY.reflow_loss(
            policy, slice_frames(batch, 0, 1, len(FRAMES)), noise[:1], actions[:1], tau[:1]
        )
    finally:
        policy.eval()
    assert torch.allclose(ours, own, rtol=1e-6, atol=1e-7)
    assert per_sample.shape == (len(FRAMES),)
    assert torch.allclose(per_sample.mean(), own, rtol=1e-6, atol=1e-7)
    assert torch.allclose(per_sample[0], first, rtol=1e-5, atol=1e-6)
    ours.backward()  # the loss trains the policy
    assert policy.noise_predictor.output_proj.weight.grad is not None
    policy.zero_grad(set_to_none=True)


def test_pinned_draws_return_the_noise_once_and_refuse_another_shape():
    noise = torch.arange(6.0).reshape(2, 3)
    with PinnedDraws(noise):
        assert torch.equal(torch.randn(2, 3, dtype=torch.float64), noise.double())
        with pytest.raises(ValueError, match="used: True"):
            torch.randn(size=(2, 3))
    with PinnedDraws(noise):
        assert torch.equal(torch.randn(size=(2, 3)), noise)
    with pytest.raises(ValueError, match="pinned noise"), PinnedDraws(noise):
        torch.randn((2, 4))
    assert torch.randn(2, 3).shape == (2, 3)  # outside the block, an ordinary draw


def test_a_diffusion_objective_is_refused(dit_teacher):
    config = copy.copy(dit_teacher.config)
    config.objective = "diffusion"
    with pytest.raises(ReflowPairsError, match="objective='diffusion'"):
        check_supported(config)


def test_observation_history_is_added_or_refused(dit_teacher):
    config = copy.copy(dit_teacher.config)
    state = torch.zeros(3, 2)
    assert with_observation_history(config, {"observation.state": state})["observation.state"].shape == (
        3,
        1,
        2,
    )
    config.n_obs_steps = 2
    with pytest.raises(ReflowPairsError, match="n_obs_steps=2"):
        with_observation_history(config, {"observation.state": state})


def test_check_loaded_catches_a_missing_or_different_tensor(dit_teacher, dit_world, tmp_path):
    policy = dit_teacher.policy
    FAMILY.check_loaded(policy, dit_world.teacher_dir)  # the loaded teacher holds its file's weights
    with pytest.raises(ReflowPairsError, match="no model.safetensors"):
        FAMILY.check_loaded(policy, tmp_path)
    weights = load_file(str(dit_world.teacher_dir / "model.safetensors"))
    key = "noise_predictor.output_proj.weight"
    save_file({k: v for k, v in weights.items() if k != key}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ReflowPairsError, match=f"lacks 1 tensors \\(e.g. {key}\\)"):
        FAMILY.check_loaded(policy, tmp_path)
    save_file({**weights, key: weights[key] + 1.0}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ReflowPairsError, match="differs in"):
        check_loaded(policy, tmp_path, max_tensors=None)


# --- the command line -------------------------------------------------------------------------------------------

GENERATE = ("--episodes", "0-1", "--samples-per-frame", "2", "--num-steps", "6", "--batch-size", "8")
GENERATE += ("--shard-size", "32", "--device", "cpu")


def _assert_x1_is_dits(store: Path, loaded, world, num_steps: int) -> None:
    """Every stored X_1 == DiT's own sampler (``sample_chunk``) from the stored X_0 at ``num_steps`` (fp32, 1e-5)."""
    pairs = Pairs.concat(list(PairStore(store).iter_shards()))
    dataset = open_dataset(world.repo_id, world.dataset_root)
    position = {int(i): p for p, i in enumerate(np.asarray(dataset.hf_dataset["index"]))}
    frames = sorted({int(i) for i in pairs.obs_index})
    worst = 0.0
    with configured_num_steps(loaded.policy, num_steps):
        for frame in frames:
            rows = np.flatnonzero(pairs.obs_index == frame)
            item = {k: v for k, v in dataset[position[frame]].items() if not k.startswith("action")}
            batch = loaded.preprocessor(torch.utils.data.default_collate([item] * len(rows)))
            x1 = FAMILY.sample_chunk(loaded.policy, batch, torch.from_numpy(pairs.x0[rows]))
            worst = max(worst, float(np.abs(x1.numpy() - pairs.x1[rows]).max()))
    assert len(frames) > 0 and worst < 1e-5


@pytest.mark.slow
def test_generate_validate_train_eval_from_the_cli(dit_world, dit_teacher, tmp_path):
    data = ("--dataset", dit_world.repo_id, "--dataset-root", str(dit_world.dataset_root))
    teacher = dit_world.teacher_dir
    store = tmp_path / "pairs"
    cli("generate", "--teacher", str(teacher), *data, "--out", str(store), *GENERATE)
    _assert_x1_is_dits(store, dit_teacher, dit_world, num_steps=6)

    cli("validate", str(store), *data, "--teacher", str(teacher), "--spot-check", "4", "--device", "cpu")

    run = tmp_path / "run"
    train = ("--pairs", str(store), "--dataset-root", str(dit_world.dataset_root), "--out", str(run))
    cli("train", *train, "--steps", "2", "--batch-size", "4", "--student-num-steps", "2", "--device", "cpu")
    student = run / "checkpoints" / "last" / "pretrained_model"
    teacher_json = json.loads((teacher / "config.json").read_text())
    student_json = json.loads((student / "config.json").read_text())
    assert student_json.pop("num_integration_steps") == 2 and teacher_json.pop("num_integration_steps") == 100
    assert (
        Path(student_json.pop("pretrained_path")) == teacher and teacher_json.pop("pretrained_path") is None
    )
    assert student_json == teacher_json

    from lerobot.policies.multi_task_dit.modeling_multi_task_dit import MultiTaskDiTPolicy

    with redirect_stdout(StringIO()):
        reloaded = MultiTaskDiTPolicy.from_pretrained(student)
    FAMILY.check_loaded(reloaded, student)  # lerobot's own loader holds the student's weights
    assert reloaded.config.num_integration_steps == 2

    report_dir = tmp_path / "eval"
    cli(
        "eval",
        "--student",
        str(student),
        "--teacher",
        str(teacher),
        *data,
        "--episodes",
        "2",
        "--num-steps",
        "1,2",
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
        (m, n) for m in ("teacher", "student") for n in (1, 2)
    }
    assert report["engine_check"]["max_abs_diff"] < 1e-5  # DiT's own sampler agrees with the engine
    assert report["settings"]["reference_num_steps"] == 100
    assert report["student"]["num_steps"] == 2 and report["student"]["step_field"] == "num_integration_steps"


@pytest.mark.slow
def test_lerobot_eval_runs_a_one_step_dit_student_on_pusht(tmp_path):
    """A tiny DiT teacher on PushT (its CLIP at the env's 96 px) -> generate -> train -> ``lerobot-eval
    --policy.path=<student>`` in lerobot's own evaluation loop, at the student's saved step count (1)."""
    pytest.importorskip("gym_pusht")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from reflowpairs.tiny.dit import TinyClipSpec, build_tiny_clip, build_tiny_dit_teacher
    from reflowpairs.tiny.world import PUSHT_REPO_ID, build_pusht_dataset

    from .helpers import run_child

    dataset_root = tmp_path / "dataset"
    build_pusht_dataset(dataset_root, num_episodes=2, episode_length=12)
    clip = build_tiny_clip(
        tmp_path / "clip", TinyClipSpec(image_size=96, patch_size=16), tasks=("push the T",)
    )
    teacher = build_tiny_dit_teacher(
        clip,
        LeRobotDataset(PUSHT_REPO_ID, root=dataset_root),
        tmp_path / "teacher",
        TinyDitSpec(train_steps=2, batch_size=4),
    )
    data = ("--dataset", PUSHT_REPO_ID, "--dataset-root", str(dataset_root), "--device", "cpu")
    generate = ("--episodes", "0", "--samples-per-frame", "1", "--num-steps", "2")
    cli("generate", "--teacher", str(teacher), *data, "--out", str(tmp_path / "pairs"), *generate)
    train = ("--steps", "2", "--batch-size", "4", "--device", "cpu")
    cli("train", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "student"), *train)
    student = tmp_path / "student" / "checkpoints" / "last" / "pretrained_model"
    assert json.loads((student / "config.json").read_text())["num_integration_steps"] == 1

    lerobot_eval = Path(sys.executable).with_name("lerobot-eval")
    args = ["--policy.device=cpu", "--env.type=pusht", "--env.episode_length=8", "--eval.n_episodes=1"]
    args += ["--eval.batch_size=1", "--eval.use_async_envs=false", f"--output_dir={tmp_path / 'eval'}"]
    done = run_child([str(lerobot_eval), f"--policy.path={student}", *args], cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "End of eval" in log and "'n_episodes': 1" in log
    assert "num_integration_steps" not in " ".join(
        args
    )  # lerobot-eval takes the step count from the checkpoint
