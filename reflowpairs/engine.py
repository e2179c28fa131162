"""The stage-1 sampling engine: the teacher's own sampler, with the VLM prefix shared across samples.

The prefix (images, language, state) does not depend on the noise. ``SmolVLAEngine`` embeds it and
fills its KV cache once per *frame*, repeats the cache for that frame's K noise samples, and then
calls the policy's own ``denoise_step`` at every ODE step; the result equals
``policy.predict_action_chunk(batch, noise=x0)`` for every sample (up to float rounding), at a
fraction of the cost of re-running the prefix K times.

Engines are looked up by policy type (``make_engine``); a pi0/pi05 engine plugs in the same way.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from reflowpairs.errors import ReflowPairsError
from reflowpairs.solvers import SolverConfig, Velocity, integrate


def pair_shapes(policy_config) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(x0_shape, x1_shape)`` of the pairs a policy makes and trains on: noise ``(chunk_size, max_action_dim)``,
    actions ``(chunk_size, action_dim)`` (the pair-store contract's T, D0 and D1)."""
    chunk = policy_config.chunk_size
    return (chunk, policy_config.max_action_dim), (chunk, policy_config.action_feature.shape[0])


class Engine(Protocol):
    """Samples X_1 for K noises per frame from a preprocessed batch of B frames."""

    noise_shape: tuple[int, int]
    action_dim: int

    def velocity_field(self, batch: dict[str, Tensor], repeats: int) -> Velocity:
        """The teacher's velocity v(x_t, t) for each frame repeated ``repeats`` times (frame-major)."""

    def sample(self, batch: dict[str, Tensor], noise: Tensor, solver: SolverConfig) -> Tensor:
        """X_1 ``(B, K, T, action_dim)`` in normalised action space from noise ``(B, K, T, D0)``."""


class SmolVLAEngine:
    """Prefix-cached sampler for ``SmolVLAPolicy`` (lerobot 0.6), built from the policy's own methods."""

    def __init__(self, policy):
        self.policy = policy
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
        prefix_embs, prefix_pad_masks, prefix_att_masks = model.embed_prefix(
            images, img_masks, batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK], state=state
        )
        _, cache = model.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(prefix_pad_masks, prefix_att_masks),
            position_ids=torch.cumsum(prefix_pad_masks, dim=1) - 1,
            past_key_values=None,
            inputs_embeds=[prefix_embs, None],
            use_cache=True,
        )
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
            prefix_pad_masks = prefix_pad_masks.repeat_interleave(repeats, dim=0)

        def velocity(x_t: Tensor, t: Tensor) -> Tensor:
            return model.denoise_step(
                prefix_pad_masks=prefix_pad_masks, past_key_values=cache, x_t=x_t, timestep=t
            )

        return velocity

    @torch.no_grad()
    def sample(self, batch: dict[str, Tensor], noise: Tensor, solver: SolverConfig) -> Tensor:
        frames, samples = noise.shape[:2]
        velocity = self.velocity_field(batch, samples)
        x0 = noise.reshape(frames * samples, *noise.shape[2:]).to(self.device, torch.float32, non_blocking=True)
        x1 = integrate(velocity, x0, solver)[:, :, : self.action_dim]
        if self.policy.config.adapt_to_pi_aloha:
            x1 = self.policy._pi_aloha_encode_actions(x1)
        return x1.reshape(frames, samples, *x1.shape[1:])


ENGINES = {"smolvla": SmolVLAEngine}


def make_engine(policy) -> Engine:
    """The sampling engine for ``policy`` (by its config ``type``)."""
    policy_type = policy.config.type
    if policy_type not in ENGINES:
        raise ReflowPairsError(
            f"No sampling engine for {policy_type} policies yet.", f"Supported: {', '.join(ENGINES)}."
        )
    return ENGINES[policy_type](policy)
