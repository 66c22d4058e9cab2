"""IMRAM (Chen et al., CVPR 2020): iterative matching with recurrent attention memory.

Scores every (image, caption) pair at once: tensors carry a pair grid ``(Ni, Nt, ...)``.
Padded words are masked so results equal the authors' code, which slices each caption to
its length before matching.
"""

from __future__ import annotations

import torch
from torch import nn

from xmr.data.vocab import Vocabulary
from xmr.models.base import RetrievalModel
from xmr.models.config import ImramConfig
from xmr.models.layers import cosine, l2norm, leaky_relu, length_mask, masked_mean
from xmr.models.losses import triplet_loss


def attend(query: torch.Tensor, context: torch.Tensor, lambda_softmax: float,
           query_mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """IMRAM's attention of each query token over the context tokens.

    query ``(..., Q, D)``, context ``(..., C, D)`` (broadcastable batch dims); masks are bool
    ``(..., Q)`` / ``(..., C)``, true at real tokens. Returns attended context ``(..., Q, D)``.
    """
    s = leaky_relu(context @ query.transpose(-1, -2))  # (..., C, Q)
    if query_mask is not None:  # padded queries must not enter the norm across queries
        s = s * query_mask.unsqueeze(-2).to(s.dtype)
    s = l2norm(s, dim=-1)  # each context row normalised across the query axis
    logits = lambda_softmax * s.transpose(-1, -2)  # (..., Q, C)
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask.unsqueeze(-2), float("-inf"))
    return torch.softmax(logits, dim=-1) @ context  # (..., Q, D)


class MemoryUnit(nn.Module):
    """Memory distillation: ``q <- g*q + (1-g)*tanh(W_l [q; a] + b_l)``, ``g = σ(W_g [q; a] + b_g)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim)
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        query = query.expand_as(attended)
        both = torch.cat([query, attended], dim=-1)  # (..., 2D)
        gate = torch.sigmoid(self.gate(both))
        return query * gate + torch.tanh(self.linear(both)) * (1 - gate)


class Imram(RetrievalModel):
    config: ImramConfig

    def __init__(self, config: ImramConfig, vocab: Vocabulary | None = None) -> None:
        super().__init__(config, vocab)
        self.memory_t2i = MemoryUnit(config.embed_size)  # authors: linear_t2i / gate_t2i
        self.memory_i2t = MemoryUnit(config.embed_size)  # authors: linear_i2t / gate_i2t

    def _match(self, query0: torch.Tensor, context: torch.Tensor, memory: MemoryUnit,
               query_mask: torch.Tensor | None, context_mask: torch.Tensor | None) -> torch.Tensor:
        """Per-step scores ``[K, Ni, Nt]`` of one direction; query0/context on the pair grid."""
        cfg = self.config
        query = query0
        steps = []
        for k in range(cfg.steps):
            attended = attend(query, context, cfg.lambda_softmax, query_mask, context_mask)  # (Ni, Nt, Q, D)
            steps.append(masked_mean(cosine(query0, attended), query_mask))  # (Ni, Nt)
            if k + 1 < cfg.steps:  # the authors also update after the last step; the result is unused
                query = memory(query, attended)
                if cfg.memory_norm:
                    query = l2norm(query)
        return torch.stack(steps)

    def text_steps(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Text-IMRAM: words attend regions. ``[K, Ni, Nt]``."""
        words = cap_emb.unsqueeze(0)  # (1, Nt, L, D)
        regions = img_emb.unsqueeze(1)  # (Ni, 1, R, D)
        word_mask = length_mask(lengths, cap_emb.size(1)).unsqueeze(0)  # (1, Nt, L)
        return self._match(words, regions, self.memory_t2i, word_mask, None)

    def image_steps(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Image-IMRAM: regions attend words. ``[K, Ni, Nt]``."""
        regions = img_emb.unsqueeze(1)  # (Ni, 1, R, D)
        words = cap_emb.unsqueeze(0)  # (1, Nt, L, D)
        word_mask = length_mask(lengths, cap_emb.size(1)).unsqueeze(0)  # (1, Nt, L)
        return self._match(regions, words, self.memory_i2t, None, word_mask)

    def _score(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mode = self.config.mode
        score = img_emb.new_zeros(img_emb.size(0), cap_emb.size(0))
        if mode in ("text", "full"):
            score = score + self.text_steps(img_emb, cap_emb, lengths).sum(0)
        if mode in ("image", "full"):
            score = score + self.image_steps(img_emb, cap_emb, lengths).sum(0)
        return score

    def loss(self, scores: torch.Tensor, hardest: bool = True) -> torch.Tensor:
        return triplet_loss(scores, self.config.margin, hardest)
