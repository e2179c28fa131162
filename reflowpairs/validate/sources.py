"""The ``dataset`` and ``teacher`` checks: the store was made from this dataset, by this checkpoint (fingerprints)."""

from __future__ import annotations

from reflowpairs.dataset import dataset_fingerprint, open_dataset
from reflowpairs.store.reader import PairStore
from reflowpairs.teacher import fingerprint_checkpoint
from reflowpairs.validate.config import ValidateConfig
from reflowpairs.validate.report import FAIL, PASS, CheckResult


def open_checked_dataset(store: PairStore, cfg: ValidateConfig, use_recorded: bool):
    """The dataset to check against: --dataset/--dataset-root, else (if ``use_recorded``) the recorded one, else
    None. Opened with the store's recorded episodes."""
    recorded = store.manifest.get("dataset", {})
    if cfg.dataset is None and cfg.dataset_root is None:
        if not use_recorded:
            return None
        repo_id, root = recorded.get("repo_id"), recorded.get("root")
    else:
        repo_id = cfg.dataset or recorded.get("repo_id")
        root = cfg.dataset_root
    return open_dataset(repo_id, root, store.manifest.get("generation", {}).get("episodes"))


def check_dataset(store: PairStore, dataset) -> CheckResult:
    """``dataset`` (a LeRobotDataset) has the fingerprint the store recorded."""
    recorded = store.manifest.get("dataset", {})
    fingerprint = dataset_fingerprint(dataset)
    if fingerprint != recorded.get("fingerprint"):
        return CheckResult(
            "dataset",
            FAIL,
            f"the dataset {dataset.repo_id} at {dataset.root} has fingerprint {fingerprint[:12]}..., the store was made from "
            f"{recorded.get('repo_id')} at {recorded.get('root')} with fingerprint {str(recorded.get('fingerprint'))[:12]}...: another dataset or another version of it",
        )
    return CheckResult(
        "dataset",
        PASS,
        f"{dataset.repo_id} at {dataset.root} is the recorded dataset (fingerprint {fingerprint[:12]}...)",
    )


def check_teacher(store: PairStore, source: str) -> CheckResult:
    """The checkpoint ``source`` has the fingerprint of the teacher the store recorded."""

    recorded = store.manifest.get("teacher", {})
    fingerprint = fingerprint_checkpoint(source)["fingerprint"]
    if fingerprint != recorded.get("fingerprint"):
        return CheckResult(
            "teacher",
            FAIL,
            f"teacher {source} has fingerprint {fingerprint[:12]}..., the store was made by {recorded.get('source')} with "
            f"{str(recorded.get('fingerprint'))[:12]}...: another checkpoint (other weights or config)",
        )
    return CheckResult(
        "teacher", PASS, f"{source} is the recorded teacher (fingerprint {fingerprint[:12]}...)"
    )
