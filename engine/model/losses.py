"""Distillation losses.

`global_cosine` is the "global cosine similarity loss" of CEMD, in the form confirmed in
RD4AD (`main.py`) and ReContrast (`utils.py`): each sample's whole C·H·W feature map is
flattened into one vector, so the map must be consistent as a whole while single normal
pixels are not over-fitted. `pixel_cosine` is the per-pixel alternative used for ablation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def global_cosine(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    loss = teacher[0].new_zeros(())
    for t, s in zip(teacher, student):
        loss = loss + (1 - F.cosine_similarity(t.detach().flatten(1), s.flatten(1), dim=1)).mean()
    return loss


def pixel_cosine(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    loss = teacher[0].new_zeros(())
    for t, s in zip(teacher, student):
        loss = loss + (1 - F.cosine_similarity(t.detach(), s, dim=1)).mean()
    return loss


def _zero_easy_gradients(student: torch.Tensor, easy: torch.Tensor, factor: float) -> torch.Tensor:
    if not student.requires_grad:
        return student
    keep = torch.where(easy, torch.full_like(easy, factor, dtype=student.dtype), torch.ones_like(easy, dtype=student.dtype))

    student.register_hook(lambda grad: grad * keep)
    return student


def global_cosine_hard(
    teacher: list[torch.Tensor], student: list[torch.Tensor], alpha: float, factor: float = 0.0
) -> torch.Tensor:
    """Hard-mining global cosine (ReContrast `global_cosine_hm`).

    Positions whose per-pixel distance is below mean + alpha·std are "easy": their gradient
    is multiplied by `factor` (0), so only poorly reconstructed positions are optimised.
    """
    loss = teacher[0].new_zeros(())
    for t, s in zip(teacher, student):
        t = t.detach()
        with torch.no_grad():
            d = 1 - F.cosine_similarity(t, s, dim=1, eps=1e-6).unsqueeze(1)
            easy = d < d.mean() + alpha * d.std()
        s = _zero_easy_gradients(s, easy.expand_as(s), factor)
        loss = loss + (1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean()
    return loss


def hard_mining_alpha(step: int, total_steps: int) -> float:
    """ReContrast schedule: alpha ramps from -3 to 1 over the first 10% of steps."""
    return min(-3 + 4 * step / max(0.1 * total_steps, 1.0), 1.0)
