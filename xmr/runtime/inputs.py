"""Checks on everything a caller hands the runtime, done before any device work.

Each problem is an ``InputError`` naming what is wrong and where (which image, which
caption); recoverable oddities (unknown words, over-long captions) are warnings.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xmr.data.tokenize import pad_token_ids, tokenize
from xmr.data.vocab import END, UNK, Vocabulary
from xmr.errors import InputError, ShapeError
from xmr.models.layers import check_tokens


class InputWarning(UserWarning):
    """Input the runtime changed to score it: unknown words, truncated captions."""


def _warn(message: str) -> None:
    """An ``InputWarning`` attributed to the caller's line, however deep inside xmr it is raised."""
    package = Path(__file__).resolve().parents[1]
    frame, level = sys._getframe(1), 2
    while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, InputWarning, stacklevel=level)


@dataclass
class Tokens:
    ids: torch.Tensor  # (N, L) int64, 0-padded
    lengths: torch.Tensor  # (N,) int64


def as_features(features: object, regions: int, img_dim: int, single: bool = False) -> torch.Tensor:
    """Region features as a float32 ``[N, regions, img_dim]`` CPU tensor; ``single`` also
    accepts one image ``[regions, img_dim]``."""
    if isinstance(features, torch.Tensor):
        array = features.detach().cpu()
    elif isinstance(features, np.ndarray):
        array = torch.from_numpy(np.require(features, requirements=["C", "W"]))  # copies only read-only or strided input
    else:
        raise InputError(f"image features must be a numpy array or torch tensor, got {type(features).__name__}")
    if single and array.dim() == 2:
        array = array.unsqueeze(0)
    expected = f"[n_images, {regions}, {img_dim}]" + (f" or [{regions}, {img_dim}]" if single else "")
    if array.dim() != 3:
        raise InputError(f"image features must be {expected}, got shape {list(array.shape)}")
    if not array.is_floating_point():
        raise InputError(f"image features must be floating point, got {array.dtype}")
    if array.size(2) != img_dim:
        raise InputError(f"image features have dimension {array.size(2)} but the model expects {img_dim} "
                         f"(shape {list(array.shape)}, expected {expected})")
    if array.size(1) != regions:
        raise InputError(f"images have {array.size(1)} regions but the model was exported for {regions} "
                         f"(shape {list(array.shape)}); re-export with --regions {array.size(1)} or pad/cut the regions")
    if array.size(0) == 0:
        raise InputError("no images given (0 rows)")
    array = array.float()
    bad = ~torch.isfinite(array)
    if bad.any():
        images = torch.nonzero(bad.flatten(1).any(1)).flatten().tolist()
        raise InputError(f"image features contain NaN or Inf ({int(bad.sum())} values, in image(s) "
                         f"{images[:5]}{' ...' if len(images) > 5 else ''})")
    return array.contiguous()


def tokenize_captions(captions: Sequence[str], vocab: Vocabulary) -> Tokens:
    """Token ids of raw captions with the model's vocabulary; unknown words -> ``<unk>`` (warned)."""
    if isinstance(captions, str):
        raise InputError("captions must be a list of strings; wrap a single caption in a list")
    sequences, unknown = [], set()
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise InputError(f"caption {i} is a {type(caption).__name__}, not a string")
        words = tokenize(caption)
        if not words:
            raise InputError(f"caption {i} is empty ({caption!r}): nothing to score")
        unknown.update(w for w in words if w not in vocab.word2idx)
        sequences.append(vocab.encode(words))
    if not sequences:
        raise InputError("no captions given (empty list)")
    if unknown:
        shown = ", ".join(sorted(unknown)[:8])
        _warn(f"{len(unknown)} word(s) not in the model's vocabulary scored as {UNK}: {shown}"
              f"{' ...' if len(unknown) > 8 else ''}")
    ids, lengths = pad_token_ids(sequences)
    return Tokens(ids, lengths)


def as_tokens(ids: object, lengths: object, vocab_size: int) -> Tokens:
    """Validated token ids ``[N, L]`` (0-padded, ``<start>``/``<end>`` included) and lengths ``[N]``."""
    ids_t = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids)
    lengths_t = torch.as_tensor(np.asarray(lengths) if not isinstance(lengths, torch.Tensor) else lengths)
    if ids_t.dim() == 2 and ids_t.size(0) == 0:
        raise InputError("no captions given (0 rows)")
    if lengths_t.is_floating_point():
        raise InputError(f"lengths must be integers (tokens per caption), got {lengths_t.dtype}")
    try:
        check_tokens(ids_t, lengths_t, vocab_size)  # the models' own checks: shapes, id and length ranges
    except ShapeError as e:
        raise InputError(str(e)) from e
    return Tokens(ids_t.long().contiguous(), lengths_t.long().contiguous())


def limit_length(tokens: Tokens, max_length: int | None, end_id: int, truncate: bool) -> Tokens:
    """Cut captions longer than ``max_length`` tokens (keeping ``<end>`` last), with a warning;
    an ``InputError`` instead when ``truncate`` is false."""
    if max_length is None or int(tokens.lengths.max()) <= max_length:
        return tokens
    long = torch.nonzero(tokens.lengths > max_length).flatten().tolist()
    where = f"caption(s) {long[:5]}{' ...' if len(long) > 5 else ''}"
    if not truncate:
        raise InputError(f"{where} have more than {max_length} tokens, the longest the backend takes "
                         f"(longest: {int(tokens.lengths.max())}); shorten them or allow truncation")
    _warn(f"{where} truncated to {max_length} tokens (the longest the backend takes)")
    ids = tokens.ids[:, :max_length].clone()
    lengths = tokens.lengths.clamp(max=max_length)
    ids[long, max_length - 1] = end_id
    return Tokens(ids, lengths)


def end_token(vocab: Vocabulary | None) -> int:
    return vocab.word2idx[END] if vocab is not None else 2
