"""SPD: Self-Policy Distillation (Hao et al., "Self-Policy Distillation via Capability-Selective Subspace Projection",
arXiv 2605.22675). No teacher and no external signal: the student improves on its own generations.

1. Subspace: the student answers `subspace_prompts` prompts; on each answer, the correctness-defining tokens (the
   final answer after a marker such as GSM8K's `####`) give a loss L = their summed NLL; per layer and per K/V
   projection, the top-`rank` right singular vectors of the matrix of gradients ∂L/∂h_t (h_t that projection's output at
   position t, every position) span the capability subspace (objectives/subspace.py).
2. Generation: while the student samples its training responses, each chosen K/V projection output h becomes
   h + β (P h − h), P the projection onto that subspace (rollout/projection.py; β = `projection_strength`).
3. Update: plain next-token cross-entropy on the raw sampled responses, the prompt masked, token-mean over the global
   batch (the same loss as SeqKD, on the student's own projected samples).

With `project: false` (or β = 0) no subspace is extracted and no hook is installed: plain self-distillation on the
unprojected samples, the baseline the paper compares against. docs/spd.md lists what the paper leaves open and what
was chosen here.

The subspace of every extraction is written to out_dir/spd_subspace/step-NNNNNN.safetensors before the step that uses
it trains, so a resume reloads the one in force (extraction itself is deterministic: seeded samples, fixed prompts).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..checkpoints import checkpoint_dirs
from ..config import OnPolicyConfig, check_choice, opt
from ..data import Example, collated, data_order, load_records, prompt_ids, total_steps_for
from ..engine import Engine
from ..errors import CheckpointError, ConfigError, DataError
from ..objectives.subspace import gradient_gram, top_subspace
from ..rollout import SamplingParams, eos_token_ids, sample_rollouts
from ..rollout.projection import captured_kv, kv_modules, projected_kv, sampling_model
from ..seeds import mix_seed
from .common import Method, response_nll_sum, response_tokens

SUBSPACE_SALT = 0x5BD  # the extraction samples' seeds differ from every training step's
SUBSPACE_DIR = "spd_subspace"
LAYERS = re.compile(r"^\d+(-\d+)?$")
NAMED_LAYERS = ("middle", "last")  # the middle and the last of the layers that have K/V projections


@dataclass
class SPDConfig(OnPolicyConfig):
    """Self-Policy Distillation (arXiv 2605.22675): project the student's keys/values into a capability subspace from its
    own answer-token gradients while it samples, then fine-tune it on those raw samples with next-token cross-entropy.
    docs/spd.md says which choices follow the paper (the full projection on the middle and last layers) and which are
    this implementation's (the rank, the marker tokens, extraction from the student's own answers)."""

    method: str = opt("spd", "Training method.")
    lr: float = opt(1e-5, "Student learning rate.")
    project: bool = opt(True, "Project K/V during sampling. false: plain self-distillation on unprojected samples (the baseline).")
    projection_strength: float = opt(1.0, "β in h ← h + β (P h − h), in [0, 1]: 1 replaces each key/value by its projection "
                                          "onto the subspace (the paper's 'projects into'), 0 leaves it unchanged.")
    rank: int = opt(32, "Dimensions r of the subspace per layer and per K/V projection (at most kv_heads × head_dim).")
    layers: str = opt("middle,last", "Layers whose K/V are projected: all, or indices, ranges and the names middle (layer ⌊L/2⌋) "
                                     "and last (layer L−1), e.g. middle,last (the paper's, as described), 0-11 or 4,8,12-15.")
    kv: str = opt("kv", "Which projections: kv (keys and values, the paper's), k (keys only) or v (values only).")
    subspace_prompts: int = opt(64, "Training prompts (a fixed, seeded choice) the student answers to extract the subspace.")
    subspace_refresh_every: int = opt(0, "Re-extract the subspace from the current weights every N steps (0: once, before the "
                                         "first step).")
    answer_markers: list[str] = opt(["####", "The answer is"], "Text that introduces the final answer; the tokens after its last "
                                                              "occurrence are the correctness-defining tokens (GSM8K: `#### 18`).")
    answer_max_tokens: int = opt(16, "At most this many tokens after the marker (the end of the response excluded: EOS).")
    answer_tail_tokens: int = opt(0, "A response without a marker contributes its last N tokens instead (0: it contributes nothing).")
    truncated_rollouts: str = opt("mask", "Samples cut at max_response_tokens (no EOS): mask (no loss on them; a step whose samples "
                                           "were all cut makes no update) or keep (train on them as they are, which teaches the "
                                           "student not to stop: docs/spd.md measured an EOS rate of 0.00 after it).")

    def validate(self) -> None:
        super().validate()
        check_choice("kv", self.kv, ("kv", "k", "v"))
        check_choice("truncated_rollouts", self.truncated_rollouts, ("mask", "keep"))
        parse_layers(self.layers)
        if not 0.0 <= self.projection_strength <= 1.0:
            raise ConfigError(f"config field `projection_strength` must be in [0, 1], got {self.projection_strength}",
                              "1 projects each key/value onto the subspace, 0 leaves it unchanged (plain self-distillation)")
        for name in ("rank", "subspace_prompts", "answer_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field `{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("subspace_refresh_every", "answer_tail_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field `{name}` must be >= 0, got {getattr(self, name)}")
        if not any(marker.strip() for marker in self.answer_markers) and not self.answer_tail_tokens:
            raise ConfigError("config field `answer_markers` is empty and answer_tail_tokens is 0: no token would define correctness",
                              "set answer_markers (e.g. ['####']) or answer_tail_tokens > 0")
        if self.projects() and self.rollout_engine != "hf":
            raise ConfigError(f"config field `rollout_engine` is {self.rollout_engine!r}, but SPD projects keys/values with PyTorch "
                              "hooks that only the in-process sampler runs", "set rollout_engine: hf (or project: false)")
        self.require_whole_micro_batches()

    def projects(self) -> bool:
        """Whether sampling is projected (false: plain self-distillation, no subspace at all)."""
        return self.project and self.projection_strength > 0.0

    def needs_responses(self) -> bool:
        """SPD learns from prompts alone: the responses are the student's own."""
        return False


