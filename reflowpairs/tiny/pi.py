"""Tiny pi0/pi05 teachers, built offline in seconds (tests, demos, benchmarks), at the sizes of the size patch
(``reflowpairs.tiny.pi_patch``: ``TinyGemmaSpec``, ``tiny_gemma_patch``, the marker file and the load hook), trained
by the tiny teachers' one loop (``reflowpairs.tiny.training``).

The tokenizer: lerobot's pi processors hard-code the gated ``google/paligemma-3b-pt-224`` tokenizer. Here the
preprocessor is built with ``TokenizerProcessorStep(tokenizer_name=<local dir>)`` (``build_pi_tokenizer`` writes a
small word-level one whose ids fit the vocabulary: the tasks' words, pi05's ``Task: ..., State: ...;`` prompt
words and the numbers 0-255 of its discretised state), so the saved ``policy_preprocessor.json`` names that local
directory and loads offline. To point any saved pi0/pi05 pipeline at another local tokenizer (e.g. a downloaded copy
of PaliGemma's), load it with ``make_pre_post_processors(cfg, pretrained_path=DIR, preprocessor_overrides=
{"tokenizer_processor": {"tokenizer_name": LOCAL_TOKENIZER_DIR}})``.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reflowpairs.tiny.pi_patch import TINY_MARKER, TinyGemmaSpec, tiny_gemma_patch
from reflowpairs.tiny.training import TinyTraining, fit_tiny_teacher
from reflowpairs.tiny.world import TASKS, policy_features

DEFAULT_GEMMA = TinyGemmaSpec()
"""The tiny pi teachers' default sizes."""


# --- tokenizer --------------------------------------------------------------------------------------


def build_pi_tokenizer(out_dir: str | Path, tasks: tuple[str, ...] | None = None) -> Path:
    """Write a small word-level fast tokenizer to ``out_dir`` (loadable with ``AutoTokenizer.from_pretrained``) for
    tiny pi0/pi05 teachers: the tasks' words, pi05's prompt words (``Task``, ``State``, ``Action``, punctuation) and
    the numbers 0-255 (pi05's discretised state). Ids are < 400, well inside PaliGemma's vocabulary."""
    # lazy: transformers is heavy
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tasks = TASKS if tasks is None else tasks
    words = {w for task in tasks for w in task.replace("_", " ").split()}
    words |= {"Task", "State", "Action", ":", ",", ";", "a", "the", "robot", "push", "T"}
    words |= {str(i) for i in range(256)}
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words - set(specials)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# --- teacher ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyPiSpec:
    """Shape and training of a tiny pi teacher. ``train_steps`` 0 saves the random initial weights."""

    chunk_size: int = 8
    max_action_dim: int = 6
    max_state_dim: int = 6
    num_inference_steps: int = 10
    image_size: int = 32
    tokenizer_max_length: int = 24
    dtype: str = (
        "float32"  # "bfloat16": the Gemma layers in bfloat16 (vision, norms stay float32), as real ones
    )
    train_steps: int = 3
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0


def tiny_pi_config(variant: str, dataset_meta, spec: TinyPiSpec = TinyPiSpec()):
    """A ``PI0Config``/``PI05Config`` with the tiny world's features (the Gemma sizes come from the patch)."""
    # lazy: lerobot's policy configs are heavy
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi05.configuration_pi05 import PI05Config

    if variant not in ("pi0", "pi05"):
        raise ValueError(f"variant must be 'pi0' or 'pi05', got {variant!r}")
    config_cls = PI0Config if variant == "pi0" else PI05Config
    return config_cls(
        chunk_size=spec.chunk_size,
        n_action_steps=spec.chunk_size,
        max_action_dim=spec.max_action_dim,
        max_state_dim=spec.max_state_dim,
        num_inference_steps=spec.num_inference_steps,
        image_resolution=(spec.image_size, spec.image_size),
        tokenizer_max_length=spec.tokenizer_max_length,
        dtype=spec.dtype,
        device="cpu",
        push_to_hub=False,
        **policy_features(dataset_meta),
    )


