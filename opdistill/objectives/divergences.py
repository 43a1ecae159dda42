"""Token-level divergences between the student's and the teacher's next-token distributions (GKD, Agarwal et al., arXiv 2306.13649; DistiLLM's skew KL, Ko et al., arXiv 2402.03898; Veto, Jang et al., arXiv 2601.07155).

`per_token` returns one value per position (no reduction, no mask: the caller masks and averages).
Everything is computed in log space from logits; vocabulary entries masked with -inf (in both models)
contribute exactly 0 and give finite values and gradients. `chunk_size` computes the positions in
chunks and recomputes each chunk in the backward pass, so the intermediates take O(chunk × V) memory
instead of O(T × V). `top_k` restricts both distributions to the teacher's k most likely tokens, with
the rest of each distribution's mass in one tail bucket (or renormalised over the k when tail=False).

Kinds (p_T teacher, p_θ student; KL(p‖q) = Σ_v p(v) (log p(v) − log q(v))):
  fkl       KL(p_T ‖ p_θ)
  rkl       KL(p_θ ‖ p_T)
  jsd       β KL(p_T ‖ m) + (1−β) KL(p_θ ‖ m), m = β p_T + (1−β) p_θ formed in probability space (GKD).
            At β = 0 and β = 1 the mixture equals one side and the value is identically 0: these
            endpoints are NOT forward / reverse KL, so per_token raises and names fkl / rkl.
  skl       KL(p_T ‖ α p_T + (1−α) p_θ)          (DistiLLM skew KL)
  srkl      KL(p_θ ‖ (1−α) p_T + α p_θ)          (skew reverse KL)
  veto_fkl  KL(Q ‖ p_θ),  Q ∝ p_T · sg(p_θ)^β    (Veto, arXiv 2601.07155: a product target, not a mixture)
  veto_rkl  KL(p_θ ‖ Q);  β = 0 gives fkl / rkl exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

KINDS = ("fkl", "rkl", "jsd", "skl", "srkl", "veto_fkl", "veto_rkl")


def default_beta(kind: str) -> float:
    """β when none is given: 0.5 for jsd (the symmetric JSD), 0 for Veto (plain forward / reverse KL)."""
    return 0.5 if kind == "jsd" else 0.0


def kl_from_logprobs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p (log p − log q) over the last dim; entries with p = 0 (log p = −inf) contribute 0, gradients included."""
    present = torch.isfinite(log_p)
    # Zero both sides where p = 0 *before* subtracting: −inf − (−inf) would be NaN, and NaN survives a
    # torch.where in the backward pass.
    diff = log_p.masked_fill(~present, 0.0) - log_q.masked_fill(~present, 0.0)
    return (log_p.exp() * diff).sum(dim=-1)


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w p + (1 − w) q) for 0 < w < 1, formed in probability space through logsumexp."""
    # Where both are masked (−inf), logsumexp's gradient is NaN: compute on zeros there and put −inf back.
    masked = torch.isinf(log_p) & torch.isinf(log_q)
    stacked = torch.stack([log_p.masked_fill(masked, 0.0) + math.log(weight_p), log_q.masked_fill(masked, 0.0) + math.log1p(-weight_p)])
    return torch.logsumexp(stacked, dim=0).masked_fill(masked, float("-inf"))


def veto_target(log_t: torch.Tensor, log_s: torch.Tensor, beta: float) -> torch.Tensor:
    """log Q with Q ∝ p_T · p_θ^β, the student factor stop-gradient."""
    unnormalised = log_t + beta * log_s.detach()
    return unnormalised - torch.logsumexp(unnormalised, dim=-1, keepdim=True)


def divergence_from_logprobs(log_s: torch.Tensor, log_t: torch.Tensor, kind: str, beta: float, alpha: float) -> torch.Tensor:
    """The divergence `kind` between two normalised log-distributions over the last dim."""
    if kind == "fkl":
        return kl_from_logprobs(log_t, log_s)
    if kind == "rkl":
        return kl_from_logprobs(log_s, log_t)
    if kind == "jsd":
        mixture = log_mixture(log_t, log_s, beta)
        return beta * kl_from_logprobs(log_t, mixture) + (1.0 - beta) * kl_from_logprobs(log_s, mixture)
    if kind == "skl":
        return kl_from_logprobs(log_t, log_mixture(log_t, log_s, alpha))
    if kind == "srkl":
        return kl_from_logprobs(log_s, log_mixture(log_s, log_t, alpha))
    if kind == "veto_fkl":
        return kl_from_logprobs(veto_target(log_t, log_s, beta), log_s)
    if kind == "veto_rkl":
        return kl_from_logprobs(log_s, veto_target(log_t, log_s, beta))
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(KINDS)}")


TAIL_FLOOR = 1e-30  # smallest tail mass: a top-k holding all the mass (up to rounding) gives log 1e-30, not −inf


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012); x is capped just below 0."""
    x = x.clamp(max=-TAIL_FLOOR)
    near_zero = x > -math.log(2.0)
    # Each branch sees only inputs it is defined for, so the unused branch cannot put NaN into the gradient.
    return torch.where(near_zero, torch.log(-torch.expm1(torch.where(near_zero, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x))))


