"""Policy families: what reflowpairs needs to know about each lerobot flow-matching policy type.

``FAMILIES`` maps a lerobot config ``type`` to its family object, which provides:

- ``step_field: str``: the config field holding the sampler's Euler step count (``"num_steps"`` for SmolVLA,
  ``"num_inference_steps"`` for pi0/pi05); everything that reads or writes a policy's step count goes through it;
- ``pair_shapes(config) -> ((T, D0), (T, D1))``: noise ``(chunk_size, max_action_dim)`` and actions
  ``(chunk_size, action_dim)``, the pair-store contract's shapes;
- ``make_engine(policy, frames_per_call=None) -> Engine``: the prefix-cached sampler (``reflowpairs.engine.Engine``
  protocol: ``noise_shape``, ``action_dim``, ``frames_per_call``, ``exact``, ``device``, ``velocity_field(batch,
  repeats)``, ``sample(batch, noise, solver)``), whose X_1 equals ``policy.predict_action_chunk(batch, noise=x0)``
  up to float rounding;
- ``reflow_loss(policy, batch, x0, x1, t, reduction="mean") -> Tensor``: lerobot's own training loss of the policy
  for noise ``x0`` ``(B, T, D0)``, normalised actions ``x1`` ``(B, T, D1)`` and time ``t`` ``(B,)``, on a
  *preprocessed* observation batch (normalised, tokenised).

A family may also offer the feature cache (``reflowpairs.featurecache``, docs/feature-cache.md); SmolVLA does, pi0/pi05
do not yet (``featurecache.cache_family`` is None for them). Its members: ``feature_kind`` (what is cached),
``frozen_feature_modules(policy)`` (the modules the features depend on, fingerprinted), ``feature_cache_problems(policy)``
(why a student cannot use the cache: trainable parameters there), ``feature_inputs(config)`` (settings that change the
features), ``feature_slots(config, batch_keys)``, ``compute_features(policy, batch) -> ((B, S, N, D), slots)``,
``captured_features(policy)`` (a context yielding the features a sampling call computes) and
``substituted_features(policy, features, slots)`` (a context in which the training forward takes cached features).

Only lerobot 0.6.x is tested (``lerobot_version_ok``; ``require_lerobot_version`` raises outside it): the families
call lerobot's model internals (``embed_prefix``, ``embed_suffix``, the model-level ``forward``), which are not a
stable API.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import multi_task_dit, pi0, pi05, smolvla

TESTED_LEROBOT = "0.6"
"""The lerobot minor series the families were written and tested against."""

FAMILIES = {
    "smolvla": smolvla.FAMILY,
    "pi0": pi0.FAMILY,
    "pi05": pi05.FAMILY,
    "multi_task_dit": multi_task_dit.FAMILY,
}


def lerobot_version() -> str:
    import lerobot

    return getattr(lerobot, "__version__", "unknown")


def lerobot_version_ok(version: str | None = None) -> bool:
    """True when ``version`` (default: the installed lerobot's) is in the tested series, 0.6.x."""
    version = lerobot_version() if version is None else version
    return version == TESTED_LEROBOT or version.startswith(f"{TESTED_LEROBOT}.")


def require_lerobot_version(version: str | None = None) -> None:
    """Raise ``ReflowPairsError`` unless the installed lerobot (or ``version``) is 0.6.x."""
    version = lerobot_version() if version is None else version
    if not lerobot_version_ok(version):
        raise ReflowPairsError(
            f"lerobot {version} is installed; reflowpairs' pi0/pi05 support is written against lerobot "
            f"{TESTED_LEROBOT}.x internals and is not tested with other versions.",
            f"Install lerobot {TESTED_LEROBOT}.x (pip install 'lerobot=={TESTED_LEROBOT}.*').",
        )


def family(policy_type: str):
    """The family of a lerobot policy type, or a ``ReflowPairsError`` naming the supported ones."""
    if policy_type not in FAMILIES:
        raise ReflowPairsError(
            f"No policy family for {policy_type} policies.", f"Supported: {', '.join(FAMILIES)}."
        )
    return FAMILIES[policy_type]


@contextmanager
def configured_num_steps(policy, num_steps: int) -> Iterator[None]:
    """Within the block, ``policy`` samples with ``num_steps`` Euler steps (its family's ``step_field``); the
    config's own value is restored after."""
    field = family(policy.config.type).step_field
    saved = getattr(policy.config, field)
    setattr(policy.config, field, num_steps)
    try:
        yield
    finally:
        setattr(policy.config, field, saved)


def step_field(policy_type: str) -> str:
    """The config field holding a policy type's sampler step count (``smolvla``: ``num_steps``; pi0/pi05:
    ``num_inference_steps``)."""
    return family(policy_type).step_field


def config_num_steps(config) -> int:
    """A built policy config's sampler step count, read from its family's ``step_field``."""
    return int(getattr(config, step_field(config.type)))


def json_step_field(config_json: dict) -> str:
    """The step-count field of a saved config.json (a dict), by its ``type``: its family's ``step_field``, or
    ``num_steps`` for a type without a family."""
    policy_type = config_json.get("type")
    return FAMILIES[policy_type].step_field if policy_type in FAMILIES else "num_steps"
