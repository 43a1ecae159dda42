"""On-policy co-distillation (OPCoD; Byeon et al., "Be My Tutor: On-Policy Co-Distillation for Mutual LLM
Improvement via Peer Feedback", arXiv 2606.14368), white-box: two peers, each the tutor of the other on the
domain where it is strong.

Peer A is the run's student (the engine's model, optimizer, schedule and sampler); peer B (`peer:`) is a
second trained model with its own AdamW, schedule and sampler, saved in every checkpoint beside A. A record's
`domain` names the peer that is strong there. Each step, for both directions at once:

    learner samples `batch_size` prompts of the tutor's domain (its own sampler, its own context)
    → the tutor scores the same tokens: its logits with the problem, anchored against its logits
      without the problem (objectives.codistill.anchored_logits)
    → cognizance gate per response: feedback only where the tutor does not recognise the response as its own
    → the learner's token divergence to the tutor, gated, token-mean over all of its response tokens.

Both tutors score before either peer's weights change: gradients of both directions accumulate, then both
optimizers step, so the update does not depend on which direction runs first. The paper's feedback is text
a peer writes and each student self-distils on its own correct rollouts; that part needs a verifier and is
not here (docs/cod.md lists the choices).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..config import OnPolicyConfig, check_choice, check_divergence_settings, opt
from ..data import Record, StepOrder, load_records, prompt_ids, render_prompt, teacher_messages, total_steps_for
from ..engine import Engine, NonFiniteLoss, Trainable, lr_lambda
from ..errors import ConfigError, DataError
from ..models import load_tokenizer, save_pretrained_atomic, shared_vocabulary_size
from ..objectives.codistill import anchored_logits, cognizance_gate
from ..objectives.divergences import KINDS, default_beta, per_token
from ..logprobs import logprobs_of, response_logits, response_targets
from ..rollout import Rollouts, SamplingParams, sample_rollouts
from ..seeds import mix_seed
from ..teachers.logprob import LocalTeacher, TeacherRow
from . import load_student
from .common import Method, response_tokens

PEERS = ("a", "b")


def tutor_messages(record: Record, system: str) -> list[dict[str, str]]:
    """The problem as a tutor reads it: the record's canonical `teacher_messages` when it has them (a clean prompt,
    e.g. CCOPD's), else its messages; the tutor's privileged system prompt first."""
    return Record(messages=teacher_messages(record), source=record.source).with_system(system)


def problem_free_messages(system: str) -> list[dict[str, str]]:
    """What the tutor reads for anchoring's "without the problem" side: its system prompt and an empty user turn,
    so the chat template (turn markers, default system prompt) is the same as with the problem."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": ""}]


