"""A tiny Multi-task DiT teacher (lerobot 0.6 ``multi_task_dit``, ``objective="flow_matching"``), built offline.

lerobot's ``MultiTaskDiTPolicy`` builds its observation encoder from two CLIP models *by name*
(``vision_encoder_name``, ``text_encoder_name``; the config refuses a name without "clip" in it), loaded with
``CLIPVisionModel.from_pretrained`` / ``CLIPTextModel.from_pretrained``, and its preprocessor tokenises the task with
``AutoTokenizer.from_pretrained(text_encoder_name)``. ``build_tiny_clip`` writes a local directory (named ``clip``)
that serves all three: a random-weight ``CLIPModel`` of a few thousand parameters (``TinyClipSpec``) and a
word-level tokenizer that knows the tiny world's task words, built with the ``tokenizers`` package.

``build_tiny_dit_teacher`` trains a small DiT on the ``reflowpairs tiny-world`` dataset (``reflowpairs.tiny.world``)
with lerobot's own flow-matching loss (``policy.forward``) and saves it as ``lerobot-train`` saves
``pretrained_model/`` (config.json, model.safetensors, processor files). The checkpoint refers to the CLIP directory
by its absolute path (as a SmolVLA checkpoint built from a local VLM does), so keep the two together.

Observation history: ``n_obs_steps = 1`` (``TinyDitSpec``): the observation delta indices are ``[0]`` and the action
delta indices ``0 .. horizon-1``, the same frames and chunks reflowpairs reads for every family (no observation
history), with ``horizon == n_action_steps`` so no frame is dropped (``drop_n_last_frames`` 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from reflowpairs.tiny.training import TinyTraining, fit_tiny_teacher
from reflowpairs.tiny.world import (
    TASKS,
    TINY_IMAGE,
    TINY_REPO_ID,
    TinyDatasetSpec,
    build_tiny_dataset,
    policy_features,
)

CLIP_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")


@dataclass(frozen=True)
class TinyClipSpec:
    """Sizes of the local CLIP (vision and text towers share them)."""

    hidden: int = 32
    layers: int = 1
    heads: int = 2
    image_size: int = TINY_IMAGE
    patch_size: int = 8
    max_text_length: int = 16


@dataclass(frozen=True)
class TinyDitSpec:
    """How the tiny DiT is shaped and trained."""

    horizon: int = 8
    n_action_steps: int = 8
    n_obs_steps: int = 1
    hidden_dim: int = 32
    num_layers: int = 2
    num_heads: int = 2
    timestep_embed_dim: int = 16
    num_integration_steps: int = 100
    integration_method: str = "euler"
    tokenizer_max_length: int = 8
    train_steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0


@dataclass(frozen=True)
class TinyDitWorld:
    """Paths of a built tiny DiT world."""

    root: Path
    clip_dir: Path
    dataset_root: Path
    repo_id: str
    teacher_dir: Path


def build_tiny_clip(out_dir: str | Path, spec: TinyClipSpec = TinyClipSpec(), tasks=TASKS) -> Path:
    """Write a random-weight tiny ``CLIPModel`` (config.json + model.safetensors) and a word-level tokenizer that
    wraps each text in ``<|startoftext|> ... <|endoftext|>`` to ``out_dir``. The directory name must contain
    "clip" for ``MultiTaskDiTConfig``; pass e.g. ``root / "clip"``."""
    from tokenizers import (  # lazy: only to build a tiny tokenizer
        Tokenizer,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast  # lazy: transformers is heavy

    out_dir = Path(out_dir)
    if "clip" not in out_dir.name.lower():
        raise ValueError(f"the CLIP directory's name must contain 'clip' (MultiTaskDiTConfig), got {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    words = sorted({w for task in tasks for w in task.split()} | {"a", "the", "task", "robot"})
    vocab = {tok: i for i, tok in enumerate([*CLIP_SPECIAL_TOKENS, *words])}
    pad, unk, bos, eos = CLIP_SPECIAL_TOKENS
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos
    )
    tokenizer.model_max_length = spec.max_text_length
    tower = {
        "hidden_size": spec.hidden,
        "intermediate_size": 2 * spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
    }
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(vocab),
            "max_position_embeddings": spec.max_text_length,
            "pad_token_id": vocab[pad],
            "bos_token_id": vocab[bos],
            "eos_token_id": vocab[eos],  # not 2: CLIP pools the first eos token, not the largest id
        },
        vision_config={**tower, "image_size": spec.image_size, "patch_size": spec.patch_size},
        projection_dim=spec.hidden,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_dit_config(clip_dir: str | Path, dataset_meta, spec: TinyDitSpec = TinyDitSpec()):
    """A flow-matching ``MultiTaskDiTConfig`` on the local CLIP in ``clip_dir``, features from ``dataset_meta``.
    Images are used at the dataset's size (no resize, no crop: the CLIP's ``image_size`` is the camera's)."""
    from lerobot.policies.multi_task_dit.configuration_multi_task_dit import (
        MultiTaskDiTConfig,  # lazy: lerobot imports torch and its model stack
    )

    clip = str(Path(clip_dir).resolve())
    return MultiTaskDiTConfig(
        objective="flow_matching",
        n_obs_steps=spec.n_obs_steps,
        horizon=spec.horizon,
        n_action_steps=spec.n_action_steps,
        hidden_dim=spec.hidden_dim,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        dropout=0.0,
        timestep_embed_dim=spec.timestep_embed_dim,
        num_integration_steps=spec.num_integration_steps,
        integration_method=spec.integration_method,
        vision_encoder_name=clip,
        text_encoder_name=clip,
        tokenizer_max_length=spec.tokenizer_max_length,
        image_crop_shape=None,
        image_resize_shape=None,
        device="cpu",
        push_to_hub=False,
        **policy_features(dataset_meta),
    )


