"""Training checkpoints: atomic writes, the latest complete one, exact resume.

A checkpoint is `out_dir/checkpoints/step-NNNNNN/`: accelerate's state (model, optimizer, schedule, RNG) plus
`trainer_state.json`, written last. It is written to a temp directory, fsynced and renamed into place, so a
crash leaves either the old checkpoints or the new one; one without the state file is incomplete and ignored.
The data position is the step number alone (data.StepOrder), so nothing else needs saving.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from .errors import CheckpointError
from .fileio import fsync_tree

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete and ignored


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(accelerator: Any, out_dir: Path, step: int, total_steps: int, method: str, keep: int) -> Path:
    """Write the checkpoint of `step` atomically and keep the newest `keep` (all processes call it)."""
    root = out_dir / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if main:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "total_steps": total_steps, "method": method, "time": time.time()}))
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in checkpoint_dirs(out_dir)[:-keep]:
                # Renamed first (atomic), so a kill mid-delete never leaves a half-deleted step-N that looks complete.
                trash = old.with_name(f".del-{old.name}")
                os.replace(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
            for stray in root.glob(".del-*"):  # left by a kill during an earlier delete
                shutil.rmtree(stray, ignore_errors=True)
    except (OSError, RuntimeError, SafetensorError) as err:
        # torch.save reports a full disk as a RuntimeError from its zip writer, safetensors as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"writing checkpoint {final} failed ({reason}); is the disk full?",
                              "free disk space and rerun: the previous checkpoint is intact and the run resumes from it") from None
    accelerator.wait_for_everyone()
    return final


def load_latest_checkpoint(accelerator: Any, out_dir: Path, method: str) -> int | None:
    """Restore the newest complete checkpoint into the accelerator's objects; its step, or None when there is none."""
    found = checkpoint_dirs(out_dir)
    if not found:
        return None
    latest = found[-1]
    state = json.loads((latest / STATE_FILE).read_text())
    if state.get("method") != method:
        raise CheckpointError(f"{latest} was written by method {state.get('method')!r}, not {method!r}", "use another out_dir, or resume=false")
    try:
        accelerator.load_state(str(latest))
    except (RuntimeError, KeyError, ValueError, OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot resume from {latest}: {str(err).splitlines()[0]}",
                              "the checkpoint does not match this model/config; use another out_dir or resume=false") from None
    return int(state["step"])