@dataclass
class CoDConfig(OnPolicyConfig):
    """On-policy co-distillation (OPCoD, arXiv 2606.14368): two peers, each the white-box tutor of the other on
    its own domain. The student is peer A, `peer` is peer B; a record's `domain` says which peer is strong there.

    Each step each peer samples `batch_size` prompts of the other peer's domain; the other peer scores the same
    tokens (anchored to the problem, gated by cognizance) and the learner minimises a token-level divergence.
    The paper gives no formulas for the gate and the anchor; docs/cod.md says what was chosen.
    """

    method: str = opt("cod", "Training method.")
    lr: float = opt(1e-5, "Learning rate of both peers (each has its own AdamW and schedule).")
    batch_size: int = opt(8, "Prompts per peer per step, over all processes: each peer samples this many of the other peer's domain.")
    peer: str = opt("", "Peer B, with the student's tokenizer: built-in name, local directory or hub id (the student is peer A).")
    peer_a_domain: str = opt("a", "The records' `domain` value where peer A (the student) is strong: there it tutors peer B.")
    peer_b_domain: str = opt("b", "The records' `domain` value where peer B is strong: there it tutors peer A.")
    peer_a_system: str = opt("", "Privileged system prompt peer A reads when it tutors (never when it samples).")
    peer_b_system: str = opt("", "Privileged system prompt peer B reads when it tutors (never when it samples).")
    divergence: str = opt("rkl", "Token-level objective between learner and tutor: fkl, rkl, jsd, skl, srkl, veto_fkl, veto_rkl.")
    beta: float = opt(-1.0, "jsd: the mixture weight β in (0, 1); veto_*: β. -1: the divergence's default (0.5 / 0).")
    alpha: float = opt(0.1, "skl / srkl: the skew α in (0, 1).")
    chunk_size: int = opt(128, "Positions per chunk when computing the divergence: peak memory O(chunk x vocab). 0: all at once.")
    distill_temperature: float = opt(1.0, "Temperature applied to both models' logits inside the divergence.")
    gate: str = opt("cognizance", "When the tutor gives feedback: cognizance (only on responses it does not recognise as its own: "
                                  "mean log p_learner - log p_tutor over the response > gate_margin) or always.")
    gate_margin: float = opt(0.0, "cognizance gate: the mean per-token log-ratio (nats) a response must exceed to get feedback.")
    anchor: float = opt(0.5, "Feedback anchoring strength γ: the tutor's log-probs with the problem are pushed away from its log-probs "
                             "without it, log p(x) + γ (log p(x) - log p(no problem)). 0: no anchoring.")

    def validate(self) -> None:
        super().validate()
        if not self.peer:
            raise ConfigError("config field `peer` is empty: cod trains two peers", "set peer: MODEL (peer B; the student is peer A)")
        if not self.peer_a_domain or not self.peer_b_domain or self.peer_a_domain == self.peer_b_domain:
            raise ConfigError(f"peer_a_domain {self.peer_a_domain!r} and peer_b_domain {self.peer_b_domain!r} must be two different, "
                              "non-empty `domain` values", "name the domain where each peer is strong, e.g. peer_a_domain: french")
        check_choice("divergence", self.divergence, KINDS)
        check_choice("gate", self.gate, ("cognizance", "always"))
        check_divergence_settings(self.divergence, {"beta": self.beta}, self.alpha, self.chunk_size, self.distill_temperature)
        if self.anchor < 0:
            raise ConfigError(f"anchor must be >= 0 (0 turns anchoring off), got {self.anchor}")
        if self.lora_r or self.train_mask:
            raise ConfigError("cod trains both peers fully: lora_r and train_mask are not supported with it", "set lora_r: 0 and train_mask: ''")
        self.require_whole_micro_batches()

    def needs_responses(self) -> bool:
        return False  # both peers learn from their own samples only

    def preflight(self, report: Any, tokenizer: Any, records: list[Record]) -> None:
        """`opdistill check`: every record names a peer's domain with batch_size records each, and peer B (a white-box
        tutor) has the student's vocabulary, EOS and chat template."""
        from ..check import check_domains, check_local

        check_domains(report, records, {self.peer_a_domain: "peer_a_domain: peer A, the student, is strong there",
                                        self.peer_b_domain: "peer_b_domain: peer B is strong there"}, self.batch_size)
        first = records[0]
        check_local(report, "peer B", self.peer, self, tokenizer, Record(tutor_messages(first, self.peer_b_system), source=first.source))


