"""White-box on-policy distillation (SPEC §3).

Each step: the student samples responses to its prompts (up to the step's rollout horizon) → the teacher
scores the same response tokens under its own context (the student's, or a privileged one: an extra
system prompt, a per-record `teacher_messages`, a template) → a token-level divergence between the two
next-token distributions, token-mean over the global batch → one optimizer step.

With on_policy_ratio (GKD's λ) < 1, the other steps train on the data's responses instead of samples.
The teacher is a separate local model, or the student's own starting weights (self-distillation: a
frozen copy, or with LoRA the base model with the adapters switched off).
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any, Iterator

import torch

from ..config import SAMPLED_ESTIMATORS, OPDConfig
from ..data import Example, collate, fit_prompt, load_records, render_prompt, response_ids, teacher_messages
from ..engine import Engine, chunks, data_order, total_steps_for
from ..models import load_model, load_tokenizer, shared_vocabulary_size
from ..objectives.divergences import default_beta, per_token, reward_policy_gradient
from ..objectives.policy import kl_k1, kl_k3
from ..seeds import mix_seed
from ..rollout import SamplingParams, horizon_at, logprobs_of, response_logits, response_targets, rollout_seeds
from .seqkd import response_tokens


def beta_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Veto's β, linear from start (first step) to end (last step); constant when end < 0."""
    if end < 0 or total_steps <= 1:
        return start
    return start + (end - start) * step / (total_steps - 1)


