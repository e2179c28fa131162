"""What a run reads, checked before the first step: the store (its manifest only), the init checkpoint and the dataset
(their fingerprints against the store's), and the loaded student (its shapes against the store's). Nothing here reads
a shard: each is checked when it is first read (``reflowpairs.pairdata.read_checked``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reflowpairs.checkpoint import pretrained_dir, read_json_object
from reflowpairs.dataset import check_features, dataset_fingerprint, frame_indices, open_dataset
from reflowpairs.errors import ReflowPairsError
from reflowpairs.pairdata import position_lookup
from reflowpairs.policies import pair_shapes
from reflowpairs.store.reader import PairStore
from reflowpairs.teacher import checkpoint_file, fingerprint_checkpoint, is_local, load_policy, rename_map
from reflowpairs.train.config import TrainConfig


def open_training_store(path: Path) -> PairStore:
    """Open the store and check what its manifest says, without reading a shard: the manifest is sound
    (``StoreManifest.read``), the store is complete and holds pairs. Time independent of the store's size; the
    shards are checked as they are read (``reflowpairs.pairdata.read_checked``)."""
    store = PairStore(path)
    manifest = store.manifest
    if not manifest.get("complete", False):
        total = manifest.get("generation", {}).get("num_frames")
        done = manifest.get("num_frames", 0)
        raise ReflowPairsError(
            f"Pair store {path} is incomplete ({done} of {total if total is not None else '?'} frames): "
            "its generation was interrupted or is still running.",
            "Finish it with the same `reflowpairs generate ...` command plus --resume, then train.",
        )
    if not store.shards or len(store) == 0:
        raise ReflowPairsError(
            f"Pair store {path} holds no pairs.", "Generate pairs first with `reflowpairs generate`."
        )
    return store


def refuse_mismatch(what: str, allow: bool, warnings: list[str]) -> None:
    """Refuse an input that differs from the store's record of it (``what``), or with ``allow`` add it to ``warnings``."""
    if allow:
        warnings.append(what + " (allowed by --allow-mismatch)")  # a warning, printed as is: not an error
        return
    raise ReflowPairsError(
        what,
        "Train with the checkpoint and dataset the store was generated from, or set `allow_mismatch` "
        "if you know they are equivalent. Nothing was written.",
    )


@dataclass
class TrainInputs:
    """Everything checked and loaded before the first step."""

    store: PairStore
    dataset: Any
    lookup: np.ndarray
    loaded: Any  # reflowpairs.teacher.LoadedPolicy: the student
    init_source: str
    init_fingerprint: dict[str, str]
    init_config: dict[str, Any]
    warnings: list[str]


def _init_checkpoint(
    cfg: TrainConfig, manifest: dict[str, Any]
) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The init checkpoint of a new run: ``init``, else the manifest's teacher; its source (a local one as an absolute
    path), fingerprint and config.json."""
    init_source = cfg.init or manifest.get("teacher", {}).get("source")
    if init_source and is_local(
        init_source
    ):  # recorded as pretrained_path: independent of the working directory
        init_source = str(Path(init_source).expanduser().resolve())
    if not init_source:
        raise ReflowPairsError(
            f"The manifest of {cfg.pairs} names no teacher checkpoint.",
            "Set `init` to the teacher checkpoint (a path or hub repo id).",
        )
    try:
        config_path = checkpoint_file(init_source, "config.json")
    except ReflowPairsError as err:
        where = (
            "`init`"
            if cfg.init
            else f"The store's teacher ({manifest['teacher'].get('source')!r}, from its manifest)"
        )
        raise ReflowPairsError(
            f"{where}: {err.what}", "Set `init` to the teacher checkpoint's current location."
        ) from err
    try:
        init_config = read_json_object(
            config_path,
            "The checkpoint's config.json is damaged: set `init` to a good copy of the teacher checkpoint.",
        )
    except FileNotFoundError as err:
        raise ReflowPairsError(f"{config_path} is missing.", "Set `init` to a complete checkpoint.") from err
    return init_source, fingerprint_checkpoint(init_source), init_config


def _checked_dataset(cfg: TrainConfig, manifest: dict[str, Any], warnings: list[str]):
    """The dataset the store was generated from: ``dataset_root``, else where the manifest says it was; its
    fingerprint checked against the manifest's (with ``allow_mismatch``: a warning)."""
    recorded = manifest.get("dataset", {})
    root = cfg.dataset_root
    if root is None and recorded.get("root"):
        root = Path(recorded["root"])
        if not (root / "meta" / "info.json").is_file():
            raise ReflowPairsError(
                f"The store's dataset {recorded.get('repo_id')!r} was read from {root}, which holds no dataset now.",
                "Set `dataset_root` to where the dataset is now.",
            )
    dataset = open_dataset(recorded.get("repo_id"), root)
    if recorded.get("fingerprint") != dataset_fingerprint(dataset):
        refuse_mismatch(
            f"The dataset at {dataset.root} is not the one the store {cfg.pairs} was generated from "
            f"(dataset fingerprint of its meta/ files: store has {str(recorded.get('fingerprint'))[:12]}, "
            f"dataset has {dataset_fingerprint(dataset)[:12]}).",
            cfg.allow_mismatch,
            warnings,
        )
    return dataset


