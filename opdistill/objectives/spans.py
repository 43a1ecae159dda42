"""Sampled-token estimators of the reverse KL to a teacher, as score-function losses (pure tensor functions).

On the student's own samples y ~ π_θ the teacher's log-prob of each sampled unit gives a reward
r = log π_T − log π_θ, and the loss is −Σ_t sg(A_t) · log π_θ(y_t) (SPEC.md, "Sampled-token estimators"):

- `reward` (A_t = r of t's unit, no reward-to-go): the gradient of Σ_t KL(π_θ(·|y<t) ‖ π_T(·|y<t)) with each prefix
  held fixed, the per-token ("myopic") reverse KL; Thinking Machines' / tinker-cookbook's default (kl_discount 0).
- `reward_to_go` (A_t = Σ of the rewards of t's unit and every later one): the unbiased gradient of the sequence-level
  reverse KL(π_θ(y|x) ‖ π_T(y|x)). A per-prompt baseline may be subtracted: any number that does not depend on the
  sample itself keeps it unbiased (`objectives.policy.leave_one_out_baseline`).

A unit is a span: the student's and the teacher's tokens of one piece of text (`teachers/alignment.py` cuts a response
at the character positions both tokenizations share). By the chain rule each side's log-prob of a span given the text
before it is the sum of its tokens' log-probs, so r_s = Σ_{u ∈ s, teacher} ℓ_T(u) − Σ_{t ∈ s, student} ℓ_θ(t), and
every student token of span s carries its span's advantage. With one tokenizer every span is one token on each side
(`token_spans`), so the same code is the per-token estimator. Tests: tests/test_estimators.py enumerates every sequence
of a tiny vocabulary in float64 and compares E_y[∇loss] with the analytic gradient of each objective.

`k1` (ℓ_θ − ℓ_T) and `k3` as losses are retired: with the sample held fixed, k1's gradient is ∇ℓ_θ(y), zero in
expectation and blind to the teacher; k3's is the forward KL's, and its value clamp zeroes it where the models disagree
most. Both remain right as KL *values* (objectives.policy.kl_k1 / kl_k3: metrics, GAD's KL penalty).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

Span = tuple[int, int, int, int]  # student tokens [start, end), teacher tokens [start, end)

ESTIMATORS = ("reward", "reward_to_go")
RETIRED = {
    "k1": "k1 (log pS − log pT) as a loss has the gradient ∇log pS(y) with the sample held fixed: zero in expectation and "
          "the same for any teacher, so it distils nothing",
    "k3": "k3 as a loss has the gradient of the forward KL(pT ‖ pS), not the reverse KL, and its clamp zeroes it where the "
          "two models disagree most",
}
RETIRED_FIX = ("use divergence: reward_to_go (the sequence-level reverse KL) or reward (the per-token reverse KL, each "
               "prefix held fixed); k1/k3 remain as KL values only")

# vLLM answers −inf log-probs as −9999 (the remote client reads both as −inf). A reward of −inf (or −1e4) would swamp
# every other token, so the teacher's log-prob is floored here: e^−30 ≈ 1e-13 is below what any unmasked token of a
# real softmax gets, so the floor changes nothing else and a token the teacher rules out still gets a large penalty.
TEACHER_LOGPROB_FLOOR = -30.0


@dataclass(frozen=True)
class SpanIndex:
    """Which span every student token and every teacher token belongs to, rows flattened row-major (as response tokens
    are everywhere else) and spans numbered across rows; `spans_per_row` says where each row's spans end."""

    student_ids: torch.Tensor  # (Ts,) span of each student token
    teacher_ids: torch.Tensor  # (Tt,) span of each teacher token
    spans_per_row: tuple[int, ...]

    @property
    def n_spans(self) -> int:
        return sum(self.spans_per_row)


def span_index(spans_per_row: Sequence[Sequence[Span]]) -> SpanIndex:
    """The SpanIndex of aligned rows. Each row's spans must be consecutive from token 0 on both sides."""
    student_lengths: list[int] = []
    teacher_lengths: list[int] = []
    for row, spans in enumerate(spans_per_row):
        s_at = t_at = 0
        for s_start, s_end, t_start, t_end in spans:
            if s_start != s_at or t_start != t_at or s_end < s_start or t_end < t_start:
                raise ValueError(f"row {row}: spans must be consecutive from token 0, got {list(spans)}")
            student_lengths.append(s_end - s_start)
            teacher_lengths.append(t_end - t_start)
            s_at, t_at = s_end, t_end
    index = torch.arange(len(student_lengths))
    return SpanIndex(torch.repeat_interleave(index, torch.tensor(student_lengths, dtype=torch.long)),
                     torch.repeat_interleave(index, torch.tensor(teacher_lengths, dtype=torch.long)),
                     tuple(len(spans) for spans in spans_per_row))


