"""Every OPD objective checked against the objective it claims, by exact expectation (SPEC.md, "Sampled-token estimators").

A tiny autoregressive student (a free logit vector for every prefix) and a fixed teacher over a vocabulary of 3 tokens.
Every sequence of the length is enumerated in float64; E_y[∇ loss(y)] = Σ_y sg(π_θ(y)) ∇ loss(y) is compared with the
analytic gradient (autograd of the exact objective) of:
- `reward_to_go`: the sequence-level reverse KL(π_θ(y) ‖ π_T(y)), with and without the leave-one-out baseline;
- `reward`: Σ_t E_{y<t}[KL(π_θ(·|y<t) ‖ π_T(·|y<t))] with the prefix distribution held fixed (the per-token KL);
- on one-token spans (one tokenizer) and on merged spans (two student tokens against one teacher token, one against
  two), where the teacher's log-prob of a span is a proper distribution over the span's text;
- every full-vocabulary divergence at every prefix: the gradient of their per-prefix sum.
Each test also checks that the two sampled objectives differ here, so a test could not pass with the wrong estimator.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from opdistill.objectives.divergences import KINDS, per_token
from opdistill.objectives.policy import leave_one_out_baseline
from opdistill.objectives.spans import sampled_kl_losses, sequence_returns, span_index, token_spans
from test_divergences import PARAMS, brute_force

V = 3
DT = torch.float64


def _prefixes(length: int) -> list[tuple[int, ...]]:
    return [p for n in range(length) for p in itertools.product(range(V), repeat=n)]


class TinyPolicy:
    """π(v | prefix) = softmax(logits[prefix]): every prefix up to `length` − 1 tokens has its own free logits."""

    def __init__(self, length: int, seed: int, scale: float = 1.5, requires_grad: bool = True) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.rows = {p: i for i, p in enumerate(_prefixes(length))}
        self.logits = (torch.randn(len(self.rows), V, generator=generator, dtype=DT) * scale).requires_grad_(requires_grad)

    def log_probs(self, prefix: tuple[int, ...]) -> torch.Tensor:
        return torch.log_softmax(self.logits[self.rows[prefix]], dim=-1)

    def token_logprobs(self, y: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([self.log_probs(y[:t])[y[t]] for t in range(len(y))])


def _expected_grad(student: TinyPolicy, sequences: list[tuple[int, ...]], loss_of) -> torch.Tensor:
    """Σ_y sg(π_θ(y)) ∇ loss(y): the estimator's expected gradient, exactly."""
    total = sum(student.token_logprobs(y).sum().detach().exp() * loss_of(y) for y in sequences)
    (grad,) = torch.autograd.grad(total, student.logits)
    return grad


def _grad(objective: torch.Tensor, student: TinyPolicy) -> torch.Tensor:
    (grad,) = torch.autograd.grad(objective, student.logits)
    return grad


# ------------------------------------------------------------------ one tokenizer: every token its own span


def _token_setup(length: int = 3):
    student, teacher = TinyPolicy(length, seed=0), TinyPolicy(length, seed=1, requires_grad=False)
    return student, teacher, list(itertools.product(range(V), repeat=length))


def _sequence_kl(student: TinyPolicy, teacher_logprob, sequences) -> torch.Tensor:
    """KL(π_θ(y) ‖ π_T(y)) by enumeration, differentiable in θ through both π_θ(y) and log π_θ(y)."""
    total = torch.zeros((), dtype=DT)
    for y in sequences:
        log_p = student.token_logprobs(y).sum()
        total = total + log_p.exp() * (log_p - teacher_logprob(y))
    return total


def _myopic_kl(student: TinyPolicy, teacher: TinyPolicy, length: int) -> torch.Tensor:
    """Σ_t Σ_{y<t} sg(π_θ(y<t)) KL(π_θ(·|y<t) ‖ π_T(·|y<t))."""
    total = torch.zeros((), dtype=DT)
    for prefix in _prefixes(length):
        weight = student.token_logprobs(prefix).sum().detach().exp() if prefix else torch.ones((), dtype=DT)
        log_p, log_q = student.log_probs(prefix), teacher.log_probs(prefix)
        total = total + weight * (log_p.exp() * (log_p - log_q)).sum()
    return total


