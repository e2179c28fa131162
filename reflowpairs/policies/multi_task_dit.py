"""The Multi-task DiT family (lerobot 0.6 ``MultiTaskDiTPolicy`` with ``objective="flow_matching"``).

Time runs the other way from lerobot's VLAs (``time_direction = "noise_at_0"``): DiT's ``FlowMatchingObjective``
integrates from t=0 (noise) to t=1 (action) on the path ``x_t = t * action + (1 - (1 - sigma_min) * t) * noise``
with the velocity ``noise_predictor(x_t, t, conditioning_vec)`` (target ``action - (1 - sigma_min) * noise``),
``num_integration_steps`` (100) Euler steps on ``linspace(0, 1, N + 1)`` or classic RK4 (``integration_method``).
reflowpairs works in lerobot's convention (tau = 1 noise, tau = 0 action), so this family maps times itself:

- the engine's velocity is ``v(x, tau) = -v_dit(x, 1 - tau)``: ``reflowpairs.solvers``' Euler from tau=1 to 0 with
  dt = -1/N is then DiT's own Euler loop step for step (``x + (1/N) v_dit(x, i/N)``), up to float rounding of the
  time grid;
- the reflow loss is DiT's own ``compute_loss`` with its noise draw := X_0, its actions := X_1 and its time
  ``t = 1 - tau``. With ``sigma_min = 0`` (the default) DiT's ``x_t`` is then lerobot's ``tau * X_0 + (1 - tau) *
  X_1`` and its squared error lerobot's ``((X_0 - X_1) - v)^2``. DiT's own time draw, ``t = s * (1 - u)`` with
  ``u ~ Beta(alpha, beta)`` (s = 0.999, alpha = 1.5, beta = 1: ``timestep_sampling_*``), is ``tau = 1 - s + s * u``
  in lerobot's convention: pi0's ``Beta(1.5, 1) * 0.999 + 0.001``. DiT's time embedding takes t in [0, 1] as is
  (``SinusoidalPosEmb``, no timestep scale).

The conditioning vector (``observation_encoder.encode``: state, CLIP image CLS tokens, projected CLIP text) does
not depend on the noise: the engine computes it once per frame and shares it by the K samples and every step.

Shapes: a pair's T is ``horizon`` (the whole ODE state, which DiT trains on: the action chunk from ``n_obs_steps - 1``
steps in the past), D0 = D1 = the action dimension (DiT does not pad actions). ``predict_action_chunk`` returns the
slice ``[n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]`` of it; ``sample_chunk`` returns the whole horizon, the
X_1 the store holds. Observation history: reflowpairs reads single frames (state ``(B, D)``); this family adds the
history axis for a ``n_obs_steps = 1`` checkpoint and refuses a longer history (``ReflowPairsError``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from reflowpairs.engine import PrefixCachedEngine
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies.interface import NOISE_AT_0
from reflowpairs.policies.version import require_lerobot_version
from reflowpairs.solvers import Velocity

POLICY_TYPE = "multi_task_dit"
STEP_FIELD = "num_integration_steps"
"""DiT's config field holding the flow-matching sampler's step count."""
STATE_KEY = "observation.state"  # lerobot.utils.constants.OBS_STATE
ACTION_KEY = "action"  # lerobot.utils.constants.ACTION


def action_dim(config) -> int:
    """The policy's action dimension (``output_features["action"]``)."""
    return int(config.action_feature.shape[0])


def pair_shapes(config) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(x0_shape, x1_shape)``: both ``(horizon, action_dim)`` (DiT samples the whole horizon, unpadded)."""
    return (config.horizon, action_dim(config)), (config.horizon, action_dim(config))


def check_supported(config) -> None:
    """Refuse a DiT checkpoint this family cannot sample as an ODE: the diffusion objective (DDPM/DDIM)."""
    if getattr(config, "objective", None) != "flow_matching":
        raise ReflowPairsError(
            f"This multi_task_dit checkpoint has objective={config.objective!r}: its sampler is a DDPM/DDIM "
            "scheduler, not a flow-matching ODE reflowpairs can straighten.",
            'Use a multi_task_dit checkpoint trained with objective="flow_matching".',
        )


def with_observation_history(config, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The preprocessed ``batch`` with DiT's observation-history axis: a single-frame state ``(B, D)`` becomes
    ``(B, 1, D)`` for a ``n_obs_steps = 1`` checkpoint (images need nothing: ``encode`` adds their axis itself).
    A batch already carrying the history ``(B, n_obs_steps, D)`` passes through."""
    state = batch[STATE_KEY]
    if state.ndim == 3:
        return batch
    if config.n_obs_steps != 1:
        raise ReflowPairsError(
            f"This multi_task_dit checkpoint conditions on n_obs_steps={config.n_obs_steps} past observations; "
            "reflowpairs reads single dataset frames (no observation history).",
            "Use a multi_task_dit checkpoint trained with n_obs_steps=1.",
        )
    return {**batch, STATE_KEY: state[:, None]}


