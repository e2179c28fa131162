"""Tiny pi0/pi05 teachers, built offline in seconds (tests, demos, the CLI's tiny world).

lerobot 0.6's pi0/pi05 build their PaliGemma + action expert from sizes fixed in code: the Gemma widths come
from ``get_gemma_config`` (``gemma_300m`` or ``gemma_2b`` only) and the SigLIP tower is hard-coded (hidden 1152,
27 layers, ``projection_dim`` 2048), so the smallest model lerobot will build is ~3.3 B parameters.
``tiny_gemma_patch()`` swaps both for small ones *in lerobot's modules*, explicitly and reversibly:

- ``modeling_pi0.get_gemma_config`` / ``modeling_pi05.get_gemma_config`` return ``TinyGemmaSpec``'s widths
  (``gemma_2b`` -> the VLM, ``gemma_300m`` -> the action expert; 8 heads are required: lerobot's joint
  attention reshapes to ``8 * head_dim`` in ``compute_layer_complete``);
- ``PaliGemmaForConditionalGenerationWithPiGemma`` (as those modules see it) is a subclass that shrinks the
  SigLIP ``vision_config`` (hidden, layers, heads, patch) and sets its ``projection_dim`` to the VLM text width,
  which the image/language concatenation needs.

The vocabulary stays PaliGemma's 257,152 tokens (so any PaliGemma token id fits) unless
``TinyGemmaSpec.vocab_size`` says otherwise. The patch must be active in *every* process that builds or loads such a
checkpoint: without it lerobot's ``from_pretrained`` builds the 3 B model, fails to load the tiny weights into it and
silently returns random weights (``reflowpairs.policies._pi_common.check_weights_loaded`` catches that). A tiny
checkpoint carries ``TINY_MARKER`` (the spec, as JSON) so a loader can call ``install_for_checkpoint(dir)`` first.

lerobot's own commands load checkpoints with no reflowpairs code involved, so the patch has to be installed in their
process first: ``python -m reflowpairs.tinypi lerobot-eval --policy.path=DIR ...`` (or ``lerobot-train``) installs
the patch ``DIR``'s marker names and runs lerobot's command in the same process (``run_lerobot``); an ordinary
checkpoint runs unpatched. This is the test fixture for lerobot's CLI (``tests/test_pusht_eval.py``).

The tokenizer: lerobot's pi processors hard-code the gated ``google/paligemma-3b-pt-224`` tokenizer. Here the
preprocessor is built with ``TokenizerProcessorStep(tokenizer_name=<local dir>)`` (``build_pi_tokenizer`` writes a
small word-level one whose ids fit the vocabulary: the tasks' words, pi05's ``Task: ..., State: ...;`` prompt
words and the numbers 0-255 of its discretised state), so the saved ``policy_preprocessor.json`` names that local
directory and loads offline. To point any saved pi0/pi05 pipeline at another local tokenizer (e.g. a downloaded copy
of PaliGemma's), load it with ``make_pre_post_processors(cfg, pretrained_path=DIR, preprocessor_overrides=
{"tokenizer_processor": {"tokenizer_name": LOCAL_TOKENIZER_DIR}})``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TINY_MARKER = "reflowpairs_tinypi.json"
"""File in a tiny pi checkpoint that holds its ``TinyGemmaSpec`` (JSON): the patch to install before loading it."""

PALIGEMMA_VOCAB = 257_152


@dataclass(frozen=True)
class TinyGemmaSpec:
    """Sizes of a tiny pi0/pi05. ``vlm_width``/``expert_width`` are the two Gemmas' hidden sizes (they share
    ``num_heads``, ``num_kv_heads`` and ``head_dim``, as the joint attention needs; ``num_heads`` must be 8)."""

    vlm_width: int = 64
    expert_width: int = 32
    depth: int = 2
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 8
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    patch_size: int = 8
    vocab_size: int = PALIGEMMA_VOCAB

    def gemma(self, variant: str):
        """lerobot's ``GemmaConfig`` for ``variant``: ``gemma_2b`` is the VLM, ``gemma_300m`` the action expert."""
        from lerobot.policies.pi0.modeling_pi0 import GemmaConfig

        if variant not in ("gemma_2b", "gemma_300m"):
            raise ValueError(f"Unknown variant: {variant}")
        width = self.vlm_width if variant == "gemma_2b" else self.expert_width
        return GemmaConfig(
            width=width,
            depth=self.depth,
            mlp_dim=2 * width,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
        )


def _patched_modules():
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    return modeling_pi0, modeling_pi05


_saved: dict | None = None  # lerobot's own functions/classes while the patch is installed
_active: TinyGemmaSpec | None = None


