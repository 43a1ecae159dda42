"""Objectives against float64 brute-force references written out term by term."""

from __future__ import annotations

import math

import pytest
import torch

from opdistill.objectives.policy import drpo_per_token, group_advantages, kl_k1, kl_k3, ppo_clip_per_token
from opdistill.objectives.preference import bradley_terry, pairwise_accuracy


def test_bradley_terry_matches_the_formula_and_is_stable():
    torch.manual_seed(0)
    teacher, student = torch.randn(5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    brute = sum(-math.log(1 / (1 + math.exp(-(teacher[b] - student[b, i]).item()))) for b in range(5) for i in range(3)) / 15
    assert bradley_terry(teacher, student).item() == pytest.approx(brute, rel=1e-12)
    # a large margin neither overflows nor underflows
    far = bradley_terry(torch.tensor([1000.0]), torch.tensor([[-1000.0, 1000.0]]))
    assert torch.isfinite(far) and far.item() == pytest.approx(0.5 * 0 + 0.5 * math.log(2), rel=1e-6)
    t = torch.zeros(2, requires_grad=True)
    bradley_terry(t, torch.zeros(2, 4)).backward()
    assert torch.allclose(t.grad, torch.full((2,), -0.25)), "dL/dt = −σ(−0)/B"
    with pytest.raises(ValueError):
        bradley_terry(torch.zeros(2), torch.zeros(3, 4))


def test_pairwise_accuracy():
    assert pairwise_accuracy(torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 2.0], [-1.0, -2.0]])).item() == 0.75


def test_group_advantages_normalise_within_each_group_only():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 10.0, 10.0], [0.0, 100.0, 0.0, 100.0]], dtype=torch.float64)
    adv = group_advantages(rewards)
    for row in range(3):
        r = rewards[row].tolist()
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
        expected = [(x - mean) / (std + 1e-6) for x in r]
        assert adv[row].tolist() == pytest.approx(expected, abs=1e-9)
    assert torch.all(adv[1] == 0), "identical rewards give zero advantage, not NaN"
    assert torch.all(group_advantages(torch.tensor([[3.0], [5.0]])) == 0), "a group of one gives zero advantage"


def test_ppo_clip_takes_the_pessimistic_branch():
    old = torch.zeros(4, dtype=torch.float64)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 1.5], dtype=torch.float64))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    loss, clipped = ppo_clip_per_token(new, old, adv, clip=0.2)
    # ρ=1.5, A>0: clipped to 1.2 → −1.2; ρ=0.5, A<0: clipped to 0.8 → +0.8; ρ=1.1 inside → −1.1; ρ=1.5, A<0 → +1.5
    assert loss.tolist() == pytest.approx([-1.2, 0.8, -1.1, 1.5])
    assert clipped.tolist() == [1.0, 1.0, 0.0, 0.0]
    x = new.clone().requires_grad_(True)
    ppo_clip_per_token(x, old, adv)[0].sum().backward()
    assert x.grad[0] == 0 and x.grad[1] == 0, "no gradient through a clipped ratio"
    assert x.grad[2].item() == pytest.approx(-1.1) and x.grad[3].item() == pytest.approx(1.5)


def test_kl_estimators():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -2.0, -0.1], dtype=torch.float64)
    expected_k3 = [math.exp(r - l) - (r - l) - 1 for l, r in zip(lp.tolist(), ref.tolist())]
    assert kl_k3(lp, ref).tolist() == pytest.approx(expected_k3)
    assert kl_k1(lp, ref).tolist() == pytest.approx([0.5, 0.0, -0.4])
    assert torch.all(kl_k3(torch.randn(100), torch.randn(100)) >= 0)
    # on samples from p, the mean of k3 estimates KL(p || q)
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    samples = torch.multinomial(p, 200_000, replacement=True)
    estimate = kl_k3(p.log()[samples], q.log()[samples]).mean().item()
    assert estimate == pytest.approx((p * (p / q).log()).sum().item(), rel=0.02)


def test_k3_is_clamped_like_verl_so_a_very_unlikely_token_gives_a_finite_loss_and_gradient():
    """Student log-prob −90, reference −1: unclamped k3 is exp(89) = inf in fp32; clamped it is at most 10."""
    logprobs = torch.tensor([-90.0, -1.2, -3.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -2.5])
    value = kl_k3(logprobs, ref)
    assert torch.isfinite(value).all() and value[0] == 10.0
    (grad,) = torch.autograd.grad(value.sum(), logprobs)
    assert torch.isfinite(grad).all() and grad[0] == 0.0
    # inside the bounds the value is the plain estimator
    inside = torch.exp(ref[1:] - logprobs[1:]) - (ref[1:] - logprobs[1:]) - 1.0
    torch.testing.assert_close(value[1:], inside.detach())


def test_drpo_gradient_is_the_bounded_weight_and_vanishes_on_dppos_boundary():
    """float64: ∂ℓ/∂log π = −A·r·w with w = 1 − sign(A)(π − μ)/δ; w = 0 exactly where DPPO's mask drops the token."""
    delta = 0.15
    behaviour = torch.log(torch.tensor([0.30, 0.30, 0.30, 0.30, 0.50, 0.02], dtype=torch.float64))
    policy = torch.log(torch.tensor([0.30, 0.40, 0.45, 0.10, 0.20, 0.02], dtype=torch.float64)).requires_grad_(True)
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, 2.0, 0.0], dtype=torch.float64)
    loss, beyond = drpo_per_token(policy, behaviour, advantages, delta)
    (grad,) = torch.autograd.grad(loss.sum(), policy)
    p, mu = policy.detach().exp(), behaviour.exp()
    ratio, weight = p / mu, 1 - torch.sign(advantages) * (p - mu) / delta
    torch.testing.assert_close(grad, -advantages * ratio * weight, rtol=1e-12, atol=1e-12)
    # π = μ: plain policy gradient, ℓ = −A; A = 0: nothing
    assert loss[0].item() == pytest.approx(-1.0) and loss[5].item() == 0.0 and grad[5].item() == 0.0
    # shift 0.15 with A > 0 sits exactly on the boundary (w = 0); 0.15 < shift with A > 0 is beyond (w < 0, corrective)
    assert abs(weight[2].item()) < 1e-12 and grad[2].abs().item() < 1e-12
    assert beyond[[0, 1, 3, 4, 5]].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]  # index 2 is on the boundary itself
    assert weight[3] < 0 and grad[3] < 0  # A < 0 and the token already lost 0.2 > δ of mass: pushed back up
    # DPPO's Binary-TV mask keeps a token iff sign(A)(π − μ) <= δ: DRPO's weight is positive exactly there
    kept = torch.sign(advantages) * (p - mu) <= delta + 1e-12
    assert bool(((weight > -1e-12) == kept)[advantages != 0].all())


def test_drpo_rejects_a_non_positive_delta():
    with pytest.raises(ValueError, match="delta"):
        drpo_per_token(torch.zeros(2), torch.zeros(2), torch.ones(2), 0.0)

