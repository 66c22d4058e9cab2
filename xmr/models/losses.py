"""The authors' training objectives on a square score matrix (diagonal = matching pairs)."""

from __future__ import annotations

import torch

BCE_EPS = 1e-6


def _off_diagonal(scores: torch.Tensor) -> torch.Tensor:
    assert scores.dim() == 2 and scores.size(0) == scores.size(1), f"need a square score matrix, got {list(scores.shape)}"
    return ~torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)


def triplet_hardest_negative(scores: torch.Tensor, margin: float) -> torch.Tensor:
    """VSE++ ranking loss with the hardest negative per image and per caption (summed)."""
    positives = scores.diag()
    off = _off_diagonal(scores)
    cost_caption = (margin + scores - positives[:, None]).clamp(min=0) * off  # per image row
    cost_image = (margin + scores - positives[None, :]).clamp(min=0) * off  # per caption column
    return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()


def bce_hardest_negative(scores: torch.Tensor) -> torch.Tensor:
    """CAMP's loss on sigmoid scores: -(2 Σ log s_ii + Σ_rows min log(1-s) + Σ_cols min log(1-s)).

    As released: the positive term is counted twice and the hardest negative is the
    off-diagonal minimum of log(1 - s) (the diagonal contributes 0 to the minimum).
    """
    s = scores.clamp(min=BCE_EPS, max=1.0 - BCE_EPS)
    off = _off_diagonal(s)
    positive = torch.log(s.diag()).sum()
    negative = torch.log(1.0 - s) * off
    return -(2 * positive + negative.min(dim=1).values.sum() + negative.min(dim=0).values.sum())
