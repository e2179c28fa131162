"""The bundled tiny world: everything the demo, tests and examples need, built offline in seconds.

Three pieces, each a real lerobot/transformers artefact written to disk:

- a SmolVLM config + processor directory (``build_tiny_vlm``): random-weight VLM of ~0.4 M parameters;
- a LeRobotDataset v3 (``build_tiny_dataset``) written with ``LeRobotDataset.create``, whose action
  chunks depend on the state, the image and the task, and are *bimodal* for one task, so a
  flow-matching teacher's 1-step sample (the mean of the modes) is visibly worse than its 10-step one;
- a SmolVLA teacher (``build_tiny_teacher``) trained for a short while with lerobot's ordinary
  flow-matching loss and saved exactly as ``lerobot-train`` saves ``pretrained_model/``.

``build_tiny_world(root)`` builds all three under one directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from reflowpairs.tiny.training import TinyTraining, fit_tiny_teacher

TINY_IMAGE = 32  # dataset camera resolution (H = W)
TINY_VLM_IMAGE = 64  # the VLM's image size; SmolVLA pads camera images up to it
TINY_REPO_ID = "reflowpairs/tiny_reach"
TASKS = ("reach up", "reach sideways")
SPECIAL_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "end_of_utterance_token": "<end_of_utterance>",
    "global_image_token": "<global-img>",
}


@dataclass(frozen=True)
class TinyWorld:
    """Paths of a built tiny world."""

    root: Path
    vlm_dir: Path
    dataset_root: Path
    repo_id: str
    teacher_dir: Path


@dataclass(frozen=True)
class TinyDatasetSpec:
    """Shape of the tiny dataset: ``num_episodes`` episodes of ``episode_length`` frames at ``fps``."""

    num_episodes: int = 10
    episode_length: int = 24
    fps: int = 10
    seed: int = 0
    state_dim: int = 2


@dataclass(frozen=True)
class TinyTeacherSpec:
    """How the tiny teacher is shaped and trained."""

    chunk_size: int = 8
    max_action_dim: int = 6
    max_state_dim: int = 6
    num_steps: int = 10
    train_steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0


@dataclass(frozen=True)
class VLMSpec:
    """Sizes of the local SmolVLM. The default is the tiny one (~0.4 M parameters with its SmolVLA);
    ``VLMSpec.small()`` is a few-million-parameter one where compute, not overhead, dominates."""

    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = TINY_VLM_IMAGE
    scale_factor: int = 2  # pixel shuffle: (image_size / 16 / scale_factor)^2 image tokens per camera
    text_dtype: str | None = None  # ``text_config.torch_dtype``: "bfloat16" as in the real SmolVLM2 config

    def with_dtype(self, text_dtype: str | None) -> VLMSpec:
        """This spec with ``text_config.torch_dtype`` set: with "bfloat16", as on the real SmolVLM2 config,
        transformers builds the VLM's text layers in bfloat16 and lerobot the action expert too (the vision
        encoder and SmolVLA's own projections stay float32), so the teacher computes as real checkpoints do."""
        return replace(self, text_dtype=text_dtype)

    @staticmethod
    def small() -> VLMSpec:
        return VLMSpec(
            text_hidden=256,
            text_layers=8,
            text_heads=8,
            text_kv_heads=4,
            vision_hidden=128,
            vision_layers=4,
            vision_heads=4,
            image_size=128,
        )

    @staticmethod
    def smolvla_shaped() -> VLMSpec:
        """SmolVLA's real token and layer counts at a quarter of its widths (21 M parameters with its SmolVLA):
        512 px images (1,024 patches through 12 vision layers, 64 image tokens), 16 VLM layers. The prefix is most
        of a sampling call here, as on the real model; the "small" one keeps it to ~30%."""
        return VLMSpec(
            text_hidden=256,
            text_layers=16,
            text_heads=4,
            text_kv_heads=2,
            vision_hidden=192,
            vision_layers=12,
            vision_heads=3,
            image_size=512,
            scale_factor=4,
        )

    @staticmethod
    def large() -> VLMSpec:
        """About 100 M parameters with its SmolVLA: big enough to dominate a process's memory."""
        return VLMSpec(
            text_hidden=768,
            text_layers=12,
            text_heads=12,
            text_kv_heads=4,
            vision_hidden=384,
            vision_layers=6,
            vision_heads=6,
            image_size=128,
        )


