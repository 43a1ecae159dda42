"""Policy-gradient pieces for on-policy methods (GRPO, Shao et al., arXiv 2402.03300, as GAD uses it, arXiv 2511.10643): GRPO group advantages, PPO-clip, KL estimators.

Per-token functions return unreduced tensors; the caller masks them and averages over the response
tokens of the global batch (the engine's token mean).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i − mean_j r_j) / (std_j r_j + ε) within each prompt's group of N samples.

    rewards: (B, N). std is the unbiased sample std, as in GRPO's reference code; a group of one sample
    (or of identical rewards) gets advantage 0, never NaN.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, N), got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def leave_one_out_baseline(returns: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """b_i = the mean return of the other samples of sample i's prompt, returns (B, N) -> (B, N).

    It does not depend on sample i itself, so subtracting it from i's advantage keeps a score-function estimate
    unbiased (RLOO: Kool et al., 2019; Ahmadian et al., arXiv 2402.14740) while removing the prompt's common level.
    Needs N >= 2. `valid` (B, N), 1/0: only valid samples count as others (a sample whose return is meaningless, e.g.
    one the teacher could not score); a sample with no valid sibling gets 0."""
    if returns.dim() != 2 or returns.shape[1] < 2:
        raise ValueError(f"a leave-one-out baseline needs (B, N >= 2) returns, got {tuple(returns.shape)}")
    valid = torch.ones_like(returns) if valid is None else valid.to(returns.dtype)
    kept = returns * valid
    others = valid.sum(dim=1, keepdim=True) - valid
    return (kept.sum(dim=1, keepdim=True) - kept) / others.clamp(min=1)


def ppo_clip_per_token(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip loss per token: −min(ρ A, clip(ρ, 1−ε, 1+ε) A), ρ = exp(ℓ_θ − ℓ_old).

    Returns (loss, clipped) with clipped = 1.0 where the clipped branch was taken (for the clip fraction).
    advantages broadcast against logprobs (a per-sequence advantage of shape (..., 1) is fine).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped_ratio = torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    clipped = clipped_ratio * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).float()


DRPO_LOG_RATIO_CLAMP = 20.0


def drpo_per_token(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, advantages: torch.Tensor,
                   delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DRPO per token (Yao et al., "Rethinking the Divergence Regularization in LLM RL", arXiv 2606.09821, §3):

        ℓ = −A·r + |A| · sg(μ) · (r − 1)² / (2δ),   r = π_θ(y)/μ(y),  μ the behaviour (sampling) policy.

    Since μ(r − 1)² = (π − μ)²/μ, the penalty is an advantage-weighted quadratic on the sampled token's
    probability shift π − μ, the quantity DPPO's trust region bounds by δ. Its gradient is
    −A·r·w·∇log π with w = 1 − sign(A)(π − μ)/δ: 1 at π = μ, 0 exactly on DPPO's boundary (where DPPO's hard
    mask drops the token) and negative beyond it, a correction instead of a dropped gradient. The log-ratio
    is clamped to ±20 (as verl does) before the exponential. Returns (loss, beyond): beyond = 1.0 where w < 0.
    """
    if delta <= 0:
        raise ValueError(f"DRPO's delta must be > 0, got {delta}")
    behaviour_logprobs = behaviour_logprobs.detach()
    ratio = torch.exp((logprobs - behaviour_logprobs).clamp(-DRPO_LOG_RATIO_CLAMP, DRPO_LOG_RATIO_CLAMP))
    behaviour = behaviour_logprobs.exp()
    loss = -advantages * ratio + advantages.abs() * behaviour * (ratio - 1.0) ** 2 / (2.0 * delta)
    with torch.no_grad():
        shift = logprobs.detach().exp() - behaviour
        beyond = (torch.sign(advantages) * shift > delta).to(loss.dtype)
    return loss, beyond


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = ℓ_θ − ℓ_ref: an unbiased *value* of KL(π_θ ‖ π_ref) on samples from π_θ (can be negative). Not a loss: with
    the sample held fixed its gradient is ∇ℓ_θ, zero in expectation (objectives/spans.py has the distillation losses)."""
    return logprobs - ref_logprobs


K3_LOG_RATIO_CLAMP = 20.0  # |ℓ_ref − ℓ_θ| beyond this is clamped before the exponential
K3_VALUE_CLAMP = 10.0  # and the estimate itself to [−10, 10]
# Where the value clamp saturates: k3(r) = e^r − r − 1 = 10 at r ≈ 2.6109 and r ≈ −10.99998 (solved by bisection,
# tests/test_gad.py checks the gradient on both sides). Both lie inside ±20, so the value clamp binds first.
K3_SATURATES_ABOVE = 2.6108686381498756
K3_SATURATES_BELOW = -10.999983298020256


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(r) − r − 1 with r = ℓ_ref − ℓ_θ: an unbiased value of KL(π_θ ‖ π_ref), ≥ 0 (Schulman's estimator), clamped.

    As a penalty beside a policy loss (GAD's KL to its reference, like verl's "low_var_kl") its gradient is
    E[(1 − π_ref/π_θ)∇ℓ_θ] = ∇KL(π_ref ‖ π_θ), the forward KL's: fine for a small regulariser, wrong as a distillation
    objective (objectives/spans.py).

    A token the student finds very unlikely but the reference does not (ℓ_θ = −90, ℓ_ref = −1) gives
    exp(89): inf in fp32, and an inf loss and gradient. Like verl (kl_penalty "low_var_kl") the log-ratio is
    clamped to ±20 and the estimate to [−10, 10]. The value clamp is the one that acts: k3 reaches 10 at
    r ≈ 2.61 (the reference gives the token e^2.61 ≈ 14 times the student's probability) and at r ≈ −11, so
    the ±20 clamp never binds first. For r in (−11, 2.61) value and gradient are exact. Past r ≈ 2.61 (and below
    r ≈ −11) the gradient is exactly 0 and the token pays a constant penalty of 10: the KL term stops pulling a
    token back once the student has made it about 14 times less likely than the reference does, and further
    drift on such tokens is restrained by nothing but the policy loss.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)
