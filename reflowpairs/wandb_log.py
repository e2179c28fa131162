"""Optional Weights & Biases logging for ``reflowpairs train`` (``pip install 'reflowpairs[wandb]'``).

Settings are lerobot's own ``lerobot.configs.default.WandBConfig`` (``enable``, ``project``, ``entity``, ``notes``,
``mode``, ``run_id``), used as lerobot-train's ``WandBLogger`` uses them: the run's files go to ``OUT/wandb/`` (or
``$WANDB_DIR/wandb/`` when that is set), each ``train_log.jsonl`` record is logged as ``train/loss``, ``train/lr``,
``train/grad_norm`` at its step, and ``--resume`` continues the W&B run found in ``wandb/latest-run`` (as lerobot-train
does). ``mode=None`` leaves the choice to wandb (``WANDB_MODE``, else online). ``wandb`` is imported only here and only
when a run starts: it is an optional dependency.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from reflowpairs.errors import ReflowPairsError

MODES = ("online", "offline", "disabled")
DEFAULT_PROJECT = "reflowpairs"
INSTALL_HINT = "Install it with `pip install 'reflowpairs[wandb]'` (or `pip install wandb`), or drop --wandb."


def require_wandb() -> None:
    """Refuse ``--wandb`` early (before any work) when the wandb package is missing."""
    try:
        found = importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):  # a None entry in sys.modules, or a broken install
        found = False
    if not found:
        raise ReflowPairsError("--wandb needs the wandb package, which is not installed.", INSTALL_HINT)


def wandb_settings(project: str | None, entity: str | None, mode: str | None, notes: str | None):
    """lerobot's ``WandBConfig`` for a run that logs (``TrainConfig.wandb_config``): ``project`` None is
    ``DEFAULT_PROJECT``; refuses a bad mode or a missing wandb package before any work."""
    from lerobot.configs.default import WandBConfig  # lerobot imports torch: only for a run that logs

    check_mode(mode)
    require_wandb()
    return WandBConfig(enable=True, project=project or DEFAULT_PROJECT, entity=entity, notes=notes, mode=mode)


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise ReflowPairsError(f"--wandb-mode must be one of {', '.join(MODES)}, got {mode!r}.")


def _previous_run_id(wandb_dir: Path) -> str | None:
    """The id of the run in ``wandb_dir/wandb/latest-run`` (lerobot's ``get_wandb_run_id_from_filesystem`` rule)."""
    runs = sorted((wandb_dir / "wandb" / "latest-run").glob("run-*.wandb"))
    match = re.search(r"run-([^.]+)\.wandb", runs[0].name) if len(runs) == 1 else None
    return match.group(1) if match else None


class WandbRun:
    """One W&B run of a training run; ``log`` takes ``train_log.jsonl`` records."""

    def __init__(self, run: Any, wandb: Any):
        self.run = run
        self._wandb = wandb

    @classmethod
    def start(cls, cfg: Any, out: Path, name: str, config: dict[str, Any], resume: bool = False) -> WandbRun:
        """Start (or, with ``resume``, continue) the run described by ``cfg`` (a lerobot ``WandBConfig``)."""
        require_wandb()
        check_mode(cfg.mode)
        os.environ.setdefault("WANDB_SILENT", "True")  # as lerobot-train: the CLI prints where the run is
        import wandb  # optional dependency (reflowpairs[wandb]), imported when a run logs

        wandb_dir = Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else Path(out)
        run_id = cfg.run_id or (_previous_run_id(wandb_dir) if resume else None)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(
                id=run_id,
                project=cfg.project,
                entity=cfg.entity,
                name=name,
                notes=cfg.notes,
                dir=str(wandb_dir),
                config=config,
                save_code=False,
                job_type="train",
                resume="allow" if run_id else None,
                mode=cfg.mode,
            )
        except Exception as err:  # noqa: BLE001 - wandb raises its own errors for login, network and settings
            raise ReflowPairsError(
                f"Could not start the W&B run ({type(err).__name__}: {err}).",
                "Check `wandb login` and --wandb-project/--wandb-entity, or pass --wandb-mode offline "
                "(sync later with `wandb sync`).",
            ) from err
        cfg.run_id = run.id
        return cls(run, wandb)

    def where(self) -> str:
        """The run's URL, or its local directory when it is offline."""
        url = self.run.get_url() if not self.run.offline else None
        return url or f"{self.run.dir.removesuffix('/files')} (offline: `wandb sync` it later)"

    def log(self, record: dict[str, Any]) -> None:
        """``{"step": 200, "loss": ..., "lr": ..., "grad_norm": ..., ...}`` -> ``train/loss``, ... at step 200."""
        data = {f"train/{k}": v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        self.run.log(data, step=int(record["step"]))

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
