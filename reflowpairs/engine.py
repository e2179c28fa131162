"""The stage-1 sampling engine: the teacher's own sampler, with the VLM prefix shared across samples.

The prefix (images, language, state) does not depend on the noise. ``SmolVLAEngine`` embeds it and
fills its KV cache once per *frame*, then runs the ODE for all K noise samples of the frame against
that one cache; the result equals ``policy.predict_action_chunk(batch, noise=x0)`` for every sample
(up to float rounding), at a fraction of the cost of re-running the prefix K times.

Each denoise step is lerobot's ``VLAFlowMatching.denoise_step`` with two changes that leave its maths
alone and make it cheaper:

- *samples folded into the sequence*: ``g`` samples of a frame ride in one row as ``g`` suffixes one
  after another, with a block-diagonal mask (each sample sees the prefix and its own chunk only) and
  positions restarting per sample. The cross-attention layers then project the prefix keys/values
  once per row instead of once per sample, and the cache is repeated ``K/g`` times instead of ``K``
  (``samples_per_row`` picks ``g``: long folded suffixes cost attention over masked-out tokens).
- *fused attention*: ``torch.nn.functional.scaled_dot_product_attention`` (``sdpa_attention``) in
  place of the eager matmul-softmax-matmul, without materialising the expanded K/V heads.

On the CPU benchmark model the two together make a 10-step call ~1.2x faster than repeating the
cache K times and calling ``denoise_step`` (benchmarks/RESULTS.md).

A batch is sampled in calls of exactly ``frames_per_call`` frames (``resolve_frames_per_call``: as many
as fit in ``tokens_per_call`` suffix tokens, frames x K x chunk_size; on a CPU the denoise step runs
fastest while its activations stay in cache, ~1,024 tokens on the benchmark machine; on an accelerator
the loaded batch). A call short of frames is padded with copies of its last frame, and the language
tokens are padded to the tokenizer's ``max_length``, so every call has the same shapes whatever the
batch, the resume point, the partition or the process count. A frame's X_1 then depends on the
teacher, the frame, its noises and ``frames_per_call`` only: matmul and attention rows do not mix,
so batch-mates cannot change it, and in bfloat16, where the rounding of a matmul depends on its
shapes, this is what keeps resumed and multi-process stores equal to an uninterrupted one.

``ExactSampler`` is the reference instead: ``policy.predict_action_chunk`` on each frame repeated K
times, lerobot's own code bit for bit, at the price of the prefix K times per frame and no batching
across frames (``--exact``).

Engines are looked up by policy type (``make_engine``); a pi0/pi05 engine plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from reflowpairs.errors import ReflowPairsError
from reflowpairs.solvers import SolverConfig, Velocity, integrate


def pair_shapes(policy_config) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(x0_shape, x1_shape)`` of the pairs a policy makes and trains on: noise ``(chunk_size, max_action_dim)``,
    actions ``(chunk_size, action_dim)`` (the pair-store contract's T, D0 and D1)."""
    chunk = policy_config.chunk_size
    return (chunk, policy_config.max_action_dim), (chunk, policy_config.action_feature.shape[0])


def sdpa_attention(
    attention_mask: Tensor,
    batch_size: int,
    head_dim: int,
    query_states: Tensor,
    key_states: Tensor,
    value_states: Tensor,
) -> Tensor:
    """Drop-in for SmolVLM-with-expert's ``eager_attention_forward`` (same arguments, same result up to float
    rounding) on ``scaled_dot_product_attention``, grouped-query heads included.

    ``query_states`` ``(B, L, H, head_dim)``, ``key_states``/``value_states`` ``(B, S, H_kv, head_dim)``,
    ``attention_mask`` ``(B, L, S)`` bool (True = attend); returns ``(B, L, H * head_dim)``. Used for the denoise
    steps only, where every query attends to at least one key (a fully masked row gives 0 here, not eager's
    uniform average).
    """
    query = query_states.transpose(1, 2)
    key = key_states.transpose(1, 2).to(query.dtype)
    value = value_states.transpose(1, 2).to(query.dtype)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask[:, None],
        scale=head_dim**-0.5,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).reshape(batch_size, -1, query.shape[1] * head_dim)


