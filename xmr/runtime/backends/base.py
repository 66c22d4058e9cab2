"""What every backend offers the scheduler: encode, prepare and score blocks of tensors.

Prepared tensors are named as the exported graphs name them (``image_*``, ``text_*``), the
item index first, and live on ``backend.device``; so galleries are the same whichever
backend encoded them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from xmr.errors import InputError
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.schedule import Limits

Prepared = dict[str, torch.Tensor]
PRECISIONS = ("fp32", "fp16", "int8")


class Backend(ABC):
    name: ClassVar[str]
    precision: str
    device: torch.device
    limits: Limits = Limits()

    def __init__(self, artifacts: Artifacts, precision: str) -> None:
        self.artifacts = artifacts
        self.precision = precision

    @abstractmethod
    def encode_images(self, features: torch.Tensor) -> Prepared:
        """float32 features ``[N, R, img_dim]`` (on ``device``) -> prepared image tensors."""

    @abstractmethod
    def encode_texts(self, ids: torch.Tensor, lengths: torch.Tensor) -> Prepared:
        """int64 ids ``[N, L]`` and lengths ``[N]`` (on ``device``) -> prepared caption tensors."""

    @abstractmethod
    def score(self, images: Prepared, texts: Prepared, lengths: torch.Tensor) -> torch.Tensor:
        """float32 scores ``[Ni, Nt]`` on ``device``, issued on the current CUDA stream on a GPU."""

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.device}"

    def release(self) -> None:
        """Drop what the backend holds (sessions, engines, model); later calls raise ``InputError``."""
        for name in ("sessions", "engines", "contexts", "model"):
            if hasattr(self, name):
                setattr(self, name, _Released(self.describe()))


class GraphBackend(Backend):
    """A backend that runs the three exported graphs by name (ONNX Runtime, TensorRT)."""

    @abstractmethod
    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs of ``graph`` by name for ``feeds`` (its inputs by name, extra ones ignored)."""

    def encode_images(self, features: torch.Tensor) -> Prepared:
        return self._run("image_encoder", {"features": features})

    def encode_texts(self, ids: torch.Tensor, lengths: torch.Tensor) -> Prepared:
        return self._run("text_encoder", {"ids": ids, "lengths": lengths})

    def score(self, images: Prepared, texts: Prepared, lengths: torch.Tensor) -> torch.Tensor:
        return self._run("pair_scorer", {**images, **texts, "lengths": lengths})["scores"]


class _Released:
    """Stands in for what a released backend held: any use says so in one line."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> object:
        raise InputError(f"this scorer was closed ({self._what}); load a new one")

    __getitem__ = __getattr__