def conditioning(policy, batch: dict[str, Tensor]) -> Tensor:
    """DiT's conditioning vector ``(B, C)`` of a preprocessed batch of B frames, computed as ``_generate_actions``
    computes it: ``observation_encoder.encode(_prepare_batch(batch))`` in eval mode (center crop, if any)."""
    policy.eval()
    return policy.observation_encoder.encode(
        policy._prepare_batch(with_observation_history(policy.config, batch))
    )


class DitEngine(PrefixCachedEngine):
    """Conditioning-shared sampler for ``MultiTaskDiTPolicy`` (``Engine`` protocol of ``reflowpairs.engine``): one
    ``encode`` per frame, repeated for its K samples, then every ODE step is one ``noise_predictor`` call on all
    samples. ``frames_per_call`` as ``PrefixCachedEngine``: every call samples exactly that many frames."""

    def __init__(self, policy, frames_per_call: int | None = None):
        check_supported(policy.config)
        self.policy = policy
        self.frames_per_call = frames_per_call
        self.noise_shape, (_, self.action_dim) = pair_shapes(policy.config)

    @torch.no_grad()
    def velocity_field(self, batch: dict[str, Tensor], repeats: int) -> Velocity:
        """The teacher's velocity in lerobot's convention, ``v(x, tau) = -v_dit(x, 1 - tau)``, for each frame of
        ``batch`` repeated ``repeats`` times (frame-major): ``x`` ``(B * repeats, horizon, A)``, ``tau``
        ``(B * repeats,)``."""
        cond = conditioning(self.policy, batch)
        if repeats > 1:
            cond = cond.repeat_interleave(repeats, dim=0)
        return partial(self._velocity, cond)

    @torch.no_grad()
    def _velocity(self, cond: Tensor, x: Tensor, tau: Tensor) -> Tensor:
        return -self.policy.noise_predictor(x, 1.0 - tau.to(x.dtype), conditioning_vec=cond)

    def finish(self, x: Tensor) -> Tensor:
        """ODE end point ``(N, horizon, A)`` -> the normalised action chunk: DiT's sample as is."""
        return x


class PinnedDraws(TorchFunctionMode):
    """Within the block (this thread), lerobot's ``torch.randn`` / ``torch.randn_like`` draw returns ``noise`` (once;
    a draw of another shape, or a second one, is an error) and, with ``record_losses``, every
    ``F.mse_loss(..., reduction="none")`` output is appended to ``losses``. DiT draws its noise inline
    (``conditional_sample``, ``compute_loss``), with no argument or method to replace, so the draw itself is pinned."""

    def __init__(self, noise: Tensor, record_losses: bool = False):
        super().__init__()
        self.noise = noise
        self.used = False
        self.record_losses = record_losses
        self.losses: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn or func is torch.randn_like:
            return self._pinned(func, args, kwargs)
        out = func(*args, **kwargs)
        if self.record_losses and func is F.mse_loss and kwargs.get("reduction") == "none":
            self.losses.append(out)
        return out

    def _pinned(self, func, args, kwargs) -> Tensor:
        if func is torch.randn_like:
            shape, dtype, device = args[0].shape, args[0].dtype, args[0].device
        else:
            shape = kwargs.get(
                "size", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            )
            dtype, device = kwargs.get("dtype") or torch.float32, kwargs.get("device")
        if self.used or tuple(shape) != tuple(self.noise.shape):
            raise ValueError(
                f"pinned noise {tuple(self.noise.shape)} (used: {self.used}); the policy drew {tuple(shape)}"
            )
        self.used = True
        return self.noise.to(device=device, dtype=dtype)


@torch.no_grad()
def sample_chunk(policy, batch: dict[str, Tensor], noise: Tensor) -> Tensor:
    """lerobot's own DiT sampler with its noise draw replaced by ``noise`` ``(B, horizon, A)``: the conditioning
    vector as ``_generate_actions`` computes it, then ``objective.conditional_sample`` (its Euler or RK4 loop at
    ``config.num_integration_steps`` on ``linspace(0, 1, N + 1)``), whose ``torch.randn`` returns ``noise``.
    Returns the normalised sample ``(B, horizon, A)``, the whole horizon (``predict_action_chunk`` returns its
    ``n_action_steps`` slice from ``n_obs_steps - 1``)."""
    require_lerobot_version()
    check_supported(policy.config)
    cond = conditioning(policy, batch)
    with PinnedDraws(noise):
        return policy.objective.conditional_sample(policy.noise_predictor, noise.shape[0], cond)


@contextmanager
def pinned_time(objective, time: Tensor) -> Iterator[None]:
    """Within the block, DiT's ``FlowMatchingObjective._sample_timesteps`` returns ``time`` ``(B,)`` (DiT's own
    convention: t = 0 noise), as an instance attribute over lerobot's method, removed after."""

    def sample_timesteps(batch_size: int, device) -> Tensor:
        if batch_size != time.shape[0]:
            raise ValueError(f"pinned time has {time.shape[0]} rows, the objective asked for {batch_size}")
        return time.to(device)

    objective._sample_timesteps = sample_timesteps
    try:
        yield
    finally:
        del objective._sample_timesteps