def one_token_spans(length: int) -> list[Span]:
    """One tokenizer on both sides: each of a row's `length` tokens is its own span (the estimators are then the
    per-token ones)."""
    return [(t, t + 1, t, t + 1) for t in range(length)]


def token_spans(row_lengths: Sequence[int]) -> SpanIndex:
    """The SpanIndex of rows of one-token spans."""
    return span_index([one_token_spans(n) for n in row_lengths])


def span_sums(values: torch.Tensor, ids: torch.Tensor, n_spans: int) -> torch.Tensor:
    """Σ of `values` (T,) over each span: (n_spans,), by index_add (differentiable in `values`); empty spans give 0."""
    if values.dim() != 1 or values.shape != ids.shape:
        raise ValueError(f"values {tuple(values.shape)} and span ids {tuple(ids.shape)} must be one (T,) shape")
    return values.new_zeros(n_spans).index_add(0, ids.to(values.device), values)


def span_rewards(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, index: SpanIndex) -> torch.Tensor:
    """r_s = log π_T(span) − log π_θ(span), (n_spans,), detached: the reward of each span (k1's negative). The teacher's
    log-probs are floored at TEACHER_LOGPROB_FLOOR (a −inf answer included)."""
    teacher = teacher_logprobs.detach().clamp(min=TEACHER_LOGPROB_FLOOR)
    student = student_logprobs.detach().to(teacher.dtype)
    return span_sums(teacher, index.teacher_ids, index.n_spans) - span_sums(student, index.student_ids, index.n_spans)


def rewards_to_go(rewards: torch.Tensor, spans_per_row: Sequence[int]) -> torch.Tensor:
    """G_s = Σ_{s' ≥ s in the same row} r_s', (n_spans,): a reverse cumulative sum inside each row."""
    parts = torch.split(rewards, list(spans_per_row))
    return torch.cat([part.flip(0).cumsum(0).flip(0) for part in parts]) if parts else rewards


def token_advantages(kind: str, rewards: torch.Tensor, index: SpanIndex, baseline: torch.Tensor | None = None) -> torch.Tensor:
    """A_t for every student token, (Ts,): its span's reward (`reward`) or reward-to-go (`reward_to_go`), minus its row's
    `baseline` (rows,) when given."""
    if kind not in ESTIMATORS:
        raise ValueError(f"kind must be one of {ESTIMATORS}, got {kind!r}")
    per_span = rewards if kind == "reward" else rewards_to_go(rewards, index.spans_per_row)
    if baseline is not None:
        if baseline.shape != (len(index.spans_per_row),):
            raise ValueError(f"baseline must hold one value per row ({len(index.spans_per_row)}), got {tuple(baseline.shape)}")
        rows = torch.repeat_interleave(torch.arange(len(index.spans_per_row), device=rewards.device),
                                       torch.tensor(index.spans_per_row, device=rewards.device))
        per_span = per_span - baseline.to(per_span)[rows]
    return per_span.index_select(0, index.student_ids.to(per_span.device))


def score_function_loss(student_logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """−sg(A_t) · log π_θ(y_t) per token: a policy-gradient (REINFORCE) loss whose gradient is E[A ∇log π_θ]."""
    return -advantages.detach().to(student_logprobs.dtype) * student_logprobs


def sampled_kl_losses(kind: str, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, index: SpanIndex,
                      baseline: torch.Tensor | None = None) -> torch.Tensor:
    """The estimator `kind` as one loss per student token, (Ts,), for rows of student samples.

    student_logprobs (Ts,): log π_θ of the sampled tokens, with gradient; teacher_logprobs (Tt,): log π_T of the
    teacher's tokens of the same text (data); index: the spans that align them; baseline (rows,): optional."""
    rewards = span_rewards(student_logprobs, teacher_logprobs, index)
    return score_function_loss(student_logprobs, token_advantages(kind, rewards, index, baseline))


def sequence_returns(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, index: SpanIndex) -> torch.Tensor:
    """Σ_s r_s of each row, (rows,): log π_T(y) − log π_θ(y), the negative of the sequence-level k1 estimate."""
    rewards = span_rewards(student_logprobs, teacher_logprobs, index)
    return torch.stack([part.sum() for part in torch.split(rewards, list(index.spans_per_row))]) if index.spans_per_row \
        else rewards.new_zeros(0)
