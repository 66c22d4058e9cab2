"""Checks on everything a caller hands the runtime, done before any device work.

Each problem is one ``InputError`` line naming what is wrong and where (which image, which
caption, which argument); recoverable oddities (unknown words, over-long captions) are
warnings. Nothing a caller passes reaches numpy or torch unchecked, so no bare numpy/torch
traceback stands in for an explanation.
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
from xmr.errors import InputError, ShapeError, first_line
from xmr.models.layers import check_tokens

DEFAULT_MAX_LENGTH = 128  # tokens per caption, <start> and <end> included (longest Flickr30K/COCO: ~90)
MIN_MAX_LENGTH = 3  # <start>, one word, <end>
WORD_MARGIN = 16  # words tokenised beyond the cap, so a cut never changes the tokens that are kept
INTEGER_TENSORS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


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


def positive_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"{name} must be {wanted}, got {value!r}"[:300])
    return int(value)


def caption_cap(max_length: object, engine_limit: int | None) -> int:
    """The longest caption a scorer takes: ``max_length``, else ``DEFAULT_MAX_LENGTH`` (or the
    TensorRT profile's longest when smaller); never beyond what the engines take."""
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, engine_limit or DEFAULT_MAX_LENGTH)
    cap = positive_int(max_length, "max_length (tokens per caption, <start>/<end> included)", MIN_MAX_LENGTH)
    if engine_limit is not None and cap > engine_limit:
        raise InputError(f"max_length={cap} is longer than the TensorRT engines take ({engine_limit} tokens, their "
                         f"optimisation profile); pass max_length <= {engine_limit} or re-export with a larger "
                         f"`xmr export --max-length`")
    return cap


def as_features(features: object, regions: int, img_dim: int, single: bool = False) -> torch.Tensor:
    """Region features as a float32 ``[N, regions, img_dim]`` CPU tensor; ``single`` also
    accepts one image ``[regions, img_dim]``."""
    if isinstance(features, torch.Tensor):
        if features.layout != torch.strided or features.device.type == "meta":
            raise InputError(f"image features must be a dense tensor with data, got a {features.layout} tensor on "
                             f"{features.device}")
        if not features.is_floating_point():
            raise InputError(f"image features must be floating point, got {features.dtype}")
        array = features.detach().cpu()
    elif isinstance(features, np.ndarray):
        if features.dtype.kind != "f" or features.dtype.itemsize > 8:  # float16/32/64, either byte order
            raise InputError(f"image features must be floating point (float16, float32 or float64), got {features.dtype}")
        if not features.dtype.isnative:
            features = features.astype(features.dtype.newbyteorder("="))
        array = torch.from_numpy(np.require(features, requirements=["C", "W"]))  # copies only read-only or strided input
    else:
        raise InputError(f"image features must be a numpy array or torch tensor, got {type(features).__name__}"
                         + (" (convert it with np.asarray(features, dtype=np.float32))" if isinstance(features, list) else ""))
    if single and array.dim() == 2:
        array = array.unsqueeze(0)
    expected = f"[n_images, {regions}, {img_dim}]" + (f" or [{regions}, {img_dim}]" if single else "")
    if array.dim() != 3:
        raise InputError(f"image features must be {expected}, got shape {list(array.shape)}")
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
        raise InputError(f"image features contain NaN or Inf ({int(bad.sum())} values, in image(s) {images[:5]}"
                         f"{' ...' if len(images) > 5 else ''}); values beyond float32's range count as Inf")
    return array.contiguous()


def caption_list(captions: object) -> list[str]:
    """Raw captions as a list: a list or tuple of strings, or a 1-D numpy array of them."""
    if isinstance(captions, (str, bytes)):
        raise InputError(f"captions must be a list of strings, got one {type(captions).__name__}; wrap a single "
                         f"caption in a list" + (" (and decode bytes first)" if isinstance(captions, bytes) else ""))
    if isinstance(captions, np.ndarray):
        if captions.ndim != 1 or captions.dtype.kind not in "UO":
            raise InputError(f"captions as a numpy array must be a 1-D array of strings, got {captions.dtype} "
                             f"{list(captions.shape)}")
        captions = captions.tolist()
    if not isinstance(captions, Sequence):
        raise InputError(f"captions must be a list of strings or (ids, lengths), got {type(captions).__name__}")
    return list(captions)


def _words(caption: str, max_length: int | None) -> tuple[list[str], bool]:
    """The caption's tokens, and whether its text was cut first: beyond the cap (plus a margin)
    no word is tokenised, so a 20,000-word caption costs what a short one does."""
    if max_length is not None:
        parts = caption.split(maxsplit=max_length + WORD_MARGIN)
        if len(parts) > max_length + WORD_MARGIN:
            return tokenize(" ".join(parts[:-1])), True
    return tokenize(caption), False


