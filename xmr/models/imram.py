"""IMRAM (Chen et al., CVPR 2020): iterative matching with recurrent attention memory.

Scores every (image, caption) pair at once: tensors carry a pair grid ``(Ni, Nt, ...)``.
Padded words are masked so results equal the authors' code, which slices each caption to
its length before matching.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from xmr.data.vocab import Vocabulary
from xmr.models.base import ITEMS, LENGTH, REGIONS, Prepared, PreparedSpec, PreparedTensor, RetrievalModel
from xmr.models.config import ImramConfig
from xmr.models.layers import L2_EPS, cosine, grid_matmul, l2norm, length_mask, masked_mean
from xmr.models.losses import triplet_loss


def attention_from_scores(scores: torch.Tensor, lambda_softmax: float, query_mask: torch.Tensor | None = None,
                          context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """IMRAM's attention weights ``(..., Q, C)`` from raw scores ``query @ contextᵀ`` ``(..., Q, C)``.

    LeakyReLU, l2-norm of each context token's scores across the queries (padded queries
    excluded), then a λ-softmax over the context. Masks are bool ``(..., Q)`` / ``(..., C)``,
    true at real tokens.
    """
    s = torch.nn.functional.leaky_relu(scores, 0.1)
    if query_mask is not None:  # padded queries must not enter the norm across queries
        s = s * query_mask.unsqueeze(-1).to(s.dtype)
    logits = lambda_softmax * l2norm(s, dim=-2)
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask.unsqueeze(-2), float("-inf"))
    return torch.softmax(logits, dim=-1)


def attend(query: torch.Tensor, context: torch.Tensor, lambda_softmax: float,
           query_mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each query token's attended context ``(..., Q, D)``; query ``(..., Q, D)``, context ``(..., C, D)``."""
    scores = grid_matmul(query, context.transpose(-1, -2))
    return grid_matmul(attention_from_scores(scores, lambda_softmax, query_mask, context_mask), context)


