"""What pi0 and pi05 (lerobot 0.6) share: the prefix-cached engine, the reflow loss, the weights check.

The two differ in one place: pi0 puts a *state token* at the head of the action expert's suffix
(``embed_suffix(state, x_t, t)``; ``forward(..., state, actions, noise, time)``), while pi05 has no state
argument (the state is discretised into the prompt by its preprocessor) and conditions the expert on the
time through adaRMS (``embed_suffix(x_t, t)`` returns the condition). ``PiEngine.uses_state`` says which.

``PiEngine`` samples as lerobot's ``PI0Pytorch.sample_actions`` does (``modeling_pi0.py``): the prefix
(SigLIP image tokens + language) goes once through the PaliGemma with ``use_cache=True``; each Euler step
embeds the suffix and runs the action expert against that cache. Here the cache is filled once per call of
frames, repeated for the K samples of each frame, and reused by every ODE step: lerobot copies the cache
before every step (``clone_past_key_values``) because the expert's self-attention appends the suffix keys and
values to it in place; the engine crops them off after the step instead (``DynamicCache.crop``), which leaves
the cache as it was without a copy. The maths of ``denoise_step`` is untouched (eager attention, lerobot's 4-D
additive masks and positions), so X_1 equals ``policy.predict_action_chunk(batch, noise=x0)`` up to float
rounding of the batched matmuls.

Private lerobot methods used here (``_preprocess_images``, ``_fix_pytorch_state_dict_keys``) and the model-level
internals are called only after ``require_lerobot_version()`` (in ``PiFamily``'s members).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
from safetensors import SafetensorError, safe_open
from torch import Tensor

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

STEP_FIELD = "num_inference_steps"
"""The pi0/pi05 config field holding the sampler's Euler step count (SmolVLA's is ``num_steps``)."""

FEATURE_WHAT = (
    "per camera slot, PaliGemmaWithExpertModel.embed_image (SigLIP vision tower + multi-modal projector) of the "
    "image as _preprocess_images prepares it"
)
FEATURE_CACHE_HOW = (
    "lerobot's pi0/pi05 `train_expert_only: true` freezes both (the whole PaliGemma); `freeze_vision_encoder` "
    "alone leaves the multi_modal_projector trainable. Set `train_expert_only: true` in the student's config.json "
    "to use the cache"
)


def action_dim(config) -> int:
    """The policy's real action dimension (its actions are padded to ``max_action_dim`` inside the model)."""

    return config.output_features[ACTION].shape[0]


