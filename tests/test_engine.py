"""The prefix-cached engine against lerobot's own sampler and attention, in memory (fp32)."""

from __future__ import annotations

import pytest
import torch

from reflowpairs.dataset import open_dataset
from reflowpairs.engine import (
    CPU_TOKENS_PER_CALL,
    default_tokens_per_call,
    frames_per_call,
    pad_frames,
    pad_language,
    resolve_frames_per_call,
    slice_frames,
)
from reflowpairs.errors import ReflowPairsError
from reflowpairs.noise import batch_noise
from reflowpairs.policies import make_engine
from reflowpairs.policies.smolvla import samples_per_row, sdpa_attention
from reflowpairs.solvers import SolverConfig
from reflowpairs.teacher import load_policy


@pytest.fixture(scope="module")
def teacher_and_batch(other_world):
    teacher = load_policy(str(other_world.teacher_dir), "cpu")
    dataset = open_dataset(other_world.repo_id, other_world.dataset_root)
    items = [dataset[p] for p in (0, 3, 11, 17, 25)]
    batch = teacher.preprocessor(torch.utils.data.default_collate(items))
    return teacher, batch, [int(i["index"]) for i in items]


@pytest.mark.parametrize("samples", [1, 3, 30])
def test_engine_equals_predict_action_chunk_per_sample(teacher_and_batch, samples):
    """Same X_0 -> same X_1 as the plain loop (one predict_action_chunk per sample): K=1, all K samples folded
    into one row, and K=30 folded in groups over a repeated cache."""
    teacher, batch, obs_index = teacher_and_batch
    policy = teacher.policy
    engine = make_engine(policy)
    prefix_len = engine._fill_prefix(batch)[0].shape[1]
    fold = samples_per_row(samples, policy.config.chunk_size, prefix_len)
    regime = {1: fold == 1, 3: fold == 3, 30: 1 < fold < 30}  # the three regimes this test is meant to cover
    assert regime[samples], (samples, fold)
    noise = batch_noise(0, obs_index, samples, engine.noise_shape)  # (B, K, T, D0)
    x1 = engine.sample(batch, noise, SolverConfig("euler", policy.config.num_steps))
    assert x1.shape == (len(obs_index), samples, policy.config.chunk_size, engine.action_dim)
    for k in range(samples):
        policy.reset()
        plain = policy.predict_action_chunk(batch, noise=noise[:, k])
        torch.testing.assert_close(x1[:, k], plain, atol=1e-5, rtol=0)
    # the attention swap is scoped to the engine's denoise steps: the policy itself is left as loaded
    assert "get_attention_interface" not in vars(policy.model.vlm_with_expert)


def test_engine_in_calls_of_whole_frames_equals_predict_action_chunk(teacher_and_batch):
    """A batch cut into calls of 2 frames (2, 2, and 1 padded with a copy of the last frame) samples the same X_1 as
    the plain loop, frame for frame."""
    teacher, batch, obs_index = teacher_and_batch
    policy = teacher.policy
    samples, chunk = 3, policy.config.chunk_size
    engine = make_engine(policy, frames_per_call(len(obs_index), samples, chunk, 2 * samples * chunk))
    assert engine.frames_per_call == 2
    noise = batch_noise(0, obs_index, samples, engine.noise_shape)
    x1 = engine.sample(batch, noise, SolverConfig("euler", policy.config.num_steps))
    assert x1.shape == (len(obs_index), samples, chunk, engine.action_dim)
    for k in range(samples):
        policy.reset()
        torch.testing.assert_close(
            x1[:, k], policy.predict_action_chunk(batch, noise=noise[:, k]), atol=1e-5, rtol=0
        )


def test_frames_per_call_and_slice_frames():
    assert frames_per_call(32, samples=16, chunk=8, tokens_per_call=1024) == 8
    assert frames_per_call(32, samples=4, chunk=8, tokens_per_call=1024) == 32
    assert (
        frames_per_call(5, samples=4, chunk=50, tokens_per_call=100) == 1
    )  # one frame always goes, over budget
    assert frames_per_call(7, samples=16, chunk=50, tokens_per_call=0) == 7  # 0: no limit
    assert default_tokens_per_call(torch.device("cpu")) == CPU_TOKENS_PER_CALL
    assert default_tokens_per_call(torch.device("cuda")) == 0
    batch = {
        "state": torch.arange(10).view(5, 2),
        "task": list("abcde"),
        "scale": torch.tensor(2.0),
        "flag": True,
    }
    part = slice_frames(batch, 1, 3, frames=5)
    assert part["state"].tolist() == [[2, 3], [4, 5]] and part["task"] == ["b", "c"]
    assert part["scale"] is batch["scale"] and part["flag"] is True  # not per-frame: passed through


