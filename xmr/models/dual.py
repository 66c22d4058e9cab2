"""Dual-encoder baseline: the same encoders, pooled by a mean, compared by cosine.

No cross-attention: it cannot tell "a red car beside a white dog" from "a white car
beside a red dog" in the image, which is what the synthetic data measures.
"""

from __future__ import annotations

import torch

from xmr.models.base import RetrievalModel
from xmr.models.config import DualEncoderConfig
from xmr.models.layers import l2norm, length_mask
from xmr.models.losses import triplet_loss


class DualEncoder(RetrievalModel):
    config: DualEncoderConfig

    def _score_direct(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        image = l2norm(img_emb.mean(dim=1))  # (Ni, D)
        mask = length_mask(lengths, cap_emb.size(1)).unsqueeze(-1).to(cap_emb.dtype)  # (Nt, L, 1)
        caption = l2norm((cap_emb * mask).sum(dim=1) / mask.sum(dim=1))  # (Nt, D)
        return image @ caption.T

    def loss(self, scores: torch.Tensor, hardest: bool = True) -> torch.Tensor:
        return triplet_loss(scores, self.config.margin, hardest)