def tokenize_captions(captions: object, vocab: Vocabulary, max_length: int | None = None,
                      truncate: bool = True) -> Tokens:
    """Token ids of raw captions with the model's vocabulary; unknown words -> ``<unk>``
    (warned); captions over ``max_length`` tokens cut (warned) or refused (``truncate=False``)."""
    sequences, unknown, long, longest, cut = [], set(), [], 0, False
    for i, caption in enumerate(caption_list(captions)):
        if not isinstance(caption, str):
            raise InputError(f"caption {i} is a {type(caption).__name__}, not a string"
                             + (" (decode it first)" if isinstance(caption, bytes) else ""))
        words, was_cut = _words(caption, max_length)
        if not words:
            raise InputError(f"caption {i} is empty ({caption[:80]!r}): nothing to score")
        sequence = vocab.encode(words)
        if max_length is not None and len(sequence) > max_length:
            long.append(i)
            longest, cut = max(longest, len(sequence)), cut or was_cut
            sequence = [*sequence[: max_length - 1], sequence[-1]]  # <end> stays last
        unknown.update(w for w in words[: len(sequence) - 2] if w not in vocab.word2idx)
        sequences.append(sequence)
    if not sequences:
        raise InputError("no captions given (empty list)")
    if long:
        too_long(long, f"{longest}{'+' if cut else ''}", max_length, truncate)  # type: ignore[arg-type]
    if unknown:
        shown = ", ".join(sorted(unknown)[:8])
        _warn(f"{len(unknown)} word(s) not in the model's vocabulary scored as {UNK}: {shown}"
              f"{' ...' if len(unknown) > 8 else ''}")
    ids, lengths = pad_token_ids(sequences)
    return Tokens(ids, lengths)


def too_long(indices: list[int], longest: str, max_length: int, truncate: bool) -> None:
    """Warn that captions ``indices`` are cut to ``max_length`` tokens, or refuse them."""
    where = f"caption(s) {indices[:5]}{' ...' if len(indices) > 5 else ''}"
    if not truncate:
        raise InputError(f"{where} have more than {max_length} tokens (longest: {longest}), the scorer's cap; "
                         f"shorten them, or load the scorer with a larger max_length= or truncate=True")
    _warn(f"{where} truncated to {max_length} tokens, the scorer's cap (<start>/<end> included); "
          f"load it with max_length= to change the cap")


def _integers(value: object, what: str) -> torch.Tensor:
    """An integer array (numpy, torch or nested lists) as an int64 CPU tensor."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in INTEGER_TENSORS:
            raise InputError(f"{what} must be integers, got {value.dtype}")
        return value.detach().cpu().long().contiguous()
    try:
        array = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise InputError(f"{what} must be a rectangular integer array (pad token ids with 0 to one width), got "
                         f"ragged rows ({first_line(e)[:120]})") from e
    if array.dtype.kind not in "iu":
        raise InputError(f"{what} must be integers, got {array.dtype} {list(array.shape)}")
    if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise InputError(f"{what} hold values beyond int64 (largest {int(array.max())})")
    return torch.from_numpy(array.astype(np.int64))


def as_tokens(ids: object, lengths: object, vocab_size: int) -> Tokens:
    """Validated token ids ``[N, L]`` (0-padded, ``<start>``/``<end>`` included) and lengths ``[N]``."""
    ids_t, lengths_t = _integers(ids, "token ids"), _integers(lengths, "lengths (tokens per caption)")
    if ids_t.dim() == 2 and ids_t.size(0) == 0:
        raise InputError("no captions given (0 rows)")
    try:
        check_tokens(ids_t, lengths_t, vocab_size)  # the models' own checks: shapes, id and length ranges
    except ShapeError as e:
        raise InputError(str(e)) from e
    return Tokens(ids_t, lengths_t)


def limit_length(tokens: Tokens, max_length: int | None, vocab: Vocabulary | None, truncate: bool) -> Tokens:
    """Cut captions longer than ``max_length`` tokens (keeping ``<end>`` last: ``vocab``'s, else id 2),
    with a warning; an ``InputError`` instead when ``truncate`` is false."""
    if max_length is None or int(tokens.lengths.max()) <= max_length:
        return tokens
    long = torch.nonzero(tokens.lengths > max_length).flatten().tolist()
    too_long(long, str(int(tokens.lengths.max())), max_length, truncate)
    ids = tokens.ids[:, :max_length].clone()
    lengths = tokens.lengths.clamp(max=max_length)
    ids[long, max_length - 1] = vocab.word2idx[END] if vocab is not None else 2
    return Tokens(ids, lengths)
