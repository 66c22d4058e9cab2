"""CAMP (Wang et al., ICCV 2019): cross-modal adaptive message passing, the released
``gate_fusion_new`` configuration (concat fusion, summary-attention reduction).

Scores every (image, caption) pair at once on a pair grid ``(Ni, Nt, ...)``. Symbols:
v1 regions, v2 words; a1 words' attention over regions, a2 regions' attention over words;
f1, f2 the self-attended messages; c1, c2 the gated fusions; r1, r2 the pooled vectors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xmr.data.vocab import Vocabulary
from xmr.models.base import ITEMS, LENGTH, REGIONS, Prepared, PreparedSpec, PreparedTensor, RetrievalModel
from xmr.models.config import CampConfig
from xmr.models.layers import L2_EPS, MASKED_LOGIT, grid_matmul, l2norm, length_mask, qkv_attention, xavier_uniform_
from xmr.models.losses import bce_loss

RELEASED_TEXT_POSITIONS = 50  # the released text encoder pads every caption to max_length + 3 = 50
RELEASED_IMAGES_PER_CALL = 5  # the released evaluation scores 5 images against all captions per call


class SummaryAttention(nn.Module):
    """Pools tokens ``(..., N, D)`` -> ``(..., D)``: h attention heads from a 2-layer MLP, heads averaged."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, dim)
        self.heads = nn.Linear(dim, num_heads)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, heads_first: bool = True) -> torch.Tensor:
        """``heads_first``: pool with each head, then average (as written); otherwise average
        the heads' weights and pool once (the same value, 1/h of the pooling work)."""
        logits = self.heads(torch.relu(self.hidden(tokens))).transpose(-1, -2)  # (..., h, N)
        if mask is not None:
            logits = logits.masked_fill(~mask.unsqueeze(-2), MASKED_LOGIT)
        weights = torch.softmax(logits, dim=-1)  # (..., h, N)
        if heads_first:
            return grid_matmul(weights, tokens).mean(dim=-2)  # (..., D)
        return grid_matmul(weights.mean(dim=-2, keepdim=True), tokens).squeeze(-2)


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

    def _score_direct(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        v1 = img_emb.unsqueeze(1)  # (Ni, 1, R, D)
        v2 = cap_emb.unsqueeze(0)  # (1, Nt, L, D)
        word_keys = length_mask(lengths, cap_emb.size(1))[None, :, None, :]  # (1, Nt, 1, L)

        a1 = qkv_attention(self.txt_query_fc(v2), self.img_key_fc(v1), v1)  # (Ni, Nt, L, D)
        a2 = qkv_attention(self.img_query_fc(v1), self.txt_key_fc(v2), v2, word_keys)  # (Ni, Nt, R, D)
        f1 = l2norm(qkv_attention(self.weighted_txt_query_fc(a2), self.weighted_txt_key_fc(a2), a2))  # (Ni, Nt, R, D)
        f2 = l2norm(qkv_attention(self.weighted_img_query_fc(a1), self.weighted_img_key_fc(a1), a1, word_keys))

        c1 = self._fuse(v1, f1, self.fc_1)  # (Ni, Nt, R, D)
        c2 = self._fuse(v2, f2, self.fc_2)  # (Ni, Nt, L, D)
        return self._head(c1, c2, word_keys)

    def _prepare(self, tokens: torch.Tensor, cross_query: nn.Linear, other_key: nn.Linear, self_query: nn.Linear,
                 self_key: nn.Linear, fuse_self: torch.Tensor, fuse_message: torch.Tensor) -> Prepared:
        """One item's tokens ``v`` and what the pair grid needs of them."""
        scale = math.sqrt(self.config.embed_size)
        return {
            "cross": cross_query(tokens) @ other_key.weight / scale,  # (W_q v) W_k / √D: logits against raw tokens
            "self_scores": self_query(tokens) @ self_key(tokens).transpose(-1, -2) / scale,  # (N, T, T)
            "fuse_self": tokens @ fuse_self.T,  # this side's half of its fc
            "fuse_message": tokens @ fuse_message.T,  # the other side's fc half applied to messages from v
        }

    def _prepared_side(self, tokens: str, axis: str) -> tuple[PreparedTensor, ...]:
        """What ``_prepare`` returns for one side, after its ``tokens``; ``axis``: their count T."""
        d = self.config.embed_size
        return (PreparedTensor(tokens, (ITEMS, axis, d)), PreparedTensor("cross", (ITEMS, axis, d)),
                PreparedTensor("self_scores", (ITEMS, axis, axis)),  # (N, T, T)
                PreparedTensor("fuse_self", (ITEMS, axis, d)), PreparedTensor("fuse_message", (ITEMS, axis, d)))

    def prepared_spec(self) -> PreparedSpec:
        return PreparedSpec(images=self._prepared_side("regions", REGIONS), texts=self._prepared_side("words", LENGTH))

    def prepare_images(self, img_emb: torch.Tensor) -> Prepared:
        d = self.config.embed_size
        return {"regions": img_emb, **self._prepare(img_emb, self.img_query_fc, self.txt_key_fc, self.weighted_img_query_fc,
                                                     self.weighted_img_key_fc, self.fc_1.weight[:, :d], self.fc_2.weight[:, d:])}

    def prepare_texts(self, cap_emb: torch.Tensor, lengths: torch.Tensor) -> Prepared:
        d = self.config.embed_size
        return {"words": cap_emb, "lengths": lengths,
                **self._prepare(cap_emb, self.txt_query_fc, self.img_key_fc, self.weighted_txt_query_fc,
                                self.weighted_txt_key_fc, self.fc_2.weight[:, :d], self.fc_1.weight[:, d:])}

    def score_prepared(self, images: Prepared, texts: Prepared) -> torch.Tensor:
        """The fast form. The cross-attended features ``a = A v`` and the messages ``f`` are
        never formed: every linear map of them is a map of the other item's tokens, mixed by
        per-pair weights. With ``a2 = A2 v2``, the self-attention logits ``(W_q a2)(W_k a2)ᵀ``
        are ``A2 (W_q v2)(W_k v2)ᵀ A2ᵀ``; with ``f1 = γ1 v2 / |γ1 v2|`` (``γ1 = B1 A2``),
        ``|γ1 v2|² = γ1 (v2 v2ᵀ) γ1ᵀ``, the gate's ``v1·f1`` is ``Σ γ1 ⊙ (v1 v2ᵀ)`` and ``fc_1``'s
        message half is ``γ1 (v2 W_1fᵀ) / |γ1 v2|``. Per pair remain these small products, the
        non-linearities and the reduction MLPs. The Gram matrices ``v vᵀ`` are formed per
        block (``T² D`` per item, negligible) rather than stored."""
        img = {name: t.unsqueeze(1) for name, t in images.items()}  # (Ni, 1, ...)
        txt = {name: t.unsqueeze(0) for name, t in texts.items() if name != "lengths"}  # (1, Nt, ...)
        v1, v2 = img["regions"], txt["words"]
        word_keys = length_mask(texts["lengths"], v2.size(-2))[None, :, None, :]  # (1, Nt, 1, L)

        a1 = torch.softmax(grid_matmul(txt["cross"], v1.transpose(-1, -2)), dim=-1)  # words over regions (Ni,Nt,L,R)
        logits2 = grid_matmul(img["cross"], v2.transpose(-1, -2))  # (Ni, Nt, R, L)
        a2 = torch.softmax(logits2.masked_fill(~word_keys, MASKED_LOGIT), dim=-1)  # regions over words
        dots = grid_matmul(v1, v2.transpose(-1, -2))  # v1 v2ᵀ (Ni, Nt, R, L)

        c1 = self._fuse_mixed(v1, img["fuse_self"], a2, v2, txt["self_scores"], txt["fuse_message"], dots, None)
        c2 = self._fuse_mixed(v2, txt["fuse_self"], a1, v1, img["self_scores"], img["fuse_message"],
                              dots.transpose(-1, -2), word_keys)
        return self._head(c1, c2, word_keys, heads_first=False)  # c1 (Ni, Nt, R, D), c2 (Ni, Nt, L, D)

    @staticmethod
    def _fuse_mixed(own: torch.Tensor, own_fused: torch.Tensor, attention: torch.Tensor, other: torch.Tensor,
                    other_self_scores: torch.Tensor, other_fuse_message: torch.Tensor, dots: torch.Tensor,
                    key_mask: torch.Tensor | None) -> torch.Tensor:
        """``c = ReLU(fc([v; f] g)) + v`` for one side: ``own`` tokens ``v`` ``(.., N, D)``,
        ``own_fused`` their half of ``fc``, ``attention`` ``(.., N, M)`` over the ``other`` item's
        ``M`` tokens; ``dots = v otherᵀ``. ``g > 0``, so ``ReLU(g x) = g ReLU(x)``."""
        logits = grid_matmul(grid_matmul(attention, other_self_scores), attention.transpose(-1, -2))  # (.., N, N)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask, MASKED_LOGIT)
        mix = grid_matmul(torch.softmax(logits, dim=-1), attention)  # γ, with f = γ other / |γ other|
        gram = grid_matmul(other, other.transpose(-1, -2))  # (.., M, M), per item
        norm = (grid_matmul(mix, gram) * mix).sum(-1, keepdim=True).clamp(min=0).sqrt() + L2_EPS
        gate = torch.sigmoid((mix * dots).sum(-1, keepdim=True) / norm)  # σ(v · f)
        fused = grid_matmul(mix / norm, other_fuse_message) + own_fused  # fc([v; f]) / g
        return torch.addcmul(own, torch.relu(fused), gate)

    def _head(self, c1: torch.Tensor, c2: torch.Tensor, word_keys: torch.Tensor, heads_first: bool = True) -> torch.Tensor:
        """Pools the fused regions ``c1`` and words ``c2`` and maps the pair to a probability."""
        r1 = l2norm(self.reduce_1(c1, heads_first=heads_first))  # (Ni, Nt, D)
        r2 = l2norm(self.reduce_2(c2, word_keys.squeeze(-2), heads_first))  # (Ni, Nt, D)
        hidden = torch.relu(self.out_hidden(torch.cat([r1, r2], dim=-1)))
        return torch.sigmoid(self.out_logit(hidden)).squeeze(-1)  # (Ni, Nt)

    def _authors_loop(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The released ``i2t``: groups of 5 images, each against every caption padded to 50."""
        padded = torch.nn.functional.pad(cap_emb, (0, 0, 0, max(0, RELEASED_TEXT_POSITIONS - cap_emb.size(1))))
        rows = [self._score_direct(img_emb[i : i + RELEASED_IMAGES_PER_CALL], padded, lengths)
                for i in range(0, img_emb.size(0), RELEASED_IMAGES_PER_CALL)]
        return torch.cat(rows) if rows else img_emb.new_zeros(0, cap_emb.size(0))

    @staticmethod
    def _fuse(v: torch.Tensor, f: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
        """``ReLU(fc([v; f] * g)) + v`` with the gate ``g = σ(Σ_d v ⊙ f)`` per token."""
        v = v.expand_as(f)
        gate = torch.sigmoid((v * f).sum(dim=-1, keepdim=True))
        return torch.relu(fc(torch.cat([v, f], dim=-1) * gate)) + v

    def loss(self, scores: torch.Tensor, hardest: bool = True) -> torch.Tensor:
        return bce_loss(scores, hardest)
