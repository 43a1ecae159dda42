"""White-box on-policy distillation: GKD (Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", arXiv 2306.13649) and its family (docs/opd.md cites each divergence's and horizon's paper).

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
from dataclasses import dataclass
from typing import Any

import torch

from ..check import CheckReport, check_alignment, check_local, check_remote
from ..config import OnPolicyConfig, TeacherOptions, check_choice, check_divergence_settings, opt, teacher_spec
from ..data import Record, data_order, ends_with_eos, load_records, prompt_ids, response_ids, teacher_messages, total_steps_for
from ..engine import Engine
from ..errors import ConfigError, NothingToTrainOn, OpdistillError
from ..objectives.divergences import KINDS, default_beta, per_token, per_token_top_k
from ..objectives.policy import leave_one_out_baseline
from ..objectives.spans import (ESTIMATORS, RETIRED, RETIRED_FIX, SpanIndex, one_token_spans, sampled_kl_losses, sequence_returns,
                                span_index)
from ..logprobs import logprobs_of, response_logits, response_targets
from ..rollout import Rollouts, SamplingParams, data_rollouts, horizon_at, sample_rollouts
from ..seeds import mix_seed
from ..teachers.alignment import Alignment, alignment_stats, cross_tokenize, end_of_turn_id, same_vocabulary, unaligned
from ..teachers.factory import build_teachers, default_teacher_model, record_teacher
from ..teachers.logprob import LocalTeacher, TeacherRow, TeacherSet
from ..teachers.remote import RemoteTeacher
from .common import Method, response_tokens


DIVERGENCES = KINDS  # the full-vocabulary divergences (objectives/divergences.py)
SAMPLED_ESTIMATORS = ESTIMATORS  # score-function estimators on the sampled tokens (objectives/spans.py)
# `divergence: auto`: rkl with one tokenizer; with cross_tokenizer (only sampled estimators apply) reward_to_go, the
# unbiased gradient of the sequence-level reverse KL. Chosen from benchmarks/sampled_estimators.py (docs/opd.md).
CROSS_TOKENIZER_DEFAULT = "reward_to_go"
VETO_BETA = (0.3, 0.0)  # Veto's reference schedule (ddp_veto.py): β from 0.3 at the first step linearly to 0 at the last


@dataclass
class OPDConfig(OnPolicyConfig, TeacherOptions):
    """White-box on-policy distillation (GKD, arXiv 2306.13649): the student samples, a local teacher scores the same
    tokens under its own (possibly privileged) context, and a token-level divergence is minimised.

    Peer defaults for reference: TRL's on-policy trainer uses reverse KL, lr 1e-6, T 1.0; Veto's
    reference setup lr 1e-5, T 0.5, top-p 0.5; GKD λ 0.5, β 0.5, T 0.9.
    """

    method: str = opt("opd", "Training method.")
    lr: float = opt(1e-5, "Student learning rate.")
    cross_tokenizer: bool = opt(False, "The teacher may have another tokenizer: it scores the student's response text re-tokenised "
                                       "with its own tokenizer after its own chat template, the two tokenizations are aligned into spans "
                                       "that end at a shared character boundary, and reward / reward_to_go act on span log-probs (docs/opd.md).")
    teacher_tokenizer: str = opt("", "cross_tokenizer with teacher_url: a local copy of the served teacher's tokenizer (default: "
                                     "teacher_model loaded by name).")
    teacher_tokenizers: dict[str, str] = opt({}, "cross_tokenizer: the tokenizer of each named remote teacher (name -> path); a "
                                                 "named local teacher uses its own.")
    teacher_system: str = opt("", "Privileged system prompt that only the teacher sees (context distillation).")
    teacher_template: str = opt("", "Rewrite of the last user turn for the teacher; {prompt} is the original text.")
    divergence: str = opt("auto", "Token-level objective. Full vocabulary: fkl, rkl, jsd, skl, srkl, veto_fkl, veto_rkl. Sampled-token "
                                  "score-function estimators (only each sampled token's teacher log-prob; the student's own samples at "
                                  "temperature = distill_temperature, top_p 1): reward = per-token reverse KL, each prefix held fixed "
                                  "(advantage r_t = log pT - log pS); reward_to_go = sequence-level reverse KL (advantage Σ_{u>=t} r_u). "
                                  "auto: rkl, or reward_to_go with cross_tokenizer.")
    samples_per_prompt: int = opt(1, "Student samples per prompt each step (>= 2 for baseline: loo).")
    baseline: str = opt("none", "reward_to_go: none, or loo (subtract the mean return of the prompt's other samples: still unbiased, "
                                "removes the prompt's common level; needs samples_per_prompt >= 2).")
    beta: float = opt(-1.0, "jsd: the mixture weight β in (0, 1) (default 0.5); veto_*: β at the first step (default 0.3, Veto's "
                            "reference). -1: the default.")
    beta_end: float = opt(-1.0, "veto_*: β at the last step, linear from `beta` (-1: 0, annealed as in Veto's reference; set it to "
                                "`beta` for a constant β).")
    alpha: float = opt(0.1, "skl / srkl: the skew α in (0, 1).")
    top_k_tail: bool = opt(True, "With top_k: the remaining mass of each side is one tail bucket (false: renormalise over the k).")
    chunk_size: int = opt(128, "Positions per chunk when computing the divergence: peak memory O(chunk x vocab). 0: all at once.")
    distill_temperature: float = opt(1.0, "Temperature applied to both models' logits inside the divergence.")
    on_policy_ratio: float = opt(1.0, "GKD's λ: share of steps on student samples; the others train on the data's responses.")
    horizon: str = opt("full", "Rollout horizon: full, truncated (TOPD) or progressive (POPD).")
    horizon_ratio: float = opt(0.0, "truncated: H = ratio x max_response_tokens (TOPD ρ; 0 uses horizon_tokens).")
    horizon_tokens: int = opt(0, "truncated: a fixed horizon H in tokens.")
    horizon_start: int = opt(64, "progressive: H_0 tokens.")
    horizon_increment: int = opt(64, "progressive: ΔH tokens added every horizon_every steps.")
    horizon_every: int = opt(10, "progressive: Δk steps between increments.")

    def validate(self) -> None:
        super().validate()
        if self.divergence in RETIRED:
            raise ConfigError(f"divergence: {self.divergence} is retired: {RETIRED[self.divergence]}", RETIRED_FIX)
        if self.divergence == "auto":
            self.divergence = CROSS_TOKENIZER_DEFAULT if self.cross_tokenizer else "rkl"
        check_choice("divergence", self.divergence, DIVERGENCES + SAMPLED_ESTIMATORS)
        check_choice("baseline", self.baseline, ("none", "loo"))
        self.validate_sampling()
        check_choice("horizon", self.horizon, ("full", "truncated", "progressive"))
        check_choice("teacher_cache_keep", self.teacher_cache_keep, ("resume", "all"))
        if self.beta_end != -1.0 and not self.divergence.startswith("veto"):
            raise ConfigError(f"beta_end schedules Veto's β, but divergence is {self.divergence}", "remove beta_end or use veto_fkl / veto_rkl")
        check_divergence_settings(self.divergence, {"beta": self.beta, "beta_end": self.beta_end}, self.alpha, self.chunk_size,
                                  self.distill_temperature)
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_k and self.divergence in SAMPLED_ESTIMATORS:
            raise ConfigError(f"top_k restricts a full-vocabulary divergence, but {self.divergence} uses only the sampled token",
                              "set top_k: 0 or pick a full divergence")
        if not 0.0 <= self.on_policy_ratio <= 1.0:
            raise ConfigError(f"on_policy_ratio must be in [0, 1], got {self.on_policy_ratio}")
        if self.on_policy_ratio < 1.0 and self.divergence in SAMPLED_ESTIMATORS:
            raise ConfigError(f"divergence {self.divergence} is a sampled-token estimator: it is unbiased only on the student's own "
                              f"samples, but on_policy_ratio {self.on_policy_ratio} feeds it the data's responses on some steps",
                              "use a full-vocabulary divergence (fkl, rkl, jsd, ...) with on_policy_ratio < 1, or on_policy_ratio: 1")
        self.validate_teachers()
        if self.cross_tokenizer and self.divergence not in SAMPLED_ESTIMATORS:
            raise ConfigError(f"cross_tokenizer compares span log-probs of two vocabularies, but divergence {self.divergence} needs one "
                              "vocabulary on both sides", f"use divergence: {' or '.join(SAMPLED_ESTIMATORS)} (or auto)")
        if self.teacher_tokenizers and not self.cross_tokenizer:
            raise ConfigError("teacher_tokenizers is set but cross_tokenizer is off", "set cross_tokenizer: true, or remove teacher_tokenizers")
        if self.horizon == "truncated" and self.horizon_ratio <= 0 and self.horizon_tokens <= 0:
            raise ConfigError("horizon: truncated needs horizon_ratio (0 < ρ <= 1) or horizon_tokens > 0")
        if self.horizon_ratio > 1:
            raise ConfigError(f"horizon_ratio must be in (0, 1], got {self.horizon_ratio}")
        if self.horizon == "progressive" and (self.horizon_start < 1 or self.horizon_increment < 0 or self.horizon_every < 1):
            raise ConfigError("progressive horizon needs horizon_start >= 1, horizon_increment >= 0, horizon_every >= 1")
        self.require_whole_micro_batches()

    def validate_sampling(self) -> None:
        """A score-function estimator is the gradient of the policy it samples from: the samples must come from the very
        policy that is differentiated (SPEC §3), and the baseline from other samples of the same prompt."""
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.baseline == "loo" and (self.divergence != "reward_to_go" or self.samples_per_prompt < 2):
            raise ConfigError(f"baseline: loo subtracts the mean return of a prompt's other samples from reward_to_go's advantages, "
                              f"but divergence is {self.divergence} with samples_per_prompt {self.samples_per_prompt}",
                              "use divergence: reward_to_go with samples_per_prompt >= 2, or baseline: none")
        if self.divergence not in SAMPLED_ESTIMATORS:
            return
        if self.top_p < 1.0 or self.temperature != self.distill_temperature:
            raise ConfigError(f"divergence {self.divergence} differentiates the student at distill_temperature {self.distill_temperature} "
                              f"but would sample at temperature {self.temperature}, top_p {self.top_p}: another policy, so its "
                              "gradient is biased (Veto's T 0.5 / top-p 0.5 is for its full-vocabulary divergences)",
                              f"set temperature: {self.distill_temperature} and top_p: 1, or use a full-vocabulary divergence "
                              "(fkl, rkl, veto_*, ...) to sample at other settings")

    def validate_teachers(self) -> None:
        if self.teacher and self.teacher_url:
            raise ConfigError("both teacher and teacher_url are set", "keep one: teacher for a local model, teacher_url for a server")
        if self.teacher_url:
            teacher_spec(f"{self.teacher_url}#{self.teacher_model}", "teacher_url")
        elif self.teacher_model:
            raise ConfigError("teacher_model is set without teacher_url", "set teacher_url, or use teacher: for a local model")
        for name, spec in self.teachers.items():
            teacher_spec(spec, f"teachers.{name}")
        if self.teacher_cache_max_bytes < 1:
            raise ConfigError(f"teacher_cache_max_bytes must be > 0, got {self.teacher_cache_max_bytes}")
        if min(self.teacher_concurrency, self.teacher_max_attempts) < 1 or self.teacher_timeout <= 0:
            raise ConfigError("teacher_concurrency and teacher_max_attempts must be >= 1 and teacher_timeout > 0")
        if self.has_remote_teacher():
            if self.divergence not in SAMPLED_ESTIMATORS and not self.top_k:
                raise ConfigError(f"a remote teacher returns top-k log-probs, but divergence {self.divergence} needs the full vocabulary",
                                  f"set top_k (<= the server's cap, often 20), or use {' / '.join(SAMPLED_ESTIMATORS)}")
            if self.distill_temperature != 1.0:
                raise ConfigError(f"a remote teacher's log-probs are at temperature 1; distill_temperature is {self.distill_temperature}",
                                  "set distill_temperature: 1, or use local teachers")

    def has_remote_teacher(self) -> bool:
        return bool(self.teacher_url) or any(teacher_spec(spec)[1] for spec in self.teachers.values())

    def needs_responses(self) -> bool:
        """The data's responses are trained on only in the off-policy steps (on_policy_ratio < 1)."""
        return self.on_policy_ratio < 1.0

    def preflight(self, report: CheckReport, tokenizer: Any, records: list[Record]) -> None:
        """Records name only configured teachers; each teacher the records use has the student's vocabulary, EOS and chat
        template (a local one), or serves top-k prompt log-probs and tokenises like the student (a remote one)."""
        default = (self.teacher_model, self.teacher_url) if self.teacher_url else (self.teacher or ("" if self.lora_r else self.student), "")
        teachers = {"": default, **{name: teacher_spec(spec, f"teachers.{name}") for name, spec in self.teachers.items()}}
        used = {record.meta.get("teacher") or "" for record in records}
        unknown = sorted(name for name in used if isinstance(name, str) and name and name not in teachers)
        if unknown:
            report.fail("teacher names", f"records name teachers the config lacks: {', '.join(unknown)}",
                        "add them to `teachers:` (name: model or URL#model), or fix the records' `teacher` fields")
        first = records[0]
        probe = Record(messages=teacher_messages(first, self.teacher_system, self.teacher_template), source=first.source)
        for name, (model, url) in teachers.items():
            if name not in used or (not model and not url):
                continue  # unused, or the LoRA student's own base weights (the same tokenizer by construction)
            label = f"teacher {name or '(default)'}"
            if self.cross_tokenizer:
                check_alignment(report, label, self.teacher_tokenizer_path(name), self, tokenizer, records)
                if url:  # the server must tokenise like the local copy of its tokenizer the client renders with
                    from ..models import load_tokenizer

                    teacher_tokenizer = load_tokenizer(self.teacher_tokenizer_path(name), trust_remote_code=self.trust_remote_code)
                    check_remote(report, label, url, model, self, teacher_tokenizer, probe)
            elif url:
                check_remote(report, label, url, model, self, tokenizer, probe)
            else:
                check_local(report, label, model, self, tokenizer, probe)

    def teacher_tokenizer_path(self, name: str) -> str:
        """cross_tokenizer: where the tokenizer of teacher `name` ("" the default) loads from: a local teacher's own model,
        else teacher_tokenizer(s), else the served model's name."""
        if name:
            model, url = teacher_spec(self.teachers[name], f"teachers.{name}")
            return self.teacher_tokenizers.get(name, model) if url else model
        if self.teacher_url:
            return self.teacher_tokenizer or self.teacher_model
        return default_teacher_model(self) or self.student  # the LoRA student's base weights: the student's tokenizer


