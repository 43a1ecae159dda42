"""KD: off-policy distillation on the data's own text with the language-modelling and distillation losses mixed.

Per trained token t (the response of a chat record, or every token after the first of a plain text):

    loss_t = (1 − w) · CE(p_θ(·|x_<t), x_t)  +  w · τ² · D(p_T^τ(·|x_<t), p_θ^τ(·|x_<t))

w = `kd_weight`, the KD weight that "Strong Teacher Not Needed? On Distillation in LLM Pretraining" (Lu & Liu, arXiv
2605.23857) calls α: its first author's code (github.com/TaiMingLu/maxtext-distillation, MaxText/train.py
`kd_loss_fn`) computes `(1 - kd_alpha) * CE + kd_alpha * T² * KL(teacher ‖ student)`, both terms token means
over the same targets. D is forward KL by default (the classic KD of Hinton et al., "Distilling the Knowledge in a
Neural Network", arXiv 1503.02531, which also gives the τ² factor: it keeps the soft term's gradient scale as τ
changes), or any divergence of objectives/divergences.per_token. CE is at temperature 1: it is the data's own
likelihood. The paper finds that with the two mixed even a smaller, undertrained teacher improves a larger student,
and that a stronger teacher can saturate or reverse the gain; docs/kd.md has what it leaves open.

Unlike OPD the student never samples: the teacher scores the data's text (a frozen local model with the student's
tokenizer, in eval mode), so a method of its own needs no prompts and trains on plain text too (data.py `text`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..check import CheckReport, check_local
from ..config import RunConfig, check_choice, check_divergence_settings, opt
from ..data import Example, Record, chunks, collate, data_order, load_records, text_ids, tokenize_records, total_steps_for
from ..engine import Engine
from ..errors import ConfigError
from ..objectives.divergences import default_beta, per_token
from ..logprobs import logprobs_of, response_logits, response_targets
from ..teachers.factory import default_local_teacher, default_teacher_model
from ..teachers.logprob import LocalTeacher, TeacherRow
from .common import Method, response_tokens

# The full-vocabulary divergences that compare two fixed distributions (Veto's product target is an on-policy
# device with a β schedule; it has no meaning as a fixed KD target, so it is left out).
DIVERGENCES = ("fkl", "rkl", "jsd", "skl", "srkl")


@dataclass
class KDConfig(RunConfig):
    """Off-policy KD on the data's own text, mixed with the language-modelling loss (Lu & Liu, "Strong Teacher Not Needed?",
    arXiv 2605.23857): loss = (1 − kd_weight) · CE + kd_weight · τ² · D(teacher, student), per token. kd_weight is the
    paper's α (its weight on the KD term). Chat records train on the response, plain-text records (`text`) on every
    token after the first. The authors' runs: kd_weight swept 0.2–1.0, forward KL, τ 1, lr 3e-4 from scratch."""

    method: str = opt("kd", "Training method.")
    teacher: str = opt("", "Teacher model (same tokenizer as the student). Empty: the student's own starting weights "
                           "(a frozen copy; with LoRA the base model with the adapters switched off).")
    kd_weight: float = opt(0.5, "The paper's α: weight of the distillation term; the language-modelling term gets 1 - kd_weight. "
                                "0: plain LM training on the text (no teacher is loaded), 1: pure distillation.")
    divergence: str = opt("fkl", "Token-level divergence to the teacher: fkl (forward KL(teacher ‖ student), classic KD), rkl, "
                                 "jsd, skl, srkl (objectives/divergences.py).")
    distill_temperature: float = opt(1.0, "τ: both models' logits are divided by τ inside the divergence, which is scaled by τ² "
                                          "(Hinton et al. 2015); the LM term stays at temperature 1.")
    beta: float = opt(-1.0, "jsd: the mixture weight β in (0, 1); -1: 0.5.")
    skew: float = opt(0.1, "skl / srkl: the skew α of DistiLLM's skewed KL, in (0, 1) (not the mixing weight kd_weight).")
    chunk_size: int = opt(128, "Positions per chunk when computing the divergence: peak memory O(chunk x vocab). 0: all at once.")

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ConfigError(f"kd_weight must be in [0, 1], got {self.kd_weight}",
                              "kd_weight is the weight of the distillation term (the paper's α); the LM term gets 1 - kd_weight")
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_divergence_settings(self.divergence, {"beta": self.beta}, self.skew, self.chunk_size, self.distill_temperature)
        self.require_whole_micro_batches()

    def accepts_plain_text(self) -> bool:
        return True

    def preflight(self, report: CheckReport, tokenizer: Any, records: list[Record]) -> None:
        """The teacher against the student's tokenizer (vocabulary, EOS, chat template), and how plain texts fit the limit."""
        texts = [r for r in records if r.text is not None]
        if texts:
            lengths = [len(text_ids(tokenizer, r.text or "")) for r in texts[:1000]]  # a sample bounds the check's time
            cut = sum(length > self.max_response_tokens + 1 for length in lengths)
            detail = (f"{len(texts)} plain-text records; of {len(lengths)} checked the longest is {max(lengths)} tokens, "
                      f"{cut} longer than max_response_tokens {self.max_response_tokens} + 1 (cut there)")
            (report.note if cut else report.ok)("plain-text lengths", detail)
        teacher = default_teacher_model(self)
        if self.kd_weight == 0.0 or not teacher:
            return  # no teacher is read (kd_weight 0), or the LoRA student's own base weights (its tokenizer by construction)
        chats = [r for r in records if r.text is None]
        probe = chats[0] if chats else Record(messages=[{"role": "user", "content": "Hello."}], source="a probe chat")
        check_local(report, "teacher", teacher, self, tokenizer, probe)