class OPD:
    def __init__(self, config: OPDConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        records = load_records(config.data, require_response=config.on_policy_ratio < 1.0)
        self.student_prompts: list[list[int]] = []
        self.teacher_prompts: list[list[int]] = []
        self.responses: list[list[int]] = []
        skipped = 0
        for record in records:
            student = fit_prompt(render_prompt(tokenizer, record.messages), config.max_prompt_tokens, config.overlong)
            teacher = fit_prompt(render_prompt(tokenizer, teacher_messages(record, config.teacher_system, config.teacher_template)),
                                 config.max_prompt_tokens, config.overlong)
            if student is None or teacher is None:
                skipped += 1
                continue
            self.student_prompts.append(student)
            self.teacher_prompts.append(teacher)
            self.responses.append(response_ids(tokenizer, record.response, config.max_response_tokens) if record.response else [])
        print(f"train: data {config.data}: {len(records)} records, {skipped} skipped as over-long")
        self.order = data_order(config, len(self.student_prompts))
        self.total_steps = total_steps_for(config, self.order.steps_per_epoch)
        self.teacher: Any = None
        self.vocab = 0

    # ------------------------------------------------------------ set-up

    def setup(self, engine: Engine) -> None:
        """Load the teacher and check that it shares the student's vocabulary."""
        config = self.config
        student = engine.accelerator.unwrap_model(engine.model)
        student_vocab = student.get_output_embeddings().weight.shape[0]
        if not config.teacher and config.lora_r:
            self.teacher = None  # the student's base weights with the adapters off (see teacher_context)
            self.vocab = student_vocab
            return
        name = config.teacher or config.student
        teacher_tokenizer = load_tokenizer(name, chat_template=config.chat_template, trust_remote_code=config.trust_remote_code)
        teacher = load_model(name, dtype=engine.frozen_dtype, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
        self.vocab = shared_vocabulary_size(self.tokenizer, teacher_tokenizer, student_vocab,
                                            teacher.get_output_embeddings().weight.shape[0], name)
        self.teacher = teacher.to(engine.accelerator.device).eval().requires_grad_(False)

    @contextlib.contextmanager
    def teacher_context(self, engine: Engine) -> Iterator[Any]:
        """The teacher model; for LoRA self-distillation the student itself with its adapters disabled."""
        if self.teacher is not None:
            yield self.teacher
            return
        student = engine.accelerator.unwrap_model(engine.model)
        with student.disable_adapter():
            yield student

    # ------------------------------------------------------------ the step

    def horizon(self, step: int) -> int:
        c = self.config
        return horizon_at(step, c.horizon, c.max_response_tokens, ratio=c.horizon_ratio, tokens=c.horizon_tokens,
                          start=c.horizon_start, increment=c.horizon_increment, every=c.horizon_every)

    def on_policy(self, step: int) -> bool:
        """GKD's λ as a seeded per-step coin: the same steps are on-policy on every process and after a resume."""
        return random.Random(mix_seed(self.config.seed, step)).random() < self.config.on_policy_ratio

    def sample(self, engine: Engine, indices: list[int], horizon: int) -> tuple[list[list[int]], float]:
        """One response per prompt from the current student, and the share that hit the horizon."""
        params = SamplingParams(self.config.temperature, self.config.top_p, horizon)
        samples = engine.sampler.sample([self.student_prompts[i] for i in indices], params,
                                        seeds=rollout_seeds(self.config.seed, engine.step, indices))
        return [s.response_ids for s in samples], sum(not s.finished for s in samples) / len(samples)

    def step(self, engine: Engine, step: int) -> dict[str, float]:
        config = self.config
        indices = self.order.indices(step, engine.rank, engine.world_size)
        horizon = self.horizon(step)
        on_policy = self.on_policy(step)
        started = time.perf_counter()
        if on_policy:
            responses, truncated = self.sample(engine, indices, horizon)
        else:
            responses, truncated = [self.responses[i][:horizon] for i in indices], 0.0
        rollout_seconds = time.perf_counter() - started
        batches = []
        for group in chunks(list(zip(indices, responses)), config.micro_batch_size):
            # Responses aligned at one index, so only response positions get logits (see response_logits).
            student = collate([Example(self.student_prompts[i], r) for i, r in group], self.pad_id, align_responses=True)
            teacher = collate([Example(self.teacher_prompts[i], r) for i, r in group], self.pad_id, align_responses=True)
            batches.append({**student, **{f"teacher_{k}": v for k, v in teacher.items()}})
        beta = beta_at(step, self.total_steps, default_beta(config.divergence) if config.beta == -1.0 else config.beta, config.beta_end)

        def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            student_logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])[:, : self.vocab]
            with torch.no_grad(), self.teacher_context(engine) as teacher:
                teacher_logits = response_logits(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                                                 batch["teacher_loss_mask"])[:, : self.vocab]
            return self.token_losses(student_logits, teacher_logits, batch, beta).sum()

        engine.model.train()
        loss = engine.backward_token_mean(batches, loss_sum, response_tokens)
        lengths = [len(r) for r in responses]
        return {"loss": loss, **engine.optimizer_step(), "on_policy": float(on_policy), "horizon": float(horizon),
                "beta": beta, "response_length": sum(lengths) / len(lengths), "truncated": truncated,
                "rollout_seconds": rollout_seconds}

    def token_losses(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict[str, torch.Tensor],
                     beta: float) -> torch.Tensor:
        """One loss per response token: a full-vocabulary divergence, or a sampled-token estimator."""
        config = self.config
        if config.divergence not in SAMPLED_ESTIMATORS:
            return per_token(student_logits, teacher_logits, config.divergence, beta=beta, alpha=config.alpha,
                             temperature=config.distill_temperature, chunk_size=config.chunk_size or None,
                             top_k=config.top_k or None, tail=config.top_k_tail)
        tokens = response_targets(batch)
        student_lp = logprobs_of(student_logits, tokens, config.distill_temperature)
        teacher_lp = logprobs_of(teacher_logits, tokens, config.distill_temperature)
        if config.divergence == "k1":
            return kl_k1(student_lp, teacher_lp)
        if config.divergence == "k3":
            return kl_k3(student_lp, teacher_lp)
        return reward_policy_gradient(student_lp, teacher_lp)

    def evaluate(self, engine: Engine) -> dict[str, float]:
        return {}