def build_tiny_vlm(out_dir: str | Path, spec: VLMSpec = VLMSpec(), tasks: tuple[str, ...] = TASKS) -> Path:
    """Write a tiny SmolVLM ``config.json`` plus processor (word-level tokenizer, image and video
    processors) to ``out_dir``; ``SmolVLAConfig(vlm_model_name=out_dir, load_vlm_weights=False)``
    then builds a real, random-weight SmolVLA from it without the hub. The tokenizer knows the words of
    ``tasks`` (the tiny world's by default) plus a few common ones."""
    # lazy: transformers is heavy
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        SmolVLMConfig,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    words = sorted({w for task in tasks for w in task.split()} | {"\n", "a", "the", "task", "robot"})
    specials = ["<pad>", "<unk>", "<s>", "</s>", *SPECIAL_TOKENS.values()]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=dict(SPECIAL_TOKENS),
    )
    patch = 16
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(
            do_image_splitting=False,
            size={"longest_edge": spec.image_size},
            max_image_size={"longest_edge": spec.image_size},
        ),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=(spec.image_size // patch // spec.scale_factor) ** 2,
    )
    config = SmolVLMConfig(
        text_config={
            "model_type": "llama",
            "hidden_size": spec.text_hidden,
            "intermediate_size": 2 * spec.text_hidden,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "vocab_size": len(vocab),
            "max_position_embeddings": 512,
            "pad_token_id": vocab["<pad>"],
            "rms_norm_eps": 1e-5,
        },
        vision_config={
            "hidden_size": spec.vision_hidden,
            "intermediate_size": 2 * spec.vision_hidden,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.image_size,
            "patch_size": patch,
        },
        scale_factor=spec.scale_factor,
        image_token_id=vocab["<image>"],
        pad_token_id=vocab["<pad>"],
    )
    config.save_pretrained(out_dir)
    if spec.text_dtype:  # written as the real SmolVLM2 config.json has it (transformers would rename the key)
        saved = json.loads((out_dir / "config.json").read_text())
        saved["text_config"]["torch_dtype"] = spec.text_dtype
        (out_dir / "config.json").write_text(json.dumps(saved, indent=2))
    processor.save_pretrained(out_dir)
    return out_dir