def test_samples_per_row_is_the_largest_divisor_that_fits():
    assert samples_per_row(16, chunk=8, prefix_len=19) == 8  # 16 * 8 > 4 * 19 >= 8 * 8
    assert samples_per_row(4, chunk=8, prefix_len=19) == 4
    assert samples_per_row(7, chunk=8, prefix_len=10) == 1  # a prime K that does not fit whole
    assert samples_per_row(1, chunk=50, prefix_len=2) == 1
    assert samples_per_row(12, chunk=50, prefix_len=113) == 6


def test_sdpa_attention_equals_lerobot_eager_attention(teacher_and_batch):
    """Grouped-query heads, padded keys, a block-causal mask: the same output as eager_attention_forward."""
    module = teacher_and_batch[0].policy.model.vlm_with_expert
    heads, kv_heads = module.num_attention_heads, module.num_key_value_heads
    assert heads != kv_heads  # the tiny VLM has grouped-query attention, so that path is exercised
    generator = torch.Generator().manual_seed(0)
    batch, queries, keys, head_dim = 3, 5, 9, 16
    q = torch.randn(batch, queries, heads, head_dim, generator=generator)
    k = torch.randn(batch, keys, kv_heads, head_dim, generator=generator)
    v = torch.randn(batch, keys, kv_heads, head_dim, generator=generator)
    mask = torch.rand(batch, queries, keys, generator=generator) > 0.4
    mask[..., 0] = True  # every query attends to at least one key, as in the denoise steps
    mask[1, :, 6:] = False  # padded prefix tokens
    eager = module.eager_attention_forward(mask, batch, head_dim, q, k, v)
    fused = sdpa_attention(mask, batch, head_dim, q, k, v)
    assert fused.shape == eager.shape == (batch, queries, heads * head_dim)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_on_cuda_matches_the_cpu_plain_loop(other_world, teacher_and_batch, dtype):
    """On CUDA (fused SDPA kernels, pinned copies, optional bf16 autocast) X_1 stays the teacher's X_1."""
    from reflowpairs.generate.config import COMPUTE_DTYPES

    cpu_teacher, cpu_batch, obs_index = teacher_and_batch
    teacher = load_policy(str(other_world.teacher_dir), "cuda")
    dataset = open_dataset(other_world.repo_id, other_world.dataset_root)
    batch = teacher.preprocessor(torch.utils.data.default_collate([dataset[p] for p in (0, 3, 11, 17, 25)]))
    engine = make_engine(teacher.policy)
    noise = batch_noise(0, obs_index, 4, engine.noise_shape)
    compute = COMPUTE_DTYPES[dtype]
    with torch.autocast("cuda", dtype=compute, enabled=compute is not torch.float32):
        x1 = engine.sample(batch, noise, SolverConfig("euler", teacher.policy.config.num_steps)).float().cpu()
    tolerance = {"float32": 1e-3, "bfloat16": 0.1}[dtype]  # TF32/bf16 matmuls, not bit equality
    for k in range(4):
        cpu_teacher.policy.reset()
        plain = cpu_teacher.policy.predict_action_chunk(cpu_batch, noise=noise[:, k])
        assert torch.isfinite(x1[:, k]).all()
        torch.testing.assert_close(x1[:, k], plain, atol=tolerance, rtol=0)


@pytest.mark.parametrize(
    "layout",
    [
        {"attention_mode": "self_attn"},  # every expert layer self-attends over [prefix; suffix]
        {"self_attn_every_n_layers": 0},  # every expert layer cross-attends to the prefix
        # 2 expert layers for 4 VLM layers (layers 1 and 3 have none), self-attention at layer 0 only (lerobot
        # needs the two to agree), and language padded to max_length
        {"num_expert_layers": 2, "self_attn_every_n_layers": 4, "pad_language_to": "max_length"},
    ],
    ids=["self_attn", "all_cross_attn", "fewer_expert_layers"],
)
def test_engine_equals_predict_action_chunk_for_other_smolvla_layouts(other_world, layout):
    """Teachers configured unlike the tiny one (random weights: only equality matters) sample the same X_1."""
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from reflowpairs.tiny.world import TinyTeacherSpec, tiny_smolvla_config

    dataset = open_dataset(other_world.repo_id, other_world.dataset_root)
    config = tiny_smolvla_config(
        other_world.vlm_dir,
        dataset.meta,
        TinyTeacherSpec(chunk_size=5, max_action_dim=4, max_state_dim=4, num_steps=4),
    )
    for key, value in layout.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    policy = SmolVLAPolicy(config).eval()
    preprocessor, _ = make_pre_post_processors(config, dataset_stats=dataset.meta.stats)
    items = [dataset[p] for p in (0, 12, 25)]
    batch = preprocessor(torch.utils.data.default_collate(items))
    engine = make_engine(policy)
    if layout.get("pad_language_to") == "max_length":
        assert not engine._fill_prefix(batch)[0].all()  # the prefix really has padded tokens to mask
    noise = batch_noise(1, [int(i["index"]) for i in items], 4, engine.noise_shape)
    x1 = engine.sample(batch, noise, SolverConfig("euler", config.num_steps))
    for k in range(4):
        policy.reset()
        torch.testing.assert_close(
            x1[:, k], policy.predict_action_chunk(batch, noise=noise[:, k]), atol=1e-5, rtol=0
        )