def pair_shapes(config) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(x0_shape, x1_shape)``: noise ``(chunk_size, max_action_dim)``, actions ``(chunk_size, action_dim)``."""
    return (config.chunk_size, config.max_action_dim), (config.chunk_size, action_dim(config))


def _check_supported(config) -> None:
    if getattr(
        config, "adapt_to_pi_aloha", False
    ):  # not a pi0/pi05 option in lerobot 0.6; refuse if it appears
        raise ReflowPairsError(
            f"This {config.type} checkpoint sets adapt_to_pi_aloha, which the {config.type} engine does not handle.",
            "Use a checkpoint without it.",
        )
    if getattr(config, "compile_model", False):
        raise ReflowPairsError(
            f"This {config.type} checkpoint sets compile_model: true; the prefix-cached engine runs the model's "
            "modules eagerly and does not support torch.compile'd sampling.",
            "Set compile_model to false in its config.json (it does not change the sampled actions).",
        )


class PiEngine(PrefixCachedEngine):
    """Prefix-cached sampler for lerobot 0.6's ``PI0Policy``/``PI05Policy`` (``Engine`` protocol of
    ``reflowpairs.engine``), built from the model's own modules.

    ``frames_per_call``: every call samples exactly this many frames (a short call is padded with copies of its
    last frame, the language with pad tokens to ``tokenizer_max_length``), so a frame's X_1 does not depend on its
    batch-mates; None: the whole batch in one call, unpadded. Real-time chunking (``rtc_config``) is not applied:
    the engine samples the plain ODE, as ``predict_action_chunk`` does without RTC arguments.

    A batch carrying cached image embeddings (``FEATURE_KEY``, ``(B, S, N, D)`` in the camera slots
    ``feature_slots``: ``generate --features-from``) fills its prefix from them, with no vision tower run."""

    feature_slots: list[str] | None = (
        None  # the camera slots of cached features a batch carries (FEATURE_KEY)
    )

    def __init__(self, policy, frames_per_call: int | None = None, *, uses_state: bool):
        _check_supported(policy.config)
        self.uses_state = uses_state  # pi0: the state token heads the suffix; pi05: no state argument
        self.policy = policy
        self.model = policy.model
        self.frames_per_call = frames_per_call
        self.noise_shape, (_, self.action_dim) = pair_shapes(policy.config)

    @torch.no_grad()
    def velocity_field(self, batch: dict[str, Tensor], repeats: int) -> Velocity:
        """The teacher's velocity ``v(x_t, t)`` for each frame of ``batch`` repeated ``repeats`` times (frame-major):
        ``x_t`` ``(B * repeats, T, max_action_dim)``, ``t`` ``(B * repeats,)``."""
        prefix_pad_masks, cache, state = self._fill_prefix(batch)
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
            prefix_pad_masks = prefix_pad_masks.repeat_interleave(repeats, dim=0)
            state = None if state is None else state.repeat_interleave(repeats, dim=0)
        return partial(self._denoise_step, prefix_pad_masks, cache, state)

    @torch.no_grad()
    def _fill_prefix(self, batch: dict[str, Tensor]) -> tuple[Tensor, object, Tensor | None]:
        """Embed the prefix of a preprocessed batch of B frames and fill its KV cache as ``sample_actions`` does;
        returns ``prefix_pad_masks`` ``(B, P)``, the ``DynamicCache`` and the padded state (None for pi05)."""
        # lazy: lerobot's model utilities import transformers (loaded by then: the policy calling this uses them)
        from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d

        policy, model = self.policy, self.model
        policy.eval()
        batch = dict(batch)
        features = batch.pop(FEATURE_KEY, None)  # cached image embeddings (B, S, N, D): no vision tower pass
        substituted = (
            substituted_image_features(policy, features, self.feature_slots)
            if features is not None
            else nullcontext()
        )
        with substituted:
            images, img_masks = policy._preprocess_images(batch)
            tokens, masks = pad_language(
                batch[OBS_LANGUAGE_TOKENS],
                batch[OBS_LANGUAGE_ATTENTION_MASK],
                policy.config.tokenizer_max_length,
            )
            state = policy.prepare_state(batch) if self.uses_state else None
            prefix_embs, prefix_pad_masks, prefix_att_masks = model.embed_prefix(
                images, img_masks, tokens, masks
            )
        att_4d = prepare_attention_masks_4d(make_att_2d_masks(prefix_pad_masks, prefix_att_masks))
        with_expert = model.paligemma_with_expert
        with_expert.paligemma.model.language_model.config._attn_implementation = "eager"  # as sample_actions
        _, cache = with_expert.forward(
            attention_mask=att_4d,
            position_ids=torch.cumsum(prefix_pad_masks, dim=1) - 1,
            past_key_values=None,
            inputs_embeds=[prefix_embs, None],
            use_cache=True,
        )
        return prefix_pad_masks, cache, state

    @torch.no_grad()
    def _denoise_step(
        self, prefix_pad_masks: Tensor, cache, state: Tensor | None, x_t: Tensor, t: Tensor
    ) -> Tensor:
        """lerobot's ``denoise_step`` against the shared cache, which is cropped back to the prefix after the step
        instead of being copied before it. Returns ``v_t`` ``(N, T, max_action_dim)`` float32."""
        # lazy: lerobot's model utilities import transformers (loaded by then: the policy calling this uses them)
        from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d

        model = self.model
        if self.uses_state:
            suffix_embs, suffix_pad_masks, suffix_att_masks, adarms_cond = model.embed_suffix(state, x_t, t)
        else:
            suffix_embs, suffix_pad_masks, suffix_att_masks, adarms_cond = model.embed_suffix(x_t, t)
        rows, prefix_len = prefix_pad_masks.shape
        suffix_len = suffix_pad_masks.shape[1]
        prefix_2d = prefix_pad_masks[:, None, :].expand(rows, suffix_len, prefix_len)
        suffix_2d = make_att_2d_masks(suffix_pad_masks, suffix_att_masks)
        att_4d = prepare_attention_masks_4d(torch.cat([prefix_2d, suffix_2d], dim=2))
        positions = torch.sum(prefix_pad_masks, dim=-1)[:, None] + torch.cumsum(suffix_pad_masks, dim=1) - 1
        with_expert = model.paligemma_with_expert
        with_expert.gemma_expert.model.config._attn_implementation = "eager"  # as denoise_step
        try:
            outputs_embeds, _ = with_expert.forward(
                attention_mask=att_4d,
                position_ids=positions,
                past_key_values=cache,
                inputs_embeds=[None, suffix_embs],
                use_cache=False,
                adarms_cond=[None, adarms_cond],
            )
        finally:
            cache.crop(prefix_len)  # the expert's self-attention appended the suffix K/V in place
        suffix_out = outputs_embeds[1][:, -self.policy.config.chunk_size :].to(dtype=torch.float32)
        return model.action_out_proj(suffix_out)

    def finish(self, x: Tensor) -> Tensor:
        """ODE end point ``(N, T, max_action_dim)`` -> normalised action ``(N, T, action_dim)`` (cropped), as
        ``predict_action_chunk`` returns it."""
        return x[:, :, : self.action_dim]


def reflow_loss(
    policy,
    batch: dict[str, Tensor],
    x0: Tensor,
    x1: Tensor,
    t: Tensor,
    *,
    uses_state: bool,
    reduction: str = "mean",
) -> Tensor:
    """lerobot's own pi0/pi05 training loss for given noise and time: what ``PI0Policy.forward`` computes when its
    model draws ``x0`` and ``t``.

    ``batch``: a preprocessed (normalised, tokenised) observation batch; ``x0`` ``(B, T, max_action_dim)`` noise;
    ``x1`` ``(B, T, action_dim)`` normalised actions (padded to ``max_action_dim`` with zeros here, as
    ``prepare_action`` does); ``t`` ``(B,)`` in (0, 1]. The model-level ``forward`` returns the per-element
    ``(u_t - v_t)**2``; as lerobot does, the padded action dimensions are cropped off before the mean (lerobot does
    not mask padded chunk steps, ``action_is_pad``, for pi0/pi05, so neither does this). ``reduction``: "mean"
    (a scalar) or "none" (per sample, ``(B,)``).

    ``policy`` may be a ``DistributedDataParallel`` wrapper (``.module`` the policy): the loss must then run through
    the wrapper's ``forward``, or DDP would not average the gradients, so the policy-level ``forward`` is called
    through it with the model's noise and time draws pinned to ``x0`` and ``t`` (``pinned_draws``)."""
    # lazy: lerobot's model utilities import transformers (loaded by then: the policy calling this uses them)
    from lerobot.policies.common.vla_utils import pad_vector

    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    device = t.device
    noise = x0.to(device, torch.float32)
    if _is_wrapper(policy):
        with pinned_draws(policy.module.model, noise, t):
            return policy({**batch, ACTION: x1.to(device, torch.float32)}, reduction=reduction)[0]
    config = policy.config
    images, img_masks = policy._preprocess_images(batch)
    tokens, masks = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]
    actions = pad_vector(x1.to(device, torch.float32), config.max_action_dim)
    if uses_state:
        state = policy.prepare_state(batch)
        losses = policy.model.forward(images, img_masks, tokens, masks, state, actions, noise, t)
    else:
        losses = policy.model.forward(images, img_masks, tokens, masks, actions, noise, t)
    losses = losses[:, :, : action_dim(config)]
    if reduction == "none":
        return losses.mean(dim=(1, 2))
    return losses.mean()


