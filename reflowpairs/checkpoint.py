"""Student checkpoints in lerobot-train's layout, written atomically.

::

    OUT/checkpoints/<step>/pretrained_model/   config.json, model.safetensors, policy pre/post-processor files
    OUT/checkpoints/<step>/training_state/     optimizer, scheduler, step and RNG state (lerobot's own files)
                                               + reflow_state.json (data position, settings, provenance)
                                               + master_params.safetensors (float32 masters of the
                                                 bfloat16/float16 trainable parameters, when there are any)
    OUT/checkpoints/last -> <step>             relative symlink, as lerobot-train makes it

``<step>`` is lerobot's ``get_step_identifier`` (zero-padded to 6 digits). Each checkpoint is written
into ``checkpoints/.tmp-<step>``, fsynced, and renamed into place; ``last`` is then repointed by
renaming a fresh symlink over it. A crash at any moment leaves ``last`` on a complete checkpoint (or
absent, before the first one), and at worst a ``.tmp-*`` leftover that the next run removes. A save that fails
(a full disk) or is stopped (a second Ctrl-C) removes its ``.tmp-*`` copy itself, freeing the space it took.

``pretrained_model/config.json`` is the init checkpoint's own config.json, key for key and value for
value, except ``pretrained_path`` (the init checkpoint, as lerobot-train records ``--policy.path``) and
``num_steps`` (``--student-num-steps``: 1 unless asked otherwise, or the teacher's). Writing the init's JSON rather than
re-serialising the loaded config guarantees that no field drifts (the predecessor's
``load_vlm_weights`` and leftover-field bugs).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from reflowpairs.atomic import TMP_PREFIX, NotAJSONObjectError, fsync_dir, fsync_tree, load_json_object
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import json_step_field

STATE_FILE = "reflow_state.json"
MASTER_FILE = "master_params.safetensors"
STATE_FORMAT = "reflowpairs.train"
STATE_VERSION = 1
OLD_PREFIX = ".old-"

TEST_SAVE_GATE = "REFLOWPAIRS_TEST_SAVE_GATE"
"""Test hook: a directory. Inside each save, once ``.tmp-<step>`` exists and before the weights go in, the saver creates
``<dir>/inside-<step>`` and waits until ``<dir>/go-<step>`` exists, so a test can signal a ``train`` process or fill
its disk while it is inside a save, at a known point (``tests/test_train_faults.py``). Unset in normal use."""


def checkpoints_dir(out: str | Path) -> Path:
    from lerobot.utils.constants import CHECKPOINTS_DIR  # heavy: imported when used

    return Path(out) / CHECKPOINTS_DIR


def last_link(out: str | Path) -> Path:
    from lerobot.utils.constants import LAST_CHECKPOINT_LINK  # heavy: imported when used

    return checkpoints_dir(out) / LAST_CHECKPOINT_LINK


def pretrained_dir(checkpoint: Path) -> Path:
    from lerobot.utils.constants import PRETRAINED_MODEL_DIR  # heavy: imported when used

    return checkpoint / PRETRAINED_MODEL_DIR


def training_state_dir(checkpoint: Path) -> Path:
    from lerobot.utils.constants import TRAINING_STATE_DIR  # heavy: imported when used

    return checkpoint / TRAINING_STATE_DIR


def last_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint ``OUT/checkpoints/last`` points at (resolved), or None if there is none yet."""
    link = last_link(out)
    if not link.is_symlink() and not link.exists():
        return None
    target = link.resolve()
    if not target.is_dir():
        raise ReflowPairsError(
            f"{link} points at {target}, which does not exist.",
            "Repoint it at a complete checkpoints/<step> directory, or start a new run in another `out`.",
        )
    return target


def student_config_json(
    init_config: dict[str, Any], init_source: str, num_steps: int | None = None
) -> dict[str, Any]:
    """The student's config.json: the init checkpoint's, with ``pretrained_path`` set to ``init_source``
    and the policy family's step-count field (SmolVLA's ``num_steps``, pi0/pi05's ``num_inference_steps``) set
    only when ``num_steps`` is given. Nothing else changes."""
    config = dict(init_config)
    config["pretrained_path"] = str(init_source)
    if num_steps is not None:
        field = json_step_field(config)
        if field not in config:
            raise ReflowPairsError(
                f"The student's {field} would be {num_steps} (`student_num_steps`), but the init checkpoint's "
                f"config.json has no {field} field.",
                "Set `student_num_steps` to 'teacher' for this policy.",
            )
        config[field] = int(num_steps)
    return config