def test_reward_to_go_is_the_gradient_of_the_sequence_level_reverse_kl():
    student, teacher, sequences = _token_setup()
    index = token_spans([3])

    def loss(y):
        return sampled_kl_losses("reward_to_go", student.token_logprobs(y), teacher.token_logprobs(y), index).sum()

    expected = _expected_grad(student, sequences, loss)
    target = _grad(_sequence_kl(student, lambda y: teacher.token_logprobs(y).sum(), sequences), student)
    torch.testing.assert_close(expected, target, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(expected, _grad(_myopic_kl(student, teacher, 3), student), atol=1e-3)


def test_reward_is_the_gradient_of_the_per_token_reverse_kl_with_prefixes_held_fixed():
    student, teacher, sequences = _token_setup()
    index = token_spans([3])

    def loss(y):
        return sampled_kl_losses("reward", student.token_logprobs(y), teacher.token_logprobs(y), index).sum()

    expected = _expected_grad(student, sequences, loss)
    torch.testing.assert_close(expected, _grad(_myopic_kl(student, teacher, 3), student), rtol=1e-10, atol=1e-12)
    sequence_level = _grad(_sequence_kl(student, lambda y: teacher.token_logprobs(y).sum(), sequences), student)
    assert not torch.allclose(expected, sequence_level, atol=1e-3)


def test_the_leave_one_out_baseline_keeps_reward_to_go_unbiased():
    """Two samples per prompt, every pair enumerated: each row's baseline is the other sample's return, computed by the
    same functions the training step uses (leave_one_out_baseline over sequence_returns)."""
    student, teacher, sequences = _token_setup()
    pairs = list(itertools.product(sequences, repeat=2))
    rows = [y for pair in pairs for y in pair]
    student_lp = torch.cat([student.token_logprobs(y) for y in rows])
    teacher_lp = torch.cat([teacher.token_logprobs(y) for y in rows])
    index = token_spans([3] * len(rows))
    returns = sequence_returns(student_lp, teacher_lp, index).reshape(len(pairs), 2)
    baseline = leave_one_out_baseline(returns).reshape(-1)
    per_row = sampled_kl_losses("reward_to_go", student_lp, teacher_lp, index, baseline).reshape(len(rows), 3).sum(1)
    weights = student_lp.detach().reshape(len(pairs), 2, 3).sum(-1).exp().prod(-1)  # π(y1) π(y2)
    expected = _grad((weights[:, None] * per_row.reshape(len(pairs), 2)).sum() / 2, student)  # the mean over the 2 samples
    target = _grad(_sequence_kl(student, lambda y: teacher.token_logprobs(y).sum(), sequences), student)
    torch.testing.assert_close(expected, target, rtol=1e-9, atol=1e-12)
    # and the baseline is not a no-op: the single-pair estimates change
    plain = sampled_kl_losses("reward_to_go", student_lp, teacher_lp, index).reshape(len(rows), 3).sum(1)
    assert not torch.allclose(plain.detach(), per_row.detach())


def test_a_baseline_needs_two_samples_per_prompt():
    with pytest.raises(ValueError, match="N >= 2"):
        leave_one_out_baseline(torch.zeros(4, 1))


# ------------------------------------------------------------------ merged spans: another tokenizer

# Four student tokens cut into spans of 2, 1 and 1 student tokens; the teacher spends 1, 2 and 1 tokens on them.
STUDENT_SPANS = (2, 1, 1)
TEACHER_TOKENS = (1, 2, 1)
SPANS = [(0, 2, 0, 1), (2, 3, 1, 3), (3, 4, 3, 4)]


class SpanTeacher:
    """A teacher whose unit is the span: log q(text of span s | text before it) is a softmax over the V^n_s possible
    contents of the span, a free table per (prefix, span). Its log-prob of a span is split over its own tokens (any
    split: only the span's sum is a probability, which is what the chain rule gives a real teacher)."""

    def __init__(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tables: dict[tuple[int, ...], torch.Tensor] = {}
        at = 0
        for n in STUDENT_SPANS:
            for prefix in itertools.product(range(V), repeat=at):
                self.tables[prefix] = torch.log_softmax(torch.randn(V ** n, generator=generator, dtype=DT) * 2.0, dim=-1)
            at += n

    def span_logprobs(self, y: tuple[int, ...]) -> list[torch.Tensor]:
        out, at = [], 0
        for n in STUDENT_SPANS:
            content = sum(token * V ** (n - 1 - k) for k, token in enumerate(y[at:at + n]))
            out.append(self.tables[y[:at]][content])
            at += n
        return out

    def token_logprobs(self, y: tuple[int, ...]) -> torch.Tensor:
        parts = []
        for value, n in zip(self.span_logprobs(y), TEACHER_TOKENS):
            shares = torch.full((n,), 1.0 / n, dtype=DT) if n == 1 else torch.tensor([0.3, 0.7], dtype=DT)
            parts.append(value * shares)
        return torch.cat(parts)


def _span_setup():
    student, teacher = TinyPolicy(4, seed=2), SpanTeacher(seed=3)
    return student, teacher, list(itertools.product(range(V), repeat=4))


def _myopic_span_kl(student: TinyPolicy, teacher: SpanTeacher) -> torch.Tensor:
    """Σ_s Σ_{text before s} sg(π_θ(it)) KL(π_θ(span s | before) ‖ q_T(span s | before)), spans' contents enumerated."""
    total, at = torch.zeros((), dtype=DT), 0
    for s, n in enumerate(STUDENT_SPANS):
        for prefix in itertools.product(range(V), repeat=at):
            weight = student.token_logprobs(prefix).sum().detach().exp() if prefix else torch.ones((), dtype=DT)
            for content in itertools.product(range(V), repeat=n):
                y = prefix + content
                log_p = student.token_logprobs(y)[at:].sum()
                log_q = teacher.span_logprobs(y + (0,) * (4 - len(y)))[s]  # span s reads only the text up to its end
                total = total + weight * log_p.exp() * (log_p - log_q)
        at += n
    return total


@pytest.mark.parametrize("kind", ["reward", "reward_to_go"])
def test_span_estimators_on_merged_spans_have_their_objectives_gradient(kind):
    student, teacher, sequences = _span_setup()
    index = span_index([SPANS])
    assert index.student_ids.tolist() == [0, 0, 1, 2] and index.teacher_ids.tolist() == [0, 1, 1, 2]

    def loss(y):
        return sampled_kl_losses(kind, student.token_logprobs(y), teacher.token_logprobs(y), index).sum()

    expected = _expected_grad(student, sequences, loss)
    sequence_level = _grad(_sequence_kl(student, lambda y: torch.stack(teacher.span_logprobs(y)).sum(), sequences), student)
    myopic = _grad(_myopic_span_kl(student, teacher), student)
    target, other = (sequence_level, myopic) if kind == "reward_to_go" else (myopic, sequence_level)
    torch.testing.assert_close(expected, target, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(expected, other, atol=1e-3)


# ------------------------------------------------------------------ full-vocabulary divergences

@pytest.mark.parametrize("kind", KINDS)
def test_full_vocabulary_divergences_have_the_gradient_of_their_per_prefix_sum(kind):
    """On sampled prefixes the full-vocabulary loss Σ_t D(π_θ(·|y<t), π_T(·|y<t)) has expected gradient
    Σ_t E_{y<t}[∇D_t] with the prefixes held fixed: the same exact-expectation check, against the float64 reference
    formulas of tests/test_divergences.py."""
    student, teacher, sequences = _token_setup()
    options = PARAMS[kind]

    def loss(y):
        logits = torch.stack([student.logits[student.rows[y[:t]]] for t in range(3)])
        teacher_logits = torch.stack([teacher.logits[teacher.rows[y[:t]]] for t in range(3)])
        return per_token(logits, teacher_logits, kind, **options).sum()

    expected = _expected_grad(student, sequences, loss)
    target = torch.zeros((), dtype=DT)
    for prefix in _prefixes(3):
        weight = student.token_logprobs(prefix).sum().detach().exp() if prefix else torch.ones((), dtype=DT)
        target = target + weight * brute_force(student.logits[student.rows[prefix]], teacher.logits[teacher.rows[prefix]], kind, **options)
    torch.testing.assert_close(expected, _grad(target, student), rtol=1e-9, atol=1e-12)
    assert math.isfinite(float(expected.abs().sum())) and float(expected.abs().sum()) > 1e-3