def _render(state: np.ndarray) -> np.ndarray:
    """A ``(H, W, 3)`` uint8 picture with a bright blob at ``state`` (in [-2, 2]^2)."""
    grid = np.linspace(-2.0, 2.0, TINY_IMAGE, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    blob = np.exp(-((xx - state[0]) ** 2 + (yy - state[1]) ** 2) / 0.1)
    img = np.stack([blob, 0.5 * blob, 1.0 - blob], axis=-1)
    return (255 * np.clip(img, 0.0, 1.0)).astype(np.uint8)


def tiny_features(state_dim: int = 2) -> dict:
    """The tiny dataset's feature spec, in ``LeRobotDataset.create`` form."""
    return {
        "observation.state": {"dtype": "float32", "shape": (state_dim,), "names": None},
        "observation.images.cam": {
            "dtype": "image",
            "shape": (TINY_IMAGE, TINY_IMAGE, 3),
            "names": ["height", "width", "channels"],
        },
        "action": {"dtype": "float32", "shape": (state_dim,), "names": None},
    }


def tiny_episode(episode: int, spec: TinyDatasetSpec) -> tuple[str, np.ndarray, np.ndarray]:
    """``(task, states (L, S), actions (L, S))`` of one episode; pure function of (seed, episode).

    "reach up" moves the state steadily up; "reach sideways" moves it left *or* right, chosen at
    random per episode and not visible in the first frame: the action chunk given the observation is
    bimodal there. The action is the next state (a position target), as on real arms.
    """
    rng = np.random.default_rng([spec.seed, episode])
    task = TASKS[episode % len(TASKS)]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    direction = np.array([0.0, 1.0]) if task == TASKS[0] else np.array([sign, 0.0])
    start = rng.uniform(-1.0, 1.0, size=2)
    steps = np.arange(spec.episode_length + 1)[:, None]
    wobble = 0.05 * np.sin(steps * 0.7 + rng.uniform(0, 2 * math.pi))
    path = start[None, :] + 0.06 * steps * direction[None, :] + wobble * direction[::-1][None, :]
    path = np.pad(path, ((0, 0), (0, spec.state_dim - 2))) if spec.state_dim > 2 else path
    return task, path[:-1].astype(np.float32), path[1:].astype(np.float32)


def build_tiny_dataset(
    root: str | Path,
    repo_id: str = TINY_REPO_ID,
    spec: TinyDatasetSpec = TinyDatasetSpec(),
    use_videos: bool = False,
):
    """Write the tiny LeRobotDataset (v3) to ``root`` and return it: the camera as PNG frames, or with
    ``use_videos`` as MP4 video (lerobot's own encoder, as real datasets store cameras; reads then decode video)."""
    # lazy: the datasets stack is heavy
    import datasets
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    datasets.disable_progress_bars()  # one "Map" bar per episode is noise here
    features = tiny_features(spec.state_dim)
    if use_videos:
        features["observation.images.cam"]["dtype"] = "video"
    dataset = LeRobotDataset.create(
        repo_id=repo_id, fps=spec.fps, root=root, features=features, use_videos=use_videos
    )
    for episode in range(spec.num_episodes):
        task, states, actions = tiny_episode(episode, spec)
        for state, action in zip(states, actions, strict=True):
            dataset.add_frame(
                {
                    "observation.state": state,
                    "observation.images.cam": _render(state),
                    "action": action,
                    "task": task,
                }
            )
        dataset.save_episode()
    dataset.finalize()
    return LeRobotDataset(repo_id, root=root)


PUSHT_REPO_ID = "reflowpairs/tiny_pusht"


def build_pusht_dataset(root: str | Path, num_episodes: int = 4, episode_length: int = 30, seed: int = 0):
    """A small LeRobotDataset with the PushT environment's features (``observation.image`` 96x96x3,
    ``observation.state`` 2, ``action`` 2), recorded from real gym-pusht rollouts of a smooth random-walk
    controller, so a teacher trained on it runs unchanged in ``lerobot-eval --env.type=pusht``."""
    # lazy: heavy, and gym_pusht is optional (the pusht extra)
    import datasets
    import gym_pusht  # noqa: F401 - registers gym_pusht/PushT-v0
    import gymnasium as gym
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    datasets.disable_progress_bars()
    features = {
        "observation.image": {
            "dtype": "image",
            "shape": (96, 96, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (2,), "names": None},
        "action": {"dtype": "float32", "shape": (2,), "names": None},
    }
    dataset = LeRobotDataset.create(
        repo_id=PUSHT_REPO_ID, fps=10, root=root, features=features, use_videos=False
    )
    env = gym.make("gym_pusht/PushT-v0", obs_type="pixels_agent_pos", render_mode="rgb_array")
    rng = np.random.default_rng(seed)
    for episode in range(num_episodes):
        obs, _ = env.reset(seed=seed + episode)
        target = obs["agent_pos"].astype(np.float32)
        for _ in range(episode_length):
            target = np.clip(target + rng.normal(0.0, 15.0, size=2), 0.0, 512.0).astype(np.float32)
            dataset.add_frame(
                {
                    "observation.image": obs["pixels"],
                    "observation.state": obs["agent_pos"].astype(np.float32),
                    "action": target,
                    "task": "push the T",
                }
            )
            obs, *_ = env.step(target)
        dataset.save_episode()
    env.close()
    dataset.finalize()
    return LeRobotDataset(PUSHT_REPO_ID, root=root)


def policy_features(dataset_meta) -> dict[str, dict]:
    """``input_features`` and ``output_features`` of a tiny teacher's policy config (keyword arguments) for a dataset:
    lerobot's ``dataset_to_policy_features`` of ``dataset_meta``, the action as output and everything else as input."""
    from lerobot.configs.types import FeatureType  # lazy: lerobot imports torch and its model stack
    from lerobot.utils.feature_utils import dataset_to_policy_features  # lazy: as above

    features = dataset_to_policy_features(dataset_meta.features)
    return {
        "input_features": {k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        "output_features": {k: f for k, f in features.items() if f.type is FeatureType.ACTION},
    }


def tiny_smolvla_config(vlm_dir: str | Path, dataset_meta, spec: TinyTeacherSpec = TinyTeacherSpec()):
    """A ``SmolVLAConfig`` for the local VLM in ``vlm_dir`` with features taken from ``dataset_meta``."""
    # lazy: lerobot's policy configs and transformers are heavy
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from transformers import AutoConfig

    vlm = AutoConfig.from_pretrained(vlm_dir)
    image = vlm.vision_config.image_size
    return SmolVLAConfig(
        vlm_model_name=str(Path(vlm_dir).resolve()),
        load_vlm_weights=False,
        chunk_size=spec.chunk_size,
        n_action_steps=spec.chunk_size,
        max_action_dim=spec.max_action_dim,
        max_state_dim=spec.max_state_dim,
        num_steps=spec.num_steps,
        resize_imgs_with_padding=(image, image),
        tokenizer_max_length=16,
        num_vlm_layers=vlm.text_config.num_hidden_layers,
        device="cpu",
        push_to_hub=False,
        **policy_features(dataset_meta),
    )


def build_tiny_teacher(
    vlm_dir: str | Path,
    dataset,
    out_dir: str | Path,
    spec: TinyTeacherSpec = TinyTeacherSpec(),
) -> Path:
    """Train a tiny SmolVLA on ``dataset`` with lerobot's own flow-matching loss (``policy.forward``), by the tiny
    teachers' loop (``reflowpairs.tiny.training``: AdamW, cosine schedule, gradient clip 1), and save it as ``lerobot-train``
    saves ``pretrained_model/``: config.json, model.safetensors and the policy pre/post-processor files."""
    # lazy: lerobot's policies are heavy
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    torch.manual_seed(spec.seed)
    cfg = tiny_smolvla_config(vlm_dir, dataset.meta, spec)
    policy = SmolVLAPolicy(cfg)
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=dataset.meta.stats)
    training = TinyTraining(spec.train_steps, spec.batch_size, spec.lr, spec.seed, cosine=True)
    info = fit_tiny_teacher(policy, preprocessor, dataset, cfg.chunk_size, training)
    out_dir = Path(out_dir)
    policy.save_pretrained(out_dir)
    preprocessor.save_pretrained(out_dir)
    postprocessor.save_pretrained(out_dir)
    (out_dir / "tiny_training.json").write_text(
        json.dumps({"final_loss": info["final_loss"], "steps": info["steps"]})
    )
    return out_dir


def save_untrained_policy(
    vlm_dir: str | Path, dataset, out_dir: str | Path, spec: TinyTeacherSpec = TinyTeacherSpec()
) -> Path:
    """Save a random-weight SmolVLA for ``dataset`` as a checkpoint (for speed benchmarks, where quality is moot)."""
    # lazy: lerobot's policies are heavy
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    torch.manual_seed(spec.seed)
    cfg = tiny_smolvla_config(vlm_dir, dataset.meta, spec)
    policy = SmolVLAPolicy(cfg)
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=dataset.meta.stats)
    out_dir = Path(out_dir)
    policy.save_pretrained(out_dir)
    preprocessor.save_pretrained(out_dir)
    postprocessor.save_pretrained(out_dir)
    return out_dir


def build_tiny_world(
    root: str | Path,
    dataset_spec: TinyDatasetSpec = TinyDatasetSpec(),
    teacher_spec: TinyTeacherSpec = TinyTeacherSpec(),
    vlm_spec: VLMSpec = VLMSpec(),
) -> TinyWorld:
    """Build VLM dir, dataset and teacher under ``root`` (``vlm/``, ``dataset/``, ``teacher/``).
    ``vlm_spec.with_dtype("bfloat16")`` gives a teacher that computes in bfloat16 as real SmolVLA checkpoints do."""
    root = Path(root).resolve()
    vlm_dir = build_tiny_vlm(root / "vlm", vlm_spec)
    dataset = build_tiny_dataset(root / "dataset", TINY_REPO_ID, dataset_spec)
    teacher_dir = build_tiny_teacher(vlm_dir, dataset, root / "teacher", teacher_spec)
    return TinyWorld(root, vlm_dir, root / "dataset", TINY_REPO_ID, teacher_dir)