def restrict_to_teacher_top_k(log_s: torch.Tensor, log_t: torch.Tensor, k: int, tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions over the teacher's top-k tokens, plus one tail bucket holding the rest of each
    distribution's mass (tail=True), or renormalised over the k tokens (tail=False)."""
    top_t, index = log_t.topk(min(k, log_t.shape[-1]), dim=-1)
    return on_teacher_top_k(log_s.gather(-1, index), top_t, tail)


def on_teacher_top_k(top_s: torch.Tensor, top_t: torch.Tensor, tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' log-probs of the teacher's top-k tokens -> two distributions over k tokens (+ a tail bucket)."""
    if not tail:
        return top_s - torch.logsumexp(top_s, -1, keepdim=True), top_t - torch.logsumexp(top_t, -1, keepdim=True)
    tail_t = log1mexp(torch.logsumexp(top_t, -1, keepdim=True))
    tail_s = log1mexp(torch.logsumexp(top_s, -1, keepdim=True))
    return torch.cat([top_s, tail_s], -1), torch.cat([top_t, tail_t], -1)


def _per_row(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, beta: float, alpha: float,
             temperature: float, top_k: int | None, tail: bool) -> torch.Tensor:
    # At least fp32 (bf16 logits lose too much in log_softmax); float64 stays float64.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if top_k and top_k < log_t.shape[-1]:
        log_s, log_t = restrict_to_teacher_top_k(log_s, log_t, top_k, tail)
    return divergence_from_logprobs(log_s, log_t, kind, beta, alpha)


class ForwardOrReverseKL(torch.autograd.Function):
    """Row-wise fkl or rkl from logits with a hand-written backward, in chunks of rows.

    The generic path (autograd through log_softmax, exp, masks and products, each chunk recomputed in the
    backward pass) makes about a dozen V-wide passes per position; this one makes five forward and five
    backward and keeps nothing V-wide between them. Gradients w.r.t. the student logits z (τ the
    temperature, p = softmax(z/τ), q = softmax(w/τ) the teacher):
        rkl = Σ p (log p − log q):  ∂/∂z = p ⊙ (log p − log q − rkl) / τ
        fkl = Σ q (log q − log p):  ∂/∂z = (p − q) / τ
    Only for finite logits without top-k (per_token checks); the generic path covers masked vocabularies.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, reverse: bool, temperature: float, chunk: int) -> torch.Tensor:
        dtype = torch.promote_types(student.dtype, torch.float32)
        values = []
        for start in range(0, len(student), chunk):
            z, w = student[start : start + chunk].to(dtype) / temperature, teacher[start : start + chunk].to(dtype) / temperature
            log_s, log_t = torch.log_softmax(z, dim=-1), torch.log_softmax(w, dim=-1)
            # softmax, not log_s.exp(): torch.exp is many times slower on the far-negative tail of real logits
            weights = torch.softmax(z, dim=-1) if reverse else torch.softmax(w, dim=-1)
            values.append((weights * (log_s - log_t if reverse else log_t - log_s)).sum(dim=-1))
        value = torch.cat(values)
        ctx.save_for_backward(student, teacher, value)
        ctx.reverse, ctx.temperature, ctx.chunk = reverse, temperature, chunk
        return value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        student, teacher, value = ctx.saved_tensors
        dtype = value.dtype
        grads = []
        for start in range(0, len(student), ctx.chunk):
            z = student[start : start + ctx.chunk].to(dtype) / ctx.temperature
            w = teacher[start : start + ctx.chunk].to(dtype) / ctx.temperature
            p = torch.softmax(z, dim=-1)
            if ctx.reverse:
                direction = p * (torch.log_softmax(z, dim=-1) - torch.log_softmax(w, dim=-1) - value[start : start + ctx.chunk, None])
            else:
                direction = p - torch.softmax(w, dim=-1)
            grads.append((direction * (grad[start : start + ctx.chunk, None] / ctx.temperature)).to(student.dtype))
        return torch.cat(grads), None, None, None, None


def _checked_options(kind: str, beta: float | None, alpha: float | None, temperature: float) -> tuple[float, float]:
    """(β, α) with their defaults, after checking the kind and the ranges."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(KINDS)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    beta = default_beta(kind) if beta is None else beta
    alpha = 0.1 if alpha is None else alpha
    if kind in ("skl", "srkl") and not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) for {kind}, got {alpha}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd with beta {beta}: at β = 0 or 1 the generalised JSD is identically 0, not forward or reverse KL; "
                         "use beta in (0, 1), or kind fkl / rkl")
    return beta, alpha


def per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, *, beta: float | None = None,
              alpha: float | None = None, temperature: float = 1.0, chunk_size: int | None = None,
              top_k: int | None = None, tail: bool = True) -> torch.Tensor:
    """Divergence per position, shape logits.shape[:-1]. beta: the JSD weight (jsd, default 0.5) or the Veto β
    (veto_*, default 0); alpha: the skew (skl / srkl, default 0.1). The teacher side never gets a gradient."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape")
    beta, alpha = _checked_options(kind, beta, alpha, temperature)
    teacher_logits = teacher_logits.detach()
    leading, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    student_rows, teacher_rows = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    plain_kl = kind in ("fkl", "rkl") or (kind.startswith("veto") and beta == 0.0)  # Veto at β = 0 is fkl / rkl exactly
    if plain_kl and not (top_k and top_k < vocab) and not (torch.isinf(student_rows).any() or torch.isinf(teacher_rows).any()):
        chunk = chunk_size or len(student_rows)
        reverse = kind in ("rkl", "veto_rkl")
        return ForwardOrReverseKL.apply(student_rows, teacher_rows, reverse, temperature, max(1, chunk)).reshape(leading)
    return _in_chunks(_per_row, student_rows, (teacher_rows,), (kind, beta, alpha, temperature, top_k, tail), chunk_size).reshape(leading)