def clean_leftovers(out: str | Path) -> list[Path]:
    """Remove ``.tmp-*``/``.old-*`` entries under ``OUT/checkpoints`` (an interrupted save); returns them."""
    root = checkpoints_dir(out)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
    return removed


def save_checkpoint(
    out: str | Path,
    step: int,
    total_steps: int,
    policy,
    preprocessor,
    postprocessor,
    config_json: dict[str, Any],
    optimizer,
    scheduler,
    state: dict[str, Any],
    batch_size: int | None = None,
    master_params: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``OUT/checkpoints/<step>`` atomically and repoint ``last`` at it; returns its path.

    ``config_json`` is written as ``pretrained_model/config.json`` (see ``student_config_json``);
    weights through lerobot's ``policy.save_pretrained``, processors through their own
    ``save_pretrained``, and the training state through lerobot's ``save_training_state`` plus
    ``state`` as ``training_state/reflow_state.json`` and, when not empty, ``master_params`` (name ->
    float32 tensor, ``MasterWeights.state_dict()``) as ``training_state/master_params.safetensors``.
    ``extra_files``: name -> text written into ``pretrained_model/`` too (a tiny test teacher's size marker,
    ``LoadedPolicy.extra_files``, so the student loads as the teacher does)."""
    from lerobot.common.train_utils import get_step_identifier  # heavy: imported when used

    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = get_step_identifier(step, total_steps)
    final = root / name
    tmp = root / (TMP_PREFIX + name)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_checkpoint(
            tmp,
            step,
            policy,
            preprocessor,
            postprocessor,
            config_json,
            optimizer,
            scheduler,
            state,
            batch_size,
            master_params,
            extra_files,
        )
        fsync_tree(tmp)
    except BaseException as err:  # a full disk, Ctrl-C: drop the half-written copy; `last` was not touched
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(err):
            raise OSError(f"{type(err).__name__}: {err}") from err
        raise
    old = root / (OLD_PREFIX + name)
    if final.exists():  # the same step saved by an earlier, resumed-from-before-it run
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    if old.exists():
        shutil.rmtree(old)
    point_last(out, final)
    return final


WRITE_FAILURE_MARKERS = ("I/O error", "os error", "No space left", "unexpected pos", "failed writing")
"""How a failed write reads in the errors that are not ``OSError``: safetensors' ``SafetensorError`` ("I/O error: No
space left on device (os error 28)") and ``torch.save``'s ``RuntimeError`` ("[enforce fail at inline_container.cc]
. unexpected pos ...", "PytorchStreamWriter failed writing file ...") on a full disk."""


def _is_write_failure(err: BaseException) -> bool:
    """Whether ``err``, not an ``OSError``, is a failed write (a full disk) that safetensors or torch.save reported in
    its own type: the caller words it as the OSError it is (which checkpoint, ``last`` kept, free space and resume).
    Any other error (a bug) propagates as it is."""
    if isinstance(err, OSError) or not isinstance(err, Exception):
        return False
    if not (isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError"):
        return False
    return any(marker in str(err) for marker in WRITE_FAILURE_MARKERS)


def _write_checkpoint(
    tmp: Path,
    step: int,
    policy,
    preprocessor,
    postprocessor,
    config_json: dict[str, Any],
    optimizer,
    scheduler,
    state: dict[str, Any],
    batch_size: int | None,
    master_params: dict[str, Any] | None,
    extra_files: dict[str, str] | None,
) -> None:
    """Every file of checkpoint ``step`` into ``tmp`` (``save_checkpoint`` documents them)."""
    from lerobot.common.train_utils import save_training_state  # heavy: imported when used
    from safetensors.torch import save_file  # heavy: imported when used

    model_dir = pretrained_dir(tmp)
    model_dir.mkdir(parents=True)
    _test_gate(step)
    policy.save_pretrained(model_dir)
    with open(model_dir / "config.json", "w") as handle:
        json.dump(config_json, handle, indent=4)
    preprocessor.save_pretrained(model_dir)
    postprocessor.save_pretrained(model_dir)
    for filename, text in (extra_files or {}).items():
        (model_dir / filename).write_text(text)
    save_training_state(tmp, step, optimizer, scheduler, batch_size=batch_size)
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": int(step), **state}
    (training_state_dir(tmp) / STATE_FILE).write_text(json.dumps(state, indent=2))
    if master_params:
        save_file(
            {k: v.contiguous() for k, v in master_params.items()}, str(training_state_dir(tmp) / MASTER_FILE)
        )


TEST_SAVE_GATE_WAIT_S = 120.0


def _test_gate(step: int) -> None:
    """The ``TEST_SAVE_GATE`` hook (nothing when the variable is unset): announce the save of ``step`` and wait for the
    test's go, at most ``TEST_SAVE_GATE_WAIT_S`` (a test that died never leaves a run hanging)."""
    gate = os.environ.get(TEST_SAVE_GATE)
    if not gate:
        return
    (Path(gate) / f"inside-{step}").touch()
    go = Path(gate) / f"go-{step}"
    deadline = time.monotonic() + TEST_SAVE_GATE_WAIT_S
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def point_last(out: str | Path, checkpoint: Path) -> None:
    """Atomically make ``OUT/checkpoints/last`` a relative symlink to ``checkpoint``."""
    link = last_link(out)
    tmp_link = link.with_name(TMP_PREFIX + link.name)
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(checkpoint.name)
    os.replace(tmp_link, link)
    fsync_dir(link.parent)


def read_json_object(path: Path, hint: str) -> dict[str, Any]:
    """The JSON object in ``path``. A file that cannot be read, is not UTF-8, is not JSON or holds something other
    than an object raises ``ReflowPairsError`` naming it (and ``FileNotFoundError`` stays itself, for the caller)."""
    try:
        return load_json_object(path)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise ReflowPairsError(f"Cannot read {path} ({err.strerror or err}).", hint) from err
    except NotAJSONObjectError as err:
        raise ReflowPairsError(f"{path} {err.problem}.", hint) from err.__cause__


def read_state(checkpoint: Path) -> dict[str, Any]:
    """``training_state/reflow_state.json`` of a checkpoint, checked; errors name the file."""
    path = training_state_dir(checkpoint) / STATE_FILE
    try:
        state = read_json_object(
            path,
            "The checkpoint is damaged: resume from an earlier one (repoint checkpoints/last "
            "at it) or start a new run in another `out`.",
        )
    except FileNotFoundError:
        raise ReflowPairsError(
            f"{checkpoint} has no {path.relative_to(checkpoint)}: it was not written by `reflowpairs train`.",
            "Resume only runs that `reflowpairs train` started, or start a new run in another `out`.",
        ) from None
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ReflowPairsError(f"{path} is not a version {STATE_VERSION} {STATE_FORMAT} state file.")
    return state


def load_training_state(checkpoint: Path, optimizer, scheduler) -> int:
    """Restore optimizer, scheduler and RNG state with lerobot's ``load_training_state``; returns the step."""
    from lerobot.common.train_utils import load_training_state as lerobot_load  # heavy: imported when used

    try:
        step, _, _ = lerobot_load(checkpoint, optimizer, scheduler)
    except Exception as err:  # noqa: BLE001 - safetensors/json/torch raise many kinds
        raise ReflowPairsError(
            f"Cannot restore the training state in {training_state_dir(checkpoint)} ({type(err).__name__}: {err}).",
            "The checkpoint is damaged or was written with other settings; start a new run in another `out`.",
        ) from err
    return int(step)


def load_master_params(checkpoint: Path) -> dict[str, Any] | None:
    """``training_state/master_params.safetensors`` (name -> float32 tensor), or None when the checkpoint has none
    (a run without low-precision trainable parameters, or one saved before master copies existed)."""
    from safetensors.torch import load_file  # heavy: imported when used

    path = training_state_dir(checkpoint) / MASTER_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several kinds
        raise ReflowPairsError(
            f"Cannot read {path} ({type(err).__name__}: {err}).",
            "The checkpoint is damaged; resume from an earlier one or start a new run in another `out`.",
        ) from err
