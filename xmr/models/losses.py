"""The authors' training objectives on a square score matrix (diagonal = matching pairs).

Each comes in the authors' two variants: ``hardest=True`` (their ``max_violation``: the
hardest negative per image and per caption) and ``hardest=False`` (all negatives).
"""

from __future__ import annotations

import torch

BCE_EPS = 1e-6
TEMPERATURE = 0.05  # of the prefilter heads' contrastive loss (inner products of unit vectors / 0.05)


def _off_diagonal(scores: torch.Tensor) -> torch.Tensor:
    assert scores.dim() == 2 and scores.size(0) == scores.size(1), f"need a square score matrix, got {list(scores.shape)}"
    return ~torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)


def triplet_loss(scores: torch.Tensor, margin: float, hardest: bool = True) -> torch.Tensor:
    """VSE++ hinge loss ``[margin + s_neg - s_pos]+`` per image (over captions) and per caption
    (over images): the hardest negative of each, or the sum over all negatives."""
    positives = scores.diag()
    off = _off_diagonal(scores)
    cost_caption = (margin + scores - positives[:, None]).clamp(min=0) * off  # per image row
    cost_image = (margin + scores - positives[None, :]).clamp(min=0) * off  # per caption column
    if hardest:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()


def bce_loss(scores: torch.Tensor, hardest: bool = True) -> torch.Tensor:
    """CAMP's binary cross-entropy on sigmoid scores, as released.

    hardest: ``-(2 Σ log s_ii + Σ_rows min log(1-s) + Σ_cols min log(1-s))`` (the positive
    term is counted twice in their code, and the diagonal contributes 0 to the minima);
    otherwise ``-(mean_i log s_ii + mean_ij (1-I) log(1-s_ij))``.
    """
    s = scores.clamp(min=BCE_EPS, max=1.0 - BCE_EPS)
    off = _off_diagonal(s)
    negative = torch.log(1.0 - s) * off
    if hardest:
        positive = torch.log(s.diag()).sum()
        return -(2 * positive + negative.min(dim=1).values.sum() + negative.min(dim=0).values.sum())
    return -(torch.log(s.diag()).mean() + negative.mean())


def contrastive_loss(images: torch.Tensor, texts: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The prefilter heads' loss: symmetric InfoNCE over a batch of matching unit vectors
    ``[B, G]`` (row i of ``images`` shows caption i), in-batch negatives both ways."""
    logits = images @ texts.T / temperature
    target = torch.arange(logits.size(0), device=logits.device)
    return (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
