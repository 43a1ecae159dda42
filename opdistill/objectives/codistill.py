"""OPCoD's two controls on a tutor's feedback, as pure tensor functions (method `cod`, docs/cod.md).

Byeon et al., "Be My Tutor: On-Policy Co-Distillation for Mutual LLM Improvement via Peer Feedback"
(arXiv 2606.14368) name cognizance-based gating (when a peer gives feedback) and feedback anchoring
(grounding the feedback in the problem). Their public abstract gives no formulas, and their feedback is
text that a peer writes; here the peer is a white-box tutor whose feedback is its next-token distribution
on the learner's own response. Both functions are this project's choices for that setting:

- `anchored_logits`: the tutor's log-probs with the problem, pushed away from its log-probs without the
  problem (classifier-free guidance on the problem: Sanchez et al., "Stay on topic with Classifier-Free
  Guidance", arXiv 2306.17806). What the problem explains is kept and sharpened; what the tutor would say
  whatever the problem (its habits) is damped.
- `cognizance_gate`: the tutor gives feedback on a response only when it recognises the response as not
  its own: the learner's mean per-token log-ratio log p_learner(y_t) − log p_tutor(y_t) on its own sample
  (the k1 estimate of KL(learner ‖ tutor) along it) exceeds a margin. A response the tutor would have given
  itself gets no update, so the learner stops being pulled once it has the tutor's behaviour.
"""

from __future__ import annotations

import torch


def anchored_logits(problem_logits: torch.Tensor, free_logits: torch.Tensor, strength: float) -> torch.Tensor:
    """log p(x) + γ (log p(x) − log p(∅)) per position, from the tutor's logits with the problem (x) and without
    it (∅), same shape (..., V). γ = 0 returns `problem_logits` unchanged. The result is unnormalised log-space
    (the divergences normalise it). A token impossible with the problem stays impossible; where either side is
    −inf the difference counts as 0, so no inf − inf appears."""
    if strength < 0:
        raise ValueError(f"anchoring strength must be >= 0, got {strength}")
    if strength == 0:
        return problem_logits
    dtype = torch.promote_types(problem_logits.dtype, torch.float32)  # bf16 logits are computed in fp32; float64 stays
    with_problem = torch.log_softmax(problem_logits.to(dtype), dim=-1)
    without = torch.log_softmax(free_logits.to(dtype), dim=-1)
    difference = torch.where(torch.isfinite(with_problem) & torch.isfinite(without), with_problem - without,
                             torch.zeros_like(with_problem))
    return with_problem + strength * difference


def response_means(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of each response's slice of a flat (tokens,) tensor laid out row-major (response i has lengths[i])."""
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths.to(values.device))
    sums = torch.zeros(len(lengths), dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    return sums / lengths.to(values.device).clamp(min=1)


def cognizance_gate(learner_logprobs: torch.Tensor, tutor_logprobs: torch.Tensor, lengths: torch.Tensor,
                    margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, disagreement) per response: disagreement_i = mean_t log p_learner(y_t) − log p_tutor(y_t) over
    response i's tokens (flat, row-major, like rollout.response_targets), gate_i = 1.0 when it exceeds
    `margin`, else 0.0. No gradient flows through either."""
    difference = (learner_logprobs - tutor_logprobs).detach()
    disagreement = response_means(difference.to(torch.promote_types(difference.dtype, torch.float32)), lengths)
    return (disagreement > margin).float(), disagreement
