"""Small building blocks shared by the models, written to match the authors' numerics."""

from __future__ import annotations

import math

import torch
from torch import nn

from xmr.errors import ShapeError

L2_EPS = 1e-8  # the authors add eps to the norm (not inside the sqrt)
MASKED_LOGIT = -1e9  # CAMP masks attention logits with -1e9 (masked_fill), not -inf


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = L2_EPS) -> torch.Tensor:
    """``x / (||x|| + eps)`` along ``dim``.

    ``vector_norm`` rather than ``sqrt(sum(x^2))``: same value, but its gradient at a zero
    vector (padded words) is 0 instead of NaN."""
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def cosine(a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = L2_EPS) -> torch.Tensor:
    """Cosine similarity with the product of norms clamped at ``eps`` (as the authors)."""
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp(min=eps)


def grid_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` over a pair grid whose batch dims broadcast (``(Ni, 1, ...)`` with ``(1, Nt, ...)``).

    ``einsum`` folds a size-1 batch dim into the GEMM instead of materialising the expanded
    operand as ``matmul`` does: 4-6x faster on the shapes of pair scoring. Exported to ONNX
    as a broadcasting ``MatMul`` (no ``Einsum`` in the graphs)."""
    if torch.onnx.is_in_onnx_export():
        return a @ b
    return torch.einsum("...mk,...kn->...mn", a, b)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` counting only positions where ``mask`` is true."""
    if mask is None:
        return x.mean(dim)
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim)


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Bool ``[N, max_len]``, true at real token positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def qkv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d)) v``; keys where ``key_mask`` is false get logit -1e9."""
    logits = grid_matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))  # (..., Nq, Nk)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, MASKED_LOGIT)
    return grid_matmul(torch.softmax(logits, dim=-1), v)


def xavier_uniform_(linear: nn.Linear, fan_in: int | None = None, fan_out: int | None = None) -> None:
    """The authors' init: U(-r, r) with r = sqrt(6 / (fan_in + fan_out)); bias 0."""
    r = math.sqrt(6.0) / math.sqrt((fan_in or linear.in_features) + (fan_out or linear.out_features))
    nn.init.uniform_(linear.weight, -r, r)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class ImageEncoder(nn.Module):
    """Regions ``[N, R, img_dim]`` -> ``[N, R, D]``: one linear layer, optional l2-norm per region."""

    def __init__(self, img_dim: int, embed_size: int, normalize: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        self.normalize = normalize
        xavier_uniform_(self.fc)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        regions = self.fc(features)  # (N, R, D)
        return l2norm(regions) if self.normalize else regions


class TextEncoder(nn.Module):
    """Token ids ``[N, L]`` + lengths -> ``[N, L, D]``: embedding, bi-GRU (directions averaged).

    Lengths are honoured as packed sequences do: the backward direction starts at each
    caption's own last token, and padded positions are exactly zero.
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, normalize: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers=1, batch_first=True, bidirectional=True)
        self.normalize = normalize
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (N, L, word_dim)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.size(1))  # (N, L, 2D)
        half = out.size(-1) // 2
        words = (out[..., :half] + out[..., half:]) / 2  # (N, L, D)
        return l2norm(words) if self.normalize else words


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ShapeError(message)


def check_features(features: torch.Tensor, img_dim: int) -> None:
    _check(isinstance(features, torch.Tensor), f"features must be a torch.Tensor, got {type(features).__name__}")
    _check(features.dim() == 3 and features.size(-1) == img_dim,
           f"features must be [N_images, regions, {img_dim}], got {list(features.shape)}")
    _check(features.is_floating_point(), f"features must be floating point, got {features.dtype}")


def check_tokens(ids: torch.Tensor, lengths: torch.Tensor, vocab_size: int) -> None:
    _check(isinstance(ids, torch.Tensor) and isinstance(lengths, torch.Tensor), "ids and lengths must be torch tensors")
    _check(ids.dim() == 2, f"ids must be [N_captions, max_len], got {list(ids.shape)}")
    _check(not ids.is_floating_point(), f"ids must be integers, got {ids.dtype}")
    _check(lengths.dim() == 1 and lengths.size(0) == ids.size(0),
           f"lengths must be [{ids.size(0)}] (one per caption), got {list(lengths.shape)}")
    if ids.numel():
        _check(int(ids.min()) >= 0 and int(ids.max()) < vocab_size,
               f"token ids must be in [0, {vocab_size}), got range [{int(ids.min())}, {int(ids.max())}]")
    check_lengths(lengths, ids.size(1))


def check_lengths(lengths: torch.Tensor, max_len: int) -> None:
    if lengths.numel():
        _check(int(lengths.min()) >= 1 and int(lengths.max()) <= max_len,
               f"lengths must be in [1, {max_len}], got range [{int(lengths.min())}, {int(lengths.max())}]")


def check_embeddings(img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor, dim: int) -> None:
    _check(img_emb.dim() == 3 and img_emb.size(-1) == dim, f"image embeddings must be [Ni, R, {dim}], got {list(img_emb.shape)}")
    _check(cap_emb.dim() == 3 and cap_emb.size(-1) == dim, f"caption embeddings must be [Nt, L, {dim}], got {list(cap_emb.shape)}")
    _check(lengths.dim() == 1 and lengths.size(0) == cap_emb.size(0),
           f"lengths must be [{cap_emb.size(0)}] (one per caption), got {list(lengths.shape)}")
    check_lengths(lengths, cap_emb.size(1))
