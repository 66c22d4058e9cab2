"""The API every xmr model shares: encode images, encode texts, score pairs."""

from __future__ import annotations

import torch
from torch import nn

from xmr.data.vocab import Vocabulary
from xmr.models.config import ModelConfig
from xmr.models.layers import (
    ImageEncoder, TextEncoder, check_embeddings, check_features, check_tokens,
)


class RetrievalModel(nn.Module):
    """Base of CAMP, IMRAM and the dual-encoder baseline.

    Subclasses implement ``score(img_emb, cap_emb, lengths) -> [Ni, Nt]`` (rows images,
    columns captions) and ``loss(scores)`` for a square training batch.
    """

    config: ModelConfig

    def __init__(self, config: ModelConfig, vocab: Vocabulary | None = None) -> None:
        super().__init__()
        if vocab is not None and len(vocab) != config.vocab_size:
            raise ValueError(f"vocabulary has {len(vocab)} words but config.vocab_size is {config.vocab_size}")
        self.config = config
        self.vocab = vocab
        self.img_enc = ImageEncoder(config.img_dim, config.embed_size, config.img_norm)
        self.txt_enc = TextEncoder(config.vocab_size, config.word_dim, config.embed_size, config.txt_norm)

    @property
    def kind(self) -> str:
        return self.config.KIND

    def encode_images(self, features: torch.Tensor) -> torch.Tensor:
        """Region features ``[Ni, R, img_dim]`` -> region embeddings ``[Ni, R, D]``."""
        check_features(features, self.config.img_dim)
        return self.img_enc(features.to(self.img_enc.fc.weight.dtype))

    def encode_texts(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Token ids ``[Nt, L]`` (0-padded, ``<start>``/``<end>`` included) -> ``[Nt, L, D]``."""
        check_tokens(ids, lengths, self.config.vocab_size)
        return self.txt_enc(ids.long(), lengths.long())

    def score(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores ``[Ni, Nt]`` of every (image, caption) pair."""
        check_embeddings(img_emb, cap_emb, lengths, self.config.embed_size)
        return self._score(img_emb, cap_emb, lengths.to(cap_emb.device).long())

    def _score(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def similarity(self, features: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``score(encode_images(features), encode_texts(ids, lengths), lengths)``."""
        return self.score(self.encode_images(features), self.encode_texts(ids, lengths), lengths)

    def loss(self, scores: torch.Tensor, hardest: bool = True) -> torch.Tensor:
        """Training loss of a square ``[B, B]`` score matrix whose diagonal holds the positives;
        ``hardest``: only the hardest negative per row and column (the authors' max_violation)."""
        raise NotImplementedError
