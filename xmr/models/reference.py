"""Straightforward per-pair scoring, written from the papers' equations.

One (image, caption) pair at a time, the caption sliced to its length, no masks and no
broadcasting. Slow by design: it is the reference the vectorised ``model.score`` is
tested against (float64, relative 1e-6).
"""

from __future__ import annotations

import math

import torch

from xmr.models.base import RetrievalModel
from xmr.models.camp import Camp, SummaryAttention
from xmr.models.dual import DualEncoder
from xmr.models.imram import Imram, MemoryUnit
from xmr.models.layers import l2norm


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.T / math.sqrt(q.size(-1)), dim=-1) @ v


def _summary(pool: SummaryAttention, c: torch.Tensor) -> torch.Tensor:
    weights = torch.softmax(pool.heads(torch.relu(pool.hidden(c))).T, dim=-1)  # (h, n)
    return (weights @ c).mean(0)


def camp_pair(m: Camp, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """CAMP score of regions ``v1 [R, D]`` and words ``v2 [n, D]`` (unpadded)."""
    a1 = _softmax_attention(m.txt_query_fc(v2), m.img_key_fc(v1), v1)  # (n, D)
    a2 = _softmax_attention(m.img_query_fc(v1), m.txt_key_fc(v2), v2)  # (R, D)
    f1 = l2norm(_softmax_attention(m.weighted_txt_query_fc(a2), m.weighted_txt_key_fc(a2), a2))
    f2 = l2norm(_softmax_attention(m.weighted_img_query_fc(a1), m.weighted_img_key_fc(a1), a1))
    g1 = torch.sigmoid((v1 * f1).sum(-1, keepdim=True))
    g2 = torch.sigmoid((v2 * f2).sum(-1, keepdim=True))
    c1 = torch.relu(m.fc_1(torch.cat([v1, f1], -1) * g1)) + v1
    c2 = torch.relu(m.fc_2(torch.cat([v2, f2], -1) * g2)) + v2
    r = torch.cat([l2norm(_summary(m.reduce_1, c1)), l2norm(_summary(m.reduce_2, c2))])
    return torch.sigmoid(m.out_logit(torch.relu(m.out_hidden(r))))[0]


def _imram_direction(query0: torch.Tensor, context: torch.Tensor, memory: MemoryUnit, steps: int,
                     lam: float, memory_norm: bool) -> torch.Tensor:
    """Sum over steps of mean_i cos(query0_i, attended_i)."""
    query, total = query0, query0.new_zeros(())
    for _ in range(steps):
        s = torch.nn.functional.leaky_relu(context @ query.T, 0.1)  # (C, Q)
        s = s / (s.norm(dim=1, keepdim=True) + 1e-8)  # each context row over the queries
        alpha = torch.softmax(lam * s.T, dim=1)  # (Q, C), softmax over the context
        attended = alpha @ context  # (Q, D)
        cos = (query0 * attended).sum(1) / (query0.norm(dim=1) * attended.norm(dim=1)).clamp(min=1e-8)
        total = total + cos.mean()
        both = torch.cat([query, attended], 1)
        gate = torch.sigmoid(memory.gate(both))
        query = query * gate + torch.tanh(memory.linear(both)) * (1 - gate)
        if memory_norm:
            query = l2norm(query)
    return total


def imram_pair(m: Imram, regions: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    cfg = m.config
    score = regions.new_zeros(())
    if cfg.mode in ("text", "full"):
        score = score + _imram_direction(words, regions, m.memory_t2i, cfg.steps, cfg.lambda_softmax, cfg.memory_norm)
    if cfg.mode in ("image", "full"):
        score = score + _imram_direction(regions, words, m.memory_i2t, cfg.steps, cfg.lambda_softmax, cfg.memory_norm)
    return score


def dual_pair(m: DualEncoder, regions: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    return (l2norm(regions.mean(0)) * l2norm(words.mean(0))).sum()


PAIR_SCORERS = {Camp: camp_pair, Imram: imram_pair, DualEncoder: dual_pair}


@torch.no_grad()
def reference_scores(model: RetrievalModel, img_emb: torch.Tensor, cap_emb: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """``[Ni, Nt]`` scores, one pair at a time."""
    pair = PAIR_SCORERS[type(model)]
    out = img_emb.new_empty(img_emb.size(0), cap_emb.size(0))
    for i in range(img_emb.size(0)):
        for j in range(cap_emb.size(0)):
            out[i, j] = pair(model, img_emb[i], cap_emb[j, : int(lengths[j])])
    return out
