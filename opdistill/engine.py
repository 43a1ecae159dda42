"""The shared training loop every method uses: accelerate, AdamW, warm-up + decay, clipping, token-mean
losses under gradient accumulation, metrics and progress; checkpoints (checkpoints.py) with exact resume.

A method (methods/common.py, `Method`) supplies how many steps and one `step` function; its other hooks
(setup, on_resume, evaluate, save_outputs) do nothing unless it overrides them.
Token losses are summed per micro-batch and divided by the number of loss tokens in the whole global
batch (all micro-batches, all processes), so accumulation never changes the loss (averaging per micro-batch instead, a known
gradient-accumulation bug, weights the tokens of short micro-batches more).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import yaml
from tqdm import tqdm

from .config import OnPolicyConfig, RunConfig, to_dict
from .checkpoints import checkpoint_dirs, checkpoint_name, load_latest_checkpoint, save_checkpoint
from .errors import OpdistillError
from .interrupts import sigterm_as_interrupt
from .models import compute_dtype, default_device, resolve_precision, save_pretrained_atomic



class Method(Protocol):
    """What the engine calls on a training method, whatever the method (methods/common.py's base class gives every hook a
    do-nothing default). The engine names no method of its own: this protocol is its side of the contract."""

    progress_metrics: tuple[str, ...]  # the metrics shown beside the progress bar

    def setup(self, engine: "Engine") -> None:
        """Before a resume restores state: load what the step needs besides the student, and register extra trained
        parts (engine.add_trainable), so the resume restores them too."""

    def on_resume(self, engine: "Engine") -> None:
        """After a resume: restore method state that lives outside the engine checkpoint (e.g. a reference model)."""

    def step(self, engine: "Engine", step: int) -> dict[str, float]:
        """One optimizer step: sample, score every frozen model once, a loss per micro-batch through
        engine.backward_token_mean, engine.optimizer_step(); returns the step's metrics."""

    def evaluate(self, engine: "Engine") -> dict[str, float]:
        """Held-out metrics, at the start, every eval_every steps and at the end."""

    def save_outputs(self, engine: "Engine") -> dict[str, str]:
        """Once at the end: write what the method keeps besides the student into engine.out_dir; returns name -> path."""

MAX_BAD_STEPS = 5  # consecutive non-finite losses before the run stops


class NonFiniteLoss(Exception):
    pass


@dataclass(frozen=True)
class TokenMean:
    """What a token-mean backward did: the mean loss per loss token and the loss tokens of the global batch."""

    loss: float
    tokens: float