def make_pi_processors(config, dataset_stats, tokenizer_dir: str | Path):
    """lerobot's own pi0/pi05 pre/post-processor pipelines with the tokenizer step reading ``tokenizer_dir`` (a local
    directory, saved by absolute path in ``policy_preprocessor.json``) instead of the hub's PaliGemma tokenizer."""
    # lazy: lerobot's processors are heavy
    if config.type == "pi0":
        from lerobot.policies.pi0.processor_pi0 import (
            make_pi0_pre_post_processors as make,  # lazy: lerobot imports torch and its model stack
        )
    else:
        from lerobot.policies.pi05.processor_pi05 import (
            make_pi05_pre_post_processors as make,  # lazy: lerobot imports torch and its model stack
        )
    # the factory looks TokenizerProcessorStep up in its module's namespace when called
    module = importlib.import_module(make.__module__)
    original = module.TokenizerProcessorStep
    local = str(Path(tokenizer_dir).resolve())
    module.TokenizerProcessorStep = lambda **kwargs: original(**{**kwargs, "tokenizer_name": local})
    try:
        return make(config, dataset_stats=dataset_stats)
    finally:
        module.TokenizerProcessorStep = original


def build_tiny_pi_teacher(
    out_dir: str | Path,
    variant: str,
    dataset_repo_id: str,
    dataset_root: str | Path,
    tokenizer_dir: str | Path | None = None,
    spec: TinyPiSpec = TinyPiSpec(),
    gemma: TinyGemmaSpec = DEFAULT_GEMMA,
) -> Path:
    """Build a tiny ``variant`` ("pi0" or "pi05") teacher for the LeRobotDataset at ``dataset_root`` offline, train
    it ``spec.train_steps`` steps with lerobot's own loss (``reflowpairs.tiny.training``, no schedule; 0 keeps the
    random init) and save it
    as ``lerobot-train`` saves ``pretrained_model/``: config.json, model.safetensors, the policy pre/post-processor
    files, plus ``TINY_MARKER``. ``tokenizer_dir``: a local tokenizer directory; None writes ``build_pi_tokenizer``'s
    to ``out_dir/tokenizer``. The tiny patch is active only during the build (see ``tiny_gemma_patch``)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # lazy: heavy

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = build_pi_tokenizer(out_dir / "tokenizer")
    dataset = LeRobotDataset(dataset_repo_id, root=dataset_root)
    with tiny_gemma_patch(gemma):
        torch.manual_seed(spec.seed)
        cfg = tiny_pi_config(variant, dataset.meta, spec)
        policy_cls = _policy_class(variant)
        policy = policy_cls(cfg)
        preprocessor, postprocessor = make_pi_processors(cfg, dataset.meta.stats, tokenizer_dir)
        info = {"steps": 0, "final_loss": None}
        if spec.train_steps > 0:
            training = TinyTraining(spec.train_steps, spec.batch_size, spec.lr, spec.seed, cosine=False)
            info = fit_tiny_teacher(policy, preprocessor, dataset, cfg.chunk_size, training)
        policy.save_pretrained(out_dir)
    preprocessor.save_pretrained(out_dir)
    postprocessor.save_pretrained(out_dir)
    (out_dir / TINY_MARKER).write_text(json.dumps(asdict(gemma), indent=2))
    (out_dir / "tiny_training.json").write_text(json.dumps(info))
    return out_dir


def _policy_class(variant: str):
    # lazy: lerobot's pi models import transformers
    if variant == "pi0":
        from lerobot.policies.pi0.modeling_pi0 import (
            PI0Policy,  # lazy: lerobot imports torch and its model stack
        )

        return PI0Policy
    from lerobot.policies.pi05.modeling_pi05 import (
        PI05Policy,  # lazy: lerobot imports torch and its model stack
    )

    return PI05Policy