def _is_wrapper(policy) -> bool:
    """True for a ``DistributedDataParallel`` (or any ``.module``-holding) wrapper of a policy."""
    return not hasattr(policy, "config") and hasattr(policy, "module")


@contextmanager
def pinned_draws(model, noise: Tensor, time: Tensor | None = None) -> Iterator[None]:
    """Within the block, the model's ``sample_noise`` returns ``noise`` ``(B, T, max_action_dim)`` and (given) its
    ``sample_time`` returns ``time`` ``(B,)`` (instance attributes over lerobot's methods, removed after), so
    lerobot's own sampler and loss run on that noise and time: the pi models and EO-1 draw both through these two
    methods. A draw of another shape is an error."""

    def sample_noise(shape, device):
        if tuple(shape) != tuple(noise.shape):
            raise ValueError(
                f"pinned noise has shape {tuple(noise.shape)}, the model asked for {tuple(shape)}"
            )
        return noise.to(device)

    def sample_time(bsize, device):
        if bsize != time.shape[0]:
            raise ValueError(f"pinned time has {time.shape[0]} rows, the model asked for {bsize}")
        return time.to(device)

    model.sample_noise = sample_noise
    if time is not None:
        model.sample_time = sample_time
    try:
        yield
    finally:
        del model.sample_noise
        if time is not None:
            del model.sample_time


