"""xmr checkpoints: weights + the full model config + the vocabulary, in one file.

Stored as plain tensors and JSON-able dicts, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from xmr.config import config_from_dict, config_to_dict
from xmr.data.vocab import Vocabulary
from xmr.errors import CheckpointError, XmrError
from xmr.models.base import RetrievalModel
from xmr.models.registry import build_model, config_class

FORMAT = "xmr-checkpoint"
FORMAT_VERSION = 1


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(model: RetrievalModel, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (weights, config, vocabulary) and free-form ``metadata`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model.kind,
            "config": config_to_dict(model.config),
            "vocab": model.vocab.to_dict() if model.vocab is not None else None,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "metadata": metadata or {},
        },
        path,
    )
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for foreign or corrupt files
        raise CheckpointError(
            f"{path}: not an xmr checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Checkpoints from the authors' code are converted with `xmr import-checkpoint`."
        ) from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an xmr checkpoint; convert the authors' files with `xmr import-checkpoint`")
    if blob.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {blob.get('format_version')} is not supported")
    return blob


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> RetrievalModel:
    """The model saved at ``path``, in eval mode, with ``model.config`` and ``model.vocab``."""
    blob = read_checkpoint(path, map_location)
    try:
        config = config_from_dict(config_class(blob["model"]), blob["config"])
        vocab = Vocabulary.from_dict(blob["vocab"]) if blob.get("vocab") else None
        model = build_model(config, vocab)
        model.load_state_dict(blob["state_dict"])
    except XmrError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: checkpoint does not match its config ({e})") from e
    model.checkpoint_metadata = dict(blob.get("metadata") or {})
    model.checkpoint_sha256 = file_sha256(path)
    return model.to(map_location).eval()
