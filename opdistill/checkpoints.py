"""Training checkpoints: atomic writes, the latest complete one, exact resume.

A checkpoint is `out_dir/checkpoints/step-NNNNNN/`: accelerate's state (model, optimizer, schedule, RNG) plus
`trainer_state.json`, written last. Of a model it holds what training changes: frozen parameters (a LoRA model's
base weights) are rebuilt from the model's source at resume, so they are not written (for a 1.5B LoRA student that
is 6 GB of disk per checkpoint, and the same again in memory while safetensors serialises it). It is written to a
temp directory, fsynced and renamed into place, so a crash leaves either the old checkpoints or the new one; one
without the state file is incomplete and ignored.
The data position is the step number alone (data.StepOrder), so nothing else needs saving.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from accelerate.utils import DistributedType
from safetensors import SafetensorError, safe_open

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


def frozen_parameters(model: Any) -> dict[str, Any]:
    """The parameters training never changes, by state-dict key (tied weights under every name they have)."""
    return {name: param for name, param in model.named_parameters(remove_duplicate=False) if not param.requires_grad}


def frozen_fingerprint(model: Any, stride: int = 4099) -> str:
    """A digest of the frozen parameters' names, shapes and every stride-th value (exact bytes, fp32): a checkpoint
    leaves them out, so a resume must rebuild the very same ones from the model's source. Cheap (a 1.5B model reads
    ~0.4M values) and independent of the device the model is on."""
    digest = hashlib.sha256()
    for name, param in sorted(frozen_parameters(model).items(), key=lambda item: item[0]):
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(param.detach().reshape(-1)[::stride].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_state_file(directory: Path, index: int) -> Path:
    """Where accelerate writes the state of its index-th prepared model."""
    return directory / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")


def check_model_states(models: list[Any], directory: Path, fingerprints: list[str] | None) -> None:
    """Each saved model state must hold every trained parameter of its model and nothing the model lacks; frozen
    parameters may be absent, and then they must be the ones the checkpoint was trained with (`fingerprints`, from its
    state file; None for a checkpoint written before they were kept). Loading is then non-strict safely."""
    for index, model in enumerate(models):
        path = model_state_file(directory, index)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing", "the checkpoint is incomplete; delete it to resume from the one before, or resume=false")
        with safe_open(str(path), framework="pt") as saved:
            keys = set(saved.keys())
        state, frozen = model.state_dict(), frozen_parameters(model).keys()
        aliases: dict[tuple[int, tuple[int, ...]], set[str]] = {}  # tied weights are written once, under one of their names
        for name, tensor in state.items():
            aliases.setdefault((tensor.data_ptr(), tuple(tensor.shape)), set()).add(name)
        missing = sorted(name for names in aliases.values() if not names & keys for name in names - frozen)
        unknown = sorted(keys - set(state))
        if missing or unknown:
            detail = f"missing {missing[:3]}" if missing else f"holds parameters the model lacks: {unknown[:3]}"
            raise CheckpointError(f"cannot resume from {directory}: {path.name} {detail}",
                                  "the checkpoint was written for another model or LoRA setting; use another out_dir or resume=false")
        if fingerprints is not None and index < len(fingerprints) and frozen_fingerprint(model) != fingerprints[index]:
            raise CheckpointError(f"cannot resume from {directory}: the frozen weights (e.g. a LoRA model's base) differ from those it "
                                  "was trained on, and the checkpoint holds only what trained",
                                  "resume with the same `student` (the same files or revision), or start over with resume=false")


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
        fingerprints: list[str] = []

        def save_without_frozen(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
            """accelerate's save-state hook: each model's state loses its frozen parameters, and their digest is kept."""
            for model, state in zip(models, weights):
                fingerprints.append(frozen_fingerprint(model))
                for name in frozen_parameters(model):
                    state.pop(name, None)

        hook = accelerator.register_save_state_pre_hook(save_without_frozen)
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)
        finally:
            hook.remove()
        if main:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "total_steps": total_steps, "method": method, "time": time.time(),
                                                      "frozen": fingerprints}))
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
    hook = accelerator.register_load_state_pre_hook(lambda models, directory: check_model_states(models, Path(directory), state.get("frozen")))
    # Frozen parameters are not in the file (check_model_states); DeepSpeed loads its own way and takes no `strict`.
    strict = {} if accelerator.distributed_type == DistributedType.DEEPSPEED else {"strict": False}
    try:
        accelerator.load_state(str(latest), **strict)
    except (RuntimeError, KeyError, ValueError, OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot resume from {latest}: {str(err).splitlines()[0]}",
                              "the checkpoint does not match this model/config; use another out_dir or resume=false") from None
    finally:
        hook.remove()
    return int(state["step"])