@dataclass(frozen=True)
class PiFamily:
    """The family interface (``reflowpairs.policies.interface.PolicyFamily`` and ``FeatureCacheFamily``) for a
    pi0-style policy type."""

    policy_type: str
    uses_state: bool
    step_field: str = STEP_FIELD
    time_direction: str = NOISE_AT_1
    chunk_methods: tuple[str, ...] = ("predict_action_chunk",)

    def pair_shapes(self, config) -> tuple[tuple[int, int], tuple[int, int]]:
        return pair_shapes(config)

    def make_engine(self, policy, frames_per_call: int | None = None) -> PiEngine:
        """The prefix-cached engine for the policy, ``frames_per_call`` frames per call."""
        require_lerobot_version()  # the engine calls the model's internals and _preprocess_images
        return PiEngine(policy, frames_per_call, uses_state=self.uses_state)

    def sample_chunk(self, policy, batch: dict[str, Tensor], noise: Tensor) -> Tensor:
        """lerobot's own ``predict_action_chunk(batch, noise=noise)``: noise ``(B, T, max_action_dim)`` ->
        normalised actions ``(B, T, action_dim)``."""
        return policy.predict_action_chunk(batch, noise=noise)

    def reflow_loss(
        self, policy, batch: dict[str, Tensor], x0: Tensor, x1: Tensor, t: Tensor, reduction: str = "mean"
    ) -> Tensor:
        require_lerobot_version()  # calls _preprocess_images and the model-level forward
        return reflow_loss(policy, batch, x0, x1, t, uses_state=self.uses_state, reduction=reduction)

    def check_loaded(self, policy, checkpoint_dir: str | Path) -> None:
        """lerobot's pi ``from_pretrained`` returns random weights when it cannot load them: ``check_weights_loaded``
        makes that an error naming the file."""
        require_lerobot_version()  # maps the file's keys with lerobot's private _fix_pytorch_state_dict_keys
        check_weights_loaded(policy, checkpoint_dir)

    def tokenizer_overrides(self, directory: str | Path) -> dict[str, dict]:
        """Point the saved ``tokenizer_processor`` step at a local tokenizer directory."""
        return {"tokenizer_processor": {"tokenizer_name": str(Path(directory).expanduser().resolve())}}

    def frame_batch(self, batch: dict) -> dict:
        """The identity: this family's preprocessed batch is already frame-first."""
        return batch

    # the feature cache (see reflowpairs.cached_features): as SmolVLA's, on PaliGemma's vision tower + projector
    @property
    def feature_kind(self) -> str:
        return f"{self.policy_type}.image_embeddings"

    feature_what: str = FEATURE_WHAT
    feature_cache_how: str = FEATURE_CACHE_HOW

    def frozen_feature_modules(self, policy) -> dict[str, torch.nn.Module]:
        return frozen_feature_modules(policy)

    def feature_cache_problems(self, policy) -> list[str]:
        return feature_cache_problems(policy)

    def feature_inputs(self, config) -> dict:
        return feature_inputs(config)

    def compute_features(self, policy, batch: dict[str, Tensor]) -> tuple[Tensor, list[str]]:
        require_lerobot_version()  # calls _preprocess_images
        return compute_image_features(policy, batch)

    def substituted_features(self, policy, features: Tensor, slots: list[str]):
        require_lerobot_version()  # replaces _preprocess_images
        return substituted_image_features(policy, features, slots)

    def captured_features(self, policy):
        return captured_image_features(policy)

    def feature_slots(self, config, batch_keys) -> list[str]:
        return feature_slots(config, batch_keys)