def install(spec: TinyGemmaSpec = TinyGemmaSpec()) -> None:
    """Make lerobot's pi0/pi05 build tiny models of ``spec`` from now on in this process (``uninstall`` undoes it).
    Installing again replaces the spec."""
    global _saved, _active
    from lerobot.policies.pi_gemma import PaliGemmaForConditionalGenerationWithPiGemma

    if spec.num_heads != 8:
        raise ValueError("lerobot's pi0/pi05 joint attention assumes 8 heads (compute_layer_complete)")

    class TinyPaliGemma(PaliGemmaForConditionalGenerationWithPiGemma):
        def __init__(self, config):
            vision = config.vision_config
            vision.hidden_size = spec.vision_hidden
            vision.intermediate_size = 2 * spec.vision_hidden
            vision.num_hidden_layers = spec.vision_layers
            vision.num_attention_heads = spec.vision_heads
            vision.patch_size = spec.patch_size
            vision.projection_dim = config.text_config.hidden_size
            if spec.vocab_size != PALIGEMMA_VOCAB:
                config.text_config.vocab_size = spec.vocab_size
            super().__init__(config)

    modules = _patched_modules()
    if _saved is None:
        _saved = {m: (m.get_gemma_config, m.PaliGemmaForConditionalGenerationWithPiGemma) for m in modules}
    for module in modules:
        module.get_gemma_config = spec.gemma
        module.PaliGemmaForConditionalGenerationWithPiGemma = TinyPaliGemma
    _active = spec


def uninstall() -> None:
    """Restore lerobot's own ``get_gemma_config`` and PaliGemma class (no-op when not installed)."""
    global _saved, _active
    if _saved is not None:
        for module, (gemma, paligemma) in _saved.items():
            module.get_gemma_config = gemma
            module.PaliGemmaForConditionalGenerationWithPiGemma = paligemma
    _saved = _active = None


def active_spec() -> TinyGemmaSpec | None:
    """The installed tiny spec, or None while lerobot builds its own sizes."""
    return _active


@contextmanager
def tiny_gemma_patch(spec: TinyGemmaSpec = TinyGemmaSpec()) -> Iterator[TinyGemmaSpec]:
    """Within the block, lerobot's pi0/pi05 build (and ``from_pretrained`` loads) tiny models of ``spec``; the
    previous state (lerobot's own sizes, or an earlier ``install``) is restored after."""
    previous = _active
    install(spec)
    try:
        yield spec
    finally:
        if previous is None:
            uninstall()
        else:
            install(previous)


def read_marker(checkpoint_dir: str | Path) -> TinyGemmaSpec | None:
    """The ``TinyGemmaSpec`` a tiny checkpoint was built with, or None for an ordinary checkpoint."""
    path = Path(checkpoint_dir) / TINY_MARKER
    if not path.is_file():
        return None
    return TinyGemmaSpec(**json.loads(path.read_text()))


def install_for_checkpoint(checkpoint_dir: str | Path) -> bool:
    """Install the tiny patch a checkpoint asks for (its ``TINY_MARKER``); True when it did. Call before loading a
    pi0/pi05 checkpoint in a fresh process (a CLI subprocess)."""
    spec = read_marker(checkpoint_dir)
    if spec is None:
        return False
    install(spec)
    return True


# --- tokenizer --------------------------------------------------------------------------------------