def build_tiny_dit_teacher(
    clip_dir: str | Path, dataset, out_dir: str | Path, spec: TinyDitSpec = TinyDitSpec()
) -> Path:
    """Train a tiny flow-matching DiT on ``dataset`` (the tiny world's) and save it to ``out_dir`` as
    ``lerobot-train`` saves ``pretrained_model/``. The training frames come with lerobot's own delta timestamps for
    the config (``resolve_delta_timestamps``: observation ``[0]``, action ``0 .. horizon-1`` at the default spec)."""
    from lerobot.datasets.factory import (
        resolve_delta_timestamps,  # lazy: lerobot imports torch and its model stack
    )
    from lerobot.policies.factory import (
        make_pre_post_processors,  # lazy: lerobot imports torch and its model stack
    )
    from lerobot.policies.multi_task_dit.modeling_multi_task_dit import (
        MultiTaskDiTPolicy,  # lazy: lerobot imports torch and its model stack
    )

    torch.manual_seed(spec.seed)
    cfg = tiny_dit_config(clip_dir, dataset.meta, spec)
    policy = MultiTaskDiTPolicy(cfg)
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=dataset.meta.stats)
    training = TinyTraining(spec.train_steps, spec.batch_size, spec.lr, spec.seed, cosine=True)
    deltas = resolve_delta_timestamps(cfg, dataset.meta)
    final_loss = fit_tiny_teacher(policy, preprocessor, dataset, spec.horizon, training, deltas)["final_loss"]
    out_dir = Path(out_dir)
    policy.save_pretrained(out_dir)
    preprocessor.save_pretrained(out_dir)
    postprocessor.save_pretrained(out_dir)
    (out_dir / "tiny_training.json").write_text(
        json.dumps({"final_loss": final_loss, "steps": spec.train_steps})
    )
    return out_dir


def build_tiny_dit_world(
    root: str | Path,
    dataset_spec: TinyDatasetSpec | None = None,
    teacher_spec: TinyDitSpec = TinyDitSpec(),
    clip_spec: TinyClipSpec = TinyClipSpec(),
) -> TinyDitWorld:
    """Build the CLIP dir, the tiny-world dataset and a DiT teacher under ``root`` (``clip/``, ``dataset/``,
    ``teacher/``); ``dataset_spec`` None: the tiny world's default (``TinyDatasetSpec()``)."""
    root = Path(root).resolve()
    clip_dir = build_tiny_clip(root / "clip", clip_spec)
    dataset = build_tiny_dataset(root / "dataset", TINY_REPO_ID, dataset_spec or TinyDatasetSpec())
    teacher_dir = build_tiny_dit_teacher(clip_dir, dataset, root / "teacher", teacher_spec)
    return TinyDitWorld(root, clip_dir, root / "dataset", TINY_REPO_ID, teacher_dir)
