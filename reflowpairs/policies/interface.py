"""The policy-family interface: what generic code (engine, generate, train, eval, validate, the closed loop, teacher
loading, checkpoints) may ask of a lerobot flow-matching policy type. Generic code asks the family; it never
branches on the policy type.

Every family is one module in ``reflowpairs/policies/`` exposing ``FAMILY``, an object satisfying ``PolicyFamily``,
registered in ``reflowpairs.policies.FAMILIES``. A family may also offer the image-feature cache
(``FeatureCacheFamily``, docs/feature-cache.md). docs/adding-a-family.md says how to add one.

Conventions every member shares:

- shapes: ``B`` frames, ``T`` = the config's ``chunk_size``, ``D0`` the noise width (``max_action_dim`` for the VLAs),
  ``D1`` the real action width; actions are *normalised* (the preprocessor's output space);
- time: lerobot's VLA convention, t = 1 is noise and t = 0 the action (``NOISE_AT_1``). A family whose own code runs
  the other way (``NOISE_AT_0``: t = 0 noise -> t = 1 action) maps times itself, in ``make_engine``'s velocity field
  (``v(x, t) = -v_own(x, 1 - t)``) and in ``reflow_loss``; generic code only records ``time_direction``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from reflowpairs.engine import Engine

NOISE_AT_1 = "noise_at_1"
"""lerobot's VLA time convention (SmolVLA, pi0, pi05, eo1): t = 1 noise -> t = 0 action."""

NOISE_AT_0 = "noise_at_0"
"""The other convention (lerobot's multi_task_dit): t = 0 noise -> t = 1 action."""

TIME_DIRECTIONS = (NOISE_AT_1, NOISE_AT_0)

FEATURE_KEY = "reflowpairs.features"
"""Batch key of cached image features ``(B, S, N, D)`` (``generate --features-from``, training from a feature cache):
a family's engine and training forward take them in place of running the vision tower."""


@runtime_checkable
class PolicyFamily(Protocol):
    """What reflowpairs needs to know about one lerobot flow-matching policy type."""

    policy_type: str
    """lerobot's config ``type`` (``"smolvla"``, ``"pi0"``, ...)."""

    step_field: str
    """The config field holding the sampler's step count (SmolVLA ``num_steps``, pi0/pi05 ``num_inference_steps``);
    everything that reads or writes a policy's step count goes through it."""

    time_direction: str
    """``NOISE_AT_1`` or ``NOISE_AT_0``: the direction of the family's own sampler. Recorded in the store manifest;
    generic code never interprets it beyond recording and checking it."""

    chunk_methods: tuple[str, ...]
    """The policy methods that make an action chunk (closed-loop latency timing wraps them)."""

    def pair_shapes(self, config) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((T, D0), (T, D1))``: the noise and action shapes of a pair (the pair-store contract)."""
        ...

    def make_engine(self, policy, frames_per_call: int | None = None) -> Engine:
        """The shared-work sampler (``reflowpairs.engine.Engine``), ``frames_per_call`` frames per call (None: the
        whole batch). Its ``velocity_field`` is in lerobot's convention (integrated by ``reflowpairs.solvers`` from
        t = 1 to t = 0 with dt = -1/N), and its X_1 equals ``sample_chunk`` up to float rounding."""
        ...

    def sample_chunk(self, policy, batch: dict[str, Tensor], noise: Tensor) -> Tensor:
        """The policy's own ``predict_action_chunk(batch)`` with its noise draw replaced by ``noise`` ``(B, T, D0)``:
        the normalised action chunk ``(B, T, D1)``, lerobot's code bit for bit. The reference used by the exact
        sampler (``--exact``), validate's spot check and eval. ``batch``: a preprocessed observation batch of B."""
        ...

    def reflow_loss(
        self, policy, batch: dict[str, Tensor], x0: Tensor, x1: Tensor, t: Tensor, reduction: str = "mean"
    ) -> Tensor:
        """The family's own training loss for noise ``x0`` ``(B, T, D0)``, normalised actions ``x1`` ``(B, T, D1)``
        and time ``t`` ``(B,)`` given in lerobot's convention, on a preprocessed observation batch. ``reduction``:
        "mean" (a scalar) or "none" (per sample, ``(B,)``). ``policy`` may be a DDP wrapper."""
        ...

    def check_loaded(self, policy, checkpoint_dir: str | Path) -> None:
        """After ``from_pretrained``: raise ``ReflowPairsError`` if the weights silently fell back to random
        initialisation (a no-op for a family whose loader cannot do that)."""
        ...

    def tokenizer_overrides(self, directory: str | Path) -> dict[str, dict]:
        """``make_pre_post_processors``' ``preprocessor_overrides`` that point a saved preprocessor at a local
        tokenizer (or processor) directory (``--tokenizer DIR``), by the family's own processor step."""
        ...

    def frame_batch(self, batch: dict) -> dict:
        """A preprocessed batch with every per-frame tensor frame-first (B, ...), what generic per-frame slicing
        and repeating (``reflowpairs.engine.slice_frames``/``repeat_frames``) need; the identity for a family whose
        preprocessor already keeps the frame first."""
        ...


@runtime_checkable
class FeatureCacheFamily(Protocol):
    """The optional image-feature cache of a family (``reflowpairs.cached_features``, docs/feature-cache.md)."""

    feature_kind: str
    """What is cached, e.g. ``"smolvla.image_embeddings"`` (recorded in the cache, checked on use)."""

    feature_what: str
    """One sentence: which module's output the features are."""

    feature_cache_how: str
    """One sentence: which config setting freezes the modules the cache stands in for."""

    def frozen_feature_modules(self, policy) -> dict[str, torch.nn.Module]:
        """The modules the features depend on (fingerprinted; they must stay frozen in a student using the cache)."""
        ...

    def feature_cache_problems(self, policy) -> list[str]:
        """Why a student cannot use the cache (trainable parameters in those modules); empty: it can."""
        ...

    def feature_inputs(self, config) -> dict:
        """The settings besides the frozen weights that change the features (image keys, resolution)."""
        ...

    def feature_slots(self, config, batch_keys) -> list[str]:
        """The camera slots a batch holding ``batch_keys`` fills, in the policy's order."""
        ...

    def compute_features(self, policy, batch: dict[str, Tensor]) -> tuple[Tensor, list[str]]:
        """``(features (B, S, N, D), slots)`` of a preprocessed batch of B frames."""
        ...

    def captured_features(self, policy) -> AbstractContextManager[list[Tensor]]:
        """A context yielding the list every feature computation of a sampling call is appended to."""
        ...

    def substituted_features(
        self, policy, features: Tensor, slots: list[str]
    ) -> AbstractContextManager[None]:
        """A context in which the policy's forward takes ``features`` instead of running the vision tower."""
        ...
