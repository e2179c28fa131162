"""The env side of closed-loop evaluation: lerobot's ``EnvConfig`` from ``--env.type`` and ``--env.FIELD`` options
(draccus, as lerobot-eval parses them), the vector envs (lerobot's ``make_env``), and whether a policy's inputs fit
the env. Every failure is a ``ReflowPairsError`` naming the input and the fix: an unknown type (the known ones and
the ``lerobot_env_`` plugin convention), an unknown field or bad value, a missing simulator package (its pip
extra), a policy the env cannot feed."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
from dataclasses import fields, make_dataclass
from typing import Any

from reflowpairs.errors import ReflowPairsError
from reflowpairs.teacher import checkpoint_file, read_policy_config

PLUGIN_PREFIX = "lerobot_env_"

ENV_EXTRAS = {
    "pusht": "pusht",
    "aloha": "aloha",
    "libero": "libero",
    "metaworld": "metaworld",
    "gym_manipulator": "hilserl",
}
"""lerobot env type -> the lerobot pip extra that installs its simulator (``pip install "lerobot[EXTRA]"``), from
lerobot 0.6.1's optional dependencies (``importlib.metadata.metadata("lerobot")``: ``pusht`` gym-pusht, ``aloha``
gym-aloha, ``libero`` hf-libero, ``metaworld`` metaworld, ``hilserl`` gym-hil)."""

ENV_PACKAGES = {
    "libero_plus": "LIBERO-plus (github.com/sylvestf/LIBERO-plus: cloned and put on PYTHONPATH; no lerobot extra)",
    "robocasa": "robocasa (github.com/robocasa/robocasa; no lerobot extra)",
    "vlabench": "VLABench and dm_control (github.com/OpenMOSS/VLABench; no lerobot extra)",
    "robotwin": "RoboTwin 2.0 (github.com/RoboTwin-Platform/RoboTwin: cloned and put on PYTHONPATH; no lerobot extra)",
    "robomme": "robomme (no lerobot extra)",
    "isaaclab_arena": "Isaac Lab Arena (its env comes from the Hub, nvidia/isaaclab-arena-envs; no lerobot extra)",
}
"""lerobot 0.6.1 env types whose simulator no lerobot pip extra installs -> what to install (lerobot's docs)."""

ENV_MODULES = {
    "pusht": "gym_pusht",
    "aloha": "gym_aloha",
    "libero": "libero",
    "libero_plus": "libero",
    "metaworld": "metaworld",
    "robocasa": "robocasa",
    "vlabench": "VLABench",
    "robomme": "robomme",
}
"""lerobot env type -> the simulator module its ``create_envs`` imports (types not listed: the config's
``package_name``, ``gym_<type>``, when its gym id is not registered and it uses lerobot's default ``create_envs``)."""


def install_fix(env_type: str, module: str) -> str:
    """What to install for ``env_type`` whose simulator module ``module`` is missing."""
    if env_type in ENV_EXTRAS:
        return f'Install it: pip install "lerobot[{ENV_EXTRAS[env_type]}]".'
    if env_type in ENV_PACKAGES:
        return f"Install {ENV_PACKAGES[env_type]}."
    return f"Install the lerobot extra or package that provides `{module}`."


def simulator_module(env_cfg) -> str | None:
    """The module the env's simulator lives in (``ENV_MODULES``, else the config's ``package_name`` where lerobot's
    default ``create_envs`` would import it), or None when nothing is known to be imported."""
    from lerobot.envs.configs import EnvConfig  # lerobot lazily: importing it takes seconds

    if env_cfg.type in ENV_MODULES:
        return ENV_MODULES[env_cfg.type]
    if type(env_cfg).create_envs is not EnvConfig.create_envs:
        return None
    import gymnasium as gym  # lazily, as lerobot: only envs without a known module need its registry

    try:
        if env_cfg.gym_id in gym.registry:
            return None
    except (TypeError, AttributeError):  # a config without a task
        return None
    return env_cfg.package_name


def check_env_package(env_cfg) -> None:
    """``ReflowPairsError`` naming the pip extra (or package) when the env's simulator module is not installed;
    nothing is imported (``importlib.util.find_spec`` on its top-level package)."""
    module = simulator_module(env_cfg)
    if module is None:
        return
    try:
        found = importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ReflowPairsError(
            f"The {env_cfg.type} env needs the package `{module}`, which is not installed.",
            install_fix(env_cfg.type, module),
        )


def known_env_types() -> list[str]:
    """Every env type lerobot's ``EnvConfig`` registry knows, installed ``lerobot_env_*`` plugins included (their
    registration runs first, through lerobot's ``register_third_party_plugins``, as lerobot-eval does)."""
    # lerobot lazily: importing it takes seconds
    from lerobot.envs.configs import EnvConfig
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()
    return sorted(EnvConfig.get_known_choices())


def make_env_config(env_type: str, options: dict[str, str] | None = None):
    """lerobot's ``EnvConfig`` subclass for ``env_type`` with ``options`` (field -> value text) set, parsed by draccus
    as lerobot-eval parses ``--env.type=TYPE --env.FIELD=VALUE``. Unknown types and fields, and values draccus cannot
    parse, are ``ReflowPairsError``s naming them."""
    # draccus and lerobot lazily: importing lerobot takes seconds
    import draccus
    from lerobot.envs.configs import EnvConfig

    known = known_env_types()
    if env_type not in known:
        raise ReflowPairsError(
            f"lerobot knows no env type {env_type!r} (--env.type). Known: {', '.join(known)}.",
            f"An env type comes from lerobot itself or from a plugin: an installed distribution whose name starts "
            f"with `{PLUGIN_PREFIX}` (e.g. {PLUGIN_PREFIX}{env_type}), which registers an EnvConfig subclass with "
            f'@EnvConfig.register_subclass("{env_type}"); lerobot imports it through register_third_party_plugins. '
            "Install the plugin (pip install -e DIR) or fix the name.",
        )
    cls = EnvConfig.get_choice_class(env_type)
    names = {f.name for f in fields(cls)}
    options = dict(options or {})
    unknown = sorted(set(options) - names)
    if unknown:
        raise ReflowPairsError(
            f"The {env_type} env has no field {', '.join(unknown)} (--env.{unknown[0]}).",
            f"Its fields: {', '.join(sorted(names))}.",
        )

    args_class = make_dataclass("EnvArgs", [("env", EnvConfig)])  # lerobot-eval's ``--env.*`` namespace
    args = [f"--env.type={env_type}", *(f"--env.{k}={v}" for k, v in options.items())]
    try:
        return draccus.parse(args_class, args=args).env
    except draccus.utils.DecodingError as err:
        raise ReflowPairsError(f"--env option: {err}.", "Give each --env.FIELD a value of its type.") from err
    except SystemExit as err:  # argparse's usage error
        raise ReflowPairsError(f"lerobot could not parse the env options {' '.join(args)}.") from err


def make_envs(env_cfg, batch_size: int, use_async_envs: bool) -> dict[str, dict[int, Any]]:
    """lerobot's ``make_env``: ``{suite: {task_id: VectorEnv}}``. A missing simulator package is a
    ``ReflowPairsError`` naming the pip extra (lerobot's for its own envs, the plugin for others)."""
    from lerobot.envs import make_env  # lerobot lazily: importing it takes seconds

    if use_async_envs and batch_size > 1:
        _preload_in_subprocesses(env_cfg)
    try:
        return make_env(env_cfg, n_envs=batch_size, use_async_envs=use_async_envs)
    except ImportError as err:  # ModuleNotFoundError included
        module = getattr(err, "name", None) or simulator_module(env_cfg) or env_cfg.package_name
        raise ReflowPairsError(
            f"The {env_cfg.type} env needs a package that is not installed ({err}).",
            install_fix(env_cfg.type, module),
        ) from err


def _preload_in_subprocesses(env_cfg) -> None:
    """Async envs start in lerobot's ``forkserver`` subprocesses, which have not imported the env's ``gym_<type>``
    package, so its gym id is unknown there (``lerobot-eval --eval.use_async_envs=true`` fails so on PushT with
    lerobot 0.6.1). Have the forkserver import the package (and the plugins) first; its children then know the id.
    Only before the forkserver starts; a package that is not installed is left to ``make_env`` to report."""
    modules = [env_cfg.package_name] if importlib.util.find_spec(env_cfg.package_name) else []
    modules += ["lerobot.envs.configs"]
    multiprocessing.get_context("forkserver").set_forkserver_preload(modules)


def _preprocessor_rename_map(checkpoint: str) -> dict[str, str]:
    """The observation renames a checkpoint's saved preprocessor applies (``{}`` when none or unreadable)."""
    try:
        saved = json.loads(checkpoint_file(checkpoint, "policy_preprocessor.json").read_text())
    except (OSError, ValueError, ReflowPairsError):
        return {}
    for step in saved.get("steps", []):
        rename = (step.get("config") or {}).get("rename_map")
        if isinstance(rename, dict):
            return {str(k): str(v) for k, v in rename.items()}
    return {}


def feature_problems(env_cfg, policy_config, rename_map: dict[str, str] | None = None) -> list[str]:
    """Why a policy cannot run in an env (empty when it can): each policy input the env does not provide (after the
    preprocessor's renames), each state/env-state input whose shape differs, and an action size that differs.
    Images may differ in size (policies resize them); the env's image keys are lerobot's ``preprocess_observation``
    keys (``observation.image`` or ``observation.images.<camera>``)."""
    # lerobot lazily: importing it takes seconds
    from lerobot.configs import FeatureType
    from lerobot.envs.utils import env_to_policy_features
    from lerobot.utils.constants import ACTION

    rename_map = rename_map or {}
    env_features = {rename_map.get(k, k): ft for k, ft in env_to_policy_features(env_cfg).items()}
    problems = []
    for key, ft in policy_config.input_features.items():
        if key not in env_features:
            problems.append(f"input {key} {tuple(ft.shape)} is not among the env's observations")
        elif ft.type is not FeatureType.VISUAL and tuple(env_features[key].shape) != tuple(ft.shape):
            problems.append(
                f"input {key} has shape {tuple(ft.shape)}, the env's {tuple(env_features[key].shape)}"
            )
    action = policy_config.output_features.get(ACTION)
    if (
        action is not None
        and ACTION in env_features
        and tuple(env_features[ACTION].shape) != tuple(action.shape)
    ):
        problems.append(
            f"action has shape {tuple(action.shape)}, the env's {tuple(env_features[ACTION].shape)}"
        )
    return problems


def check_features(env_cfg, label: str, checkpoint: str) -> None:
    """``ReflowPairsError`` when the policy in ``checkpoint`` cannot run in the env (``feature_problems``)."""
    from lerobot.envs.utils import env_to_policy_features  # lerobot lazily: importing it takes seconds

    config = read_policy_config(checkpoint)
    problems = feature_problems(env_cfg, config, _preprocessor_rename_map(checkpoint))
    if problems:
        env_side = ", ".join(f"{k} {tuple(f.shape)}" for k, f in env_to_policy_features(env_cfg).items())
        raise ReflowPairsError(
            f"The {label} ({checkpoint}) does not fit the {env_cfg.type} env: {'; '.join(problems)}. "
            f"The env gives: {env_side}.",
            "Evaluate it in the env its dataset was recorded in, or set the env's options (--env.FIELD) so that "
            "its observations match the policy's inputs.",
        )