def parse_layers(spec: str, available: list[int] | None = None) -> list[int] | None:
    """`all` -> None; `0-3,8` -> [0, 1, 2, 3, 8]; `middle,last` -> the middle and the last of the `available` layers (those
    with K/V projections). Without `available`, as when a config is validated before any model is loaded, the names are
    only checked."""
    if spec.strip() == "all":
        return None
    chosen: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if part in NAMED_LAYERS:
            if available:
                chosen.add(available[len(available) // 2] if part == "middle" else available[-1])
            continue
        if not LAYERS.match(part):
            raise ConfigError(f"config field `layers`: {part!r} is not a layer index, range or name",
                              "write all, middle,last, or e.g. 0-11 or 4,8,12-15")
        first, _, last = part.partition("-")
        if int(last or first) < int(first):
            raise ConfigError(f"config field `layers`: range {part!r} runs backwards", f"write {last}-{first}")
        chosen.update(range(int(first), int(last or first) + 1))
    return sorted(chosen)


def answer_span(tokenizer: Any, response: list[int], eos: set[int], markers: list[str], max_tokens: int, tail: int) -> tuple[int, int] | None:
    """[start, end) of the correctness-defining tokens of a response: those after the last answer marker (at most
    max_tokens), else the last `tail` tokens; None when there are none. A final EOS is never one of them."""
    body = response[:-1] if response and response[-1] in eos else response
    text = tokenizer.decode(body, skip_special_tokens=True)
    found = [text.rfind(m) + len(m) for m in markers if m.strip() and m in text]
    if found:
        answer_from = max(found)
        low, high = 0, len(body)  # the shortest prefix whose text reaches past the marker: its tokens are before the answer
        while low < high:
            middle = (low + high) // 2
            if len(tokenizer.decode(body[:middle], skip_special_tokens=True)) >= answer_from:
                high = middle
            else:
                low = middle + 1
        return (low, min(len(body), low + max_tokens)) if low < len(body) else None
    return (len(body) - tail, len(body)) if tail and body else None


def subspace_path(out_dir: Path, step: int) -> Path:
    return out_dir / SUBSPACE_DIR / f"step-{step:06d}.safetensors"


def save_subspace(path: Path, bases: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomically (temp file, fsync, rename): a kill mid-write leaves no half file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({name: basis.contiguous().cpu() for name, basis in bases.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


class SPD(Method):
    progress_metrics = ("loss", "response_length")

    def __init__(self, config: SPDConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        records = load_records(config.data)
        fitted = [prompt_ids(tokenizer, r.messages, config.max_prompt_tokens, config.overlong) for r in records]
        self.prompts = [p for p in fitted if p is not None]
        print(f"train: data {config.data}: {len(records)} prompts, {len(records) - len(self.prompts)} skipped as over-long")
        self.order = data_order(config, len(self.prompts))
        self.total_steps = total_steps_for(config, self.order.steps_per_epoch)
        generator = torch.Generator().manual_seed(mix_seed(config.seed, SUBSPACE_SALT))
        self.subspace_indices = torch.randperm(len(self.prompts), generator=generator)[: config.subspace_prompts].tolist()
        self.names: list[str] = []  # the projected K/V modules, '<layer>.<k|v>'
        self.bases: dict[str, torch.Tensor] = {}
        self.bases_step = -1  # the step whose extraction `bases` holds
        self.energy = 0.0
        self.eos: set[int] = set()
        self.load_eval_examples(config, tokenizer)

    # ------------------------------------------------------------ set-up and resume

    def setup(self, engine: Engine) -> None:
        student = engine.accelerator.unwrap_model(engine.model)
        self.eos = eos_token_ids(self.tokenizer, student.generation_config)
        available = kv_modules(student)
        layers = sorted({int(name.split(".")[0]) for name in available})
        chosen = parse_layers(self.config.layers, layers) or layers
        missing = sorted(set(chosen) - set(layers))
        if missing:
            raise ConfigError(f"config field `layers` names layers the student lacks: {missing} (it has 0-{layers[-1]})",
                              f"use indices in 0-{layers[-1]}, or layers: all")
        self.names = [f"{layer}.{kind}" for layer in chosen for kind in self.config.kv]
        engine.checkpoint_hooks.append(lambda step: self.prune_subspaces(engine.out_dir))

    def extraction_step(self, step: int) -> int:
        """The step whose extraction is in force at `step`: 0, or the last multiple of subspace_refresh_every."""
        every = self.config.subspace_refresh_every
        return step - step % every if every else 0

    def on_resume(self, engine: Engine) -> None:
        """Reload the subspace in force at the resumed step unless that step extracts its own."""
        extracted = self.extraction_step(engine.step)
        if not self.config.projects() or extracted == engine.step:
            return
        path = subspace_path(engine.out_dir, extracted)
        if not path.is_file():
            raise CheckpointError(f"resuming at step {engine.step} needs the SPD subspace of step {extracted}, {path}, which is missing",
                                  "restore that file, or start over with resume=false")
        bases = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        if sorted(bases) != sorted(self.names) or metadata.get("rank") != str(self.config.rank):
            # e.g. a run started when `layers` defaulted to all, resumed by a release whose default is middle,last
            raise CheckpointError(f"{path} holds the subspace of layers {metadata.get('layers')!r} at rank {metadata.get('rank')}, "
                                  f"but this run projects layers {self.config.layers!r} at rank {self.config.rank}",
                                  f"resume with layers={metadata.get('layers')} rank={metadata.get('rank')}, or start over with resume=false")
        self.bases, self.bases_step = bases, extracted
        self.energy = float(metadata["energy"])  # the logged subspace_energy continues as if never stopped

    def prune_subspaces(self, out_dir: Path) -> None:
        """After a checkpoint: subspaces older than the one the oldest kept checkpoint resumes with can go."""
        kept = checkpoint_dirs(out_dir)
        if not kept or not (out_dir / SUBSPACE_DIR).is_dir():
            return
        oldest = self.extraction_step(int(kept[0].name.split("-")[-1]))
        for path in (out_dir / SUBSPACE_DIR).glob("step-*.safetensors"):
            if int(path.stem.split("-")[-1]) < oldest:
                path.unlink(missing_ok=True)

    def save_outputs(self, engine: Engine) -> dict[str, str]:
        if not self.bases:
            return {}
        path = save_subspace(engine.out_dir / "spd_subspace.safetensors", self.bases, self.metadata(self.bases_step))
        return {"spd_subspace": str(path)}

    def metadata(self, step: int) -> dict[str, str]:
        c = self.config
        return {"step": str(step), "rank": str(c.rank), "projection_strength": str(c.projection_strength), "kv": c.kv,
                "layers": c.layers, "energy": repr(self.energy)}  # repr: a resume logs the same float

    # ------------------------------------------------------------ the step

    def step(self, engine: Engine, step: int) -> dict[str, float]:
        config = self.config
        if config.projects() and self.bases_step != self.extraction_step(step):
            self.extract_subspace(engine, step)
        indices = self.order.indices(step, engine.rank, engine.world_size)
        started = time.perf_counter()
        with self.projection(engine):  # the hooks exist only while sampling; the training forward below never sees them
            rollouts = sample_rollouts(engine.sampler, self.prompts, indices, self.sampling(), seed=config.seed, step=step)
        rollout_seconds = time.perf_counter() - started
        batches = rollouts.micro_batches(config.micro_batch_size, self.pad_id, finished_only=config.truncated_rollouts == "mask")
        engine.model.train()
        mean = engine.backward_token_mean(batches, response_nll_sum, response_tokens, empty_ok=True)
        skipped = mean.tokens == 0
        if skipped and engine.is_main:  # every sample was cut and masked: nothing to learn from; the schedule still advances, no weight moves
                print(f"train: step {step + 1}: every sample was cut at max_response_tokens={config.max_response_tokens}; "
                      "no update (raise max_response_tokens, or truncated_rollouts: keep)")
        return {"loss": mean.loss, **engine.optimizer_step(), "response_length": rollouts.mean_length, "truncated": rollouts.truncated,
                "skipped": float(skipped), "rollout_seconds": rollout_seconds,
                **({"subspace_energy": self.energy} if config.projects() else {})}

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.config.temperature, self.config.top_p, self.config.max_response_tokens)

    def projection(self, engine: Engine) -> contextlib.AbstractContextManager:
        if not self.config.projects():
            return contextlib.nullcontext()
        return projected_kv(sampling_model(engine.sampler), self.bases, self.config.projection_strength)

    # ------------------------------------------------------------ the subspace

    def extract_subspace(self, engine: Engine, step: int) -> None:
        """Sample answers (unprojected) to the subspace prompts, take the gradients of their answer tokens' NLL with
        respect to every chosen K/V projection output, keep each one's top-`rank` directions; save them for a resume."""
        config = self.config
        answers = sample_rollouts(engine.sampler, self.prompts, self.subspace_indices, self.sampling(),
                                  seed=mix_seed(config.seed, SUBSPACE_SALT), step=step)
        examples = []
        for answer in answers.examples:
            span = answer_span(self.tokenizer, answer.response_ids, self.eos, config.answer_markers, config.answer_max_tokens,
                               config.answer_tail_tokens)
            if span is not None:  # the answer is the "response" (its NLL the loss); everything before it is context
                start, end = span
                examples.append(Example(answer.prompt_ids + answer.response_ids[:start], answer.response_ids[start:end]))
        if not examples:
            raise DataError(f"step {step}: none of the student's {len(answers)} answers to the subspace prompts contains an answer marker "
                            f"({', '.join(map(repr, config.answer_markers))}): no correctness-defining tokens to take gradients on",
                            "ask for the marker in the prompts (GSM8K: end with '#### <number>'), change answer_markers, or set "
                            "answer_tail_tokens > 0")
        grams = self.gradient_grams(engine, examples)
        bases, energies = {}, []
        for name in self.names:
            basis, energy = top_subspace(grams[name], config.rank)
            bases[name] = basis.float()
            energies.append(energy)
        self.bases, self.bases_step, self.energy = bases, step, sum(energies) / len(energies)
        if engine.is_main:
            save_subspace(subspace_path(engine.out_dir, step), bases, self.metadata(step))
        print(f"train: step {step}: SPD subspace from {len(examples)}/{len(answers)} answers; rank {config.rank} holds "
              f"{self.energy:.1%} of the answer-gradient energy")

    def gradient_grams(self, engine: Engine, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Σ GᵀG (float64) per chosen K/V projection, G the gradients of the answer NLL with respect to its outputs.
        torch.autograd.grad differentiates with respect to those outputs only: no parameter's .grad is touched."""
        model = engine.accelerator.unwrap_model(engine.model)
        was_training = model.training
        model.eval()  # no dropout: the same weights always give the same subspace
        grams: dict[str, torch.Tensor] = {}
        try:
            for batch in collated(examples, self.config.micro_batch_size, self.pad_id, engine.accelerator.device, align_responses=True):
                with torch.enable_grad(), captured_kv(model, self.names) as outputs, inputs_require_grad(model), \
                        engine.accelerator.autocast():
                    loss = response_nll_sum(model, batch)
                grads = torch.autograd.grad(loss, [outputs[name][0] for name in self.names])
                for name, grad in zip(self.names, grads):
                    grams[name] = grams[name] + gradient_gram(grad) if name in grams else gradient_gram(grad)
        finally:
            model.train(was_training)
        return grams


@contextlib.contextmanager
def inputs_require_grad(model: Any) -> Iterator[None]:
    """The input embeddings' output joins the autograd graph even when no earlier weight trains (a LoRA student whose
    adapters skip k_proj/v_proj), so every K/V output can be differentiated."""
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out if out.requires_grad else out.detach().requires_grad_())
    try:
        yield
    finally:
        handle.remove()