@dataclass
class Trainable:
    """An extra trained module with its own optimizer (e.g. GAD's discriminator); part of every checkpoint."""

    model: Any
    optimizer: Any
    max_grad_norm: float


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr: linear warm-up from 0, then constant, linear or cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def adamw(model: Any, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused (one kernel over all tensors) where torch has it for their
    device: measured on the 2-core CPU for SmolLM2-135M, 0.08 s per step instead of 0.62 s for the
    per-tensor loop. Same update rule; zero gradients still leave a weight bitwise unchanged (train_mask)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)
    return torch.optim.AdamW(trainable, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


class Engine:
    """Holds the accelerator, the student, its optimizer and schedule, and the run directory."""

    def __init__(self, config: RunConfig, model: Any, tokenizer: Any, total_steps: int) -> None:
        from accelerate import Accelerator

        self.config = config
        self.tokenizer = tokenizer
        self.total_steps = total_steps
        self.out_dir = Path(config.out_dir)
        # cpu=True on a machine without CUDA: accelerate then treats a torchrun / accelerate launch of several
        # processes as one gloo job instead of several independent single-process runs.
        self.precision = resolve_precision(config.precision)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched == 1:
            # accelerate keeps one global state per process and refuses a second Accelerator with another mixed
            # precision; a single process owns it, so a second run in the same Python (the API, a demo after
            # an fp32 run) starts it afresh. Multi-process runs keep the launcher's state.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
        self.accelerator = Accelerator(mixed_precision="bf16" if self.precision == "bf16" else "no", cpu=default_device().type == "cpu",
                                       log_with=list(config.report_to) or None, project_dir=str(self.out_dir / "trackers"))
        if launched != self.accelerator.num_processes:
            raise OpdistillError(f"launched as {launched} processes but accelerate sees {self.accelerator.num_processes}",
                                 "start with `accelerate launch` or `torchrun`, whose environment accelerate reads")
        optimizer = adamw(model, config.lr, (config.adam_beta1, config.adam_beta2), config.weight_decay)
        warmup = int(config.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.lr_schedule, warmup, total_steps))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # The scheduler is stepped by us once per optimizer step (not prepared: accelerate would step it
        # once per process), but it is part of the checkpoint.
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.step = 0
        self._bad_steps = 0
        self._sampler: Any = None
        # Called with the step of each checkpoint once it is complete on disk: what only a resume from an older step
        # could need may then go (OPD compacts its remote teacher's cache).
        self.checkpoint_hooks: list[Callable[[int], None]] = []

    # ------------------------------------------------------------ rollouts and frozen models

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype of models that never train (teachers, GAD's reference): bf16 under bf16 precision."""
        return compute_dtype(self.config.precision)

    @property
    def sampler(self) -> Any:
        """The run's sampler (rollout_engine, precision), built on first use: methods that never sample
        (SeqKD) never pay for a sampling copy of the weights."""
        if self._sampler is None:
            self._sampler = self.build_sampler(self.accelerator.unwrap_model(self.model), self.config.student)
        return self._sampler

    def build_sampler(self, model: Any, model_path: str) -> Any:
        """A sampler for `model` (loaded from `model_path`) with the run's rollout settings: the student's, or another
        trained model's (cod's second peer)."""
        from .rollout import make_sampler

        c = self.config
        return make_sampler(c.rollout_engine, model, self.tokenizer, precision=c.precision, batch_size=c.rollout_batch_size,
                            model_path=model_path, gpu_memory_utilization=c.vllm_gpu_memory_utilization, seed=c.seed,
                            kv_cache_gib=c.vllm_kv_cache_gib, max_model_len=c.max_prompt_tokens + c.max_response_tokens)

    def sync_sampler(self) -> None:
        """After the student's weights change (an optimizer step, a resume): the sampler samples them."""
        if self._sampler is not None:
            self._sampler.sync(self.accelerator.unwrap_model(self.model))

    # ------------------------------------------------------------ distributed facts

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def global_sum(self, value: float) -> float:
        """Sum a number over all processes."""
        if self.world_size == 1:
            return float(value)
        tensor = torch.tensor([float(value)], device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum").item())

    # ------------------------------------------------------------ the update

    def backward_token_mean(self, micro_batches: list[dict[str, torch.Tensor]],
                            loss_sum: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
                            tokens: Callable[[dict[str, torch.Tensor]], int], model: Any = None,
                            score: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                            empty_ok: bool = False) -> TokenMean:
        """Backward of (sum of token losses) / (loss tokens in the global batch); returns that mean loss and the count.

        `loss_sum(model, micro_batch)` returns the summed token loss of one micro-batch and `tokens` its
        number of loss tokens. DDP averages gradients over processes, so each process scales by world size.
        `model` is the student unless given (another trained part, e.g. cod's second peer). `score(micro_batch)`, when
        given, returns what frozen models give that micro-batch (a full-vocabulary teacher's logits: kept for one
        micro-batch at a time, tokens x vocab being too large for a step), added to it without gradient before its
        loss; every other frozen signal is already in the batches. Either way the loss reads only its batch. A global
        batch without loss tokens is an error unless `empty_ok` (then nothing is computed: TokenMean(0.0, 0)).
        """
        model = self.model if model is None else model
        global_tokens = self.global_sum(sum(tokens(mb) for mb in micro_batches))
        if global_tokens == 0 and empty_ok:
            return TokenMean(0.0, 0.0)
        if global_tokens == 0:
            raise OpdistillError("a global batch has no loss tokens", "check that the records have non-empty responses")
        scale = self.world_size / global_tokens
        total = 0.0
        for index, micro_batch in enumerate(micro_batches):
            batch = {k: v.to(self.accelerator.device) for k, v in micro_batch.items()}
            if score is not None:
                with torch.no_grad():
                    batch.update({k: v.to(self.accelerator.device) for k, v in score(batch).items()})
            with self.accumulating(model, last=index == len(micro_batches) - 1):
                with self.accelerator.autocast():
                    summed = loss_sum(model, batch)
                if not torch.isfinite(summed):
                    model.zero_grad(set_to_none=True)
                    raise NonFiniteLoss(f"loss is {summed.item()}")
                self.accelerator.backward(summed * scale)
            total += summed.detach().item()
        return TokenMean(self.global_sum(total) / global_tokens, global_tokens)

    def optimizer_step(self, final: bool = True) -> dict[str, float]:
        """Clip, step the optimizer, zero the gradients; returns grad_norm and lr. `final` (the last optimizer step
        of a training step; GAD's ppo_epochs make several) also steps the schedule and syncs the sampler."""
        grad_norm = self._clip(self.model, self.config.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if final:
            self.scheduler.step()
            self.sync_sampler()
        return {"grad_norm": grad_norm, "lr": lr}

    def _clip(self, model: Any, max_norm: float) -> float:
        if max_norm <= 0:
            return float("nan")
        return float(self.accelerator.clip_grad_norm_(model.parameters(), max_norm))

    def add_trainable(self, model: Any, lr: float, max_grad_norm: float, weight_decay: float = 0.0) -> Trainable:
        """Prepare another trained module with its own AdamW (constant lr); checkpointed with the student."""
        optimizer = adamw(model, lr, (self.config.adam_beta1, self.config.adam_beta2), weight_decay)
        prepared, optimizer = self.accelerator.prepare(model, optimizer)
        return Trainable(prepared, optimizer, max_grad_norm)

    def trainable_step(self, part: Trainable) -> float:
        """Clip and step an extra trainable; returns its gradient norm."""
        grad_norm = self._clip(part.model, part.max_grad_norm)
        part.optimizer.step()
        part.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def accumulating(self, model: Any, last: bool) -> contextlib.AbstractContextManager:
        """Wrap the forward and backward of a micro-batch: all but the last skip the DDP gradient sync."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Atomic checkpoint of model, optimizer, schedule, RNG and data position (= step); then the checkpoint hooks."""
        path = save_checkpoint(self.accelerator, self.out_dir, self.step, self.total_steps, self.config.method, self.config.keep_checkpoints)
        for hook in self.checkpoint_hooks:
            hook(self.step)
        return path

    def resume_if_possible(self) -> bool:
        step = load_latest_checkpoint(self.accelerator, self.out_dir, self.config.method) if self.config.resume else None
        if step is None:
            return False
        self.step = step
        self.sync_sampler()
        return True

    def save_outputs(self, method: Method) -> dict[str, str]:
        """The trained student (merged and/or adapter-only for LoRA, per lora_save) and whatever else the method
        keeps (GAD: its discriminator). Main process only."""
        student = self.accelerator.unwrap_model(self.model)
        lora = hasattr(student, "merge_and_unload")
        saved = {}
        if lora and self.config.lora_save in ("adapter", "both"):  # first: the merge below removes the adapters
            where = "student" if self.config.lora_save == "adapter" else "student-adapter"
            saved[where] = str(save_pretrained_atomic(student, self.tokenizer, self.out_dir / where, merge=False))
        if not lora or self.config.lora_save in ("merged", "both"):
            # Training is over, so the adapters merge into the student itself rather than into a copy of it.
            saved["student"] = str(save_pretrained_atomic(student, self.tokenizer, self.out_dir / "student", in_place=True))
        saved.update(method.save_outputs(self))
        return saved

    # ------------------------------------------------------------ logging

    def _metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def _trim_metrics(self) -> None:
        """After a resume, drop metric lines written after the checkpoint so no step appears twice."""
        path = self._metrics_path()
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= self.step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def log(self, metrics: dict[str, Any]) -> None:
        """One metrics.jsonl line; the same numbers go to the report_to trackers (eval values as eval/NAME)."""
        if self.config.report_to:
            self.accelerator.log(tracker_values(metrics), step=self.step)
        if not self.is_main:
            return
        with open(self._metrics_path(), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": self.step, **metrics}) + "\n")

    # ------------------------------------------------------------ the loop

    def _train_step(self, method: Method, bar: Any) -> None:
        """One step of the method; then eval, log, progress and checkpoint as configured. A non-finite loss
        skips the step (the method zeroed its gradients), and MAX_BAD_STEPS of them in a row stop the run."""
        started = time.perf_counter()
        try:
            metrics = method.step(self, self.step)
        except NonFiniteLoss as err:
            self._bad_steps += 1
            print(f"train: step {self.step}: {err}; skipping the step ({self._bad_steps} in a row)", file=sys.stderr)
            if self._bad_steps >= MAX_BAD_STEPS:
                raise OpdistillError(f"{MAX_BAD_STEPS} non-finite losses in a row", "lower lr, use precision: fp32, or check the data") from None
            self.step += 1
            return
        self._bad_steps = 0
        self.step += 1
        metrics["step_seconds"] = time.perf_counter() - started
        if self.config.eval_every and self.step % self.config.eval_every == 0 and self.step < self.total_steps:
            metrics["eval"] = method.evaluate(self)
        if self.step % self.config.log_every == 0 or self.step == self.total_steps:
            self.log(metrics)
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.4f}" for k in method.progress_metrics if k in metrics}, refresh=False)
        if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
            self.save_checkpoint()

    def fit(self, method: Method) -> dict[str, Any]:
        """Run (or resume) to total_steps; returns the summary written to out_dir/summary.json. A LoRA student leaves
        merged (its adapters folded into its weights, to be saved without a copy); out_dir's last checkpoint keeps them."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
        if self.config.report_to:
            self.accelerator.init_trackers(self.out_dir.name or "opdistill", config=tracker_values(to_dict(self.config)))
        method.setup(self)
        if isinstance(self.config, OnPolicyConfig):
            # An on-policy method's sampler exists before a resume restores the weights, so the resume's re-sync is what
            # brings its copy (bf16, or vLLM's) up to the restored student (tests/test_opd_resume.py at bf16).
            _ = self.sampler
        if self.is_main and self.world_size > 1:
            print(f"train: {self.world_size} processes ({self.accelerator.distributed_type.value})", file=sys.stderr)
        resumed = self.resume_if_possible()
        if resumed:
            self._trim_metrics()
            method.on_resume(self)
            if self.is_main:
                print(f"train: resumed from step {self.step} ({self.world_size} process(es))", file=sys.stderr)
        first_eval: dict[str, float] = {}
        if not resumed:
            first_eval = method.evaluate(self)
            if first_eval:
                self.log({"eval": first_eval})
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.config.method}", unit="step",
                   disable=not self.is_main, dynamic_ncols=True, file=sys.stderr)
        interrupted = False
        try:
            with sigterm_as_interrupt():  # a scheduler's stop saves a checkpoint, like Ctrl-C
                while self.step < self.total_steps:
                    self._train_step(method, bar)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
        if interrupted:
            path = self.save_checkpoint()
            raise KeyboardInterrupt(f"interrupted at step {self.step}; checkpoint {path}; rerun the same command to resume")
        saved = checkpoint_dirs(self.out_dir)
        if not saved or saved[-1].name != checkpoint_name(self.step):
            self.save_checkpoint()
        final_eval = method.evaluate(self)
        if final_eval:
            self.log({"eval": final_eval})
        summary = {"steps": self.step, "final_eval": final_eval}
        if first_eval:
            summary["initial_eval"] = first_eval
        if self.is_main:
            summary.update(self.save_outputs(method))
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.config.report_to:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()
        return summary


def tracker_values(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat name -> number or text for the trackers: nested dicts as PREFIX/NAME, lists as text, None dropped."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(tracker_values(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(map(str, value))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
    return flat
