"""Training objectives beside lerobot's own (beta times, MSE): one-step distillation (``time_sampling="noise-end"``,
t = 1) and rectified flow++'s pseudo-Huber loss, each checked against an independent computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reflowpairs.cli import app
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import lerobot_sampling_steps
from reflowpairs.train.config import TrainConfig
from reflowpairs.train.loop import train
from reflowpairs.train.loss import PSEUDO_HUBER_C, pseudo_huber, reflow_loss
from reflowpairs.train.timesampling import sample_time, step_generator

from .helpers import runner


def test_noise_end_times_are_all_one():
    t = sample_time("noise-end", 5, step_generator(0, 3))
    assert t.dtype == torch.float32 and torch.equal(t, torch.ones(5))


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_out():
    dims = 100
    c = PSEUDO_HUBER_C * dims**0.5
    assert pseudo_huber(torch.zeros(3), dims).item() == 0.0
    small = torch.tensor([1e-12], dtype=torch.float64)  # ||r||^2 = 1e-10 << c^2: ~ ||r||^2 / (2c)
    assert pseudo_huber(small, dims).item() == pytest.approx(1e-10 / (2 * c), rel=1e-3)
    large = torch.tensor([4.0])  # ||r||^2 = 400 >> c^2: ~ ||r|| - c
    assert pseudo_huber(large, dims).item() == pytest.approx(20.0 - c, rel=1e-6)
    assert pseudo_huber(torch.tensor([1.0, 4.0]), dims).item() == pytest.approx(
        ((100 + c * c) ** 0.5 - c + (400 + c * c) ** 0.5 - c) / 2, rel=1e-6
    )


@pytest.fixture(scope="module")
def teacher_batch(tiny_world):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    dataset = LeRobotDataset(tiny_world.repo_id, root=tiny_world.dataset_root)
    items = [dataset[i] for i in (0, 7, 15)]
    observation = {
        k: (
            torch.stack([o[k] for o in items])
            if isinstance(items[0][k], torch.Tensor)
            else [o[k] for o in items]
        )
        for k in items[0]
        if k != "action"
    }
    policy = SmolVLAPolicy.from_pretrained(tiny_world.teacher_dir).eval()
    pre, _ = make_pre_post_processors(policy.config, pretrained_path=tiny_world.teacher_dir)
    gen = torch.Generator().manual_seed(5)
    chunk, max_dim = policy.config.chunk_size, policy.config.max_action_dim
    action_dim = policy.config.action_feature.shape[0]
    x0 = torch.randn(3, chunk, max_dim, generator=gen)
    x1 = torch.randn(3, chunk, action_dim, generator=gen)
    return policy, pre, observation, x0, x1


def test_distillation_loss_is_the_one_step_samples_error(teacher_batch):
    """At t = 1 the straight-line loss is the error of the policy's own 1-step sample x_0 - v(x_0, 1) to X_1:
    lerobot's predict_action_chunk with num_steps=1, independently of the training forward."""
    policy, pre, observation, x0, x1 = teacher_batch
    t = torch.ones(len(x0))
    with torch.no_grad():
        mse, _ = reflow_loss(policy, pre, observation, x0, x1, t, "mse")
        huber, _ = reflow_loss(policy, pre, observation, x0, x1, t, "pseudo-huber")
        with lerobot_sampling_steps(policy, 1):
            one_step = policy.predict_action_chunk(pre(dict(observation)), noise=x0)  # (B, T, A), normalised
    residual = (one_step - x1).double()
    dims = residual.shape[1] * residual.shape[2]
    c = PSEUDO_HUBER_C * dims**0.5
    assert mse.item() > 0.01  # a random X_1 is far from the sample: the check has something to compare
    assert mse.item() == pytest.approx(residual.pow(2).mean().item(), rel=1e-4)
    expected_huber = (residual.pow(2).sum(dim=(1, 2)) + c * c).sqrt().sub(c).mean().item()
    assert huber.item() == pytest.approx(expected_huber, rel=1e-4)


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = {"pairs": store, "out": out, "steps": 2, "batch_size": 4, "num_workers": 0, "device": "cpu"}
    return TrainConfig(**(base | {"save_every": 100} | kw))


@pytest.mark.slow
def test_a_run_keeps_its_objective_on_resume(tiny_store, tmp_path):
    out = tmp_path / "distil"
    first = train(_cfg(tiny_store, out, loss="pseudo-huber", time_sampling="noise-end"))
    state = json.loads((first.checkpoint / "training_state" / "reflow_state.json").read_text())
    assert state["settings"]["loss"] == "pseudo-huber" and state["settings"]["time_sampling"] == "noise-end"
    resumed = train(_cfg(tiny_store, out, steps=3, resume=True, allow_schedule_change=True))
    assert resumed.step == 3
    state = json.loads((resumed.checkpoint / "training_state" / "reflow_state.json").read_text())
    assert state["settings"]["loss"] == "pseudo-huber"
    with pytest.raises(
        ReflowPairsError, match="loss: the checkpoint has 'pseudo-huber', this run asks for 'mse'"
    ):
        train(_cfg(tiny_store, out, steps=4, resume=True, loss="mse"))


def test_an_unknown_loss_is_refused_as_a_flag(tmp_path):
    result = runner.invoke(
        app, ["train", "--pairs", str(tmp_path), "--out", str(tmp_path / "o"), "--loss", "l1"]
    )
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "Unknown --loss 'l1'. Set --loss to one of: mse, pseudo-huber." in text
    assert not (tmp_path / "o").exists()
