"""Loading a lerobot flow-matching policy checkpoint (teacher, student init, eval) with lerobot's
own classes, and fingerprinting it.

A checkpoint is what ``lerobot-train`` saves as ``pretrained_model/``: ``config.json``,
``model.safetensors`` and the policy pre/post-processor files; ``source`` is that directory or a
hub repo id (loaded through lerobot's ``from_pretrained``, so hub ids work wherever the hub does).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reflowpairs.errors import ReflowPairsError
from reflowpairs.load_hooks import LoadPatch, checkpoint_load_patch
from reflowpairs.policies import SUPPORTED_POLICIES, family, require_lerobot_version

UNSUPPORTED_POLICIES: dict[str, tuple[bool, str]] = {
    # type: (samples by a flow-matching / diffusion ODE?, why reflowpairs cannot straighten it).
    # One line per lerobot 0.6.1 policy type; docs/families.md keeps the same survey with its sources.
    "act": (
        False,
        "it regresses the action chunk in one forward pass: there is no ODE sampler to straighten",
    ),
    "vqbet": (False, "it predicts discrete action tokens (VQ codes): there is no ODE sampler to straighten"),
    "tdmpc": (False, "it plans with a learned world model (MPPI): there is no ODE sampler to straighten"),
    "gaussian_actor": (False, "it samples a Gaussian actor (RL): there is no ODE sampler to straighten"),
    "pi0_fast": (
        False,
        "it decodes FAST action tokens autoregressively: there is no ODE sampler to straighten",
    ),
    "diffusion": (
        True,
        "its DDPM/DDIM scheduler is built without a timestep spacing, so a 1-step DDIM student would run at t=0 "
        "and cannot be saved as an ordinary lerobot checkpoint",
    ),
    "xvla": (
        True,
        "it predicts clean actions and re-noises them (not a velocity ODE), classifies its gripper channels, and "
        "ignores the noise it is given",
    ),
    "groot": (True, "it draws its noise inline and builds a hub-only backbone in its constructor"),
    "evo1": (True, "it draws its noise inline and builds a hub-only backbone in its constructor"),
    "vla_jepa": (True, "it draws its noise inline and builds a hub-only backbone in its constructor"),
    "wall_x": (True, "it draws its noise inline and builds a hub-only backbone in its constructor"),
    "fastwam": (True, "it draws its noise inline and builds a hub-only video backbone in its constructor"),
    "lingbot_va": (True, "it draws its noise inline and builds a hub-only video backbone in its constructor"),
    "molmoact2": (
        True,
        "its loss at a given noise and time is a private method and its backbone loads from the hub only",
    ),
}
"""Every other lerobot 0.6.1 policy type, with the reason ``load_config`` refuses it."""


def unsupported_policy_problem(policy_type: str) -> tuple[str, str]:
    """The refusal (problem, what to do) for a policy type reflowpairs has no family for."""
    supported = f"reflowpairs straightens {', '.join(SUPPORTED_POLICIES)} policies"
    if policy_type not in UNSUPPORTED_POLICIES:
        return (
            f"a {policy_type!r} policy, a type reflowpairs does not know.",
            f"{supported}; docs/families.md lists every lerobot policy type and why each other one is refused.",
        )
    ode, why = UNSUPPORTED_POLICIES[policy_type]
    kind = (
        "a flow-matching/diffusion policy reflowpairs cannot straighten"
        if ode
        else "not a flow-matching policy"
    )
    return f"a {policy_type!r} policy, {kind}: {why}.", f"{supported} (docs/families.md)."


TOKENIZER_ENV = "REFLOWPAIRS_TOKENIZER"
"""Environment variable naming a local tokenizer directory that every loaded checkpoint's preprocessor uses in place
of the one its ``policy_preprocessor.json`` names (``load_policy``'s ``tokenizer`` wins over it)."""

PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNFINGERPRINTED_KEYS = ("device", "pretrained_path")


@dataclass
class LoadedPolicy:
    """A policy with its processors, as loaded from ``source``."""

    source: str
    policy: Any  # lerobot PreTrainedPolicy
    preprocessor: Any  # PolicyProcessorPipeline (observation dict -> model batch)
    postprocessor: Any  # PolicyProcessorPipeline (normalised action -> dataset units)
    fingerprint: dict[str, str]
    # files a student checkpoint carries over (a checkpoint-load hook's, e.g. the tiny size marker)
    extra_files: dict[str, str] = field(default_factory=dict)

    @property
    def config(self):
        return self.policy.config

    @property
    def policy_type(self) -> str:
        return self.policy.config.type

    def provenance(self) -> dict[str, Any]:
        """The manifest's ``teacher`` object (a local source as an absolute path, so it resolves from anywhere)."""
        source = str(Path(self.source).expanduser().resolve()) if is_local(self.source) else self.source
        return {"source": source, "policy_type": self.policy_type, **self.fingerprint}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` if available, else ``mps``, else ``cpu``; other names are checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReflowPairsError(
            f"`device` {device} was asked for, but CUDA is not available here.",
            "Set `device` to cpu or auto.",
        )
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ReflowPairsError(
            "`device` mps was asked for, but MPS is not available here.", "Set `device` to cpu or auto."
        )
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ReflowPairsError(f"Unknown device {device!r}.", "Use auto, cpu, cuda, cuda:N or mps.")
    return device


def is_local(source: str | Path) -> bool:
    """True when ``source`` names an existing local path (a hub id otherwise, if it looks like one)."""
    return Path(source).expanduser().exists()


def checkpoint_file(source: str, filename: str) -> Path:
    """Local path of ``filename`` in checkpoint ``source`` (from the hub cache for repo ids)."""
    if is_local(source):
        path = Path(source).expanduser() / filename
        if not path.is_file():
            inner = pretrained_model_below(Path(source).expanduser())
            raise ReflowPairsError(
                f"Checkpoint {source} has no {filename}.",
                f"Did you mean {inner}? "
                if inner is not None
                else ""
                "Point at a lerobot pretrained_model/ directory (config.json, model.safetensors and the "
                "policy_preprocessor/postprocessor files, as lerobot-train saves them).",
            )
        return path
    from huggingface_hub import hf_hub_download  # lazy: only hub ids need it (and it is slow to import)

    try:
        return Path(hf_hub_download(repo_id=source, filename=filename))
    except Exception as err:  # noqa: BLE001 - every hub failure means the same thing to the user
        raise _unreachable(source, err) from err


def pretrained_model_below(path: Path) -> Path | None:
    """The ``pretrained_model/`` checkpoint inside a lerobot-train run, checkpoint or ``checkpoints/`` directory that
    was given where a checkpoint was expected (``.../checkpoints/last`` is the usual slip), or None."""
    for candidate in (
        path / "pretrained_model",
        path / "last" / "pretrained_model",
        path / "checkpoints" / "last" / "pretrained_model",
    ):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _unreachable(source: str, err: Exception | None = None) -> ReflowPairsError:
    if not _HUB_ID.match(source):
        return ReflowPairsError(
            f"Checkpoint {source!r} does not exist.",
            "Check the path; it should be a pretrained_model/ directory.",
        )
    reason = f" ({type(err).__name__})" if err is not None else ""
    return ReflowPairsError(
        f"Checkpoint {source!r} is not a local directory and could not be fetched from the Hugging Face hub{reason}.",
        "If it is a local path, check it; if it is a hub repo id, check the id and your network "
        "(HF_HUB_OFFLINE=1 allows only what is already in the cache).",
    )


def read_policy_config(source: str):
    """The checkpoint's lerobot ``PreTrainedConfig`` (its ``type`` says which policy it is)."""
    # lazy (heavy): lerobot's policy factory imports every policy's config; it registers them with draccus
    import lerobot.policies.factory  # noqa: F401
    from lerobot.configs.policies import PreTrainedConfig

    config_path = checkpoint_file(source, "config.json")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReflowPairsError(f"Cannot read {config_path}: {err}.", "Is the checkpoint complete?") from err
    policy_type = raw.get("type") if isinstance(raw, dict) else None
    if policy_type is None:
        raise ReflowPairsError(
            f'{config_path} has no policy "type": {source} is not a lerobot policy checkpoint'
            + (
                f" (it looks like a {raw['model_type']} model config)"
                if isinstance(raw, dict) and "model_type" in raw
                else ""
            )
            + ".",
            'Point at the pretrained_model/ directory lerobot-train saved (config.json with "type": "smolvla", '
            "model.safetensors and the policy processor files).",
        )
    if policy_type not in SUPPORTED_POLICIES:
        problem, fix = unsupported_policy_problem(policy_type)
        raise ReflowPairsError(f"Checkpoint {source} is {problem}", fix)
    require_lerobot_version()  # every family calls lerobot internals
    source_dir = config_path.parent
    try:
        return PreTrainedConfig.from_pretrained(source_dir)
    except Exception as err:  # noqa: BLE001 - draccus raises many kinds
        raise ReflowPairsError(
            f"Cannot parse {config_path} as a lerobot {policy_type} config: {err}."
        ) from err


def _sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def config_digest(config_json: dict) -> str:
    """sha256 of a checkpoint config with keys that do not change the policy (device, pretrained_path) removed."""
    kept = {k: v for k, v in config_json.items() if k not in _UNFINGERPRINTED_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def fingerprint_checkpoint(source: str) -> dict[str, str]:
    """``{"config_sha256", "weights_sha256", "fingerprint"}`` of checkpoint ``source``.

    ``weights_sha256`` hashes model.safetensors byte for byte; ``fingerprint`` combines both and is
    what stores and students compare."""
    config_sha = config_digest(json.loads(checkpoint_file(source, "config.json").read_text()))
    weights_sha = _sha256_file(checkpoint_file(source, "model.safetensors"))
    combined = hashlib.sha256(f"{config_sha}:{weights_sha}".encode()).hexdigest()
    return {"config_sha256": config_sha, "weights_sha256": weights_sha, "fingerprint": combined}


def load_policy(
    source: str | Path,
    device: str = "auto",
    fingerprint: dict[str, str] | None = None,
    tokenizer: str | Path | None = None,
) -> LoadedPolicy:
    """Load a flow-matching policy checkpoint and its processors with lerobot's own classes.

    Refuses non-flow-matching policies and checkpoints without processor files, with a clear error.
    ``fingerprint``: the checkpoint's ``fingerprint_checkpoint`` when the caller has it already.
    ``tokenizer``: a local tokenizer directory the preprocessor's tokenizer step loads instead of the one its
    ``policy_preprocessor.json`` names (pi0/pi05 name the gated hub ``google/paligemma-3b-pt-224``; offline, point
    this at a downloaded copy); None: the ``REFLOWPAIRS_TOKENIZER`` environment variable, else the saved name.

    The installed lerobot must be 0.6.x, and the policy's family checks the weights after loading
    (``check_loaded``; pi0/pi05: lerobot returns a random-weight model when ``model.safetensors`` cannot be loaded,
    here that is an error naming the file).

    Checkpoints lerobot cannot build unaided go through the checkpoint-load hooks (``reflowpairs.load_hooks``):
    each hook may hold a context around this checkpoint's ``from_pretrained`` and name files to carry into students.
    The tiny pi0/pi05 test checkpoints (``reflowpairs.tiny``) use one, registered as an entry point, so they load in
    any process (a CLI subprocess included) while this loader imports no test code and ordinary checkpoints are
    never affected.
    """
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors  # lazy: heavy

    source = str(source)
    device = resolve_device(device)
    config = read_policy_config(source)
    for name in (PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        checkpoint_file(source, name)
    fingerprint = fingerprint or fingerprint_checkpoint(source)
    config.device = device
    # As lerobot's make_policy does for --policy.path: a policy whose constructor builds its backbone from the hub
    # unless it knows it is being loaded from a checkpoint (EO-1: ``pretrained_path is None`` -> Qwen2.5-VL from
    # ``vlm_base``) builds it from the config alone. In-memory only; students' config.json is written from the file.
    config.pretrained_path = source
    # A fine-tuned checkpoint keeps ``load_vlm_weights: true`` from its training start; honoured, lerobot would load
    # (online: download) the whole base VLM only to overwrite it with model.safetensors. The checkpoint holds every
    # weight, so build the VLM from its config alone and load strictly: a weight missing from the file is an error,
    # never a silently random layer. (Only this in-memory config changes: students keep the checkpoint's JSON.)
    vlm_from_checkpoint = bool(getattr(config, "load_vlm_weights", False))
    if vlm_from_checkpoint:
        config.load_vlm_weights = False
    policy_cls = get_policy_class(config.type)
    patch = checkpoint_load_patch(source) if is_local(source) else LoadPatch()  # hub checkpoints: no hooks
    # lerobot prints progress notes ("Loading weights ...") to stdout: keep stdout for our own output (--json).
    with redirect_stdout(sys.stderr):
        try:
            with patch.context:
                policy = policy_cls.from_pretrained(source, config=config, strict=vlm_from_checkpoint)
        except Exception as err:  # noqa: BLE001
            if vlm_from_checkpoint and "Missing key" in str(err):
                raise ReflowPairsError(
                    f"{checkpoint_file(source, 'model.safetensors')} lacks weights of the {config.type} policy "
                    f"({str(err).strip()[:300]}); its config says load_vlm_weights: true, and reflowpairs takes every "
                    "weight from the checkpoint itself rather than fetching the base VLM.",
                    "Use the complete model.safetensors that lerobot-train saved.",
                ) from err
            raise ReflowPairsError(
                f"lerobot could not load the {config.type} policy in {source} "
                f"({checkpoint_file(source, 'model.safetensors')}): {err}."
            ) from err
        family(config.type).check_loaded(policy, checkpoint_file(source, "model.safetensors").parent)
        policy.eval()
        overrides: dict[str, dict] = {"device_processor": {"device": device}}
        tokenizer = tokenizer or os.environ.get(TOKENIZER_ENV) or None
        if tokenizer is not None:
            overrides |= family(config.type).tokenizer_overrides(_tokenizer_dir(tokenizer))
        try:
            preprocessor, postprocessor = make_pre_post_processors(
                config, pretrained_path=source, preprocessor_overrides=overrides
            )
        except Exception as err:  # noqa: BLE001
            raise ReflowPairsError(f"lerobot could not load the processors in {source}: {err}.") from err
    return LoadedPolicy(source, policy, preprocessor, postprocessor, fingerprint, dict(patch.carried_files))


def _tokenizer_dir(tokenizer: str | Path) -> str:
    """A local tokenizer directory, absolute, or an error naming the setting."""
    path = Path(tokenizer).expanduser()
    if not path.is_dir():
        raise ReflowPairsError(
            f"`tokenizer` {tokenizer} is not a directory.",
            "Set `tokenizer` to a local tokenizer directory (one AutoTokenizer.from_pretrained loads), or unset "
            f"it and {TOKENIZER_ENV}.",
        )
    return str(path.resolve())


def parameter_dtypes(policy) -> dict[str, int]:
    """How many parameters of ``policy`` are held in each dtype, e.g. ``{"bfloat16": 301_000_000, "float32": 149_000_000}``
    (real SmolVLA checkpoints: the VLM text layers and the action expert in bfloat16, as the VLM config asks)."""
    counts: dict[str, int] = {}
    for param in policy.parameters():
        name = str(param.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + param.numel()
    return dict(sorted(counts.items()))


def compute_dtype(parameter_dtypes: dict[str, int], autocast: str = "float32") -> str:
    """The least precise dtype a teacher computes in: its autocast dtype or any of its parameters' dtypes
    (``float32`` < ``float16`` < ``bfloat16`` in precision order, by mantissa bits)."""
    order = ("bfloat16", "float16", "float32", "float64")
    present = [d for d in (*parameter_dtypes, autocast) if d in order]
    return min(present, key=order.index, default="float32")


def rename_map(preprocessor) -> dict[str, str]:
    """The dataset-to-policy key renames the checkpoint's preprocessor applies (often empty)."""
    for step in getattr(preprocessor, "steps", []):
        if hasattr(step, "rename_map"):
            return dict(step.rename_map)
    return {}
