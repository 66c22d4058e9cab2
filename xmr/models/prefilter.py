"""The prefilter head: one global vector per image and per caption, from the encoders' own outputs.

Cross-attention must score every pair; a search over a large gallery shortlists first with
these vectors (their inner product ranks a whole gallery with one matrix product) and
rescores only the shortlist exactly (``Scorer.search(..., shortlist=K)``). Each modality's
head maps every token of the encoder's output (region embeddings ``[N, R, D]``, word
embeddings ``[N, L, D]``) through a small MLP (``D -> HEAD_WIDTH * G -> G``, ReLU), averages
over the real tokens and l2-normalises: ``[N, G]``. Mapping tokens before pooling keeps what
belongs to one region together (a red car is not a red dog beside a car); projecting the
pooled embeddings instead lost 4.4 rsum at a 32-item shortlist on the synthetic IMRAM
(docs/retrieval.md). A query's vector costs nothing beyond the encoding it already does.

``xmr train`` trains the heads beside the model's own loss (``contrastive_loss``);
``xmr distill`` trains them for an existing checkpoint on its frozen encoders.
"""

from __future__ import annotations

import torch
from torch import nn

from xmr.models.config import HEAD_WIDTH
from xmr.models.layers import l2norm, masked_mean


class GlobalHead(nn.Module):
    """Tokens ``[N, T, D]`` (and a bool mask ``[N, T]`` of the real ones) -> unit vectors ``[N, G]``."""

    def __init__(self, embed_size: int, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_size, HEAD_WIDTH * dim), nn.ReLU(), nn.Linear(HEAD_WIDTH * dim, dim))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mapped = self.mlp(tokens)
        return l2norm(masked_mean(mapped, None if mask is None else mask.unsqueeze(-1), dim=1))


class PrefilterHeads(nn.Module):
    """The image head and the caption head of one model."""

    def __init__(self, embed_size: int, dim: int) -> None:
        super().__init__()
        self.images = GlobalHead(embed_size, dim)
        self.texts = GlobalHead(embed_size, dim)