# --- the feature cache (reflowpairs.cached_features): PaliGemma's image embeddings -------------------------------


def frozen_feature_modules(policy) -> dict[str, torch.nn.Module]:
    """The modules the cached features depend on: PaliGemma's ``vision_tower`` (SigLIP) and ``multi_modal_projector``,
    which together are ``PaliGemmaWithExpertModel.embed_image`` (``get_image_features``)."""
    paligemma = _inner(policy).model.paligemma_with_expert.paligemma.model
    return {"vision_tower": paligemma.vision_tower, "multi_modal_projector": paligemma.multi_modal_projector}


def feature_cache_problems(policy) -> list[str]:
    """Why the image-embedding cache cannot stand in for this policy's ``embed_image`` in training (empty: it can):
    a trainable parameter in the vision tower or the projector.

    lerobot 0.6's pi0/pi05 ``_set_requires_grad``: ``freeze_vision_encoder`` freezes ``vision_tower`` only,
    ``train_expert_only`` the whole PaliGemma (``vision_tower``, ``multi_modal_projector`` and the language model);
    the action expert, the action/state/time projections stay trainable under both. The cache needs the vision tower
    and the projector frozen: ``train_expert_only: true``."""
    return trainable_problems(frozen_feature_modules(policy))


def feature_slots(config, batch_keys) -> list[str]:
    """The camera slots ``_preprocess_images`` builds for a batch holding ``batch_keys``, in its order: the configured
    image keys present in the batch, then ``EMPTY_CAMERA`` for each missing one."""
    present = [key for key in config.image_features if key in batch_keys]
    return present + [EMPTY_CAMERA] * (len(config.image_features) - len(present))


def feature_inputs(config) -> dict:
    """The settings besides the frozen weights that decide the cached features: the image keys and the resolution
    ``_preprocess_images`` resizes (with padding) to."""
    return {
        "image_keys": list(config.image_features),
        "empty_cameras": int(config.empty_cameras),
        "image_resolution": list(config.image_resolution),
    }


@torch.no_grad()
def compute_image_features(policy, batch: dict[str, Tensor]) -> tuple[Tensor, list[str]]:
    """The cacheable features of a *preprocessed* batch of B frames: ``embed_image`` of every camera slot (SigLIP +
    projector on the image ``_preprocess_images`` prepares, float32 as lerobot keeps that path). Returns
    ``(features (B, S, N, D), slots)`` with S camera slots (``feature_slots``) of N tokens of width D."""
    inner = _inner(policy)
    images, _ = inner._preprocess_images(batch)
    embed = inner.model.paligemma_with_expert.embed_image
    features = torch.stack([embed(img) for img in images], dim=1)
    return features, feature_slots(inner.config, batch.keys())


@contextmanager
def substituted_image_features(policy, features: Tensor, slots: list[str]) -> Iterator[None]:
    """Within the block, the policy's training forward (and the engine's prefix fill) takes its image embeddings from
    ``features`` ``(B, S, N, D)`` (``compute_image_features``' output for the same frames) instead of decoding and
    encoding images: ``_preprocess_images`` returns the cached slots (mask True for a camera, False for a missing
    one, as it would) and ``embed_image`` passes them through. Everything after ``embed_image`` is lerobot's code."""
    inner = _inner(policy)
    # embed_image's output dtype: the image's, float32
    features = features.to(device=next(inner.parameters()).device, dtype=torch.float32)
    with substituted_embeddings(
        inner, "_preprocess_images", inner.model.paligemma_with_expert, features, slots
    ):
        yield


def captured_image_features(policy):
    """A context yielding the list every ``embed_image`` output of the policy (one per camera slot per prefix fill, in
    call order) is appended to: stage 1 keeps the features its prefix fills compute anyway."""
    return captured_embeddings(_inner(policy).model.paligemma_with_expert)


# --- did the weights load? --------------------------------------------------------------------------