def reflow_loss(
    policy, batch: dict[str, Tensor], x0: Tensor, x1: Tensor, t: Tensor, reduction: str = "mean"
) -> Tensor:
    """DiT's own flow-matching training loss for given noise and time: ``policy.forward`` (``_prepare_batch``,
    ``encode``, ``objective.compute_loss``) on ``batch`` with ``action = x1``, its ``torch.randn_like`` noise draw
    pinned to ``x0`` and its time draw to ``1 - t``.

    ``batch``: a preprocessed observation batch of B frames; ``x0`` ``(B, horizon, A)`` noise; ``x1``
    ``(B, horizon, A)`` normalised actions; ``t`` ``(B,)`` in lerobot's convention (tau = 1 noise), mapped to DiT's
    ``t_dit = 1 - tau`` here (module docstring). ``reduction``: "mean" (DiT's own ``loss.mean()``) or "none" (per
    sample ``(B,)``: the mean over horizon and action of the same forward's ``F.mse_loss(reduction="none")``).
    ``policy`` may be a ``DistributedDataParallel`` wrapper: the loss then runs through the wrapper's ``forward``."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    inner = policy if hasattr(policy, "config") else policy.module
    require_lerobot_version()
    check_supported(inner.config)
    device = t.device
    full = {**with_observation_history(inner.config, batch), ACTION_KEY: x1.to(device, torch.float32)}
    draws = PinnedDraws(x0.to(device, torch.float32), record_losses=reduction == "none")
    with pinned_time(inner.objective, 1.0 - t.to(torch.float32)), draws:
        loss = policy(full)[0]
    if reduction == "mean":
        return loss
    return draws.losses[-1].mean(dim=(1, 2))


def check_loaded(policy, checkpoint_dir: str | Path, max_tensors: int | None = 32) -> None:
    """Raise ``ReflowPairsError`` unless ``policy`` holds the weights of ``checkpoint_dir``/model.safetensors.

    lerobot's ``PreTrainedPolicy.from_pretrained`` loads non-strictly (``strict=False``): a tensor missing from the
    file only logs, leaving that layer as the constructor built it (the CLIP towers from ``vision_encoder_name`` /
    ``text_encoder_name``, the DiT random). Every policy tensor must be in the file, and ``max_tensors`` of them
    (spread over the keys; None: all) must be equal to it."""
    from safetensors import SafetensorError, safe_open  # heavy optional reader, as lerobot's loader

    path = Path(checkpoint_dir) / "model.safetensors"
    if not path.is_file():
        raise ReflowPairsError(
            f"Checkpoint {checkpoint_dir} has no model.safetensors: lerobot would have built the multi_task_dit "
            "policy with random weights.",
            "Point `teacher` at a complete pretrained_model/ directory.",
        )
    state = policy.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            stored = set(handle.keys())
            missing = sorted(set(state) - stored)
            keys = sorted(set(state) & stored)
            if max_tensors is not None and len(keys) > max_tensors:
                keys = [keys[int(i * len(keys) / max_tensors)] for i in range(max_tensors)]
            differ = [
                k for k in keys if not torch.equal(state[k].cpu(), handle.get_tensor(k).to(state[k].dtype))
            ]
    except SafetensorError as err:
        raise ReflowPairsError(
            f"{path} cannot be read ({err}).", "Use the complete model.safetensors that lerobot-train saved."
        ) from err
    if missing or differ:
        what = f"lacks {len(missing)} tensors (e.g. {missing[0]})" if missing else f"differs in {differ[0]}"
        raise ReflowPairsError(
            f"The loaded multi_task_dit policy does not hold the weights in {path}: the file {what}, so lerobot's "
            "non-strict load left those layers as constructed.",
            "Use the complete model.safetensors that lerobot-train saved, matching its config.json.",
        )


@dataclass(frozen=True)
class DitFamily:
    """The family interface (``reflowpairs.policies``) for lerobot's ``multi_task_dit`` (flow matching)."""

    policy_type: str = POLICY_TYPE
    step_field: str = STEP_FIELD
    time_direction: str = NOISE_AT_0
    chunk_methods: tuple[str, ...] = ("predict_action_chunk",)

    def pair_shapes(self, config) -> tuple[tuple[int, int], tuple[int, int]]:
        return pair_shapes(config)

    def make_engine(self, policy, frames_per_call: int | None = None) -> DitEngine:
        """The conditioning-shared engine for the policy, ``frames_per_call`` frames per call."""
        require_lerobot_version()
        return DitEngine(policy, frames_per_call)

    def sample_chunk(self, policy, batch: dict[str, Tensor], noise: Tensor) -> Tensor:
        return sample_chunk(policy, batch, noise)

    def reflow_loss(
        self, policy, batch: dict[str, Tensor], x0: Tensor, x1: Tensor, t: Tensor, reduction: str = "mean"
    ) -> Tensor:
        return reflow_loss(policy, batch, x0, x1, t, reduction=reduction)

    def check_loaded(self, policy, checkpoint_dir: str | Path) -> None:
        check_loaded(policy, checkpoint_dir)


FAMILY = DitFamily()