def _in_chunks(fn: Any, student_rows: torch.Tensor, teacher_rows: tuple[torch.Tensor, ...], args: tuple, chunk_size: int | None) -> torch.Tensor:
    """fn(student chunk, *teacher chunks, *args) over chunks of rows, each recomputed in the backward pass."""
    if not chunk_size or chunk_size >= len(student_rows):
        return fn(student_rows, *teacher_rows, *args)
    recompute = torch.is_grad_enabled() and student_rows.requires_grad
    parts = []
    for start in range(0, len(student_rows), chunk_size):
        chunk = (student_rows[start : start + chunk_size], *(t[start : start + chunk_size] for t in teacher_rows))
        # Recomputing the chunk in backward keeps only its inputs alive, not its V-wide intermediates.
        parts.append(checkpoint(fn, *chunk, *args, use_reentrant=False) if recompute else fn(*chunk, *args))
    return torch.cat(parts)


def _top_k_rows(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor, kind: str, beta: float,
                alpha: float, temperature: float, tail: bool) -> torch.Tensor:
    log_s = torch.log_softmax(student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)) / temperature, dim=-1)
    return divergence_from_logprobs(*on_teacher_top_k(log_s.gather(-1, top_ids), top_logprobs.to(log_s.dtype), tail), kind, beta, alpha)


def per_token_top_k(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor, kind: str, *,
                    beta: float | None = None, alpha: float | None = None, temperature: float = 1.0, chunk_size: int | None = None,
                    tail: bool = True) -> torch.Tensor:
    """per_token(..., top_k=k) when the teacher is known only by its top-k: `top_ids` (…, k) its k most likely tokens and
    `top_logprobs` their log-probs (already at `temperature`), as a remote server returns them. Equal to per_token
    with the teacher's full logits and the same k (tested)."""
    if top_ids.shape != top_logprobs.shape or top_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)}, top-k ids {tuple(top_ids.shape)} and log-probs "
                         f"{tuple(top_logprobs.shape)} do not line up")
    beta, alpha = _checked_options(kind, beta, alpha, temperature)
    leading, vocab, k = student_logits.shape[:-1], student_logits.shape[-1], top_ids.shape[-1]
    rows = (top_ids.reshape(-1, k), top_logprobs.detach().reshape(-1, k))
    return _in_chunks(_top_k_rows, student_logits.reshape(-1, vocab), rows, (kind, beta, alpha, temperature, tail), chunk_size).reshape(leading)
