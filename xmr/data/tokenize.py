"""Caption tokenisation as the authors' loaders do it: lower-case, then nltk's ``word_tokenize``.

nltk's ``word_tokenize`` first splits sentences with the Punkt model, which must be
downloaded. We never download at run time: sentences are split on ``.``, ``!`` or ``?``
followed by white space, and each sentence goes through nltk's Treebank-style word
tokenizer (``preserve_line=True``), which needs no data. For captions (one sentence,
occasionally two) this gives the same tokens.
"""

from __future__ import annotations

import re

import torch
from nltk.tokenize import word_tokenize

from xmr.data.vocab import Vocabulary
from xmr.errors import DataError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def tokenize(caption: str) -> list[str]:
    """Lower-cased word tokens of one caption (no ``<start>``/``<end>``)."""
    if not isinstance(caption, str):
        raise DataError(f"a caption must be a string, got {type(caption).__name__} {caption!r}"[:300])
    text = caption.strip().lower()
    return [tok for sentence in _SENTENCE_END.split(text) if sentence for tok in word_tokenize(sentence, preserve_line=True)]


def encode_caption(caption: str, vocab: Vocabulary) -> list[int]:
    """Token ids ``<start> ... <end>`` of one caption."""
    return vocab.encode(tokenize(caption))


def pad_token_ids(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with 0 (``<pad>``): ids ``[N, max_len]`` int64 and lengths ``[N]`` int64."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    ids = torch.zeros(len(sequences), int(lengths.max()) if sequences else 0, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
    return ids, lengths


def encode_captions(captions: list[str], vocab: Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids and lengths for a list of raw captions."""
    return pad_token_ids([encode_caption(c, vocab) for c in captions])
