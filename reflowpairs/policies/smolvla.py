"""The SmolVLA family (lerobot 0.6 ``SmolVLAPolicy``): pair shapes, the prefix-cached engine, the reflow loss,
the step-count field (``num_steps``) and its quirk ``adapt_to_pi_aloha``.

The engine calls SmolVLA's private ``_prepare_batch`` and ``_pi_aloha_encode_actions``, which only lerobot 0.6.x is
known to have as used here: ``make_engine`` checks the installed version first (``require_lerobot_version``).

The prefix (images, language, state) does not depend on the noise. ``SmolVLAEngine`` embeds it and fills its KV
cache once per *frame*, then runs the ODE for all K noise samples of the frame against that one cache; the result
equals ``policy.predict_action_chunk(batch, noise=x0)`` for every sample (up to float rounding), at a fraction of
the cost of re-running the prefix K times.

Each denoise step is lerobot's ``VLAFlowMatching.denoise_step`` with two changes that leave its maths alone and
make it cheaper:

- *samples folded into the sequence*: ``g`` samples of a frame ride in one row as ``g`` suffixes one after
  another, with a block-diagonal mask (each sample sees the prefix and its own chunk only) and positions
  restarting per sample. The cross-attention layers then project the prefix keys/values once per row instead of
  once per sample, and the cache is repeated ``K/g`` times instead of ``K`` (``samples_per_row`` picks ``g``: long
  folded suffixes cost attention over masked-out tokens).
- *fused attention*: ``torch.nn.functional.scaled_dot_product_attention`` (``sdpa_attention``) in place of the
  eager matmul-softmax-matmul, without materialising the expanded K/V heads.

On the CPU benchmark model the two together make a 10-step call ~1.2x faster than repeating the cache K times and
calling ``denoise_step`` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE
from torch import Tensor
from torch.nn import functional as F

from reflowpairs.engine import PrefixCachedEngine, pad_language
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies._image_features import (
    EMPTY_CAMERA,
    captured_embeddings,
    substituted_embeddings,
    trainable_problems,
)
from reflowpairs.policies._image_features import unwrapped as _inner
from reflowpairs.policies.interface import FEATURE_KEY, NOISE_AT_1
from reflowpairs.policies.version import require_lerobot_version
from reflowpairs.solvers import Velocity

STEP_FIELD = "num_steps"
"""SmolVLA's config field holding the sampler's Euler step count (pi0/pi05: ``num_inference_steps``)."""


def pair_shapes(config) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(x0_shape, x1_shape)``: noise ``(chunk_size, max_action_dim)``, actions ``(chunk_size, action_dim)``."""
    chunk = config.chunk_size
    return (chunk, config.max_action_dim), (chunk, config.action_feature.shape[0])


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


