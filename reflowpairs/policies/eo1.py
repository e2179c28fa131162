"""The EO-1 family (lerobot 0.6 ``EO1Policy``): a Qwen2.5-VL backbone whose action chunk rides in the same token
sequence as the prompt (``<|action_pad|>`` placeholders after ``<|action_start|>``), denoised by an openpi-style
flow-matching head (``common/flow_matching.py``'s Euler loop, t=1 noise -> t=0 action, ``num_denoise_steps``).

lerobot's ``EO1VisionFlowMatchingModel.sample_actions`` already fills the prompt's KV cache once (everything before
the action span: system prompt, images, state token, task) and, per Euler step, embeds the noisy chunk and time
(``embed_suffix``), crops the cache back to the prompt and runs the backbone on the chunk's tokens only. Neither
``predict_action_chunk`` nor ``forward`` takes noise or time: the model draws them in ``sample_noise`` and
``sample_time``. So here:

- ``EO1Engine`` runs ``sample_actions``' code split in two: the prompt's cache is filled once per frame, repeated for
  the frame's K samples, and every step of every solver runs against it (cropped after each step), so its X_1
  equals ``sample_chunk`` up to float rounding;
- ``sample_chunk`` is lerobot's own ``predict_action_chunk`` with the model's ``sample_noise`` pinned to the given
  noise (the reference: ``--exact``, the spot check, eval);
- ``reflow_loss`` is lerobot's own training ``forward`` with ``sample_noise``/``sample_time`` pinned to X_0 and t.

One layout quirk: lerobot's EO-1 preprocessor flattens the images of a batch, ``pixel_values``
``(frames * cameras * patches, C * 2 * 14 * 14)`` and ``image_grid_thw`` ``(frames * cameras, 3)``, so those
tensors do not have the frame as their first dimension. ``frame_batch`` reshapes them to ``(frames, ...)`` (under
other keys) so the generic per-frame slicing, padding and repeating apply; ``lerobot_batch`` undoes it. Every entry
point here accepts either layout.

Language padding: the preprocessor left-pads the prompts of a batch to its longest one, so a frame's prompt length
(its left padding, masked out) depends on its batch-mates; X_1 then depends on them only through float rounding of
different-length matmuls (well inside 1e-5 in float32, not bit-exact in bfloat16).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from lerobot.utils.constants import ACTION, OBS_STATE
from torch import Tensor

from reflowpairs.engine import PrefixCachedEngine
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies._pi_common import check_weights_loaded, pinned_draws
from reflowpairs.policies.interface import NOISE_AT_1
from reflowpairs.policies.version import require_lerobot_version
from reflowpairs.solvers import SolverConfig, Velocity

STEP_FIELD = "num_denoise_steps"
"""EO-1's config field holding the sampler's Euler step count."""

PIXELS, GRIDS = "pixel_values", "image_grid_thw"
"""lerobot's EO-1 preprocessor keys holding every image of a batch, flattened across frames."""

FRAME_PIXELS, FRAME_GRIDS = "pixel_values.per_frame", "image_grid_thw.per_frame"
"""``frame_batch``'s keys for them: ``(frames, patches_per_frame, patch_dim)`` and ``(frames, cameras, 3)``."""


def action_dim(config) -> int:
    """The policy's real action dimension (actions are padded to ``max_action_dim`` inside the model)."""
    return config.output_features[ACTION].shape[0]


def pair_shapes(config) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(x0_shape, x1_shape)``: noise ``(chunk_size, max_action_dim)``, actions ``(chunk_size, action_dim)``."""
    return (config.chunk_size, config.max_action_dim), (config.chunk_size, action_dim(config))


# --- batch layout --------------------------------------------------------------------------------------------------


def frame_batch(batch: dict) -> dict:
    """A preprocessed EO-1 batch with its flattened images reshaped frame-first (``FRAME_PIXELS``
    ``(B, P, patch_dim)``, ``FRAME_GRIDS`` ``(B, cameras, 3)``), so every per-frame tensor has the frame as its first
    dimension; a batch already in that layout (or without images) is returned as is. Every frame must hold the same
    number of patches (cameras of one size, as in a dataset)."""
    if PIXELS not in batch:
        return batch
    frames = batch["input_ids"].shape[0]
    pixels, grids = batch[PIXELS], batch[GRIDS]
    if grids.shape[0] % frames:
        raise ReflowPairsError(
            f"The EO-1 batch has {grids.shape[0]} images for {frames} frames: not the same cameras in every frame.",
            "Give every frame the same cameras.",
        )
    per_frame = grids.prod(dim=-1).reshape(frames, -1).sum(dim=1)
    if not bool((per_frame == per_frame[0]).all()):
        raise ReflowPairsError(
            f"The EO-1 batch's frames have different image sizes ({per_frame.tolist()} patches).",
            "Give every frame's cameras the same resolutions.",
        )
    out = {key: value for key, value in batch.items() if key not in (PIXELS, GRIDS)}
    out[FRAME_PIXELS] = pixels.reshape(frames, int(per_frame[0]), pixels.shape[-1])
    out[FRAME_GRIDS] = grids.reshape(frames, -1, 3)
    return out


def lerobot_batch(batch: dict) -> dict:
    """``frame_batch`` undone: the flattened ``pixel_values``/``image_grid_thw`` lerobot's EO-1 model takes."""
    if FRAME_PIXELS not in batch:
        return batch
    out = {key: value for key, value in batch.items() if key not in (FRAME_PIXELS, FRAME_GRIDS)}
    out[PIXELS] = batch[FRAME_PIXELS].reshape(-1, batch[FRAME_PIXELS].shape[-1])
    out[GRIDS] = batch[FRAME_GRIDS].reshape(-1, 3)
    return out


