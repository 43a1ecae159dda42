"""Discriminator objective for GAD (Ye et al., arXiv 2511.10643): Bradley–Terry between teacher and student responses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> torch.Tensor:
    """L_D = mean over prompts of (1/N) Σ_i −log σ(D(x, y_T) − D(x, y_S^i)).

    teacher_scores: (B,) one teacher response per prompt; student_scores: (B, N) N student samples.
    −log σ(z) is computed as softplus(−z), which stays finite for large |z|.
    """
    if teacher_scores.dim() != 1 or student_scores.dim() != 2 or student_scores.shape[0] != teacher_scores.shape[0]:
        raise ValueError(f"expected teacher (B,) and student (B, N) scores, got {tuple(teacher_scores.shape)} and {tuple(student_scores.shape)}")
    margin = teacher_scores.unsqueeze(1) - student_scores
    return F.softplus(-margin).mean()


def pairwise_accuracy(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> torch.Tensor:
    """d_acc: the share of (teacher, student) pairs the discriminator ranks the right way round."""
    return (teacher_scores.unsqueeze(1) > student_scores).float().mean()