class CoD(Method):
    progress_metrics = ("loss_a", "loss_b", "gate_a", "gate_b")

    def __init__(self, config: CoDConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        records = load_records(config.data)
        domains = {config.peer_a_domain: "a", config.peer_b_domain: "b"}
        problems = [f"{r.source}: field `domain` is {r.meta.get('domain')!r}" for r in records if r.meta.get("domain") not in domains]
        if problems:
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(f"{len(problems)} record(s) name no peer's domain:\n  " + "\n  ".join(problems[:20]) + more,
                            f"give every record \"domain\": {config.peer_a_domain!r} (peer A is strong) or {config.peer_b_domain!r} (peer B)")
        systems = {"a": config.peer_a_system, "b": config.peer_b_system}
        self.learner_prompts: list[list[int]] = []  # the learner's context: the record's own conversation
        self.tutor_prompts: list[list[int]] = []  # the tutor's: the problem, with the tutor's privileged system prompt
        self.owner: list[str] = []  # the peer strong on each record's domain: its tutor
        skipped = 0
        for record in records:
            owner = domains[record.meta["domain"]]
            learner = prompt_ids(tokenizer, record.messages, config.max_prompt_tokens, config.overlong)
            tutor = prompt_ids(tokenizer, tutor_messages(record, systems[owner]), config.max_prompt_tokens, config.overlong)
            if learner is None or tutor is None:
                skipped += 1
                continue
            self.learner_prompts.append(learner)
            self.tutor_prompts.append(tutor)
            self.owner.append(owner)
        self.free_prompts = {peer: render_prompt(tokenizer, problem_free_messages(systems[peer])) for peer in PEERS}
        # The records each peer learns on: those of the other peer's domain, in their own seeded order.
        self.pool = {learner: [i for i, owner in enumerate(self.owner) if owner != learner] for learner in PEERS}
        for learner, pool in self.pool.items():
            if len(pool) < config.batch_size:
                domain = config.peer_b_domain if learner == "a" else config.peer_a_domain
                raise DataError(f"{config.data}: {len(pool)} usable records of domain {domain!r}, fewer than batch_size {config.batch_size}",
                                f"lower batch_size or add records with \"domain\": {domain!r}")
        print(f"train: data {config.data}: {len(records)} records ({len(self.pool['b'])} {config.peer_a_domain!r}, "
              f"{len(self.pool['a'])} {config.peer_b_domain!r}), {skipped} skipped as over-long")
        self.order = {learner: StepOrder(len(pool), config.batch_size, mix_peer(config.seed, learner)) for learner, pool in self.pool.items()}
        # An epoch is a pass over the larger pool; the smaller one starts its next pass earlier.
        self.total_steps = total_steps_for(config, max(order.steps_per_epoch for order in self.order.values()))
        self.peer: Trainable | None = None
        self.peer_scheduler: Any = None
        self._peer_sampler: Any = None
        self.vocab = 0
        self.load_eval_examples(config, tokenizer)  # eval_data: the held-out NLL of peer A (the engine's student)

    # ------------------------------------------------------------ set-up, peer B's sampler, outputs

    def setup(self, engine: Engine) -> None:
        """Load peer B and give it its own optimizer and schedule, both part of every checkpoint (before a resume)."""
        c = self.config
        peer_tokenizer = load_tokenizer(c.peer, chat_template=c.chat_template, trust_remote_code=c.trust_remote_code)
        model = load_student(c, c.peer)
        student = engine.accelerator.unwrap_model(engine.model)
        self.vocab = shared_vocabulary_size(self.tokenizer, peer_tokenizer, student.get_output_embeddings().weight.shape[0],
                                            model.get_output_embeddings().weight.shape[0], c.peer)
        self.peer = engine.add_trainable(model, c.lr, c.max_grad_norm, c.weight_decay)
        # Same warm-up and decay as peer A's (the engine's), stepped once per training step.
        inner = getattr(self.peer.optimizer, "optimizer", self.peer.optimizer)
        self.peer_scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lr_lambda(c.lr_schedule, int(c.warmup_ratio * self.total_steps),
                                                                                   self.total_steps))
        engine.accelerator.register_for_checkpointing(self.peer_scheduler)

    def on_resume(self, engine: Engine) -> None:
        """The engine restored both peers; a sampler built before the restore samples the restored weights."""
        if self._peer_sampler is not None:
            self._peer_sampler.sync(self.unwrapped("b", engine))

    def save_outputs(self, engine: Engine) -> dict[str, str]:
        """Peer B in out_dir/peer (peer A is the engine's out_dir/student)."""
        return {"peer": str(save_pretrained_atomic(self.unwrapped("b", engine), self.tokenizer, engine.out_dir / "peer", in_place=True))}

    def model(self, peer: str, engine: Engine) -> Any:
        assert self.peer is not None
        return engine.model if peer == "a" else self.peer.model

    def unwrapped(self, peer: str, engine: Engine) -> Any:
        return engine.accelerator.unwrap_model(self.model(peer, engine))

    def sampler(self, peer: str, engine: Engine) -> Any:
        """Peer A samples through the engine's sampler, peer B through its own, built the same way on first use."""
        if peer == "a":
            return engine.sampler
        if self._peer_sampler is None:
            self._peer_sampler = engine.build_sampler(self.unwrapped("b", engine), self.config.peer)
        return self._peer_sampler

    # ------------------------------------------------------------ the step

    def step(self, engine: Engine, step: int) -> dict[str, float]:
        started = time.perf_counter()
        rollouts = {learner: self.sample(engine, step, learner) for learner in PEERS}  # both sample before either learns
        rollout_seconds = time.perf_counter() - started
        metrics: dict[str, float] = {}
        try:
            for learner in PEERS:
                metrics.update(self.learn(engine, learner, rollouts[learner]))
        except NonFiniteLoss:
            for peer in PEERS:  # neither peer may carry this step's gradients into the next one
                self.unwrapped(peer, engine).zero_grad(set_to_none=True)
            raise
        a = engine.optimizer_step()  # clips, steps, advances A's schedule, syncs A's sampler
        lr_b = self.peer_scheduler.get_last_lr()[0]
        grad_norm_b = engine.trainable_step(self.peer)
        self.peer_scheduler.step()
        if self._peer_sampler is not None:
            self._peer_sampler.sync(self.unwrapped("b", engine))
        return {"loss": (metrics["loss_a"] + metrics["loss_b"]) / 2, **metrics, "grad_norm_a": a["grad_norm"], "lr": a["lr"],
                "grad_norm_b": grad_norm_b, "lr_b": lr_b, "rollout_seconds": rollout_seconds}

    def sample(self, engine: Engine, step: int, learner: str) -> Rollouts:
        """The learner's samples on this step's prompts of the other peer's domain (this process's share)."""
        pool = self.pool[learner]
        indices = [pool[i] for i in self.order[learner].indices(step, engine.rank, engine.world_size)]
        params = SamplingParams(self.config.temperature, self.config.top_p, self.config.max_response_tokens)
        return sample_rollouts(self.sampler(learner, engine), self.learner_prompts, indices, params, seed=self.config.seed, step=step)

    def learn(self, engine: Engine, learner: str, rollouts: Rollouts) -> dict[str, float]:
        """Backward of the learner's gated divergence to its tutor, the other peer, on the learner's rollouts (no
        optimizer step); returns its metrics."""
        c = self.config
        tutor_name = "b" if learner == "a" else "a"
        beta = default_beta(c.divergence) if c.beta == -1.0 else c.beta
        tutor = LocalTeacher(self.unwrapped(tutor_name, engine), self.pad_id, self.vocab, name=f"peer {tutor_name}", micro_batch_size=c.micro_batch_size)
        stats = {"gated": 0.0, "responses": 0.0, "disagreement": 0.0, "divergence": 0.0}
        batches = rollouts.micro_batches(c.micro_batch_size, self.pad_id)
        data_rows = rollouts.rows

        def tutor_logits(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            """The tutor's logits of one micro-batch, with the problem and (anchor) without it: full-vocabulary, so kept one
            micro-batch at a time. The tutor is the other peer, trained in this same step, scored as it stands now."""
            rows = batch["rollout"].tolist()
            responses = [rollouts.responses[j] for j in rows]
            problem = tutor.score([TeacherRow(self.tutor_prompts[data_rows[j]], r) for j, r in zip(rows, responses)]).logits
            free = tutor.score([TeacherRow(self.free_prompts[tutor_name], r) for r in responses]).logits if c.anchor else problem
            return {"tutor_problem": problem, "tutor_free": free}

        def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            learner_logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])[:, : self.vocab]
            rows = batch["rollout"].tolist()
            problem = batch["tutor_problem"]
            target = anchored_logits(problem, batch["tutor_free"], c.anchor).to(learner_logits.device)
            lengths = batch["loss_mask"][:, 1:].sum(dim=1)
            tokens = response_targets(batch)
            # The gate reads the tutor's own log-probs (with the problem, before anchoring): whether the tutor recognises
            # the response as one it could have given. The anchored target is not the tutor's distribution, and gating
            # on it kept the gate open on nearly every response (docs/cod.md).
            tutor_logprobs = logprobs_of(problem.to(learner_logits.device), tokens)
            gate, disagreement = cognizance_gate(logprobs_of(learner_logits.detach(), tokens), tutor_logprobs, lengths, c.gate_margin)
            if c.gate == "always":
                gate = torch.ones_like(gate)
            divergence = per_token(learner_logits, target, c.divergence, beta=beta, alpha=c.alpha, temperature=c.distill_temperature,
                                   chunk_size=c.chunk_size or None)
            with torch.no_grad():
                stats["gated"] += float(gate.sum())
                stats["responses"] += len(rows)
                stats["disagreement"] += float(disagreement.sum())
                stats["divergence"] += float(divergence.sum())
            # Gated-off responses still count in the token mean: little feedback in a step means a small update.
            return (divergence * gate.repeat_interleave(lengths)).sum()

        model = self.model(learner, engine)
        model.train()
        mean = engine.backward_token_mean(batches, loss_sum, response_tokens, model=model, score=tutor_logits)
        responses = engine.global_sum(stats["responses"])
        return {f"loss_{learner}": mean.loss, f"divergence_{learner}": engine.global_sum(stats["divergence"]) / mean.tokens,
                f"gate_{learner}": engine.global_sum(stats["gated"]) / responses,
                f"disagreement_{learner}": engine.global_sum(stats["disagreement"]) / responses,
                f"response_length_{learner}": rollouts.mean_length, f"truncated_{learner}": rollouts.truncated}


def mix_peer(seed: int, peer: str) -> int:
    """A data-order seed per learner, so the two pools are not shuffled in lockstep."""
    return mix_seed(seed, PEERS.index(peer) + 1)

