"""White-box on-policy distillation (SPEC §3).

Each step: the student samples responses to its prompts (up to the step's rollout horizon) → the teacher
scores the same response tokens under its own context (the student's, or a privileged one: an extra
system prompt, a per-record `teacher_messages`, a template) → a token-level divergence between the two
next-token distributions, token-mean over the global batch → one optimizer step.

With on_policy_ratio (GKD's λ) < 1, the other steps train on the data's responses instead of samples.
The teacher is an object behind the `teachers.logprob` seam: a local model, the student's own starting
weights (self-distillation: a frozen copy, or with LoRA the base model with the adapters switched off), or a
remote server answering top-k prompt log-probs. A record may name its teacher (`teacher` field, `teachers:`).
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from ..config import SAMPLED_ESTIMATORS, OPDConfig
from ..data import Example, chunks, collate, data_order, fit_prompt, load_records, render_prompt, response_ids, teacher_messages, total_steps_for
from ..engine import Engine
from ..objectives.divergences import default_beta, per_token, per_token_top_k, reward_policy_gradient
from ..objectives.policy import kl_k1, kl_k3
from ..rollout import SamplingParams, horizon_at, logprobs_of, response_logits, response_targets, rollout_seeds
from ..seeds import mix_seed
from ..teachers.factory import build_teachers, record_teacher
from ..teachers.logprob import LocalTeacher, TeacherRow, TeacherScores, TeacherSet
from .common import Method, response_tokens


def beta_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Veto's β, linear from start (first step) to end (last step); constant when end < 0."""
    if end < 0 or total_steps <= 1:
        return start
    return start + (end - start) * step / (total_steps - 1)


class OPD(Method):
    def __init__(self, config: OPDConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        records = load_records(config.data, require_response=config.on_policy_ratio < 1.0)
        self.student_prompts: list[list[int]] = []
        self.teacher_prompts: list[list[int]] = []
        self.responses: list[list[int]] = []
        self.teacher_names: list[str] = []  # "" for the default teacher
        skipped = 0
        for record in records:
            name = record_teacher(record, config.teachers)
            student = fit_prompt(render_prompt(tokenizer, record.messages), config.max_prompt_tokens, config.overlong)
            teacher = fit_prompt(render_prompt(tokenizer, teacher_messages(record, config.teacher_system, config.teacher_template)),
                                 config.max_prompt_tokens, config.overlong)
            if student is None or teacher is None:
                skipped += 1
                continue
            self.student_prompts.append(student)
            self.teacher_prompts.append(teacher)
            self.teacher_names.append(name)
            self.responses.append(response_ids(tokenizer, record.response, config.max_response_tokens) if record.response else [])
        print(f"train: data {config.data}: {len(records)} records, {skipped} skipped as over-long")
        self.order = data_order(config, len(self.student_prompts))
        self.total_steps = total_steps_for(config, self.order.steps_per_epoch)
        self.teachers = TeacherSet(None)
        self.vocab = 0
        self.load_eval_examples(config, tokenizer)

    # ------------------------------------------------------------ set-up

    def setup(self, engine: Engine) -> None:
        """Build the teachers: the default one (local, remote, or the student's own starting weights) and the named ones."""
        student = engine.accelerator.unwrap_model(engine.model)
        self.vocab = student.get_output_embeddings().weight.shape[0]
        self.teachers = build_teachers(self.config, self.tokenizer, lambda: engine.accelerator.unwrap_model(engine.model),
                                       self.vocab, engine.frozen_dtype, engine.accelerator.device, engine.out_dir, engine.rank,
                                       engine.world_size, needs_default="" in self.teacher_names)
        self.vocab = min([self.vocab] + [t.vocab for t in self.teachers.all() if isinstance(t, LocalTeacher) and t.vocab])

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
        rows = [TeacherRow(self.teacher_prompts[i], r) for i, r in zip(indices, responses)]
        for group in chunks(list(range(len(indices))), config.micro_batch_size):
            # Responses aligned at one index, so only response positions get logits (see response_logits).
            student = collate([Example(self.student_prompts[indices[j]], responses[j]) for j in group], self.pad_id, align_responses=True)
            batches.append({**student, "row": torch.tensor(group)})
        beta = beta_at(step, self.total_steps, default_beta(config.divergence) if config.beta == -1.0 else config.beta, config.beta_end)

        def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            student_logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])[:, : self.vocab]
            group = batch["row"].tolist()
            teacher = self.teachers.score([rows[j] for j in group], [self.teacher_names[indices[j]] for j in group],
                                          top_k=config.top_k, temperature=config.distill_temperature)
            return self.token_losses(student_logits, teacher.to(student_logits.device), batch, beta).sum()

        engine.model.train()
        loss = engine.backward_token_mean(batches, loss_sum, response_tokens)
        lengths = [len(r) for r in responses]
        return {"loss": loss, **engine.optimizer_step(), "on_policy": float(on_policy), "horizon": float(horizon),
                "beta": beta, "response_length": sum(lengths) / len(lengths), "truncated": truncated,
                "rollout_seconds": rollout_seconds}

    def token_losses(self, student_logits: torch.Tensor, teacher: TeacherScores, batch: dict[str, torch.Tensor],
                     beta: float) -> torch.Tensor:
        """One loss per response token: a full-vocabulary divergence (or its top-k restriction), or a sampled-token estimator."""
        config = self.config
        if config.divergence not in SAMPLED_ESTIMATORS:
            options = dict(beta=beta, alpha=config.alpha, temperature=config.distill_temperature, chunk_size=config.chunk_size or None)
            if config.top_k:  # the teachers' answers are already restricted to their top-k (TeacherSet.score)
                return per_token_top_k(student_logits, teacher.top_ids, teacher.top_logprobs, config.divergence, tail=config.top_k_tail,
                                       **options)
            return per_token(student_logits, teacher.logits[:, : self.vocab], config.divergence, **options)
        tokens = response_targets(batch)
        student_lp = logprobs_of(student_logits, tokens, config.distill_temperature)
        teacher_lp = teacher.sampled(tokens, config.distill_temperature)
        if config.divergence == "k1":
            return kl_k1(student_lp, teacher_lp)
        if config.divergence == "k3":
            return kl_k3(student_lp, teacher_lp)
        return reward_policy_gradient(student_lp, teacher_lp)
