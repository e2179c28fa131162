"""A tiny EO-1 teacher (lerobot 0.6 ``EO1Policy``), built offline in seconds (tests, demos, the tiny world).

lerobot's EO-1 is a Qwen2.5-VL backbone (``vlm_base``, by default the 3 B ``Qwen/Qwen2.5-VL-3B-Instruct``) with a
flow-matching action head; its processor loads ``Qwen2_5_VLProcessor.from_pretrained(vlm_base)``. Offline, both come
from a local directory that ``build_tiny_qwen_vl`` writes, as a downloaded Qwen2.5-VL would hold them:

- ``config.json`` + ``model.safetensors``: a random-weight Qwen2.5-VL of ``TinyQwenSpec``'s sizes (~0.1 M parameters
  besides the embeddings), so ``EO1Policy(cfg)`` builds it with ``from_pretrained(vlm_base)`` exactly as it builds
  the real one;
- the processor: a word-level tokenizer (the tasks' words, the chat template's words and Qwen's and EO-1's special
  tokens), Qwen2-VL's image and video processors, and Qwen2.5-VL's chat template.

The checkpoint ``build_tiny_eo1_teacher`` saves is an ordinary lerobot one: its config.json carries the tiny
``vlm_config`` (``from_pretrained`` builds the backbone from it) and its ``policy_preprocessor.json`` names the local
directory by absolute path, so it loads in any process with no patch (unlike tiny pi0, ``reflowpairs.tiny.pi``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reflowpairs.tiny.training import TinyTraining, fit_tiny_teacher
from reflowpairs.tiny.world import TASKS, policy_features

SYSTEM_WORDS = ("You", "are", "a", "helpful", "physical", "assistant", ".", "system", "user")
"""Words of EO-1's prompt (``processor_eo1.SYSTEM_MESSAGE`` and the chat roles) the tiny tokenizer knows."""

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen2.5-VL's special tokens used by its chat template and processor (pad = ``<|endoftext|>``)."""

EO1_TOKENS = (
    "<|action_start|>",
    "<|action_pad|>",
    "<|action_end|>",
    "<|state_start|>",
    "<|state_pad|>",
    "<|state_end|>",
    "<|vla|>",
)
"""EO-1's special tokens (``processor_eo1.EO1_SPECIAL_TOKENS``), in the tokenizer from the start so their ids are
fixed (lerobot's processor step adds them again, which then changes nothing)."""

QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL/Qwen2.5-VL's chat template (as their hub processors ship it)."""


@dataclass(frozen=True)
class TinyQwenSpec:
    """Sizes of the tiny Qwen2.5-VL backbone. ``text_head_dim`` must be even and ``mrope_section`` must sum to
    ``text_head_dim // 2`` (Qwen's multimodal rotary embedding splits a head's frequencies into temporal, height
    and width sections). ``image_pixels``: the processor's ``min_pixels`` = ``max_pixels``, so every camera image
    is resized to that area (56 x 56: 4 x 4 patches of 14, 4 tokens after the 2 x 2 merge)."""

    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    text_head_dim: int = 16
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    patch_size: int = 14
    image_pixels: int = 56 * 56


def _vocabulary(tasks: tuple[str, ...]) -> dict[str, int]:
    """Token -> id of the tiny tokenizer: the special tokens first (Qwen's, then EO-1's), then the words."""
    words = {w for task in tasks for w in task.split()} | set(SYSTEM_WORDS)
    specials = ["<unk>", *QWEN_SPECIAL_TOKENS, *EO1_TOKENS]
    return {tok: i for i, tok in enumerate(specials + sorted(words - set(specials)))}