def test_resolve_frames_per_call_and_padding():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_frames_per_call(None, 32, samples=16, chunk=8, device=cpu) == 8  # 1,024 tokens on a CPU
    assert resolve_frames_per_call(None, 32, samples=16, chunk=8, device=cuda) == 32  # the whole loaded batch
    assert resolve_frames_per_call(0, 12, samples=4, chunk=50, device=cpu) == 12
    batch = {"x": torch.arange(3)[:, None], "task": ["a", "b", "c"], "n": 3}
    padded = pad_frames(batch, 3, 5)
    assert (
        padded["x"].flatten().tolist() == [0, 1, 2, 2, 2]
        and padded["task"] == ["a", "b", "c", "c", "c"]
        and padded["n"] == 3
    )
    tokens, mask = pad_language(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), 5)
    assert tokens.shape == mask.shape == (2, 5) and mask[:, 3:].sum() == 0


@pytest.fixture(scope="module")
def bf16_teacher_and_frames(bf16_world):
    teacher = load_policy(str(bf16_world.teacher_dir), "cpu")
    dataset = open_dataset(bf16_world.repo_id, bf16_world.dataset_root)
    assert teacher.policy.model.vlm_with_expert.lm_expert.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    return teacher, [dataset[p] for p in (0, 5, 30, 47, 100, 200, 230)]


def _sample(teacher, items, engine, samples=4):
    batch = teacher.preprocessor(torch.utils.data.default_collate(items))
    noise = batch_noise(0, [int(i["index"]) for i in items], samples, engine.noise_shape)
    return engine.sample(batch, noise, SolverConfig("euler", teacher.policy.config.num_steps))


def test_bf16_x1_does_not_depend_on_batch_mates(bf16_teacher_and_frames):
    """In bfloat16 a frame's X_1 is a function of the frame and its noises only, bit for bit: sampled alone, in
    another batch, at another position of a call, or in a padded call (fixed call shapes, language padded)."""
    teacher, items = bf16_teacher_and_frames
    engine = make_engine(teacher.policy, frames_per_call=3)
    together = _sample(teacher, items, engine)  # calls: frames 0-2, 3-5, 6 + two copies
    alone = torch.cat([_sample(teacher, [item], engine) for item in items])
    shuffled = _sample(teacher, items[::-1], engine).flip(0)
    assert torch.equal(together, alone) and torch.equal(together, shuffled)
    # and still lerobot's sampler, up to bfloat16 rounding of the folded, fused denoise step
    exact = _sample(teacher, items, make_engine(teacher.policy, exact=True))
    assert (together - exact).abs().max() < 2e-2


def test_exact_sampler_is_predict_action_chunk_bit_for_bit(bf16_teacher_and_frames):
    teacher, items = bf16_teacher_and_frames
    policy = teacher.policy
    engine = make_engine(policy, frames_per_call=4, exact=True)
    x1 = _sample(teacher, items[:3], engine, samples=3)
    for f, item in enumerate(items[:3]):
        frame = teacher.preprocessor(torch.utils.data.default_collate([item] * 3))
        noise = batch_noise(0, [int(item["index"])], 3, engine.noise_shape)[0]
        policy.reset()
        assert torch.equal(x1[f], policy.predict_action_chunk(frame, noise=noise))
    with pytest.raises(ReflowPairsError, match="cannot run the rk4 solver"):
        engine.sample(
            teacher.preprocessor(torch.utils.data.default_collate(items[:1])),
            torch.zeros(1, 1, *engine.noise_shape),
            SolverConfig("rk4", 2),
        )