def beta_at(step: int, total_steps: int, divergence: str, start: float, end: float) -> float:
    """The step's β: jsd's mixture weight (constant), or Veto's, linear from `start` at the first step to `end` at the
    last; -1 is each one's default (jsd 0.5; Veto 0.3 -> 0 as its reference code anneals it)."""
    if not divergence.startswith("veto"):
        return default_beta(divergence) if start == -1.0 else start
    start = VETO_BETA[0] if start == -1.0 else start
    end = VETO_BETA[1] if end == -1.0 else end
    return start if total_steps <= 1 else start + (end - start) * step / (total_steps - 1)


class OPD(Method):
    def __init__(self, config: OPDConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        records = load_records(config.data, require_response=config.needs_responses())
        self.student_prompts: list[list[int]] = []
        self.teacher_prompts: list[list[int]] = []
        self.responses: list[list[int]] = []
        self.teacher_names: list[str] = []  # "" for the default teacher
        # cross_tokenizer: each teacher reads its own chat template and scores text in its own tokens.
        self.teacher_tokenizers = {name: self.load_teacher_tokenizer(name) for name in ("", *config.teachers)} if config.cross_tokenizer else {}
        self.shared_vocab = {name: same_vocabulary(tokenizer, other) for name, other in self.teacher_tokenizers.items()}
        # A finished response's end is scored against each teacher's own end of turn, which its template decides.
        self.teacher_end_ids = {name: end_of_turn_id(other) for name, other in self.teacher_tokenizers.items()}
        skipped = dropped = 0
        for record in records:
            name = record_teacher(record, config.teachers)
            student = prompt_ids(tokenizer, record.messages, config.max_prompt_tokens, config.overlong)
            teacher = prompt_ids(self.teacher_tokenizers.get(name, tokenizer), teacher_messages(record, config.teacher_system, config.teacher_template),
                                 config.max_prompt_tokens, config.overlong)
            if student is None or teacher is None:
                skipped += 1
                continue
            # The data's responses are trained on only in off-policy steps (on_policy_ratio < 1); like SeqKD's, one
            # that did not end has no EOS, and `unfinished: drop` leaves its record out.
            response = response_ids(tokenizer, record.response, config.max_response_tokens, record.finished) if record.response else []
            if config.on_policy_ratio < 1.0 and config.unfinished == "drop" and not ends_with_eos(response, tokenizer):
                dropped += 1
                continue
            self.student_prompts.append(student)
            self.teacher_prompts.append(teacher)
            self.teacher_names.append(name)
            self.responses.append(response)
        print(f"train: data {config.data}: {len(records)} records, {skipped} skipped as over-long, {dropped} dropped as unfinished")
        if not self.student_prompts:
            raise NothingToTrainOn(f"{config.data}: no record is left to train on ({skipped} over-long, {dropped} unfinished)",
                            "raise max_prompt_tokens or max_response_tokens, or use overlong: truncate / unfinished: keep")
        self.order = data_order(config, len(self.student_prompts))
        self.total_steps = total_steps_for(config, self.order.steps_per_epoch)
        self.teachers = TeacherSet(None)
        self.remote: list[RemoteTeacher] = []
        self.vocab = 0
        self.load_eval_examples(config, tokenizer)

    def load_teacher_tokenizer(self, name: str) -> Any:
        from ..models import load_tokenizer

        # The teacher renders its prompts with its own chat template: the student's `chat_template:` override is the student's.
        return load_tokenizer(self.config.teacher_tokenizer_path(name), trust_remote_code=self.config.trust_remote_code)

    # ------------------------------------------------------------ set-up

    def setup(self, engine: Engine) -> None:
        """Build the teachers: the default one (local, remote, or the student's own starting weights) and the named ones."""
        student = engine.accelerator.unwrap_model(engine.model)
        self.vocab = student.get_output_embeddings().weight.shape[0]
        self.teachers = build_teachers(self.config, self.tokenizer, lambda: engine.accelerator.unwrap_model(engine.model),
                                       self.vocab, engine.frozen_dtype, engine.accelerator.device, engine.out_dir, engine.rank,
                                       engine.world_size, needs_default="" in self.teacher_names, teacher_tokenizers=self.teacher_tokenizers)
        if not self.config.cross_tokenizer:  # another vocabulary is never compared column by column
            self.vocab = min([self.vocab] + [t.vocab for t in self.teachers.all() if isinstance(t, LocalTeacher) and t.vocab])
        self.remote = [t for t in self.teachers.all() if isinstance(t, RemoteTeacher)]
        if self.remote and self.config.teacher_cache_keep == "resume":
            engine.checkpoint_hooks.append(self.compact_caches)

    def compact_caches(self, step: int) -> None:
        """After the checkpoint of `step` is on disk: a resume starts at `step`, so rows of earlier steps may go."""
        for teacher in self.remote:
            teacher.compact(step)

    # ------------------------------------------------------------ the step

    def horizon(self, step: int) -> int:
        c = self.config
        return horizon_at(step, c.horizon, c.max_response_tokens, ratio=c.horizon_ratio, tokens=c.horizon_tokens,
                          start=c.horizon_start, increment=c.horizon_increment, every=c.horizon_every)

    def on_policy(self, step: int) -> bool:
        """GKD's λ as a seeded per-step coin: the same steps are on-policy on every process and after a resume."""
        return random.Random(mix_seed(self.config.seed, step)).random() < self.config.on_policy_ratio

    def rollouts(self, engine: Engine, indices: list[int], horizon: int, on_policy: bool) -> Rollouts:
        """`samples_per_prompt` responses per prompt: the current student's samples (on-policy), or the data's response
        cut at the horizon."""
        if on_policy:
            params = SamplingParams(self.config.temperature, self.config.top_p, horizon)
            return sample_rollouts(engine.sampler, self.student_prompts, indices, params, seed=self.config.seed, step=engine.step,
                                   n=self.config.samples_per_prompt)
        responses = [self.responses[i][:horizon] for i in indices]
        return data_rollouts(self.student_prompts, indices, responses, [ends_with_eos(r, self.tokenizer) for r in responses])

    def teacher_rows(self, rollouts: Rollouts) -> tuple[list[TeacherRow], list[Alignment], dict[str, float]]:
        """What each teacher scores: the student's own tokens, or (cross_tokenizer) the same text in the teacher's tokens,
        with the spans that align the two (teachers/alignment.py; an end span only for a response that finished) and
        their statistics for the log."""
        rows = rollouts.rows
        if not self.config.cross_tokenizer:
            return [TeacherRow(self.teacher_prompts[i], r) for i, r in zip(rows, rollouts.responses)], [], {}
        alignments = [self.align(self.teacher_names[i], r, done) for i, r, done in zip(rows, rollouts.responses, rollouts.finished)]
        stats = alignment_stats([a for a in alignments if a.aligned])
        metrics = {"align_shared_boundaries": stats["shared_boundaries"], "align_mean_teacher_tokens": stats["mean_teacher_tokens"],
                   "align_unaligned": sum(not a.aligned for a in alignments) / len(alignments)}
        return [TeacherRow(self.teacher_prompts[i], a.teacher_ids) for i, a in zip(rows, alignments)], alignments, metrics

    def step(self, engine: Engine, step: int) -> dict[str, float]:
        config = self.config
        indices = self.order.indices(step, engine.rank, engine.world_size)
        horizon, on_policy = self.horizon(step), self.on_policy(step)
        beta = beta_at(step, self.total_steps, config.divergence, config.beta, config.beta_end)
        # 1. Sample.
        started = time.perf_counter()
        rollouts = self.rollouts(engine, indices, horizon, on_policy)
        rollout_seconds = time.perf_counter() - started
        # 2. Score every frozen model once for the step. Sampled-token estimators: each teacher's log-prob of every
        # row's tokens, all teachers at once, written into the micro-batches with the spans and baselines. Full-vocabulary
        # divergences: remote teachers answer their top-k for the whole step now; a local teacher's full logits
        # (tokens x vocab) are computed per micro-batch, just before its loss, by the `score` hook (StepScores.micro_batch),
        # to bound their memory.
        started = time.perf_counter()
        rows, alignments, align_metrics = self.teacher_rows(rollouts)
        names = [self.teacher_names[i] for i in rollouts.rows]
        if config.divergence in SAMPLED_ESTIMATORS:
            batches, kl = self.sampled_batches(rollouts, rows, names, alignments, step)
            loss_sum, score = self.sampled_loss_sum, None
        else:
            batches, kl = rollouts.micro_batches(config.micro_batch_size, self.pad_id), {}
            scores = self.teachers.for_step(rows, names, top_k=config.top_k, temperature=config.distill_temperature, step=step)
            loss_sum, score = self.divergence_loss_sum(beta), scores.micro_batch
        teacher_seconds = time.perf_counter() - started
        # 3. A pure loss per micro-batch, token mean over the global batch.
        engine.model.train()
        loss = engine.backward_token_mean(batches, loss_sum, response_tokens, score=score).loss
        return {"loss": loss, **engine.optimizer_step(), "on_policy": float(on_policy), "horizon": float(horizon),
                "beta": beta, "response_length": rollouts.mean_length, "truncated": rollouts.truncated if on_policy else 0.0,
                "rollout_seconds": rollout_seconds, **kl, **align_metrics, **self.remote_metrics(teacher_seconds)}

    def sampled_batches(self, rollouts: Rollouts, rows: list[TeacherRow], names: list[str], alignments: list[Alignment],
                        step: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, float]]:
        """The micro-batches of a sampled-token step, each carrying what its loss reads: the teachers' log-probs of its
        rows' tokens, the spans that align them with the student's, which rows are aligned, and each row's baseline.
        Also the step's `kl`: the reverse KL per response token, log pS − log pT of the samples (aligned ones), the
        quantity reward_to_go descends (the loss itself, −A·log pS, is no KL)."""
        config = self.config
        teacher_lp = self.teachers.token_logprobs(rows, names, temperature=config.distill_temperature, step=step)
        spans = [a.spans for a in alignments] or [one_token_spans(len(r)) for r in rollouts.responses]
        aligned = [a.aligned for a in alignments] or [True] * len(rows)
        # The returns log pT(y) − log pS(y) from the sampler's log-probs (at distill_temperature: validate_sampling): no
        # extra forward pass for the baseline and the logged KL.
        student_lp = torch.tensor([lp for row in rollouts.logprobs for lp in row], dtype=torch.float32)
        returns = sequence_returns(student_lp, torch.cat(teacher_lp), span_index(spans))
        valid = torch.tensor(aligned, dtype=returns.dtype)
        tokens = torch.tensor(rollouts.lengths, dtype=returns.dtype)
        kl = {"kl": float(-(returns * valid).sum() / (tokens * valid).sum().clamp(min=1))}
        baseline = leave_one_out_baseline(returns.view(-1, rollouts.n), valid.view(-1, rollouts.n)).reshape(-1) \
            if config.baseline == "loo" else None
        batches = rollouts.micro_batches(config.micro_batch_size, self.pad_id)
        for batch in batches:
            group = batch["rollout"].tolist()
            index = span_index([spans[j] for j in group])
            batch.update(teacher_logprobs=torch.cat([teacher_lp[j] for j in group]), student_span=index.student_ids,
                         teacher_span=index.teacher_ids, spans_per_row=torch.tensor(index.spans_per_row),
                         aligned=torch.tensor([aligned[j] for j in group]))
            if baseline is not None:
                batch["baseline"] = baseline[group]
        return batches, kl

    def sampled_loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """reward / reward_to_go on the spans (one token each with one tokenizer): −sg(A_t)·log pS(y_t), summed."""
        temperature = self.config.distill_temperature
        student_lp = logprobs_of(response_logits(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]),
                                 response_targets(batch), temperature)
        index = SpanIndex(batch["student_span"], batch["teacher_span"], tuple(batch["spans_per_row"].tolist()))
        losses = sampled_kl_losses(self.config.divergence, student_lp, batch["teacher_logprobs"], index, batch.get("baseline"))
        keep = batch["aligned"].repeat_interleave(batch["loss_mask"].sum(dim=1).long())
        return torch.where(keep, losses, torch.zeros_like(losses)).sum()  # an unaligned sample's tokens count, with no loss

    def divergence_loss_sum(self, beta: float) -> Any:
        """The loss of a full-vocabulary divergence (or its top-k restriction) for one micro-batch, summed over its tokens:
        it reads the teacher's answer from the batch (`teacher_logits`, or `teacher_top_ids` / `teacher_top_logprobs`)."""
        config = self.config
        options = dict(beta=beta, alpha=config.alpha, temperature=config.distill_temperature, chunk_size=config.chunk_size or None)

        def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            student_logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])[:, : self.vocab]
            if config.top_k:  # the teachers' answers are already restricted to their top-k (StepScores.restrict)
                return per_token_top_k(student_logits, batch["teacher_top_ids"], batch["teacher_top_logprobs"], config.divergence,
                                       tail=config.top_k_tail, **options).sum()
            return per_token(student_logits, batch["teacher_logits"][:, : self.vocab], config.divergence, **options).sum()

        return loss_sum

    def remote_metrics(self, teacher_seconds: float) -> dict[str, float]:
        """With a remote teacher: the step's wait on it, and what its cache holds (rows in memory, bytes on disk)."""
        if not self.remote:
            return {}
        return {"teacher_seconds": teacher_seconds, "teacher_cache_rows": float(sum(len(t.cached) for t in self.remote)),
                "teacher_cache_bytes": float(sum(t.cache_bytes() for t in self.remote))}

    def align(self, name: str, response: list[int], finished: bool) -> Alignment:
        """The response against teacher `name`'s tokenization; a placeholder that trains on nothing when the teacher's
        tokenizer cannot give its text back (a rare sample, e.g. with a control character the teacher drops)."""
        teacher_tokenizer = self.teacher_tokenizers[name]
        try:
            return cross_tokenize(self.tokenizer, teacher_tokenizer, response, finished, teacher_end_id=self.teacher_end_ids[name],
                                  shared_vocab=self.shared_vocab[name])
        except OpdistillError:
            return unaligned(response, teacher_tokenizer, finished)
