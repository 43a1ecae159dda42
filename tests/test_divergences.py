"""Every divergence against a float64 brute-force reference written from the papers' formulas (values and
gradients), plus the identities the module promises."""

from __future__ import annotations

import pytest
import torch

from opdistill.objectives.divergences import KINDS, per_token

PARAMS = {"fkl": {}, "rkl": {}, "jsd": {"beta": 0.3}, "skl": {"alpha": 0.1}, "srkl": {"alpha": 0.2},
          "veto_fkl": {"beta": 0.6}, "veto_rkl": {"beta": 0.4}}


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def brute_force(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float = 0.0, alpha: float = 0.1,
                temperature: float = 1.0) -> torch.Tensor:
    """Probability-space formulas in float64, one line per kind (GKD arXiv 2306.13649, DistiLLM, Veto arXiv 2601.07155)."""
    ps = torch.softmax(student.double() / temperature, -1)
    pt = torch.softmax(teacher.double() / temperature, -1)
    if kind == "fkl":
        return kl(pt, ps)
    if kind == "rkl":
        return kl(ps, pt)
    if kind == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    if kind == "skl":
        return kl(pt, alpha * pt + (1 - alpha) * ps)
    if kind == "srkl":
        return kl(ps, (1 - alpha) * pt + alpha * ps)
    q = pt * ps.detach() ** beta
    q = q / q.sum(-1, keepdim=True)
    return kl(q, ps) if kind == "veto_fkl" else kl(ps, q)


def random_logits(seed: int, shape=(3, 5, 17), scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale, torch.randn(shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_the_float64_reference(kind, temperature):
    student, teacher = random_logits(1)
    student.requires_grad_(True)
    ours = per_token(student, teacher, kind, temperature=temperature, **PARAMS[kind])
    (grad_ours,) = torch.autograd.grad(ours.sum(), student)
    reference = brute_force(student, teacher, kind, temperature=temperature, **PARAMS[kind])
    (grad_reference,) = torch.autograd.grad(reference.sum(), student)
    assert ours.shape == (3, 5)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-8, atol=1e-12)
    assert (ours >= -1e-12).all()


@pytest.mark.parametrize("kind", KINDS)
def test_float32_logits_agree_with_the_reference_and_the_teacher_gets_no_gradient(kind):
    student, teacher = (x.float() for x in random_logits(2))
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    ours = per_token(student, teacher, kind, **PARAMS[kind])
    ours.sum().backward()
    torch.testing.assert_close(ours.double(), brute_force(student.detach(), teacher.detach(), kind, **PARAMS[kind]), rtol=1e-4, atol=1e-5)
    assert teacher.grad is None


def test_veto_with_beta_zero_is_forward_or_reverse_kl():
    student, teacher = random_logits(3)
    torch.testing.assert_close(per_token(student, teacher, "veto_fkl", beta=0.0), per_token(student, teacher, "fkl"))
    torch.testing.assert_close(per_token(student, teacher, "veto_rkl", beta=0.0), per_token(student, teacher, "rkl"))


def test_jsd_endpoints_raise_and_name_forward_and_reverse_kl():
    """At β = 0 or 1 the generalised JSD is identically 0 (a silent no-op, not forward / reverse KL): an error."""
    student, teacher = random_logits(4)
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="fkl / rkl"):
            per_token(student, teacher, "jsd", beta=beta)
    # in between it is positive and symmetric under swapping the roles with beta -> 1 - beta
    inside = per_token(student, teacher, "jsd", beta=0.3)
    swapped = per_token(teacher, student, "jsd", beta=0.7)
    assert (inside > 0).all()
    torch.testing.assert_close(inside, swapped)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_in_value_and_gradient(kind):
    student, teacher = random_logits(5, shape=(2, 7, 13))
    student.requires_grad_(True)
    whole = per_token(student, teacher, kind, **PARAMS[kind])
    (grad_whole,) = torch.autograd.grad(whole.sum(), student)
    chunked = per_token(student, teacher, kind, chunk_size=3, **PARAMS[kind])
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), student)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_divergence(kind):
    student, teacher = random_logits(6)
    full = per_token(student, teacher, kind, **PARAMS[kind])
    torch.testing.assert_close(per_token(student, teacher, kind, top_k=17, **PARAMS[kind]), full)
    torch.testing.assert_close(per_token(student, teacher, kind, top_k=17, tail=False, **PARAMS[kind]), full)


def test_top_k_with_a_tail_bucket_is_the_divergence_of_the_coarsened_distributions():
    student, teacher = random_logits(7, shape=(4, 9))
    k = 3
    index = teacher.topk(k, -1).indices
    ps, pt = torch.softmax(student, -1), torch.softmax(teacher, -1)
    coarse_s = torch.cat([ps.gather(-1, index), 1 - ps.gather(-1, index).sum(-1, keepdim=True)], -1)
    coarse_t = torch.cat([pt.gather(-1, index), 1 - pt.gather(-1, index).sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(per_token(student, teacher, "fkl", top_k=k), kl(coarse_t, coarse_s))
    torch.testing.assert_close(per_token(student, teacher, "rkl", top_k=k), kl(coarse_s, coarse_t))


@pytest.mark.parametrize("kind", KINDS)
def test_masked_vocabulary_entries_give_no_nan_and_change_nothing(kind):
    student, teacher = random_logits(8, shape=(2, 3, 10))
    masked_s, masked_t = student.clone(), teacher.clone()
    masked_s[..., 7:] = float("-inf")
    masked_t[..., 7:] = float("-inf")
    masked_s.requires_grad_(True)
    value = per_token(masked_s, masked_t, kind, **PARAMS[kind])
    (grad,) = torch.autograd.grad(value.sum(), masked_s)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert torch.equal(grad[..., 7:], torch.zeros_like(grad[..., 7:]))
    torch.testing.assert_close(value, brute_force(student[..., :7], teacher[..., :7], kind, **PARAMS[kind]))
    chunked = per_token(masked_s, masked_t, kind, chunk_size=2, top_k=4, **PARAMS[kind])
    assert torch.isfinite(chunked).all()


def test_bad_arguments_are_clear_errors():
    student, teacher = random_logits(9)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        per_token(student, teacher, "kl")
    with pytest.raises(ValueError, match="differ in shape"):
        per_token(student, teacher[..., :5], "fkl")
    with pytest.raises(ValueError, match="alpha must be in"):
        per_token(student, teacher, "skl", alpha=1.0)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_hand_written_kl_backward_equals_autograd_through_the_generic_path(kind):
    """per_token takes ForwardOrReverseKL for finite fkl / rkl; it must match autograd through _per_row
    (on wide, real-logit-like ranges, chunked unevenly)."""
    from opdistill.objectives.divergences import ForwardOrReverseKL, _per_row

    torch.manual_seed(3)
    student = (torch.randn(7, 50, dtype=torch.float64) * 12).requires_grad_(True)
    teacher = torch.randn(7, 50, dtype=torch.float64) * 12
    weights = torch.rand(7, dtype=torch.float64)
    fast = ForwardOrReverseKL.apply(student, teacher, kind == "rkl", 0.7, 3)
    (fast_grad,) = torch.autograd.grad((fast * weights).sum(), student)
    generic = _per_row(student, teacher, kind, 0.0, 0.1, 0.7, None, True)
    (generic_grad,) = torch.autograd.grad((generic * weights).sum(), student)
    torch.testing.assert_close(fast, generic, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast_grad, generic_grad, rtol=1e-9, atol=1e-12)
