"""Policy families: what reflowpairs needs to know about each lerobot flow-matching policy type, and the registry.

``FAMILIES`` maps a lerobot config ``type`` to its family object, one module per family (``smolvla.py``, ``pi0.py``,
``pi05.py``), each satisfying ``PolicyFamily`` (``reflowpairs.policies.interface``: ``policy_type``, ``step_field``,
``time_direction``, ``chunk_methods``, ``pair_shapes``, ``make_engine``, ``sample_chunk``, ``reflow_loss``,
``check_loaded``). A family may also offer the image-feature cache (``FeatureCacheFamily``; SmolVLA, pi0 and pi05
do): ``feature_cache_family(policy_type)`` returns it, or None. docs/adding-a-family.md says how to add one.

The registry's helpers are what generic code calls: ``family(policy_type)`` (an error naming the supported types),
``pair_shapes(config)``, ``make_engine(policy, frames_per_call, exact)``, the step count (``step_field``,
``config_num_steps``, ``json_step_field``, ``configured_num_steps``, ``lerobot_sampling_steps``).

Only lerobot 0.6.x is tested (``lerobot_version_ok``; ``require_lerobot_version`` raises outside it,
``reflowpairs.policies.version``): the families call lerobot's model internals, which are not a stable API.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from reflowpairs.engine import Engine, ExactSampler, sampler_steps
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import eo1, multi_task_dit, pi0, pi05, smolvla
from reflowpairs.policies.interface import FeatureCacheFamily, PolicyFamily
from reflowpairs.policies.version import (  # noqa: F401 - the version gate, re-exported for callers
    TESTED_LEROBOT,
    lerobot_version,
    lerobot_version_ok,
    require_lerobot_version,
)

FAMILIES: dict[str, PolicyFamily] = {
    family.policy_type: family
    for family in (smolvla.FAMILY, pi0.FAMILY, pi05.FAMILY, eo1.FAMILY, multi_task_dit.FAMILY)
}
"""Every policy family, by lerobot config ``type``."""

SUPPORTED_POLICIES: tuple[str, ...] = tuple(FAMILIES)
"""The lerobot policy types reflowpairs straightens (the ones with a family)."""


def family(policy_type: str) -> PolicyFamily:
    """The family of a lerobot policy type, or a ``ReflowPairsError`` naming the supported ones."""
    if policy_type not in FAMILIES:
        raise ReflowPairsError(
            f"No policy family for {policy_type} policies.", f"Supported: {', '.join(FAMILIES)}."
        )
    return FAMILIES[policy_type]


def feature_cache_family(policy_type: str) -> FeatureCacheFamily | None:
    """The family of ``policy_type`` when it offers the image-feature cache (``FeatureCacheFamily``), else None
    (also for a type without a family)."""
    fam = FAMILIES.get(policy_type)
    return fam if isinstance(fam, FeatureCacheFamily) else None


def pair_shapes(policy_config) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(x0_shape, x1_shape)`` of the pairs a policy makes and trains on: noise ``(chunk_size, max_action_dim)``,
    actions ``(chunk_size, action_dim)`` (the pair-store contract's T, D0 and D1), by its family."""
    return family(policy_config.type).pair_shapes(policy_config)


def make_engine(policy, frames_per_call: int | None = None, exact: bool = False) -> Engine:
    """The sampling engine for ``policy`` (by its config ``type``): its family's prefix-cached one with
    ``frames_per_call`` frames per call, or with ``exact`` lerobot's own sampler (``reflowpairs.engine.ExactSampler``
    on the family's ``sample_chunk``)."""
    fam = family(policy.config.type)
    if exact:
        return ExactSampler(policy, fam, frames_per_call)
    return fam.make_engine(policy, frames_per_call)


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


def lerobot_sampling_steps(policy, num_steps: int):
    """A context within which lerobot's own sampler (``predict_action_chunk``) integrates with ``num_steps`` Euler
    steps; the config is restored and the action queue reset after (``reflowpairs.engine.sampler_steps`` on the
    policy's family's ``step_field``)."""
    return sampler_steps(policy, family(policy.config.type).step_field, num_steps)


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