class MemoryUnit(nn.Module):
    """Memory distillation: ``q <- g*q + (1-g)*tanh(W_l [q; a] + b_l)``, ``g = σ(W_g [q; a] + b_g)``.

    Split form used by the fast scorer: ``[W_l; W_g] [q; a] + b = W_q q + α (W_a C + b)`` for
    an attended context ``a = α C`` whose weights ``α`` sum to one, so ``W_a C + b``
    (``context_part``) is computed once per context item.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(2 * dim, dim)
        self.gate = nn.Linear(2 * dim, dim)

    def _halves(self, part: slice) -> torch.Tensor:
        return torch.cat([self.linear.weight[:, part], self.gate.weight[:, part]])  # (2D, D)

    def query_part(self, query: torch.Tensor) -> torch.Tensor:
        """``[W_lq q ; W_gq q]`` ``(..., 2D)``: the halves that see the query (no bias)."""
        return query @ self._halves(slice(None, self.dim)).T

    def context_part(self, context: torch.Tensor) -> torch.Tensor:
        """``[W_la c + b_l ; W_ga c + b_g]`` ``(..., 2D)`` per context token."""
        return torch.nn.functional.linear(context, self._halves(slice(self.dim, None)),
                                          torch.cat([self.linear.bias, self.gate.bias]))

    def add_query_part(self, pre: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``pre + query_part(query)`` as one GEMM that accumulates into ``pre``; same shapes."""
        weight = self._halves(slice(None, self.dim))
        if torch.onnx.is_in_onnx_export():  # MatMul + Add: quantizers fuse Q/DQ MatMul with a constant weight
            return pre + query @ weight.T
        out = torch.addmm(pre.reshape(-1, pre.size(-1)), query.reshape(-1, query.size(-1)), weight.T)
        return out.view(pre.shape)

    def update(self, query: torch.Tensor, pre_activations: torch.Tensor) -> torch.Tensor:
        """The new query from the pre-activations ``[W_l [q; a] + b_l ; W_g [q; a] + b_g]``."""
        gate = torch.sigmoid(pre_activations[..., self.dim :])
        candidate = torch.tanh(pre_activations[..., : self.dim])
        if torch.onnx.is_in_onnx_export():  # ONNX has no Lerp; its exported form mixes types in fp16
            return candidate + gate * (query - candidate)
        return torch.lerp(candidate, query, gate)  # g*q + (1-g)*tanh, one fused pass

    def forward(self, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        query = query.expand_as(attended)
        both = torch.cat([query, attended], dim=-1)  # (..., 2D)
        gate = torch.sigmoid(self.gate(both))
        return query * gate + torch.tanh(self.linear(both)) * (1 - gate)


class Imram(RetrievalModel):
    config: ImramConfig
    # the released code also updates the memory after the last step (the result is unused)
    _authors_options: ClassVar[dict[str, Any]] = {"final_update": True}

    def __init__(self, config: ImramConfig, vocab: Vocabulary | None = None) -> None:
        super().__init__(config, vocab)
        self.memory_t2i = MemoryUnit(config.embed_size)  # authors: linear_t2i / gate_t2i
        self.memory_i2t = MemoryUnit(config.embed_size)  # authors: linear_i2t / gate_i2t

    def _match(self, query0: torch.Tensor, context: torch.Tensor, memory: MemoryUnit,
               query_mask: torch.Tensor | None, context_mask: torch.Tensor | None,
               final_update: bool = False) -> torch.Tensor:
        """Per-step scores ``[K, Ni, Nt]`` of one direction; query0/context on the pair grid.
        ``final_update`` also runs the (unused) memory update after the last step, as the
        released code does; only the authors'-style baseline asks for it."""
        cfg = self.config
        query = query0
        steps = []
        for k in range(cfg.steps):
            attended = attend(query, context, cfg.lambda_softmax, query_mask, context_mask)  # (Ni, Nt, Q, D)
            steps.append(masked_mean(cosine(query0, attended), query_mask))  # (Ni, Nt)
            if k + 1 < cfg.steps or final_update:
                query = memory(query, attended)
                if cfg.memory_norm:
                    query = l2norm(query)
        return torch.stack(steps)

    def _match_fast(self, query0: torch.Tensor, query_part0: torch.Tensor, context: torch.Tensor,
                    context_part: torch.Tensor, memory: MemoryUnit,
                    query_mask: torch.Tensor | None, context_mask: torch.Tensor | None) -> torch.Tensor:
        """``_match`` with per-item work hoisted out of the pair grid.

        Per item (precomputed): ``query_part0`` (the memory unit's query halves at step 0) and
        ``context_part`` (its context halves and biases); per item and block: ``C Cᵀ``.
        The attended context ``a = α C`` is never formed: ``q0·a = Σ α ⊙ (q0 Cᵀ)`` and
        ``|a|² = α (C Cᵀ) αᵀ`` give the cosine, ``α context_part`` the memory's input. Per pair
        remain the attention, one ``α context_part`` product per update and, from step 1 on,
        the query halves of the memory unit; nothing is computed after the last score.
        """
        cfg = self.config
        scores0 = grid_matmul(query0, context.transpose(-1, -2))  # (Ni, Nt, Q, C)
        query_norm = torch.linalg.vector_norm(query0, dim=-1)  # (.., Q)
        context_gram = grid_matmul(context, context.transpose(-1, -2))  # (.., C, C): T² D per item, not stored
        query, scores = query0, scores0
        steps = []
        for k in range(cfg.steps):
            alpha = attention_from_scores(scores, cfg.lambda_softmax, query_mask, context_mask)  # (Ni, Nt, Q, C)
            dot = (alpha * scores0).sum(-1)  # q0 · a
            attended_norm = (grid_matmul(alpha, context_gram) * alpha).sum(-1).clamp(min=0).sqrt()
            steps.append(masked_mean(dot / (query_norm * attended_norm).clamp(min=L2_EPS), query_mask))
            if k + 1 == cfg.steps:
                break
            pre = grid_matmul(alpha, context_part)  # (Ni, Nt, Q, 2D)
            pre = pre + query_part0 if k == 0 else memory.add_query_part(pre, query)
            query = memory.update(query, pre)
            if cfg.memory_norm:
                query = l2norm(query)
            scores = grid_matmul(query, context.transpose(-1, -2))
        return torch.stack(steps)

    def prepared_spec(self) -> PreparedSpec:
        d, mode = self.config.embed_size, self.config.mode
        images, texts = [PreparedTensor("regions", (ITEMS, REGIONS, d))], [PreparedTensor("words", (ITEMS, LENGTH, d))]
        if mode in ("text", "full"):
            images.append(PreparedTensor("t2i_context_part", (ITEMS, REGIONS, 2 * d)))
            texts.append(PreparedTensor("t2i_query_part", (ITEMS, LENGTH, 2 * d)))
        if mode in ("image", "full"):
            images.append(PreparedTensor("i2t_query_part", (ITEMS, REGIONS, 2 * d)))
            texts.append(PreparedTensor("i2t_context_part", (ITEMS, LENGTH, 2 * d)))
        return PreparedSpec(tuple(images), tuple(texts))

    def prepare_images(self, img_emb: torch.Tensor) -> Prepared:
        items = {"regions": img_emb}
        if self.config.mode in ("text", "full"):  # regions are the context
            items["t2i_context_part"] = self.memory_t2i.context_part(img_emb)  # (Ni, R, 2D)
        if self.config.mode in ("image", "full"):  # regions are the queries
            items["i2t_query_part"] = self.memory_i2t.query_part(img_emb)  # (Ni, R, 2D)
        return items

    def prepare_texts(self, cap_emb: torch.Tensor, lengths: torch.Tensor) -> Prepared:
        items = {"words": cap_emb, "lengths": lengths}
        if self.config.mode in ("text", "full"):  # words are the queries
            items["t2i_query_part"] = self.memory_t2i.query_part(cap_emb)  # (Nt, L, 2D)
        if self.config.mode in ("image", "full"):  # words are the context
            items["i2t_context_part"] = self.memory_i2t.context_part(cap_emb)  # (Nt, L, 2D)
        return items

    def score_prepared(self, images: Prepared, texts: Prepared) -> torch.Tensor:
        """Each direction runs on a grid led by its context item, ``(contexts, queries, ...)``,
        so every per-pair product is one batched GEMM per context item with contiguous output."""
        regions, words = images["regions"], texts["words"]
        word_mask = length_mask(texts["lengths"], words.size(-2))  # (Nt, L)
        score = regions.new_zeros(regions.size(0), words.size(0))
        if self.config.mode in ("text", "full"):  # grid (Ni, Nt): words attend regions
            steps = self._match_fast(words.unsqueeze(0), texts["t2i_query_part"].unsqueeze(0), regions.unsqueeze(1),
                                     images["t2i_context_part"].unsqueeze(1), self.memory_t2i, word_mask.unsqueeze(0), None)
            score = score + steps.sum(0)
        if self.config.mode in ("image", "full"):  # grid (Nt, Ni): regions attend words
            steps = self._match_fast(regions.unsqueeze(0), images["i2t_query_part"].unsqueeze(0), words.unsqueeze(1),
                                     texts["i2t_context_part"].unsqueeze(1), self.memory_i2t, None, word_mask.unsqueeze(1))
            score = score + steps.sum(0).T
        return score

    def text_steps(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor,
                   final_update: bool = False) -> torch.Tensor:
        """Text-IMRAM: words ``(1, Nt, L, D)`` attend regions ``(Ni, 1, R, D)``. ``[K, Ni, Nt]``."""
        word_mask = length_mask(lengths, cap_emb.size(1)).unsqueeze(0)  # (1, Nt, L)
        return self._match(cap_emb.unsqueeze(0), img_emb.unsqueeze(1), self.memory_t2i, word_mask, None, final_update)

    def image_steps(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor,
                    final_update: bool = False) -> torch.Tensor:
        """Image-IMRAM: regions ``(Ni, 1, R, D)`` attend words ``(1, Nt, L, D)``. ``[K, Ni, Nt]``."""
        word_mask = length_mask(lengths, cap_emb.size(1)).unsqueeze(0)  # (1, Nt, L)
        return self._match(img_emb.unsqueeze(1), cap_emb.unsqueeze(0), self.memory_i2t, None, word_mask, final_update)

    def _score_direct(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor,
                      final_update: bool = False) -> torch.Tensor:
        mode = self.config.mode
        score = img_emb.new_zeros(img_emb.size(0), cap_emb.size(0))
        if mode in ("text", "full"):
            score = score + self.text_steps(img_emb, cap_emb, lengths, final_update).sum(0)
        if mode in ("image", "full"):
            score = score + self.image_steps(img_emb, cap_emb, lengths, final_update).sum(0)
        return score

    def loss(self, scores: torch.Tensor, hardest: bool = True) -> torch.Tensor:
        return triplet_loss(scores, self.config.margin, hardest)
