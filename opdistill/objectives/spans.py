"""Span-level sampled-token estimators for cross-tokenizer on-policy distillation (pure tensor functions).

Student and teacher tokenise the same response text differently; `teachers/alignment.py` cuts it into spans
at the character positions both tokenizations share. By the chain rule a side's log-probability of a span
(given the text before it) is the sum of its token log-probs over the span, so

    r_s = log p_θ(span s) − log p_T(span s) = Σ_{t ∈ s, student} ℓ_θ(t) − Σ_{u ∈ s, teacher} ℓ_T(u)

is the span's log ratio, and Σ_s r_s the sequence's. On the student's own samples the reverse-KL estimators
of `divergence: k1 | k3 | reward` (docs/opd.md) apply to spans exactly as to tokens: the span's value is
today's per-token function (`objectives.policy.kl_k1`, `kl_k3`, `objectives.divergences.reward_policy_gradient`)
evaluated at the span sums (ℓ_θ, ℓ_T) -> (Σ ℓ_θ, Σ ℓ_T), so each formula has one home:

- k1:     v_s = r_s;
- k3:     v_s = exp(−r_s) + r_s − 1, with kl_k3's clamps (log ratio to ±20, value to [−10, 10]) applied to the
          span's log ratio: a span saturates where a single token with that log ratio would;
- reward: v_s = −sg(−r_s) · Σ_{t ∈ s} ℓ_θ(t), the span's reward −r_s as a policy-gradient advantage for the
          span's tokens (no discount, like the per-token form).

How tokens get their span's value: each of the span's n_s student tokens carries v_s / n_s. The span's tokens
then sum to v_s, the loss summed over a response is Σ_s v_s, and the gradient is that of Σ_s v_s (every token of
a span receives the gradient through the span sum, whatever the split of the value). The engine's token mean then
divides by the student's token count, as today. With one token per span (the same tokenizer on both sides),
every span sum is its one token's log-prob and n_s = 1, so the result equals the per-token estimator exactly.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .divergences import reward_policy_gradient
from .policy import kl_k1, kl_k3

Span = tuple[int, int, int, int]  # student tokens [start, end), teacher tokens [start, end)

ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k3": kl_k3,
    "reward": reward_policy_gradient,
}


def span_ids(spans_per_row: Sequence[Sequence[Span]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The span index of every student token and of every teacher token, rows flattened row-major (as response
    tokens are everywhere else) and spans numbered across rows. Returns (student_ids, teacher_ids, n_spans).
    Each row's spans must be consecutive from token 0 on both sides."""
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
    n_spans = len(student_lengths)
    index = torch.arange(n_spans)
    return (torch.repeat_interleave(index, torch.tensor(student_lengths, dtype=torch.long)),
            torch.repeat_interleave(index, torch.tensor(teacher_lengths, dtype=torch.long)), n_spans)


def span_sums(values: torch.Tensor, ids: torch.Tensor, n_spans: int) -> torch.Tensor:
    """Σ of `values` (T,) over each span: (n_spans,), by index_add (differentiable in `values`); empty spans give 0."""
    if values.dim() != 1 or values.shape != ids.shape:
        raise ValueError(f"values {tuple(values.shape)} and span ids {tuple(ids.shape)} must be one (T,) shape")
    return values.new_zeros(n_spans).index_add(0, ids.to(values.device), values)


def spread(span_values: torch.Tensor, ids: torch.Tensor, n_spans: int) -> torch.Tensor:
    """Each token's share of its span's value: v_s / n_s for the n_s tokens of span s, (T,)."""
    ids = ids.to(span_values.device)
    counts = torch.bincount(ids, minlength=n_spans).clamp(min=1).to(span_values.dtype)
    return (span_values / counts).index_select(0, ids)


def span_log_ratio(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, student_ids: torch.Tensor,
                   teacher_ids: torch.Tensor, n_spans: int) -> torch.Tensor:
    """r_s = log p_θ(span) − log p_T(span) per span, (n_spans,): what k1 estimates, −(the span's reward)."""
    return span_sums(student_logprobs, student_ids, n_spans) - span_sums(teacher_logprobs, teacher_ids, n_spans)


def span_token_losses(kind: str, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, student_ids: torch.Tensor,
                      teacher_ids: torch.Tensor, n_spans: int) -> torch.Tensor:
    """The span estimator `kind` (k1, k3, reward) as one loss per student token, (Ts,), summing to v_s over each span.

    student_logprobs (Ts,): log p_θ of the student's sampled tokens; teacher_logprobs (Tt,): log p_T of the
    teacher's tokens of the same text; *_ids: each token's span (`span_ids`)."""
    if kind not in ESTIMATORS:
        raise ValueError(f"kind must be one of {tuple(ESTIMATORS)}, got {kind!r}")
    student = span_sums(student_logprobs, student_ids, n_spans)
    teacher = span_sums(teacher_logprobs, teacher_ids, n_spans)
    return spread(ESTIMATORS[kind](student, teacher), student_ids, n_spans)
