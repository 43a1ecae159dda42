"""GAD — Generative Adversarial Distillation (Ye et al., arXiv 2511.10643): black-box, on-policy.

The discriminator D learns to rank the teacher's response above the student's samples (Bradley–Terry);
its score is the student's reward, optimised with GRPO (group-normalised advantages, PPO-clip, k3 KL to
the warm-up checkpoint). Teacher text only: it is re-tokenised with the student's tokenizer.

Steps [0, warmup_steps): warm-up — D trains with BT on (teacher response, current student samples);
after the first d_only_steps the generator also trains with cross-entropy on the teacher responses.
Steps [warmup_steps, total): adversarial — one `adversarial_step` each. The student at the end of the
warm-up is the reference policy; it is saved to out_dir/reference so a resumed run uses the same one.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import OnPolicyConfig, check_choice, opt
from ..data import Example, chunks, collate, collated, data_order, load_records, tokenize_records, total_steps_for
from ..discriminator import load_discriminator
from ..engine import Engine, Trainable
from ..errors import ConfigError
from ..models import apply_lora, load_model, save_pretrained_atomic
from ..objectives.policy import drpo_per_token, group_advantages, kl_k3, ppo_clip_per_token
from ..objectives.preference import bradley_terry, pairwise_accuracy
from ..logprobs import entropy_from_logits, logprobs_of, response_logits, response_targets
from ..rollout import Rollouts, SamplingParams, sample_rollouts
from ..teachers.logprob import LocalTeacher, TeacherRow
from .common import Method, response_nll_sum, response_tokens

SATURATED_ACC = 0.99  # d_acc at or above this gives the generator no signal
SATURATED_STEPS = 10  # ... for this many adversarial steps in a row -> warn


@dataclass
class GADConfig(OnPolicyConfig):
    """GAD (Ye et al., arXiv 2511.10643): a discriminator trained with Bradley–Terry is the GRPO reward of the student.

    Reference defaults (GAD paper): N = 8, 256 prompts per step, lr 1e-6 for generator and discriminator,
    grad clip 0.2, temperature 0.8, max response 1536, max prompt 2048, PPO clip 0.2, k3 KL 0.001.
    """

    method: str = opt("gad", "Training method.")
    lr: float = opt(1e-6, "Generator (student) learning rate.")
    batch_size: int = opt(256, "Prompts per step (each gets n_samples student samples).")
    max_grad_norm: float = opt(0.2, "Generator gradient clipping.")
    epochs: float = opt(1.0, "Adversarial-stage passes over the prompts (used when max_steps is 0).")
    lr_schedule: str = opt("constant", "Generator lr after warm-up: constant, cosine or linear.")
    warmup_ratio: float = opt(0.0, "Share of steps with a linear lr warm-up (not the GAD warm-up stage).")
    n_samples: int = opt(8, "Student samples per prompt (the GRPO group size N).")
    temperature: float = opt(0.8, "Student sampling temperature.")
    micro_batch_size: int = opt(8, "Sequences per forward/backward pass (prompts x samples are split into these).")
    warmup_steps: int = opt(-1, "GAD warm-up stage length in steps (-1: one epoch over the prompts; 0: none).")
    d_only_steps: int = opt(10, "Warm-up steps where only the discriminator trains.")
    clip_ratio: float = opt(0.2, "PPO ratio clip ε (policy_loss: ppo_clip).")
    policy_loss: str = opt("ppo_clip", "Generator objective: ppo_clip (GRPO's clipped ratio) or drpo (DRPO, arXiv 2606.09821: a smooth "
                                       "advantage-weighted quadratic penalty on the sampled token's probability shift instead of a hard clip).")
    drpo_delta: float = opt(0.15, "DRPO's trust-region width δ on |π(y) − μ(y)| (the sampled token's probability shift; DPPO's TV "
                                  "threshold 0.15): the gradient weight reaches 0 there and turns corrective beyond.")
    ppo_epochs: int = opt(1, "Optimizer steps per rollout batch (each a full pass over it); > 1 makes the trust region matter. "
                             "The lr schedule and the sampler advance once per rollout batch.")
    truncated_rollouts: str = opt("keep", "Samples cut at max_response_tokens (no EOS): keep (the discriminator's reward judges "
                                          "them as they are) or mask (no policy loss; DAPO's overlong filtering, arXiv 2503.14476 §3.4). "
                                          "They count in their group's reward statistics and the KL either way.")
    kl_coef: float = opt(0.001, "Coefficient of the k3 KL to the reference (the end-of-warm-up student).")
    d_lr: float = opt(1e-6, "Discriminator learning rate.")
    d_max_grad_norm: float = opt(0.2, "Discriminator gradient clipping.")
    discriminator: str = opt("", "Discriminator initialisation: a model or saved discriminator dir (empty: the student).")
    discriminator_layers: int = opt(0, "Keep only the first K transformer layers of the discriminator backbone (0: all). "
                                       "A shallow copy of the student is a much cheaper discriminator.")
    freeze_discriminator: bool = opt(False, "Freeze the discriminator after warm-up (the paper's off-policy ablation).")
    d_lora_r: int = opt(0, "LoRA rank for the discriminator backbone (0: full fine-tuning); alpha, dropout and targets are the "
                           "student's lora_* values. The scalar head always trains fully. out_dir/discriminator is saved merged.")

    def preflight(self, report: Any, tokenizer: Any, records: list[Any]) -> None:
        """The teacher texts' length limit (`opdistill collect --max-tokens`, recorded with every text it stores) against
        the rollouts' `max_response_tokens`: a student allowed to sample far longer than any teacher text is told apart
        from the teacher by length alone, and the discriminator's reward teaches length, not content."""
        limits = {r.meta.get("meta", {}).get("sampling", {}).get("max_tokens") for r in records if isinstance(r.meta.get("meta"), dict)}
        limits = {limit for limit in limits if isinstance(limit, int)}
        if not limits:
            return  # texts from elsewhere: no recorded limit to compare
        limit = max(limits)
        if limit < self.max_response_tokens:
            report.fail("response limit", f"the teacher texts were collected with at most {limit} tokens (collect --max-tokens), but "
                        f"max_response_tokens is {self.max_response_tokens}: the student may sample {self.max_response_tokens / limit:.1f}x "
                        "longer than any teacher text, and the discriminator then rewards length",
                        f"set max_response_tokens={limit}, or collect again with --max-tokens {self.max_response_tokens}")
        else:
            report.ok("response limit", f"teacher texts collected with at most {limit} tokens; rollouts up to {self.max_response_tokens}")

    def validate(self) -> None:
        super().validate()
        if self.n_samples < 2:
            raise ConfigError(f"n_samples must be >= 2 for group advantages, got {self.n_samples}")
        if self.warmup_steps < -1 or self.d_only_steps < 0:
            raise ConfigError("warmup_steps must be >= -1 and d_only_steps >= 0")
        if self.d_lora_r < 0:
            raise ConfigError(f"d_lora_r must be >= 0 (0: full fine-tuning), got {self.d_lora_r}")
        if self.discriminator_layers < 0:
            raise ConfigError(f"discriminator_layers must be >= 0 (0 keeps all), got {self.discriminator_layers}")
        if self.clip_ratio <= 0 or self.kl_coef < 0 or self.d_lr <= 0:
            raise ConfigError("clip_ratio and d_lr must be > 0 and kl_coef >= 0")
        check_choice("policy_loss", self.policy_loss, ("ppo_clip", "drpo"))
        check_choice("truncated_rollouts", self.truncated_rollouts, ("keep", "mask"))
        if self.drpo_delta <= 0 or self.ppo_epochs < 1:
            raise ConfigError(f"drpo_delta must be > 0 (got {self.drpo_delta}) and ppo_epochs >= 1 (got {self.ppo_epochs})")