def build_pi_tokenizer(out_dir: str | Path, tasks: tuple[str, ...] | None = None) -> Path:
    """Write a small word-level fast tokenizer to ``out_dir`` (loadable with ``AutoTokenizer.from_pretrained``) for
    tiny pi0/pi05 teachers: the tasks' words, pi05's prompt words (``Task``, ``State``, ``Action``, punctuation) and
    the numbers 0-255 (pi05's discretised state). Ids are < 400, well inside PaliGemma's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from reflowpairs.tinyworld import TASKS

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
    from lerobot.configs.types import FeatureType
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi05.configuration_pi05 import PI05Config
    from lerobot.utils.feature_utils import dataset_to_policy_features

    if variant not in ("pi0", "pi05"):
        raise ValueError(f"variant must be 'pi0' or 'pi05', got {variant!r}")
    config_cls = PI0Config if variant == "pi0" else PI05Config
    features = dataset_to_policy_features(dataset_meta.features)
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
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={k: f for k, f in features.items() if f.type is FeatureType.ACTION},
    )


def make_pi_processors(config, dataset_stats, tokenizer_dir: str | Path):
    """lerobot's own pi0/pi05 pre/post-processor pipelines with the tokenizer step reading ``tokenizer_dir`` (a local
    directory, saved by absolute path in ``policy_preprocessor.json``) instead of the hub's PaliGemma tokenizer."""
    import importlib

    if config.type == "pi0":
        from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors as make
    else:
        from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors as make
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
    gemma: TinyGemmaSpec = TinyGemmaSpec(),
) -> Path:
    """Build a tiny ``variant`` ("pi0" or "pi05") teacher for the LeRobotDataset at ``dataset_root`` offline, train
    it ``spec.train_steps`` steps with lerobot's own loss (``policy.forward``, by ``reflowpairs.train.train_step``;
    0 keeps the random init) and save it
    as ``lerobot-train`` saves ``pretrained_model/``: config.json, model.safetensors, the policy pre/post-processor
    files, plus ``TINY_MARKER``. ``tokenizer_dir``: a local tokenizer directory; None writes ``build_pi_tokenizer``'s
    to ``out_dir/tokenizer``. The tiny patch is active only during the build (see ``tiny_gemma_patch``)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

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
            info = _train(policy, preprocessor, dataset, cfg, spec)
        policy.save_pretrained(out_dir)
    preprocessor.save_pretrained(out_dir)
    postprocessor.save_pretrained(out_dir)
    (out_dir / TINY_MARKER).write_text(json.dumps(asdict(gemma), indent=2))
    (out_dir / "tiny_training.json").write_text(json.dumps(info))
    return out_dir


def _policy_class(variant: str):
    if variant == "pi0":
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy

        return PI0Policy
    from lerobot.policies.pi05.modeling_pi05 import PI05Policy

    return PI05Policy


def _train(policy, preprocessor, dataset, cfg, spec: TinyPiSpec) -> dict:
    """``spec.train_steps`` steps of ``reflowpairs.train.train_step`` with lerobot's own pi0/pi05 loss
    (``policy.forward``, lerobot drawing noise and times) on the dataset's action chunks; returns the step count
    and the last loss."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from reflowpairs.tinyworld import _flow_matching_loss
    from reflowpairs.train import MasterWeights, Optimisation, train_step

    fps = dataset.meta.fps
    train_set = LeRobotDataset(
        dataset.repo_id,
        root=dataset.root,
        delta_timestamps={"action": [i / fps for i in range(cfg.chunk_size)]},
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=spec.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(spec.seed),
    )
    # reflowpairs' one training step (``train_step``: lerobot's order, float32 masters of any bfloat16 parameter)
    # on lerobot's own loss, with a plain AdamW (no schedule) over the trainable parameters, clipped to norm 1
    masters = MasterWeights([(n, p) for n, p in policy.named_parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(masters.params, lr=spec.lr, weight_decay=0.0)
    opt = Optimisation(masters, optimizer, scheduler=None, grad_clip=1.0)
    loss_fn = _flow_matching_loss(preprocessor)
    policy.train()
    step, stats = 0, None
    while step < spec.train_steps:
        for batch in loader:
            stats = train_step(policy, batch, loss_fn, opt)
            step += 1
            if step >= spec.train_steps:
                break
    policy.eval()
    return {"steps": step, "final_loss": None if stats is None else stats.loss}


# --- lerobot's own commands on a tiny checkpoint ------------------------------------------------------

LEROBOT_COMMANDS = {
    "lerobot-eval": "lerobot.scripts.lerobot_eval",
    "lerobot-train": "lerobot.scripts.lerobot_train",
}
"""The lerobot console commands ``run_lerobot`` runs, by the module whose ``main()`` each calls."""


def policy_path_argument(args: list[str]) -> str | None:
    """The value of ``--policy.path=DIR`` (or ``--policy.path DIR``) in lerobot command-line ``args``, or None."""
    for i, arg in enumerate(args):
        if arg.startswith("--policy.path="):
            return arg.split("=", 1)[1]
        if arg == "--policy.path" and i + 1 < len(args):
            return args[i + 1]
    return None


def run_lerobot(command: str, args: list[str]) -> int:
    """Run lerobot's ``command`` (``lerobot-eval`` or ``lerobot-train``) with ``args`` in this process, after
    installing the tiny patch that the ``--policy.path`` checkpoint's marker names (nothing for an ordinary
    checkpoint). Returns the command's exit status."""
    import importlib

    if command not in LEROBOT_COMMANDS:
        raise SystemExit(f"usage: python -m reflowpairs.tinypi {{{','.join(LEROBOT_COMMANDS)}}} ARGS...")
    path = policy_path_argument(args)
    if path is not None:
        install_for_checkpoint(path)
    module = importlib.import_module(LEROBOT_COMMANDS[command])
    sys.argv = [command, *args]
    result = module.main()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    # run through the package's module (not this __main__ copy), so the patch state is the one everything shares
    from reflowpairs import tinypi as _shared

    sys.exit(_shared.run_lerobot(sys.argv[1] if len(sys.argv) > 1 else "", sys.argv[2:]))