def _file_keys_to_policy(policy, keys) -> dict[str, str]:
    """Map safetensors keys to the policy's ``state_dict`` keys as lerobot's pi ``from_pretrained`` does
    (``_fix_pytorch_state_dict_keys`` renames, then a ``model.`` prefix)."""
    fix = getattr(policy, "_fix_pytorch_state_dict_keys", None)
    mapping = {}
    logging.disable(logging.WARNING)  # the renamer warns per vision key; only the names matter here
    try:
        for key in keys:
            fixed = fix({key: torch.empty(0)}, policy.config) if fix is not None else {key: None}
            for (
                new
            ) in fixed:  # a key may be dropped (adaRMS mismatch) or duplicated (lm_head -> embed_tokens)
                mapping[new if new.startswith("model.") else f"model.{new}"] = key
    finally:
        logging.disable(logging.NOTSET)
    return mapping


def check_weights_loaded(policy, checkpoint_dir: str | Path, max_tensors: int | None = 32) -> None:
    """Raise ``ReflowPairsError`` unless ``policy`` holds the weights of ``checkpoint_dir``/model.safetensors.

    lerobot's ``PI0Policy/PI05Policy.from_pretrained`` *prints* a message and returns a randomly initialised model
    when the file is missing or cannot be loaded (or, with ``strict=False``, leaves missing layers random); this
    check catches all three: the file must exist and parse, every policy tensor must come from it (tied tensors,
    which the file stores once, count as present), and the compared tensors must be equal. ``max_tensors``: how
    many tensors, spread evenly over the file's keys, are compared (a random init differs in all of them);
    None compares every one."""
    path = Path(checkpoint_dir) / "model.safetensors"
    if not path.is_file():
        raise ReflowPairsError(
            f"Checkpoint {checkpoint_dir} has no model.safetensors: lerobot would have built the "
            f"{policy.config.type} policy with random weights.",
            "Point `teacher` at a complete pretrained_model/ directory.",
        )
    state = policy.state_dict(keep_vars=True)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            mapping = _file_keys_to_policy(policy, handle.keys())
            stored = {}
            for policy_key, file_key in mapping.items():
                if policy_key in state:
                    stored.setdefault(file_key, policy_key)
            # tied tensors (lm_head and embed_tokens) are stored once: present when their storage is
            present = {state[k].data_ptr() for k in mapping if k in state}
            missing = [k for k, v in state.items() if k not in mapping and v.data_ptr() not in present]
            if missing:
                raise ReflowPairsError(
                    f"{path} lacks {len(missing)} of the {policy.config.type} policy's tensors (e.g. "
                    f"{', '.join(missing[:3])}): lerobot leaves those randomly initialised.",
                    "Use the complete model.safetensors that lerobot-train saved; a tiny test checkpoint needs "
                    "its size patch, which reflowpairs' checkpoint-load hook applies (docs/adding-a-family.md).",
                )
            file_keys = sorted(stored)
            if max_tensors is not None and len(file_keys) > max_tensors:
                stride = len(file_keys) / max_tensors
                file_keys = [file_keys[int(i * stride)] for i in range(max_tensors)]
            differ = []
            for file_key in file_keys:
                tensor = handle.get_tensor(file_key)
                mine = state[stored[file_key]].detach()
                if mine.shape != tensor.shape or not torch.equal(mine.cpu(), tensor.to(mine.dtype)):
                    differ.append(file_key)
    except SafetensorError as err:
        raise ReflowPairsError(
            f"{path} cannot be read ({err}): lerobot would have built the {policy.config.type} policy with random "
            "weights.",
            "Use the complete model.safetensors that lerobot-train saved.",
        ) from err
    if differ:
        raise ReflowPairsError(
            f"The loaded {policy.config.type} policy does not hold the weights in {path} ({len(differ)} of "
            f"{len(file_keys)} compared tensors differ, e.g. {differ[0]}): lerobot most likely failed to load them "
            "and returned a randomly initialised model.",
            "Check that the file is complete and matches config.json; a tiny test checkpoint needs "
            "its size patch, which reflowpairs' checkpoint-load hook applies (docs/adding-a-family.md).",
        )
