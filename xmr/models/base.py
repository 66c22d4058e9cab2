"""The API every xmr model shares: encode images, encode texts, score pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from xmr.data.vocab import Vocabulary
from xmr.errors import ConfigError, VocabError
from xmr.models.config import ModelConfig
from xmr.models.layers import (
    ImageEncoder, TextEncoder, check_embeddings, check_features, check_tokens, length_mask,
)
from xmr.models.prefilter import PrefilterHeads

Prepared = dict[str, torch.Tensor]  # per-item tensors, the item index first (see ``prepare_images``)

# Axes of a prepared tensor (``PreparedTensor.axes``); an int is a size from the config (D, 2D).
ITEMS = "items"  # the images or captions, always first
REGIONS = "regions"  # an image's regions R (fixed at export)
LENGTH = "length"  # a caption's tokens L (padded to the longest; dynamic)


@dataclass(frozen=True)
class PreparedTensor:
    """One tensor of ``prepare_images`` / ``prepare_texts``: its name and symbolic axes,
    e.g. ``("items", "length", 2 * embed_size)``."""

    name: str
    axes: tuple[str | int, ...]

    def __post_init__(self) -> None:
        assert self.axes[0] == ITEMS and all(a in (REGIONS, LENGTH) or isinstance(a, int) for a in self.axes[1:]), \
            f"prepared tensor {self.name}: axes {self.axes} must be {ITEMS!r} then {REGIONS!r}, {LENGTH!r} or sizes"


@dataclass(frozen=True)
class PreparedSpec:
    """What ``prepare_images`` / ``prepare_texts`` return, in order. ``lengths`` is not part
    of ``texts``: it travels beside the caption tensors (the text dict holds it too)."""

    images: tuple[PreparedTensor, ...]
    texts: tuple[PreparedTensor, ...]


class RetrievalModel(nn.Module):
    """Base of CAMP, IMRAM and the dual-encoder baseline.

    Subclasses implement ``_score_direct`` (the equations on the pair grid), optionally the
    fast form (``prepare_images`` / ``prepare_texts`` / ``score_prepared``, declared by
    ``prepared_spec``), and ``loss``.
    """

    config: ModelConfig
    _authors_options: ClassVar[dict[str, Any]] = {}  # ``_score_direct`` options that reproduce the released code

    def __init__(self, config: ModelConfig, vocab: Vocabulary | None = None) -> None:
        super().__init__()
        if vocab is not None and len(vocab) != config.vocab_size:
            raise VocabError(f"vocabulary has {len(vocab)} words but config.vocab_size is {config.vocab_size}")
        self.config = config
        self.vocab = vocab
        self.img_enc = ImageEncoder(config.img_dim, config.embed_size, config.img_norm)
        self.txt_enc = TextEncoder(config.vocab_size, config.word_dim, config.embed_size, config.txt_norm)
        self.prefilter: PrefilterHeads | None = None
        if config.global_dim:
            with torch.random.fork_rng(devices=[]):  # the other layers get the weights a model without heads gets
                self.prefilter = PrefilterHeads(config.embed_size, config.global_dim)

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

    def global_images(self, img_emb: torch.Tensor) -> torch.Tensor:
        """The prefilter head's unit vectors ``[Ni, G]`` of region embeddings ``[Ni, R, D]``."""
        return self._heads().images(img_emb)

    def global_texts(self, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The prefilter head's unit vectors ``[Nt, G]`` of word embeddings ``[Nt, L, D]``."""
        return self._heads().texts(cap_emb, length_mask(lengths.to(cap_emb.device), cap_emb.size(1)))

    def _heads(self) -> PrefilterHeads:
        if self.prefilter is None:
            raise ConfigError(f"this {self.kind} model has no prefilter head (global_dim 0); train one with "
                              f"`xmr distill CHECKPOINT`")
        return self.prefilter

    def score(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor,
              direct: bool = False) -> torch.Tensor:
        """Scores ``[Ni, Nt]`` of every (image, caption) pair.

        By default in the fast form: per-item work (``prepare_images`` / ``prepare_texts``)
        done once per image and caption, only the truly per-pair work on the pair grid.
        ``direct=True`` runs the straightforward form of the equations (the reference)."""
        check_embeddings(img_emb, cap_emb, lengths, self.config.embed_size)
        lengths = lengths.to(cap_emb.device).long()
        if direct:
            return self._score_direct(img_emb, cap_emb, lengths)
        return self.score_prepared(self.prepare_images(img_emb), self.prepare_texts(cap_emb, lengths))

    def prepared_spec(self) -> PreparedSpec:
        """Names and axes of what ``prepare_images`` / ``prepare_texts`` return (the graphs' IO)."""
        d = self.config.embed_size
        return PreparedSpec(images=(PreparedTensor("regions", (ITEMS, REGIONS, d)),),
                            texts=(PreparedTensor("words", (ITEMS, LENGTH, d)),))

    def prepare_images(self, img_emb: torch.Tensor) -> Prepared:
        """Per-image tensors the fast scorer needs (``regions`` plus model-specific
        precomputations), as ``prepared_spec().images`` declares them."""
        return {"regions": img_emb}

    def prepare_texts(self, cap_emb: torch.Tensor, lengths: torch.Tensor) -> Prepared:
        """Per-caption tensors the fast scorer needs (``words`` plus precomputations, as
        ``prepared_spec().texts`` declares them) and ``lengths``."""
        return {"words": cap_emb, "lengths": lengths}

    def score_prepared(self, images: Prepared, texts: Prepared) -> torch.Tensor:
        """Scores ``[Ni, Nt]`` from prepared items (see ``prepare_images`` / ``prepare_texts``)."""
        return self._score_direct(images["regions"], texts["words"], texts["lengths"])

    def score_authors_style(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The speed baseline: scores ``[Ni, Nt]`` computed the way the released evaluation code
        does (Python loops over items, the straightforward form, the released code's extra
        work; ``flops.released_evaluation_flops``). Same values as ``score``."""
        check_embeddings(img_emb, cap_emb, lengths, self.config.embed_size)
        return self._authors_loop(img_emb, cap_emb, lengths.to(cap_emb.device).long())

    def _authors_loop(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """A loop over captions, each cut to its length and scored against every image."""
        columns = [self._score_direct(img_emb, cap_emb[c : c + 1, :n], lengths[c : c + 1], **self._authors_options)
                   for c, n in enumerate(lengths.tolist())]
        return torch.cat(columns, dim=1) if columns else img_emb.new_zeros(img_emb.size(0), 0)

    def _score_direct(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def similarity(self, features: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``score(encode_images(features), encode_texts(ids, lengths), lengths)``."""
        return self.score(self.encode_images(features), self.encode_texts(ids, lengths), lengths)

    def loss(self, scores: torch.Tensor, hardest: bool = True) -> torch.Tensor:
        """Training loss of a square ``[B, B]`` score matrix whose diagonal holds the positives;
        ``hardest``: only the hardest negative per row and column (the authors' max_violation)."""
        raise NotImplementedError