class SmolVLAEngine(PrefixCachedEngine):
    """Prefix-cached sampler for ``SmolVLAPolicy`` (lerobot 0.6), built from the policy's own methods.

    ``frames_per_call``: every call samples exactly this many frames (a short call is padded with copies of its
    last frame), so a frame's X_1 does not depend on its batch-mates; None: the whole batch in one call, unpadded."""

    feature_slots: list[str] | None = (
        None  # the camera slots of cached features a batch carries (FEATURE_KEY)
    )

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
        # lazy: lerobot's model utilities import transformers (loaded by then: the policy calling this uses them)
        from lerobot.policies.common.vla_utils import make_att_2d_masks

        policy, model = self.policy, self.model
        policy.eval()
        batch = dict(batch)
        if policy.config.adapt_to_pi_aloha:  # _prepare_batch edits the state in place
            batch[OBS_STATE] = batch[OBS_STATE].clone()
        features = batch.pop(
            FEATURE_KEY, None
        )  # cached image embeddings (B, S, N, D): no vision encoder pass
        batch = policy._prepare_batch(batch)
        substituted = (
            substituted_image_features(policy, features, self.feature_slots)
            if features is not None
            else contextlib.nullcontext()
        )
        with substituted:
            images, img_masks = policy.prepare_images(batch)
            state = policy.prepare_state(batch)
            tokens, token_mask = pad_language(
                batch[OBS_LANGUAGE_TOKENS],
                batch[OBS_LANGUAGE_ATTENTION_MASK],
                policy.config.tokenizer_max_length,
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
        # lazy: lerobot's model utilities import transformers (loaded by then: the policy calling this uses them)
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

    def finish(self, x: Tensor) -> Tensor:
        """ODE end point ``(N, T, max_action_dim)`` -> normalised action ``(N, T, action_dim)``, as
        ``predict_action_chunk`` does (cropped; the pi-aloha action encoding when the config asks for it)."""
        x = x[:, :, : self.action_dim]
        if self.policy.config.adapt_to_pi_aloha:
            x = self.policy._pi_aloha_encode_actions(x)
        return x


def reflow_loss(
    policy, batch: dict[str, Tensor], x0: Tensor, x1: Tensor, t: Tensor, reduction: str = "mean"
) -> Tensor:
    """lerobot's own SmolVLA training loss for given noise and time: ``policy.forward(batch, noise=x0, time=t)``
    with ``batch["action"] = x1`` on a preprocessed observation batch (``x0`` ``(B, T, max_action_dim)``, ``x1``
    ``(B, T, action_dim)`` normalised, ``t`` ``(B,)`` on the policy's device). ``reduction``: "mean" or "none"."""

    batch = dict(batch)
    batch[ACTION] = x1.to(t.device, torch.float32)
    return policy.forward(batch, noise=x0.to(t.device, torch.float32), time=t, reduction=reduction)[0]


# --- the feature cache (reflowpairs.cached_features): image embeddings after the connector -------------------------


def frozen_feature_modules(policy) -> dict[str, torch.nn.Module]:
    """The modules the cached features depend on: SmolVLM's ``vision_model`` (SigLIP) and ``connector`` (pixel
    shuffle + projection), which together are ``SmolVLMWithExpertModel.embed_image``."""
    vlm = _inner(policy).model.vlm_with_expert.get_vlm_model()
    return {"vision_model": vlm.vision_model, "connector": vlm.connector}


def feature_cache_problems(policy) -> list[str]:
    """Why the image-embedding cache cannot stand in for this policy's ``embed_image`` in training (empty: it can).

    lerobot's ``set_requires_grad``: ``freeze_vision_encoder`` freezes the vision model only, ``train_expert_only``
    the whole VLM (the connector included); the cache needs both the vision model and the connector frozen."""
    return trainable_problems(frozen_feature_modules(policy))


def feature_slots(config, batch_keys) -> list[str]:
    """The camera slots ``prepare_images`` builds for a batch holding ``batch_keys``, in its order: the configured
    image keys present in the batch, then ``EMPTY_CAMERA`` for each missing one (at most ``config.empty_cameras``)."""
    present = [key for key in config.image_features if key in batch_keys]
    missing = len(config.image_features) - len(present)
    return present + [EMPTY_CAMERA] * min(missing, config.empty_cameras)


def feature_inputs(config) -> dict:
    """The settings besides the frozen weights that decide the cached features: the image keys and how
    ``prepare_images`` resizes them."""
    resize = config.resize_imgs_with_padding
    return {
        "image_keys": list(config.image_features),
        "empty_cameras": int(config.empty_cameras),
        "resize_imgs_with_padding": list(resize) if resize is not None else None,
    }


@torch.no_grad()
def compute_image_features(policy, batch: dict[str, Tensor]) -> tuple[Tensor, list[str]]:
    """The cacheable features of a *preprocessed* batch of B frames: ``embed_image`` of every camera slot, the
    connector's output *before* ``embed_prefix`` scales it by ``sqrt(hidden)``. Returns ``(features (B, S, N, D)``
    in the connector's dtype, ``slots``) with S camera slots (``feature_slots``) of N tokens of width D."""
    inner = _inner(policy)
    images, _ = inner.prepare_images(batch)
    features = torch.stack([inner.model.vlm_with_expert.embed_image(img) for img in images], dim=1)
    return features, feature_slots(inner.config, batch.keys())


@contextmanager
def substituted_image_features(policy, features: Tensor, slots: list[str]) -> Iterator[None]:
    """Within the block, the policy's training forward takes its image embeddings from ``features``
    ``(B, S, N, D)`` (``compute_image_features``' output for the same frames) instead of decoding and encoding
    images: ``prepare_images`` returns the cached slots (mask True for a camera, False for an empty one, as it
    would) and ``embed_image`` passes them through. Everything after ``embed_image`` is lerobot's own code."""
    inner = _inner(policy)
    vlm_with_expert = inner.model.vlm_with_expert
    dtype = next(vlm_with_expert.get_vlm_model().connector.parameters()).dtype
    features = features.to(device=next(inner.parameters()).device, dtype=dtype)
    with substituted_embeddings(inner, "prepare_images", vlm_with_expert, features, slots):
        yield


def captured_image_features(policy):
    """A context yielding the list every ``embed_image`` output of the policy (one per camera slot per prefix fill, in
    call order) is appended to: stage 1 keeps the features its prefix fills compute anyway."""
    return captured_embeddings(_inner(policy).model.vlm_with_expert)


def sample_chunk(policy, batch: dict[str, Tensor], noise: Tensor) -> Tensor:
    """lerobot's own ``predict_action_chunk`` on a preprocessed batch of B frames with the noise ``(B, T,
    max_action_dim)`` it would draw given: the normalised action chunk ``(B, T, action_dim)``."""
    return policy.predict_action_chunk(batch, noise=noise)


@dataclass(frozen=True)
class SmolVLAFamily:
    """The family interface (``reflowpairs.policies.interface.PolicyFamily`` and ``FeatureCacheFamily``) for
    ``smolvla`` policies."""

    policy_type: str = "smolvla"
    step_field: str = STEP_FIELD
    time_direction: str = NOISE_AT_1
    # select_action -> _get_action_chunk -> predict_action_chunk's model call: both make a chunk in lerobot 0.6
    chunk_methods: tuple[str, ...] = ("predict_action_chunk", "_get_action_chunk")

    def pair_shapes(self, config) -> tuple[tuple[int, int], tuple[int, int]]:
        return pair_shapes(config)

    def make_engine(self, policy, frames_per_call: int | None = None) -> SmolVLAEngine:
        require_lerobot_version()  # the engine calls SmolVLA's private methods
        return SmolVLAEngine(policy, frames_per_call)

    def sample_chunk(self, policy, batch: dict[str, Tensor], noise: Tensor) -> Tensor:
        return sample_chunk(policy, batch, noise)

    def reflow_loss(
        self, policy, batch: dict[str, Tensor], x0: Tensor, x1: Tensor, t: Tensor, reduction: str = "mean"
    ) -> Tensor:
        return reflow_loss(policy, batch, x0, x1, t, reduction)

    def check_loaded(self, policy, checkpoint_dir) -> None:
        """A no-op: SmolVLA uses lerobot's generic ``from_pretrained``, which raises when ``model.safetensors`` is
        missing or unreadable instead of returning random weights as pi0/pi05's own loader does."""

    def tokenizer_overrides(self, directory: str | Path) -> dict[str, dict]:
        """Point the saved ``tokenizer_processor`` step at a local tokenizer directory."""
        return {"tokenizer_processor": {"tokenizer_name": str(Path(directory).expanduser().resolve())}}

    def frame_batch(self, batch: dict) -> dict:
        """The identity: this family's preprocessed batch is already frame-first."""
        return batch

    # the feature cache (see reflowpairs.cached_features)
    feature_kind: str = "smolvla.image_embeddings"
    feature_what: str = (
        "per camera slot, SmolVLMWithExpertModel.embed_image (vision model + connector) of the "
        "preprocessed image, before embed_prefix's sqrt(hidden) scaling"
    )
    feature_cache_how: str = (
        "train_expert_only freezes both; freeze_vision_encoder alone leaves the connector trainable"
    )

    def frozen_feature_modules(self, policy) -> dict[str, torch.nn.Module]:
        return frozen_feature_modules(policy)

    def feature_cache_problems(self, policy) -> list[str]:
        return feature_cache_problems(policy)

    def feature_inputs(self, config) -> dict:
        return feature_inputs(config)

    def compute_features(self, policy, batch: dict[str, Tensor]) -> tuple[Tensor, list[str]]:
        return compute_image_features(policy, batch)

    def substituted_features(self, policy, features: Tensor, slots: list[str]):
        return substituted_image_features(policy, features, slots)

    def captured_features(self, policy):
        return captured_image_features(policy)

    def feature_slots(self, config, batch_keys) -> list[str]:
        return feature_slots(config, batch_keys)


FAMILY = SmolVLAFamily()
