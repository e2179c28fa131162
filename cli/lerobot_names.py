"""lerobot's option names on our commands: where a lerobot-train / lerobot-eval option means the same as ours, its name
works too (``LEROBOT_NAMES``: ``--output_dir`` for ``--out``, ``--save_freq`` for ``--save-every``, ``--dataset.root``
for ``--dataset-root``, ...), and so does any of our options spelled with underscores (``--batch_size``) and a flag
given as ``--flag=true|false`` (draccus style). A lerobot name whose meaning differs here (``--policy.path``) gets a
hint naming the option to use instead of click's bare "No such option" (``LEROBOT_HINTS``).

A command with an ``--env-option`` (eval, pipeline) also takes lerobot-eval's ``--env.FIELD VALUE`` /
``--env.FIELD=VALUE`` (``--env.type NAME`` included) as ``--env-option FIELD=VALUE``, and its ``--eval.*`` names
(``EVAL_NAMES``), all in the one translation ``translate_args``.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperOption

ENV_OPTION = "--env-option"  # where lerobot's --env.FIELD VALUE goes (eval and pipeline)
ENV_PREFIX = "--env."

# lerobot's option name -> ours, per command, where the meaning is the same (the epilogs list these).
LEROBOT_NAMES: dict[str, dict[str, str]] = {
    "generate": {
        "--output_dir": "--out",
        "--dataset.repo_id": "--dataset",
        "--dataset.root": "--dataset-root",
        "--dataset.episodes": "--episodes",
        "--policy.device": "--device",
        "--policy.num_steps": "--num-steps",
        "--policy.num_inference_steps": "--num-steps",
        "--log_freq": "--log-every",
    },
    "train": {
        "--output_dir": "--out",
        "--dataset.root": "--dataset-root",
        "--save_freq": "--save-every",
        "--log_freq": "--log-every",
        "--policy.device": "--device",
        "--policy.optimizer_lr": "--lr",
        "--policy.optimizer_grad_clip_norm": "--grad-clip",
        "--wandb.enable": "--wandb",
        "--wandb.project": "--wandb-project",
        "--wandb.entity": "--wandb-entity",
        "--wandb.mode": "--wandb-mode",
        "--wandb.notes": "--wandb-notes",
    },
    "eval": {
        "--output_dir": "--out",
        "--dataset.repo_id": "--dataset",
        "--dataset.root": "--dataset-root",
        "--dataset.episodes": "--episodes",
        "--policy.device": "--device",
    },
    "validate": {
        "--dataset.repo_id": "--dataset",
        "--dataset.root": "--dataset-root",
        "--policy.device": "--device",
    },
    "merge": {"--output_dir": "--out"},
}

# lerobot-eval's --eval.* names -> ours, for the commands that run closed loop (the epilogs word these themselves).
EVAL_NAMES: dict[str, dict[str, str]] = {
    "eval": {
        "--eval.n_episodes": "--n-episodes",
        "--eval.batch_size": "--eval-batch-size",
        "--eval.use_async_envs": "--eval-use-async-envs",
    },
    "pipeline": {
        "--eval.n_episodes": "--env-episodes",
        "--eval.batch_size": "--env-batch-size",
        "--eval.use_async_envs": "--env-use-async-envs",
    },
}

_CHECKPOINT_HINT = (
    "lerobot's --policy.path has two meanings here: use --teacher in `reflowpairs generate` (the checkpoint that "
    "makes the pairs) or --init in `reflowpairs train` (the student's start; default: the teacher the "
    "store's manifest names)."
)
_CONFIG_PATH_HINT = (
    "--config_path is lerobot's train_config.json; reflowpairs reads its own options file: --config FILE "
    "(YAML or JSON holding this command's options, e.g. the generate_config.yaml or train_options.yaml "
    "a run wrote)."
)

# lerobot's option name -> what to use instead, where the meaning differs.
LEROBOT_HINTS: dict[str, dict[str, str]] = {
    "generate": {"--policy.path": _CHECKPOINT_HINT + " Here: --teacher.", "--config_path": _CONFIG_PATH_HINT},
    "train": {
        "--policy.path": _CHECKPOINT_HINT + " Here: --init.",
        "--config_path": _CONFIG_PATH_HINT,
        "--dataset.repo_id": "train reads the dataset the pair store was generated from (its manifest names it); "
        "--dataset-root says where it is now.",
    },
    "eval": {
        "--policy.path": "eval takes the checkpoint to evaluate as --student and its teacher as --teacher.",
        "--config_path": _CONFIG_PATH_HINT,
    },
    "validate": {"--policy.path": "validate takes the checkpoint that made the store as --teacher."},
}
_POLICY_PREFIX_HINT = (
    "the policy's settings come from its checkpoint's config.json; see --help for the lerobot names "
    "this command takes."
)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class OptionNameError(typer.BadParameter):
    """A refused option name (click's "No such option" with our hint): a usage error, exit status 2, whose message
    is shown as it is (no "Invalid value" in front)."""

    def format_message(self) -> str:
        return self.message


def lerobot_aliases(command: str) -> dict[str, str]:
    """Every lerobot name ``command`` takes -> our option (``LEROBOT_NAMES`` and ``EVAL_NAMES``)."""
    return {**LEROBOT_NAMES.get(command, {}), **EVAL_NAMES.get(command, {})}


def command_options(command: Any) -> dict[str, TyperOption]:
    """Every spelling on the command line (``--resume``, ``--no-resume``) -> its option."""
    found: dict[str, TyperOption] = {}
    for param in command.params:
        if isinstance(param, TyperOption):
            for opt in (*param.opts, *param.secondary_opts):
                found[opt] = param
    return found


def _bool_word(text: str) -> bool | None:
    low = text.strip().lower()
    return True if low in _TRUE else False if low in _FALSE else None


def _target(command: Any, ctx: Any, name: str, options: dict[str, TyperOption]) -> str | None:
    """Our option that ``name`` (``--batch_size``, ``--output_dir``, ``--out``) means, None for one click reports
    itself; a lerobot name whose meaning differs raises ``OptionNameError`` saying what to use."""
    hints = LEROBOT_HINTS.get(command.name or "", {})
    if name in options:
        return name
    aliases = lerobot_aliases(command.name or "")
    if name in aliases:
        return aliases[name]
    if name in hints:
        raise OptionNameError(f"No such option {name}: {hints[name]}", ctx)
    if name.startswith("--policy."):
        raise OptionNameError(f"No such option {name}: {_POLICY_PREFIX_HINT}", ctx)
    if name.replace("_", "-") in options:
        return name.replace("_", "-")
    return None


def _flag_args(
    ctx: Any, param: TyperOption, name: str, target: str, eq: str, value: str, following: str | None
):
    """A bool flag given as ``name`` (``--wandb.enable``, ``--resume=false``, ``--wandb.enable true``) -> ``(our
    spelling or None, whether the following word was its value)``."""
    on, took_next = True, False
    if eq:
        on = _bool_word(value)
        if on is None:
            raise OptionNameError(f"{name} takes true or false, got {value!r}.", ctx)
    elif name != target and following is not None and _bool_word(following) is not None:
        on, took_next = bool(_bool_word(following)), True  # lerobot's `--wandb.enable true`
    if target in param.secondary_opts:
        on = not on
    if on:
        return param.opts[0], took_next
    return (param.secondary_opts[0] if param.secondary_opts else None), took_next


def translate_args(command: Any, ctx: Any, args: list[str]) -> list[str]:
    """``args`` with lerobot's names (and underscore spellings, ``--flag=true|false``, and ``--env.FIELD[=]VALUE``
    where the command has ``--env-option``) turned into ours; a lerobot name whose meaning differs raises a usage
    error saying what to use."""
    options = command_options(command)
    takes_env = ENV_OPTION in options
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out += args[i - 1 :]
            break
        if not arg.startswith("--"):
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if takes_env and name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            if not eq and i < len(args):
                value, i = args[i], i + 1
            out += [ENV_OPTION, f"{name.removeprefix(ENV_PREFIX)}={value}"]
            continue
        target = _target(command, ctx, name, options)
        if target is None:
            out.append(arg)  # click reports it (with its "Did you mean" suggestions)
            continue
        param = options[target]
        if not (param.is_flag and param.is_bool_flag):
            out.append(target + eq + value)
            continue
        spelled, took_next = _flag_args(
            ctx, param, name, target, eq, value, args[i] if i < len(args) else None
        )
        i += took_next
        if spelled is not None:
            out.append(spelled)
    return out


def lerobot_names_text(command: str) -> str:
    """The epilog line naming the lerobot options a command accepts."""
    names = sorted(LEROBOT_NAMES.get(command, {}))
    shown = ", ".join(names) + ", " if names else ""
    return (
        f"lerobot's names work too: {shown}any option with underscores (--batch_size) and --flag=true|false."
    )
