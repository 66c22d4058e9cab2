"""xmr checkpoints: weights + the full model config + the vocabulary, in one file.

Stored as plain tensors and JSON-able dicts, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from xmr.config import config_from_dict, config_to_dict
from xmr.data.files import require_file
from xmr.data.vocab import Vocabulary
from xmr.device import resolve_device
from xmr.errors import CheckpointError, XmrError, first_line
from xmr.models.base import RetrievalModel
from xmr.models.registry import build_model, config_class
from xmr.outputs import write_file
from xmr.paths import file_sha256

FORMAT = "xmr-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(model: RetrievalModel, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (weights, config, vocabulary) and free-form ``metadata`` to ``path``,
    atomically: a reader (or a kill) never sees half a checkpoint; a full disk is an
    ``OSError`` (ENOSPC) and leaves what was there."""
    blob = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.kind,
        "config": config_to_dict(model.config),
        "vocab": model.vocab.to_dict() if model.vocab is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": metadata or {},
    }
    buffer = io.BytesIO()  # serialised first: torch.save on a full disk raises a RuntimeError, a write an OSError
    torch.save(blob, buffer)
    return write_file(Path(path), lambda partial: partial.write_bytes(buffer.getbuffer()))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict saved by ``save_checkpoint`` (``torch.load(weights_only=True)``: no code runs)."""
    path = require_file(path, "checkpoint", CheckpointError)
    device = resolve_device(map_location)
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for foreign or corrupt files
        raise CheckpointError(
            f"{path}: not an xmr checkpoint ({type(e).__name__}: {first_line(e)}). "
            "Checkpoints from the authors' code are converted with `xmr import-checkpoint`."
        ) from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an xmr checkpoint; convert the authors' files with `xmr import-checkpoint`")
    if blob.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {blob.get('format_version')!r} is not supported"[:300])
    return blob


def is_checkpoint_file(path: Path) -> bool:
    """True when ``path`` is a checkpoint xmr wrote (its header; tensors memory-mapped, not read),
    so an output check may replace it."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # anything torch cannot read as a zip checkpoint is not ours
        return False
    return isinstance(blob, dict) and blob.get("format") == FORMAT


def check_finite_weights(state_dict: Any, source: Path) -> None:
    """``CheckpointError`` naming the first floating-point tensor of ``state_dict`` that holds NaN or Inf."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: 'state_dict' must be a mapping of tensors, got {type(state_dict).__name__}")
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                raise CheckpointError(f"{source}: weight {name!r} holds {int((~finite).sum())} NaN or Inf values "
                                      f"(of {tensor.numel()}); the run that saved it diverged: use an earlier checkpoint"[:400])


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> RetrievalModel:
    """The model saved at ``path``, in eval mode, with ``model.config`` and ``model.vocab``.

    Every problem is a one-line ``CheckpointError`` naming ``path`` (``MissingFileError`` when
    there is no file; ``BackendUnavailableError``/``ConfigError`` for a device this machine lacks)."""
    blob = read_checkpoint(path, map_location)
    path = Path(path)
    try:
        config = config_from_dict(config_class(blob.get("model")), blob.get("config"))
        vocab = Vocabulary.from_dict(blob["vocab"]) if blob.get("vocab") else None
        check_finite_weights(blob.get("state_dict"), path)
        model = build_model(config, vocab)
        model.load_state_dict(blob["state_dict"])
        metadata = dict(blob.get("metadata") or {})
    except CheckpointError:
        raise
    except XmrError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__  # all lines: torch lists every bad key
        raise CheckpointError(f"{path}: checkpoint does not match its config ({reason})"[:500]) from e
    model.checkpoint_metadata = metadata
    model.checkpoint_sha256 = file_sha256(path)
    return model.to(resolve_device(map_location)).eval()