# --- pinned draws ---------------------------------------------------------------------------------------------------


@contextmanager
def captured_elementwise_loss() -> Iterator[list[Tensor]]:
    """Within the block, every ``F.mse_loss`` lerobot's EO-1 module computes is appended to the yielded list: the
    training forward's per-element ``(u_t - v_t)**2`` ``(B, T, max_action_dim)`` before its reduction (the module's
    ``F`` is shadowed by a proxy that records ``mse_loss`` and forwards everything else)."""
    from lerobot.policies.eo1 import modeling_eo1  # lazy: lerobot imports torch and its model stack

    functional = modeling_eo1.F
    seen: list[Tensor] = []

    class _Recording:
        def __getattr__(self, name):
            return getattr(functional, name)

        @staticmethod
        def mse_loss(*args, **kwargs):
            out = functional.mse_loss(*args, **kwargs)
            seen.append(out)
            return out

    modeling_eo1.F = _Recording()
    try:
        yield seen
    finally:
        modeling_eo1.F = functional


# --- the reference sampler and the loss ----------------------------------------------------------------------------


def sample_chunk(policy, batch: dict[str, Tensor], noise: Tensor) -> Tensor:
    """lerobot's own ``EO1Policy.predict_action_chunk(batch)`` with the model's noise draw replaced by ``noise``
    ``(B, chunk_size, max_action_dim)``: normalised actions ``(B, chunk_size, action_dim)``. ``batch``: a preprocessed
    batch of B frames (either layout, see ``frame_batch``)."""
    require_lerobot_version()
    device = next(policy.parameters()).device
    policy.reset()
    with pinned_draws(policy.model, noise.to(device, torch.float32)):
        return policy.predict_action_chunk(lerobot_batch(batch))


def _is_wrapper(policy) -> bool:
    """True for a ``DistributedDataParallel`` (or any ``.module``-holding) wrapper of a policy."""
    return not hasattr(policy, "config") and hasattr(policy, "module")


def reflow_loss(
    policy, batch: dict[str, Tensor], x0: Tensor, x1: Tensor, t: Tensor, reduction: str = "mean"
) -> Tensor:
    """lerobot's own EO-1 training loss (``EO1Policy.forward``) with its model's noise and time draws pinned to ``x0``
    ``(B, T, max_action_dim)`` and ``t`` ``(B,)`` (lerobot's convention, t=1 noise) and the action ``x1``
    ``(B, T, action_dim)`` (normalised; ``prepare_action`` pads it with zeros to ``max_action_dim``, and lerobot
    supervises those padded dimensions unless ``supervise_padding_action_dims`` is false). ``batch``: a preprocessed
    observation batch. ``reduction``: "mean" (lerobot's scalar) or "none" (per sample ``(B,)``, the mean of each
    sample's supervised ``(u_t - v_t)**2``). ``policy`` may be a ``DistributedDataParallel`` wrapper: the forward then
    runs through it, so the gradients are averaged."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    require_lerobot_version()
    inner = policy.module if _is_wrapper(policy) else policy
    device = t.device
    inputs = {**lerobot_batch(batch), ACTION: x1.to(device, torch.float32)}
    # stored pairs are never padded; lerobot reads the mask only when supervise_padding_actions is false
    inputs.setdefault("action_is_pad", torch.zeros(x1.shape[:2], dtype=torch.bool, device=device))
    with pinned_draws(inner.model, x0.to(device, torch.float32), t.to(device, torch.float32)):
        if reduction == "mean":
            return policy(inputs)[0]
        with captured_elementwise_loss() as seen:
            policy(inputs)
    losses = seen[-1]
    if not inner.config.supervise_padding_action_dims:
        losses = losses[..., : action_dim(inner.config)]
    return losses.mean(dim=(1, 2))


# --- the prefix-cached engine --------------------------------------------------------------------------------------


@dataclass
class _Prompt:
    """The filled prompt of a call: its KV cache (prompt tokens only), and for the action span the attention mask
    ``(N, act_end)``, the rotary positions ``(3, N, T)``, where the span starts and the backbone's embedding dtype."""

    cache: object
    attention_mask: Tensor
    positions: Tensor
    act_start: int
    embed_dtype: torch.dtype