CPU_TOKENS_PER_CALL = 1024


def default_tokens_per_call(device: torch.device) -> int:
    """Suffix tokens per engine call when none are given: ``CPU_TOKENS_PER_CALL`` on a CPU, no limit (0) elsewhere."""
    return CPU_TOKENS_PER_CALL if device.type == "cpu" else 0


def frames_per_call(frames: int, samples: int, chunk: int, tokens_per_call: int) -> int:
    """How many frames (each with ``samples`` suffixes of ``chunk`` tokens) one call samples: as many as fit in
    ``tokens_per_call`` suffix tokens, at least 1; all ``frames`` when ``tokens_per_call`` is 0 (no limit)."""
    if tokens_per_call <= 0:
        return frames
    return max(1, min(frames, tokens_per_call // (samples * chunk)))


def resolve_frames_per_call(
    tokens_per_call: int | None, batch_size: int, samples: int, chunk: int, device: torch.device
) -> int:
    """The fixed number of frames in every engine call of a run: as many of a ``batch_size`` batch as fit in
    ``tokens_per_call`` suffix tokens (None: the device's default, ``default_tokens_per_call``; 0: no limit)."""
    budget = default_tokens_per_call(device) if tokens_per_call is None else tokens_per_call
    return frames_per_call(batch_size, samples, chunk, budget)


def slice_frames(batch: dict, start: int, stop: int, frames: int) -> dict:
    """Frames ``start:stop`` of a (preprocessed) batch of ``frames``: tensors and lists whose first dimension is the
    frame are sliced, everything else (scalars, per-batch metadata) is passed through."""

    def cut(value):
        sliceable = torch.is_tensor(value) and value.ndim > 0 or isinstance(value, (list, tuple))
        return value[start:stop] if sliceable and len(value) == frames else value

    return {key: cut(value) for key, value in batch.items()}


def pad_frames(batch: dict, frames: int, to: int) -> dict:
    """A (preprocessed) batch of ``frames`` padded to ``to`` frames with copies of its last frame (the copies' outputs
    are dropped): per-frame tensors and lists grow, everything else is passed through."""
    if to <= frames:
        return batch

    def grow(value):
        if torch.is_tensor(value) and value.ndim > 0 and len(value) == frames:
            return torch.cat([value, value[-1:].expand(to - frames, *value.shape[1:])])
        if isinstance(value, (list, tuple)) and len(value) == frames:
            return type(value)([*value, *[value[-1]] * (to - frames)])
        return value

    return {key: grow(value) for key, value in batch.items()}


def repeat_frames(batch: dict, frames: int, repeats: int) -> dict:
    """Each frame of a (preprocessed) batch of ``frames`` repeated ``repeats`` times, frame-major."""

    def rep(value):
        if torch.is_tensor(value) and value.ndim > 0 and len(value) == frames:
            return value.repeat_interleave(repeats, dim=0)
        if isinstance(value, (list, tuple)) and len(value) == frames:
            return type(value)(v for v in value for _ in range(repeats))
        return value

    return {key: rep(value) for key, value in batch.items()}


def pad_language(tokens: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Language ``tokens`` and attention ``mask`` ``(B, L)`` right-padded to ``length`` (masked-out token 0), so the
    prefix has the same length whatever the longest task in the batch (lerobot pads to the batch's longest)."""
    extra = length - tokens.shape[1]
    if extra <= 0:
        return tokens, mask
    return F.pad(tokens, (0, extra), value=0), F.pad(mask, (0, extra), value=False)


def samples_per_row(samples: int, chunk: int, prefix_len: int, max_ratio: int = 4) -> int:
    """How many of a frame's ``samples`` to fold into one row: the largest divisor ``g`` of ``samples`` whose
    folded suffix (``g * chunk`` tokens) is at most ``max_ratio`` times the prefix, and at least 1.

    Folding saves the per-sample projection of the prefix in the cross-attention layers; its cost is the
    attention each suffix token computes over the other samples' (masked) tokens, which grows with ``g * chunk``
    against a prefix of ``prefix_len`` tokens.
    """
    fits = [g for g in range(1, samples + 1) if samples % g == 0 and g * chunk <= max_ratio * prefix_len]
    return max(fits, default=1)


@contextmanager
def attention_interface(vlm_with_expert, attention) -> Iterator[None]:
    """Within the block, ``vlm_with_expert`` (a ``SmolVLMWithExpertModel``) runs ``attention`` in place of its
    eager attention (its own ``get_attention_interface`` hook, shadowed on the instance and restored after)."""
    vlm_with_expert.get_attention_interface = lambda: attention
    try:
        yield
    finally:
        del vlm_with_expert.get_attention_interface


class Engine(Protocol):
    """Samples X_1 for K noises per frame from a preprocessed batch of B frames."""

    noise_shape: tuple[int, int]
    action_dim: int

    def velocity_field(self, batch: dict[str, Tensor], repeats: int) -> Velocity:
        """The teacher's velocity v(x_t, t) for each frame repeated ``repeats`` times (frame-major)."""

    def sample(self, batch: dict[str, Tensor], noise: Tensor, solver: SolverConfig) -> Tensor:
        """X_1 ``(B, K, T, action_dim)`` in normalised action space from noise ``(B, K, T, D0)``, in calls of at most
        the engine's ``tokens_per_call`` suffix tokens (one frame per call for an adaptive solver)."""


class SmolVLAEngine:
    """Prefix-cached sampler for ``SmolVLAPolicy`` (lerobot 0.6), built from the policy's own methods.

    ``frames_per_call``: every call samples exactly this many frames (a short call is padded with copies of its
    last frame), so a frame's X_1 does not depend on its batch-mates; None: the whole batch in one call, unpadded."""

    exact = False

    def __init__(self, policy, frames_per_call: int | None = None):
        self.policy = policy
        self.frames_per_call = frames_per_call
        self.model = policy.model
        config = policy.config
        self.noise_shape, (_, self.action_dim) = pair_shapes(config)
        if not config.use_cache:
            raise ReflowPairsError(
                "This SmolVLA checkpoint has use_cache=false; the prefix-cached engine needs the KV cache.",
                "Set use_cache to true in its config.json (it does not change the sampled actions).",
            )

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @torch.no_grad()
    def velocity_field(self, batch: dict[str, Tensor], repeats: int) -> Velocity:
        prefix_pad_masks, cache = self._fill_prefix(batch)
        fold = samples_per_row(repeats, self.policy.config.chunk_size, prefix_pad_masks.shape[1])
        rows_per_frame = repeats // fold
        if rows_per_frame > 1:
            cache.batch_repeat_interleave(rows_per_frame)
            prefix_pad_masks = prefix_pad_masks.repeat_interleave(rows_per_frame, dim=0)
        return partial(self._denoise_step, prefix_pad_masks, cache, fold)

    @torch.no_grad()
    def _fill_prefix(self, batch: dict[str, Tensor]) -> tuple[Tensor, object]:
        """Embed the prefix of a preprocessed batch of B frames and fill its KV cache, as
        ``sample_actions`` does: returns ``prefix_pad_masks`` ``(B, P)`` and the ``DynamicCache``."""
        from lerobot.policies.common.vla_utils import make_att_2d_masks
        from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE

        policy, model = self.policy, self.model
        policy.eval()
        batch = dict(batch)
        if policy.config.adapt_to_pi_aloha:  # _prepare_batch edits the state in place
            batch[OBS_STATE] = batch[OBS_STATE].clone()
        batch = policy._prepare_batch(batch)
        images, img_masks = policy.prepare_images(batch)
        state = policy.prepare_state(batch)
        tokens, token_mask = pad_language(
            batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK], policy.config.tokenizer_max_length
        )
        prefix_embs, prefix_pad_masks, prefix_att_masks = model.embed_prefix(
            images, img_masks, tokens, token_mask, state=state
        )
        _, cache = model.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(prefix_pad_masks, prefix_att_masks),
            position_ids=torch.cumsum(prefix_pad_masks, dim=1) - 1,
            past_key_values=None,
            inputs_embeds=[prefix_embs, None],
            use_cache=True,
        )
        return prefix_pad_masks, cache

    @torch.no_grad()
    def _denoise_step(self, prefix_pad_masks: Tensor, cache, fold: int, x_t: Tensor, t: Tensor) -> Tensor:
        """lerobot's ``denoise_step`` with ``fold`` consecutive samples per cache row.

        ``prefix_pad_masks`` ``(R, P)`` and ``cache`` hold R rows; ``x_t`` ``(R * fold, T, D0)`` and ``t``
        ``(R * fold,)`` are sample-minor. Returns ``v_t`` ``(R * fold, T, D0)`` float32.
        """
        from lerobot.policies.common.vla_utils import make_att_2d_masks

        model = self.model
        rows, prefix_len = prefix_pad_masks.shape
        suffix_embs, suffix_pad_masks, suffix_att_masks = model.embed_suffix(x_t, t)
        chunk = suffix_embs.shape[1]
        own = make_att_2d_masks(suffix_pad_masks, suffix_att_masks).view(rows, fold, chunk, 1, chunk)
        same_sample = torch.eye(fold, dtype=torch.bool, device=x_t.device)[None, :, None, :, None]
        suffix_2d_masks = (own & same_sample).reshape(rows, fold * chunk, fold * chunk)
        prefix_2d_masks = prefix_pad_masks[:, None, :].expand(rows, fold * chunk, prefix_len)
        positions = (torch.cumsum(suffix_pad_masks, dim=1) - 1).view(rows, fold * chunk)
        positions = positions + torch.sum(prefix_pad_masks, dim=-1)[:, None]
        with attention_interface(model.vlm_with_expert, sdpa_attention):
            outputs_embeds, _ = model.vlm_with_expert.forward(
                attention_mask=torch.cat([prefix_2d_masks, suffix_2d_masks], dim=2),
                position_ids=positions,
                past_key_values=cache,
                inputs_embeds=[None, suffix_embs.reshape(rows, fold * chunk, -1)],
                use_cache=True,
            )
        cache.crop(prefix_len)  # the self-attention layers appended the suffix K/V in place
        suffix_out = outputs_embeds[1].reshape(rows * fold, chunk, -1)[:, -self.policy.config.chunk_size :]
        return model.action_out_proj(suffix_out.to(dtype=torch.float32))

    @torch.no_grad()
    def sample(self, batch: dict[str, Tensor], noise: Tensor, solver: SolverConfig) -> Tensor:
        frames = noise.shape[0]
        # an adaptive solver's steps depend on all it integrates: one frame (its K samples) per call keeps X_1 a
        # function of the frame and its noises, whatever the batching
        group = 1 if solver.adaptive else self.frames_per_call or frames
        calls = []
        for start in range(0, frames, group):
            stop = min(start + group, frames)
            part = pad_frames(slice_frames(batch, start, stop, frames), stop - start, group)
            part_noise = noise[start:stop]
            if stop - start < group:
                part_noise = torch.cat(
                    [part_noise, part_noise[-1:].expand(group - (stop - start), *noise.shape[1:])]
                )
            calls.append(self._sample_call(part, part_noise, solver)[: stop - start])
        return torch.cat(calls)

    @torch.no_grad()
    def _sample_call(self, batch: dict[str, Tensor], noise: Tensor, solver: SolverConfig) -> Tensor:
        """``sample`` for frames that go in one call: one prefix fill, one ODE over all their samples."""
        frames, samples = noise.shape[:2]
        velocity = self.velocity_field(batch, samples)
        x0 = noise.reshape(frames * samples, *noise.shape[2:]).to(
            self.device, torch.float32, non_blocking=True
        )
        x1 = integrate(velocity, x0, solver)[:, :, : self.action_dim]
        if self.policy.config.adapt_to_pi_aloha:
            x1 = self.policy._pi_aloha_encode_actions(x1)
        return x1.reshape(frames, samples, *x1.shape[1:])


@contextmanager
def lerobot_sampling_steps(policy, num_steps: int) -> Iterator[None]:
    """The one place reflowpairs changes a built policy's config: within the block, lerobot's own sampler
    (``predict_action_chunk`` -> ``sample_actions``) integrates with ``num_steps`` Euler steps.

    lerobot 0.6's SmolVLA ``sample_actions`` reads the step count from ``config.num_steps`` only (it takes noise and
    RTC arguments, no step count), so calling lerobot's sampler at another count means setting the config. Only the
    callers that must run lerobot's own code use this (``ExactSampler``, eval's latency of lerobot's call path); the
    engine's own sampling (``SmolVLAEngine.sample``, ``velocity_field`` + ``solvers.integrate``) takes the count as an
    argument (``SolverConfig.num_steps``) and never touches the config. The config's value is restored and the
    policy's action queue reset (``policy.reset()``) on leaving the block, also on error."""
    saved = policy.config.num_steps
    policy.config.num_steps = num_steps
    try:
        yield
    finally:
        policy.config.num_steps = saved
        policy.reset()


class ExactSampler:
    """lerobot's own sampler as the engine: for each frame, ``policy.predict_action_chunk`` on the frame repeated K
    times with its K noises, so X_1 is that call's output bit for bit. Euler only (it is lerobot's sampler). Costs
    the prefix K times per frame and gives up batching across frames."""

    exact = True

    def __init__(self, policy, frames_per_call: int | None = None):
        self.policy = policy
        self.frames_per_call = 1
        self.noise_shape, (_, self.action_dim) = pair_shapes(policy.config)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @torch.no_grad()
    def sample(self, batch: dict[str, Tensor], noise: Tensor, solver: SolverConfig) -> Tensor:
        if solver.name != "euler":
            raise ReflowPairsError(
                f"The exact sampler is lerobot's own Euler sampler; it cannot run the {solver.name} solver.",
                "Unset `exact`, or set `solver` to euler.",
            )
        frames, samples = noise.shape[:2]
        out = []
        with lerobot_sampling_steps(self.policy, solver.num_steps):
            for f in range(frames):
                frame = repeat_frames(slice_frames(batch, f, f + 1, frames), 1, samples)
                self.policy.reset()
                out.append(
                    self.policy.predict_action_chunk(frame, noise=noise[f].to(self.device, torch.float32))
                )
        return torch.stack(out)


ENGINES = {"smolvla": SmolVLAEngine}


def make_engine(policy, frames_per_call: int | None = None, exact: bool = False) -> Engine:
    """The sampling engine for ``policy`` (by its config ``type``): the prefix-cached one with ``frames_per_call``
    frames per call (as ``SmolVLAEngine``'s), or with ``exact`` lerobot's own sampler (``ExactSampler``)."""
    policy_type = policy.config.type
    if policy_type not in ENGINES:
        raise ReflowPairsError(
            f"No sampling engine for {policy_type} policies yet.", f"Supported: {', '.join(ENGINES)}."
        )
    return (ExactSampler if exact else ENGINES[policy_type])(policy, frames_per_call)