class GAD(Method):
    """The GAD method: one step function per stage, shared machinery in the engine."""

    # Not g_loss: with one PPO-clip epoch the ratio is 1, so its value is −Σ_i A_i·len_i / tokens + kl_coef·KL with
    # group-normalised advantages A_i that sum to 0 per prompt: about 0 (exactly 0 when the samples are equally long)
    # whatever the step did, though the gradient is not 0 (metrics.jsonl keeps it). What a user can read instead: the
    # discriminator's mean reward, the k3 KL to the reference and the share of clipped tokens (beyond DRPO's boundary
    # with policy_loss: drpo).
    progress_metrics = ("g_ce_loss", "d_loss", "d_acc", "reward_mean", "kl", "clipped")

    def __init__(self, config: GADConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        records = load_records(config.data, require_response=True)
        examples, report = tokenize_records(tokenizer, records, config.max_prompt_tokens, config.max_response_tokens,
                                            config.overlong, config.unfinished)
        print(f"train: data {config.data}: {report.summary()}")
        self.prompts = [e.prompt_ids for e in examples]
        self.teacher = [e.response_ids for e in examples]
        self.order = data_order(config, len(self.prompts))
        self.warmup_steps = self.order.steps_per_epoch if config.warmup_steps == -1 else config.warmup_steps
        self.total_steps = self.warmup_steps + total_steps_for(config, self.order.steps_per_epoch)
        self.sampling = SamplingParams(config.temperature, config.top_p, config.max_response_tokens)
        self.reference: LocalTeacher | None = None
        self.disc: Trainable | None = None
        self.saturated = deque(maxlen=SATURATED_STEPS)
        self.warmup_length: float | None = None
        self.load_eval_examples(config, tokenizer)

    # ------------------------------------------------------------ set-up and resume

    def setup(self, engine: Engine) -> None:
        source = self.config.discriminator or self.config.student
        disc = load_discriminator(source, layers=self.config.discriminator_layers, trust_remote_code=self.config.trust_remote_code)
        if self.config.d_lora_r:
            c = self.config
            disc.backbone = apply_lora(disc.backbone, c.d_lora_r, c.lora_alpha, c.lora_dropout, c.lora_target_modules, "FEATURE_EXTRACTION")
        # Dropout off whether it scores or learns: the reward is then exactly the score its BT update sees.
        self.disc = engine.add_trainable(disc.eval(), self.config.d_lr, self.config.d_max_grad_norm)

    def save_outputs(self, engine: Engine) -> dict[str, str]:
        """The trained discriminator in out_dir/discriminator (reusable as `discriminator:` of another run)."""
        assert self.disc is not None
        return {"discriminator": str(engine.accelerator.unwrap_model(self.disc.model).save(engine.out_dir / "discriminator"))}

    def reference_dir(self, engine: Engine) -> Path:
        return engine.out_dir / "reference"

    def on_resume(self, engine: Engine) -> None:
        if engine.step >= self.warmup_steps:
            self.load_reference(engine)

    def load_reference(self, engine: Engine) -> None:
        path = self.reference_dir(engine)
        if not (path / "config.json").is_file():
            self.save_reference(engine)
            return
        model = load_model(str(path), dtype=engine.frozen_dtype).to(engine.accelerator.device).eval().requires_grad_(False)
        self.reference = LocalTeacher(model, self.pad_id, name="reference", micro_batch_size=self.config.micro_batch_size)

    def save_reference(self, engine: Engine) -> None:
        """Freeze the current student (the end of warm-up) as the KL reference and keep it on disk."""
        student = engine.accelerator.unwrap_model(engine.model)
        if engine.is_main:
            save_pretrained_atomic(student, self.tokenizer, self.reference_dir(engine))
        engine.accelerator.wait_for_everyone()
        self.load_reference(engine)

    # ------------------------------------------------------------ shared pieces

    def batch_indices(self, engine: Engine, step: int) -> list[int]:
        return self.order.indices(step, engine.rank, engine.world_size)

    def sample(self, engine: Engine, indices: list[int]) -> Rollouts:
        """N samples per prompt from the current student, prompt-major."""
        return sample_rollouts(engine.sampler, self.prompts, indices, self.sampling, seed=self.config.seed, step=engine.step,
                               n=self.config.n_samples)

    def scores(self, engine: Engine, examples: list[Example], grad: bool) -> torch.Tensor:
        """Discriminator scores, in micro-batches."""
        assert self.disc is not None
        out = []
        with torch.set_grad_enabled(grad):
            for batch in collated(examples, self.config.micro_batch_size, self.pad_id, engine.accelerator.device):
                with engine.accelerator.autocast():
                    out.append(self.disc.model(batch["input_ids"], batch["attention_mask"]))
        return torch.cat(out)

    def discriminator_update(self, engine: Engine, rollouts: Rollouts, train: bool = True) -> tuple[dict[str, float], torch.Tensor]:
        """One BT step of D on (teacher response, N student samples) per prompt, micro-batched over prompts.

        Returns the diagnostics and the student scores (B, N) from before the update: the generator's rewards.
        With train=False (a frozen discriminator) it only scores.
        """
        assert self.disc is not None
        n, indices, samples = rollouts.n, rollouts.indices, rollouts.examples
        groups = chunks(list(range(len(indices))), max(1, self.config.micro_batch_size // (n + 1)))
        total_pairs = engine.global_sum(len(indices) * n)
        loss_total, teacher_all, student_all = 0.0, [], []
        for position, group in enumerate(groups):
            teacher_examples = [Example(self.prompts[indices[b]], self.teacher[indices[b]]) for b in group]
            student_examples = [samples[b * n + i] for b in group for i in range(n)]
            with engine.accumulating(self.disc.model, last=position == len(groups) - 1):
                scores = self.scores(engine, teacher_examples + student_examples, grad=train)
                teacher_scores, student_scores = scores[: len(group)], scores[len(group):].view(len(group), n)
                # BT is a mean over pairs; summing per micro-batch and dividing by all pairs keeps it one mean.
                pair_sum = bradley_terry(teacher_scores, student_scores) * (len(group) * n)
                if train:
                    engine.backward(pair_sum * engine.world_size / total_pairs)
            loss_total += pair_sum.item()
            teacher_all.append(teacher_scores.detach())
            student_all.append(student_scores.detach())
        grad_norm = engine.trainable_step(self.disc) if train else float("nan")
        teacher_scores, student_scores = torch.cat(teacher_all), torch.cat(student_all)
        metrics = {"d_loss": engine.global_sum(loss_total) / total_pairs,
                   "d_acc": pairwise_accuracy(teacher_scores, student_scores).item(),
                   "teacher_score": teacher_scores.mean().item(), "student_score": student_scores.mean().item(),
                   "d_grad_norm": grad_norm}
        return metrics, student_scores.float()

    # ------------------------------------------------------------ the two stages

    def step(self, engine: Engine, step: int) -> dict[str, float]:
        if step < self.warmup_steps:
            return self.warmup_step(engine, step)
        if self.reference is None:
            self.save_reference(engine)
        return self.adversarial_step(engine, step)

    def warmup_step(self, engine: Engine, step: int) -> dict[str, float]:
        """D learns on current student samples; after d_only_steps the generator also does SeqKD."""
        indices = self.batch_indices(engine, step)
        rollouts = self.sample(engine, indices)
        d_metrics, _ = self.discriminator_update(engine, rollouts)
        metrics = {"stage": 0.0, **d_metrics, "response_length": rollouts.mean_length}
        if step >= self.config.d_only_steps:
            engine.model.train()
            examples = [Example(self.prompts[i], self.teacher[i]) for i in indices]
            batches = [collate(group, self.pad_id, align_responses=True) for group in chunks(examples, self.config.micro_batch_size)]
            metrics["g_ce_loss"] = engine.backward_token_mean(batches, response_nll_sum, response_tokens).loss
            metrics.update(engine.optimizer_step())
        self.warmup_length = metrics["response_length"]
        return metrics

    def adversarial_step(self, engine: Engine, step: int) -> dict[str, float]:
        """Sample -> reference log-probs -> D scores (rewards) and D update -> advantages -> ppo_epochs generator
        updates (PPO-clip or DRPO) with k3 KL.

        The rewards are the student scores of D's own BT forward pass, taken before its update, so D runs once
        per step. With one PPO-clip epoch the old log-probs are the current policy's, detached, from the
        update's own forward pass: the policy that sampled is the one being updated (ratio 1, the clip
        inactive) and a separate old-log-prob pass would compute the same numbers again. With more epochs, and
        for DRPO, the reference point is the behaviour policy: the sampler's own log-probs of its tokens.
        """
        config = self.config
        indices = self.batch_indices(engine, step)
        rollouts = self.sample(engine, indices)
        batches = rollouts.micro_batches(config.micro_batch_size, self.pad_id)
        # The KL reference is a frozen teacher like any other: its log-prob of every sampled token, once for the step.
        rows = [TeacherRow(example.prompt_ids, example.response_ids) for example in rollouts.examples]
        ref = self.reference.token_logprobs(rows, temperature=config.temperature).split([response_tokens(b) for b in batches])
        d_metrics, rewards = self.discriminator_update(engine, rollouts, train=not config.freeze_discriminator)
        advantages = group_advantages(rewards).view(-1)
        if config.truncated_rollouts == "mask":
            advantages = advantages * rollouts.finished_mask().to(advantages.device)  # a cut sample's reward judges an answer it never finished

        engine.model.train()
        stats = {"clipped": 0.0, "kl": 0.0, "entropy": 0.0}
        sizes = [len(b["input_ids"]) for b in batches]
        for batch, ref_lp, batch_advantages, behaviour in zip(batches, ref, advantages.split(sizes), chunks(rollouts.logprobs, config.micro_batch_size)):
            batch["ref_logprobs"] = ref_lp
            # one advantage per sequence, repeated for each of its response tokens (response_logits' row-major order)
            batch["advantages"] = batch_advantages.repeat_interleave(batch["loss_mask"][:, 1:].sum(dim=1))
            batch["behaviour_logprobs"] = torch.tensor([lp for row in behaviour for lp in row], dtype=torch.float32)

        def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).float() / config.temperature
            logprobs = logprobs_of(logits, response_targets(batch))
            policy, clipped = self.policy_token_losses(logprobs, batch)
            kl = kl_k3(logprobs, batch["ref_logprobs"])
            with torch.no_grad():
                stats["clipped"] += float(clipped.sum())
                stats["kl"] += float(kl.sum())
                stats["entropy"] += float(entropy_from_logits(logits).sum())
            return (policy + config.kl_coef * kl).sum()

        for epoch in range(config.ppo_epochs):  # the schedule and the sampler advance once per rollout batch
            mean = engine.backward_token_mean(batches, loss_sum, response_tokens)
            step_metrics = engine.optimizer_step(final=epoch == config.ppo_epochs - 1)
        total_tokens = mean.tokens * config.ppo_epochs
        metrics = {"stage": 1.0, "g_loss": mean.loss, **d_metrics, **step_metrics,
                   "reward_mean": rewards.mean().item(), "reward_std": rewards.std(dim=1).mean().item(),
                   "response_length": rollouts.mean_length, "truncated": rollouts.truncated,
                   **{k: engine.global_sum(v) / total_tokens for k, v in stats.items()}}
        self.warn_if_unhealthy(metrics)
        return metrics

    def policy_token_losses(self, logprobs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's policy loss per response token and a 0/1 flag: clipped (PPO) or beyond DRPO's boundary."""
        config = self.config
        if config.policy_loss == "drpo":
            return drpo_per_token(logprobs, batch["behaviour_logprobs"], batch["advantages"], config.drpo_delta)
        old = batch["behaviour_logprobs"] if config.ppo_epochs > 1 else logprobs.detach()
        return ppo_clip_per_token(logprobs, old, batch["advantages"], config.clip_ratio)

    def warn_if_unhealthy(self, metrics: dict[str, float]) -> None:
        self.saturated.append(metrics["d_acc"] >= SATURATED_ACC)
        if len(self.saturated) == SATURATED_STEPS and all(self.saturated):
            print(f"train: warning: d_acc >= {SATURATED_ACC} for {SATURATED_STEPS} steps: the discriminator wins every pair, "
                  "so the generator gets no signal (lower d_lr or raise lr)", file=sys.stderr)
            self.saturated.clear()
        if self.warmup_length and metrics["response_length"] > 2 * self.warmup_length and metrics["truncated"] > 0.5:
            print(f"train: warning: response length {metrics['response_length']:.0f} is over twice the warm-up's "
                  f"{self.warmup_length:.0f} and most samples hit max_response_tokens: possible reward hacking", file=sys.stderr)