class EO1Engine(PrefixCachedEngine):
    """Prefix-cached sampler for ``EO1Policy`` (lerobot 0.6; ``reflowpairs.engine.Engine`` protocol), built from the
    model's own modules as ``EO1VisionFlowMatchingModel.sample_actions`` uses them.

    ``frames_per_call``: every call samples exactly this many frames (a short call is padded with copies of its last
    frame); None: the whole batch in one call."""

    def __init__(self, policy, frames_per_call: int | None = None):
        self.policy = policy
        self.model = policy.model
        self.frames_per_call = frames_per_call
        self.noise_shape, (_, self.action_dim) = pair_shapes(policy.config)

    @torch.no_grad()
    def sample(self, batch: dict[str, Tensor], noise: Tensor, solver: SolverConfig) -> Tensor:
        """X_1 ``(B, K, T, action_dim)`` from noise ``(B, K, T, max_action_dim)``, in calls of ``frames_per_call``
        frames (the batch reshaped frame-first first, ``frame_batch``)."""
        return super().sample(frame_batch(batch), noise, solver)

    @torch.no_grad()
    def velocity_field(self, batch: dict[str, Tensor], repeats: int) -> Velocity:
        """The teacher's velocity ``v(x_t, t)`` for each frame of ``batch`` repeated ``repeats`` times (frame-major):
        ``x_t`` ``(B * repeats, T, max_action_dim)``, ``t`` ``(B * repeats,)``, lerobot's convention."""
        prompt = self._fill_prompt(lerobot_batch(batch))
        if repeats > 1:
            prompt.cache.batch_repeat_interleave(repeats)
            prompt.attention_mask = prompt.attention_mask.repeat_interleave(repeats, dim=0)
            prompt.positions = prompt.positions.repeat_interleave(repeats, dim=1)
        return partial(self._denoise_step, prompt)

    def _action_span(self, input_ids: Tensor, inputs_embeds: Tensor, batch: dict) -> int:
        """Where the chunk's ``<|action_pad|>`` tokens start, with ``sample_actions``' checks."""
        chunk = self.policy.config.chunk_size
        _, placeholder = self.model.get_placeholder_mask(
            input_ids,
            inputs_embeds,
            state_token_id=batch["state_token_id"],
            action_token_id=batch["action_token_id"],
        )
        mask = placeholder[..., 0]
        if not bool((mask.sum(dim=1) == chunk).all()) or bool(mask.ne(mask[:1]).any()):
            raise ReflowPairsError(
                f"The EO-1 batch does not hold {chunk} aligned action tokens per frame.",
                "Preprocess the observations with the checkpoint's own policy_preprocessor (left padding).",
            )
        start = int(mask[0].to(torch.int64).argmax())
        if not bool(mask[:, start : start + chunk].all()):
            raise ReflowPairsError("The EO-1 batch's action tokens are not contiguous.")
        return start

    @torch.no_grad()
    def _fill_prompt(self, batch: dict[str, Tensor]) -> _Prompt:
        """Embed a preprocessed batch's prompt (state projected into its placeholder) and run the backbone on the
        tokens before the action span with ``use_cache=True``, as ``sample_actions`` does."""
        policy, model = self.policy, self.model
        policy.eval()
        input_ids = batch["input_ids"]
        inputs_embeds = model.embed_prefix(
            input_ids,
            states=policy.prepare_state(batch[OBS_STATE]),
            state_token_id=batch["state_token_id"],
            action_token_id=batch["action_token_id"],
        )
        start = self._action_span(input_ids, inputs_embeds, batch)
        end = start + policy.config.chunk_size
        device = inputs_embeds.device
        attention_mask = batch["attention_mask"].to(device)
        mm_token_type_ids = batch["mm_token_type_ids"].to(device)
        backbone = model.vlm_backbone.model
        positions, _ = backbone.get_rope_index(
            input_ids,
            image_grid_thw=batch[GRIDS],
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids,
        )
        positions = positions.to(device)
        outputs = backbone(
            input_ids=input_ids[:, :start],
            attention_mask=attention_mask[:, :start],
            position_ids=positions[..., :start],
            inputs_embeds=inputs_embeds[:, :start],
            pixel_values=batch[PIXELS],
            image_grid_thw=batch[GRIDS],
            mm_token_type_ids=mm_token_type_ids[:, :start],
            use_cache=True,
            return_dict=True,
        )
        return _Prompt(
            outputs.past_key_values,
            attention_mask[:, :end],
            positions[..., start:end],
            start,
            inputs_embeds.dtype,
        )

    @torch.no_grad()
    def _denoise_step(self, prompt: _Prompt, x_t: Tensor, t: Tensor) -> Tensor:
        """``sample_actions``' ``denoise_fn`` against the shared prompt cache, cropped back to the prompt after the
        step. Returns ``v_t`` ``(N, T, max_action_dim)`` in ``x_t``'s dtype."""
        model = self.model
        chunk = self.policy.config.chunk_size
        action_time_embs = model.embed_suffix(t, x_t).to(prompt.embed_dtype)
        try:
            outputs = model.vlm_backbone.model(
                attention_mask=prompt.attention_mask,
                past_key_values=prompt.cache,
                inputs_embeds=action_time_embs,
                position_ids=prompt.positions,
                use_cache=True,
                return_dict=True,
            )
        finally:
            prompt.cache.crop(prompt.act_start)  # the step appended the chunk's keys and values in place
        with model.flow_head_autocast_context():
            hidden = outputs.last_hidden_state[:, :chunk].to(dtype=model.action_out_proj.dtype)
            v_t = model.action_out_proj(hidden)
        return v_t.reshape(x_t.shape).to(x_t.dtype)

    def finish(self, x: Tensor) -> Tensor:
        """ODE end point ``(N, T, max_action_dim)`` -> normalised action ``(N, T, action_dim)`` (cropped), as
        ``predict_action_chunk`` returns it."""
        return x[:, :, : self.action_dim].to(torch.float32)