def build_tiny_qwen_vl(
    out_dir: str | Path, spec: TinyQwenSpec = TinyQwenSpec(), tasks: tuple[str, ...] = TASKS, seed: int = 0
) -> Path:
    """Write a tiny Qwen2.5-VL (config.json, random weights in model.safetensors) and its processor (tokenizer,
    image and video processors, chat template) to ``out_dir``: ``EO1Config(vlm_base=out_dir, vlm_config=...)``
    then builds and processes for a real EO-1 with no hub access."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # lazy: only to build a tiny tokenizer
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )  # lazy: transformers is heavy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = _vocabulary(tasks)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=[*QWEN_SPECIAL_TOKENS[1:], *EO1_TOKENS],
    )
    pixels = {"min_pixels": spec.image_pixels, "max_pixels": spec.image_pixels}
    image_processor = Qwen2VLImageProcessor(
        patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2, **pixels
    )
    video_processor = Qwen2VLVideoProcessor(
        patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2, **pixels
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": spec.text_hidden,
            "intermediate_size": 2 * spec.text_hidden,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "head_dim": spec.text_head_dim,
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": list(spec.mrope_section),
            },
            "bos_token_id": vocab["<|endoftext|>"],
            "eos_token_id": vocab["<|im_end|>"],
            "pad_token_id": vocab["<|endoftext|>"],
            "dtype": "float32",
        },
        vision_config={
            "depth": spec.vision_layers,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": 2 * spec.vision_hidden,
            "num_heads": spec.vision_heads,
            "patch_size": spec.patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 2 * 2 * spec.patch_size,
            "out_hidden_size": spec.text_hidden,
            "fullatt_block_indexes": [0],
        },
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


@dataclass(frozen=True)
class TinyEO1Spec:
    """Shape and training of a tiny EO-1 teacher. ``train_steps`` 0 saves the random initial weights."""

    chunk_size: int = 8
    max_action_dim: int = 6
    max_state_dim: int = 6
    num_denoise_steps: int = 10
    train_steps: int = 200
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0


def tiny_eo1_config(vlm_dir: str | Path, dataset_meta, spec: TinyEO1Spec = TinyEO1Spec()):
    """An ``EO1Config`` for the local Qwen2.5-VL in ``vlm_dir`` (``build_tiny_qwen_vl``) with the features of
    ``dataset_meta``; float32 throughout, the processor's image area read from ``vlm_dir``."""
    from lerobot.policies.eo1.configuration_eo1 import (
        EO1Config,  # lazy: lerobot imports torch and its model stack
    )
    from transformers import Qwen2_5_VLConfig  # lazy: transformers is heavy

    vlm_dir = Path(vlm_dir).resolve()
    image = json.loads((vlm_dir / "processor_config.json").read_text()).get("image_processor", {})
    pixels = image.get("min_pixels") or image.get("size", {}).get("shortest_edge")
    return EO1Config(
        vlm_base=str(vlm_dir),
        vlm_config=Qwen2_5_VLConfig.from_pretrained(vlm_dir).to_dict(),
        image_min_pixels=pixels,
        image_max_pixels=pixels,
        chunk_size=spec.chunk_size,
        n_action_steps=spec.chunk_size,
        max_action_dim=spec.max_action_dim,
        max_state_dim=spec.max_state_dim,
        num_denoise_steps=spec.num_denoise_steps,
        dtype="float32",
        device="cpu",
        push_to_hub=False,
        **policy_features(dataset_meta),
    )


def build_tiny_eo1_teacher(
    out_dir: str | Path,
    dataset_repo_id: str,
    dataset_root: str | Path,
    vlm_dir: str | Path | None = None,
    spec: TinyEO1Spec = TinyEO1Spec(),
    qwen: TinyQwenSpec = TinyQwenSpec(),
) -> Path:
    """Build a tiny EO-1 teacher for the LeRobotDataset at ``dataset_root`` offline, train it ``spec.train_steps``
    steps with lerobot's own EO-1 loss (``policy.forward``, lerobot drawing noise and times; the tiny teachers' one
    loop, ``reflowpairs.tiny.training.fit_tiny_teacher``) and save it as ``lerobot-train`` saves ``pretrained_model/``: config.json,
    model.safetensors and the policy pre/post-processor files. ``vlm_dir``: a local tiny Qwen2.5-VL directory; None
    writes ``build_tiny_qwen_vl``'s to ``out_dir/vlm`` (the checkpoint refers to it by absolute path)."""
    from lerobot.datasets.lerobot_dataset import (
        LeRobotDataset,  # lazy: lerobot imports torch and its model stack
    )
    from lerobot.policies.eo1.modeling_eo1 import EO1Policy  # lazy: lerobot imports torch and its model stack
    from lerobot.policies.factory import (
        make_pre_post_processors,  # lazy: lerobot imports torch and its model stack
    )

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if vlm_dir is None:
        vlm_dir = build_tiny_qwen_vl(out_dir / "vlm", qwen, seed=spec.seed)
    dataset = LeRobotDataset(dataset_repo_id, root=dataset_root)
    torch.manual_seed(spec.seed)
    cfg = tiny_eo1_config(vlm_dir, dataset.meta, spec)
    policy = EO1Policy(cfg)
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=dataset.meta.stats)
    info = {"steps": 0, "final_loss": None}
    if spec.train_steps > 0:
        training = TinyTraining(spec.train_steps, spec.batch_size, spec.lr, spec.seed, cosine=False)
        info = fit_tiny_teacher(policy, preprocessor, dataset, cfg.chunk_size, training)
    policy.save_pretrained(out_dir)
    preprocessor.save_pretrained(out_dir)
    postprocessor.save_pretrained(out_dir)
    (out_dir / "tiny_training.json").write_text(json.dumps({**info, "spec": asdict(spec)}))
    return out_dir