def prepare_inputs(
    cfg: TrainConfig, resume_from: Path | None, state: dict[str, Any] | None, device: str
) -> TrainInputs:
    """Every input of the run checked, and the student loaded (the init checkpoint, or ``resume_from``'s
    pretrained_model): the store's manifest; the init checkpoint's and the dataset's fingerprints against it; the
    student's features against the dataset's and its pair shapes against the store's."""
    warnings: list[str] = []
    store = open_training_store(Path(cfg.pairs))
    manifest = store.manifest
    if state is not None and state["store"]["store_id"] != manifest.get("store_id"):
        raise ReflowPairsError(
            f"Cannot resume: the run in {cfg.out} trained on store {state['store']['store_id']} "
            f"({state['store']['path']}), but `pairs` {cfg.pairs} is store {manifest.get('store_id')}.",
            "Resume with the store the run started on, or start a new run in another `out`.",
        )
    if state is not None:  # the init checkpoint the run started from
        init_source, init_fp, init_config = (
            state["init"]["source"],
            state["init"]["fingerprint"],
            state["init_config"],
        )
    else:
        init_source, init_fp, init_config = _init_checkpoint(cfg, manifest)
    store_teacher = manifest.get("teacher", {}).get("fingerprint")
    if store_teacher != init_fp["fingerprint"]:
        refuse_mismatch(
            f"The init checkpoint {init_source} is not the teacher the store {cfg.pairs} was generated with "
            f"(teacher fingerprint: store has {str(store_teacher)[:12]}, init checkpoint has {init_fp['fingerprint'][:12]}).",
            cfg.allow_mismatch,
            warnings,
        )
    dataset = _checked_dataset(cfg, manifest, warnings)
    lookup = position_lookup(frame_indices(dataset))  # each shard's obs_index is checked against it when read

    # The one policy of this process: the student (the init checkpoint, or the checkpoint resumed from).
    source = str(pretrained_dir(resume_from)) if resume_from is not None else init_source
    loaded = load_policy(
        source, device, fingerprint=init_fp if resume_from is None else None, tokenizer=cfg.tokenizer
    )
    check_features(loaded.config, dataset.meta, rename_map(loaded.preprocessor))
    x0_shape, x1_shape = pair_shapes(loaded.config)
    if tuple(store.x0_shape) != x0_shape or tuple(store.x1_shape) != x1_shape:
        raise ReflowPairsError(
            f"Store {cfg.pairs} holds X_0 {list(store.x0_shape)} and X_1 {list(store.x1_shape)}, but the policy in "
            f"{source} takes noise {list(x0_shape)} and writes actions {list(x1_shape)}.",
            "Train the policy the store was generated from.",
        )
    return TrainInputs(store, dataset, lookup, loaded, str(init_source), init_fp, init_config, warnings)


def held_out_episodes(inputs: TrainInputs) -> list[int]:
    """Episodes of the dataset that the store has no pairs of (``generation.episodes``; None: all of them)."""
    stored = inputs.store.manifest.get("generation", {}).get("episodes")
    total = int(inputs.dataset.meta.total_episodes)
    return [] if stored is None else sorted(set(range(total)) - {int(e) for e in stored})