def token_terms(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None, kd_weight: float,
                divergence: str = "fkl", temperature: float = 1.0, beta: float | None = None, skew: float | None = None,
                chunk_size: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The two unweighted terms per token, shape (tokens,): the next-token NLL and τ² · D. A term whose weight is 0 is
    not computed (None): at kd_weight 0 no teacher is needed, at 1 no cross-entropy is taken.

    `student_logits` (tokens, V) predict `targets` (tokens,); `teacher_logits` (tokens, V') with V' <= V: the
    divergence compares the first V' columns (a padded student output layer has columns no tokenizer id reaches),
    while the NLL keeps all of them, as SeqKD's does."""
    nll = -logprobs_of(student_logits, targets) if kd_weight < 1.0 else None
    soft = None
    if kd_weight > 0.0:
        if teacher_logits is None:
            raise ValueError(f"kd_weight {kd_weight} needs the teacher's logits")
        vocab = teacher_logits.shape[-1]
        soft = per_token(student_logits[:, :vocab], teacher_logits, divergence, beta=beta, alpha=skew, temperature=temperature,
                         chunk_size=chunk_size)
        if temperature != 1.0:
            soft = soft * temperature**2
    return nll, soft


def mix(nll: torch.Tensor | None, soft: torch.Tensor | None, kd_weight: float) -> torch.Tensor:
    """(1 − w) · nll + w · soft; at w = 0 exactly `nll` (SeqKD's loss), at w = 1 exactly `soft` (nothing multiplied)."""
    if soft is None or kd_weight == 0.0:
        assert nll is not None
        return nll
    if nll is None or kd_weight == 1.0:
        return soft
    return (1.0 - kd_weight) * nll + kd_weight * soft


def mixed_token_losses(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None, kd_weight: float,
                       **options: Any) -> torch.Tensor:
    """loss_t = (1 − w) · CE_t + w · τ² · D_t per token (token_terms, mix); `options` are token_terms' keywords."""
    return mix(*token_terms(student_logits, targets, teacher_logits, kd_weight, **options), kd_weight)


class KD(Method):
    """The data's text, scored by a frozen teacher; the engine does the rest (token mean, checkpoints, resume)."""

    progress_metrics = ("loss", "lm_loss", "kd_loss")

    def __init__(self, config: KDConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.examples = self.tokenized(config.data, f"train: data {config.data}")
        self.order = data_order(config, len(self.examples))
        self.total_steps = total_steps_for(config, self.order.steps_per_epoch)
        self.eval_examples = self.tokenized(config.eval_data, f"train: eval_data {config.eval_data}") if config.eval_data else []
        self.teacher: LocalTeacher | None = None
        self.vocab = 0

    def tokenized(self, spec: str, label: str) -> list[Example]:
        """Chat records (with responses) and plain texts of `spec` as Examples; a plain text's first token is its "prompt"."""
        c = self.config
        records = load_records(spec, require_response=True, plain_text=True)
        examples, report = tokenize_records(self.tokenizer, records, c.max_prompt_tokens, c.max_response_tokens, c.overlong, c.unfinished)
        print(f"{label}: {report.summary()}")
        return examples

    def load_eval_examples(self, config: Any, tokenizer: Any) -> None:
        """Held-out data may be plain text too (held-out perplexity of a corpus): read in __init__ through `tokenized`."""

    def setup(self, engine: Engine) -> None:
        """The frozen teacher, unless kd_weight is 0 (then nothing reads it)."""
        c = self.config
        if c.kd_weight == 0.0:
            return
        student = engine.accelerator.unwrap_model(engine.model)
        self.vocab = student.get_output_embeddings().weight.shape[0]
        self.teacher = default_local_teacher(c, self.tokenizer, lambda: engine.accelerator.unwrap_model(engine.model), self.vocab,
                                             engine.frozen_dtype, engine.accelerator.device)
        self.vocab = min(self.vocab, self.teacher.vocab or self.vocab)

    def step(self, engine: Engine, step: int) -> dict[str, float]:
        c = self.config
        picked = [self.examples[i] for i in self.order.indices(step, engine.rank, engine.world_size)]
        # Responses aligned at one index: only the trained positions get logits, in the student and in the teacher alike.
        batches = [{**collate([picked[j] for j in group], self.pad_id, align_responses=True), "row": torch.tensor(group)}
                   for group in chunks(list(range(len(picked))), c.micro_batch_size)]
        options = dict(divergence=c.divergence, temperature=c.distill_temperature, skew=c.skew, chunk_size=c.chunk_size or None,
                       beta=default_beta(c.divergence) if c.beta == -1.0 else c.beta)
        sums = {"lm_loss": 0.0, "kd_loss": 0.0}  # each term on its own, for the log: the mix alone hides which one moved

        def teacher_logits(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            """The frozen teacher's logits of one micro-batch (tokens x vocab: kept one micro-batch at a time)."""
            assert self.teacher is not None
            rows = [TeacherRow(picked[j].prompt_ids, picked[j].response_ids) for j in batch["row"].tolist()]
            return {"teacher_logits": self.teacher.score(rows).logits[:, : self.vocab]}

        def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            student_logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            nll, soft = token_terms(student_logits, response_targets(batch), batch.get("teacher_logits"), c.kd_weight, **options)
            for name, term in (("lm_loss", nll), ("kd_loss", soft)):
                if term is not None:
                    sums[name] += float(term.detach().sum())
            return mix(nll, soft, c.kd_weight).sum()

        engine.model.train()
        # The teacher scores each micro-batch just before its loss (`score`): the one place its full logits exist.
        mean = engine.backward_token_mean(batches, loss_sum, response_tokens, score=teacher_logits if self.teacher is not None else None)
        terms = {name: engine.global_sum(total) / mean.tokens for name, total in sums.items()
                 if (name == "lm_loss" and c.kd_weight < 1.0) or (name == "kd_loss" and c.kd_weight > 0.0)}
        return {"loss": mean.loss, **engine.optimizer_step(), **terms, "tokens": mean.tokens}
