"""CAMP (Wang et al., ICCV 2019): cross-modal adaptive message passing, the released
``gate_fusion_new`` configuration (concat fusion, summary-attention reduction).

Scores every (image, caption) pair at once on a pair grid ``(Ni, Nt, ...)``. Symbols:
v1 regions, v2 words; a1 words' attention over regions, a2 regions' attention over words;
f1, f2 the self-attended messages; c1, c2 the gated fusions; r1, r2 the pooled vectors.
"""

from __future__ import annotations

import torch
from torch import nn

from xmr.data.vocab import Vocabulary
from xmr.models.base import RetrievalModel
from xmr.models.config import CampConfig
from xmr.models.layers import MASKED_LOGIT, l2norm, length_mask, qkv_attention, xavier_uniform_
from xmr.models.losses import bce_loss


class SummaryAttention(nn.Module):
    """Pools tokens ``(..., N, D)`` -> ``(..., D)``: h attention heads from a 2-layer MLP, heads averaged."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, dim)
        self.heads = nn.Linear(dim, num_heads)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.heads(torch.relu(self.hidden(tokens))).transpose(-1, -2)  # (..., h, N)
        if mask is not None:
            logits = logits.masked_fill(~mask.unsqueeze(-2), MASKED_LOGIT)
        pooled = torch.softmax(logits, dim=-1) @ tokens  # (..., h, D)
        return pooled.mean(dim=-2)


def _projection(dim: int) -> nn.Linear:
    return nn.Linear(dim, dim, bias=False)


class Camp(RetrievalModel):
    config: CampConfig

    def __init__(self, config: CampConfig, vocab: Vocabulary | None = None) -> None:
        super().__init__(config, vocab)
        d = config.embed_size
        # names follow the released code so imported weights map one to one
        self.img_key_fc, self.img_query_fc = _projection(d), _projection(d)
        self.txt_key_fc, self.txt_query_fc = _projection(d), _projection(d)
        self.weighted_img_key_fc, self.weighted_img_query_fc = _projection(d), _projection(d)
        self.weighted_txt_key_fc, self.weighted_txt_query_fc = _projection(d), _projection(d)
        self.fc_1 = nn.Linear(2 * d, d, bias=False)  # fusion of regions with their messages
        self.fc_2 = nn.Linear(2 * d, d, bias=False)  # fusion of words with their messages
        self.reduce_1 = SummaryAttention(d, config.num_heads)  # regions
        self.reduce_2 = SummaryAttention(d, config.num_heads)  # words
        self.out_hidden = nn.Linear(2 * d, d)
        self.out_logit = nn.Linear(d, 1)
        for layer in (self.img_key_fc, self.txt_key_fc, self.fc_1, self.fc_2, self.out_hidden, self.out_logit):
            xavier_uniform_(layer, d, d)  # the released init uses r = sqrt(6 / (D + D)) for all of these

    def _score(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        v1 = img_emb.unsqueeze(1)  # (Ni, 1, R, D)
        v2 = cap_emb.unsqueeze(0)  # (1, Nt, L, D)
        word_keys = length_mask(lengths, cap_emb.size(1))[None, :, None, :]  # (1, Nt, 1, L)

        a1 = qkv_attention(self.txt_query_fc(v2), self.img_key_fc(v1), v1)  # (Ni, Nt, L, D)
        a2 = qkv_attention(self.img_query_fc(v1), self.txt_key_fc(v2), v2, word_keys)  # (Ni, Nt, R, D)
        f1 = l2norm(qkv_attention(self.weighted_txt_query_fc(a2), self.weighted_txt_key_fc(a2), a2))  # (Ni, Nt, R, D)
        f2 = l2norm(qkv_attention(self.weighted_img_query_fc(a1), self.weighted_img_key_fc(a1), a1, word_keys))

        c1 = self._fuse(v1, f1, self.fc_1)  # (Ni, Nt, R, D)
        c2 = self._fuse(v2, f2, self.fc_2)  # (Ni, Nt, L, D)
        r1 = l2norm(self.reduce_1(c1))  # (Ni, Nt, D)
        r2 = l2norm(self.reduce_2(c2, word_keys.squeeze(-2)))  # (Ni, Nt, D)
        hidden = torch.relu(self.out_hidden(torch.cat([r1, r2], dim=-1)))
        return torch.sigmoid(self.out_logit(hidden)).squeeze(-1)  # (Ni, Nt)

    @staticmethod
    def _fuse(v: torch.Tensor, f: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
        """``ReLU(fc([v; f] * g)) + v`` with the gate ``g = σ(Σ_d v ⊙ f)`` per token."""
        v = v.expand_as(f)
        gate = torch.sigmoid((v * f).sum(dim=-1, keepdim=True))
        return torch.relu(fc(torch.cat([v, f], dim=-1) * gate)) + v

    def loss(self, scores: torch.Tensor, hardest: bool = True) -> torch.Tensor:
        return bce_loss(scores, hardest)
