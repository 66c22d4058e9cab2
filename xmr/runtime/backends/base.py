"""What every backend offers the scheduler: encode, prepare and score blocks of tensors.

Prepared tensors are named as the exported graphs name them (``image_*``, ``text_*``), the
item index first, and live on ``backend.device``; so galleries are the same whichever
backend encoded them.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from xmr.cpu import cpu_features
from xmr.errors import ArtifactError, InputError
from xmr.export.graphs import GRAPHS
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.schedule import Limits

Prepared = dict[str, torch.Tensor]
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
log = logging.getLogger("xmr.runtime")
EMULATED = ", bf16 emulated"  # what ``describe`` adds for an emulated bf16 backend


def bf16_emulated(precision: str, device: torch.device) -> bool:
    """True, with a warning logged, for bf16 on a CPU without bf16 units (AMX-BF16, AVX-512
    BF16): the scores are bf16's, the speed is below fp32's."""
    if precision != "bf16" or device.type != "cpu" or cpu_features().bf16_units is not None:
        return False
    log.warning("xmr runtime: this CPU has no AMX-BF16 or AVX-512 BF16, so bf16 is emulated (bf16 scores, slower "
                "than fp32)")
    return True


class Backend(ABC):
    name: ClassVar[str]
    precision: str
    device: torch.device
    limits: Limits = Limits()
    emulated: bool = False  # bf16 without the CPU's bf16 units (``bf16_emulated``)

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
        return f"{self.name} {self.precision} on {self.device}{EMULATED if self.emulated else ''}"

    def release(self) -> None:
        """Drop what the backend holds (sessions, engines, model); later calls raise ``InputError``."""
        for name in ("sessions", "requests", "engines", "contexts", "model"):
            if hasattr(self, name):
                setattr(self, name, _Released(self.describe()))


class GraphBackend(Backend):
    """A backend that runs the three exported graphs by name (ONNX Runtime, TensorRT)."""

    @abstractmethod
    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs of ``graph`` by name for ``feeds`` (its inputs by name, extra ones ignored)."""

    def check_io(self, inputs: dict[str, list[str]], outputs: dict[str, list[str]]) -> None:
        """The loaded graphs' input and output names (by graph) must be the ones the manifest lists."""
        for graph in GRAPHS:
            manifest = self.artifacts.manifest["graphs"][graph]
            for side, names in (("inputs", inputs[graph]), ("outputs", outputs[graph])):
                listed = sorted(t["name"] for t in manifest[side])
                if sorted(names) != listed:
                    raise ArtifactError(f"the {self.precision} {graph} of {self.artifacts.directory} has {side} "
                                        f"{sorted(names)}, its manifest lists {listed}; re-export"[:300])

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