# --- the family -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EO1Family:
    """The family interface (``reflowpairs.policies``) for lerobot's ``eo1`` policy type."""

    policy_type: str = "eo1"
    step_field: str = STEP_FIELD
    time_direction: str = NOISE_AT_1
    chunk_methods: tuple[str, ...] = ("predict_action_chunk",)

    def pair_shapes(self, config) -> tuple[tuple[int, int], tuple[int, int]]:
        return pair_shapes(config)

    def make_engine(self, policy, frames_per_call: int | None = None) -> EO1Engine:
        """The prefix-cached engine for the policy, ``frames_per_call`` frames per call."""
        require_lerobot_version()
        return EO1Engine(policy, frames_per_call)

    def sample_chunk(self, policy, batch: dict[str, Tensor], noise: Tensor) -> Tensor:
        return sample_chunk(policy, batch, noise)

    def reflow_loss(
        self, policy, batch: dict[str, Tensor], x0: Tensor, x1: Tensor, t: Tensor, reduction: str = "mean"
    ) -> Tensor:
        return reflow_loss(policy, batch, x0, x1, t, reduction)

    def check_loaded(self, policy, checkpoint_dir: str | Path) -> None:
        """``EO1Policy.from_pretrained`` loads non-strictly: a layer missing from model.safetensors stays random.
        Raise ``ReflowPairsError`` unless every tensor of the policy came from the file."""
        check_weights_loaded(policy, checkpoint_dir)

    def tokenizer_overrides(self, directory: str | Path) -> dict[str, dict]:
        """``make_pre_post_processors``' ``preprocessor_overrides`` that point a saved EO-1 pipeline at a local
        Qwen2.5-VL processor directory (``--tokenizer DIR``): EO-1 has no ``tokenizer_processor`` step, its
        ``eo1_qwen_processor`` step loads ``Qwen2_5_VLProcessor.from_pretrained(processor_name)``."""
        return {"eo1_qwen_processor": {"processor_name": str(Path(directory).expanduser().resolve())}}

    def frame_batch(self, batch: dict) -> dict:
        """A preprocessed batch with every per-frame tensor frame-first (``frame_batch``): what generic per-frame
        slicing and repeating (``reflowpairs.engine.slice_frames``/``repeat_frames``) need."""
        return frame_batch(batch)


FAMILY = EO1Family()
