"""The three graphs every model is exported as, as ``nn.Module``s over plain tensors.

- ``image_encoder``: region features ``[Ni, R, img_dim]`` -> the prepared image tensors
  (``model.prepare_images`` of the region embeddings: the embeddings themselves plus the
  fast scorer's per-image precomputations);
- ``text_encoder``: token ids ``[Nt, L]`` + lengths ``[Nt]`` -> the prepared caption tensors;
- ``pair_scorer``: all of those -> scores ``[Ni, Nt]`` (``model.score_prepared``).

Input and output names, and which axes are dynamic, are derived here once (``GraphSpec``)
and used by the exporter, the validator and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from xmr.models.base import Prepared, RetrievalModel

IMAGE_PREFIX, TEXT_PREFIX = "image_", "text_"
N_IMAGES, N_CAPTIONS, LENGTH = "n_images", "n_captions", "length"
GRAPHS = ("image_encoder", "text_encoder", "pair_scorer")


@dataclass
class TensorSpec:
    """One graph input or output: its name, dtype and shape (ints fixed, strings dynamic)."""

    name: str
    dtype: str
    shape: list[int | str]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass
class GraphSpec:
    name: str
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}


def _prepared_names(model: RetrievalModel) -> tuple[list[str], list[str]]:
    """Keys of the prepared image and text dicts (text without ``lengths``), in a fixed order."""
    d = model.config.embed_size
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        images = model.prepare_images(torch.zeros(1, 2, d, dtype=dtype))
        texts = model.prepare_texts(torch.zeros(1, 2, d, dtype=dtype), torch.tensor([2]))
    return list(images), [k for k in texts if k != "lengths"]


def _symbolic_shapes(model: RetrievalModel, regions: int) -> dict[str, list[int | str]]:
    """Shapes of every prepared tensor with dynamic axes named, found by preparing two sizes."""
    d = model.config.embed_size
    dtype = next(model.parameters()).dtype
    shapes: dict[str, list[int | str]] = {}
    with torch.no_grad():
        small = {**_prefixed(IMAGE_PREFIX, model.prepare_images(torch.zeros(2, regions, d, dtype=dtype))),
                 **_prefixed(TEXT_PREFIX, model.prepare_texts(torch.zeros(3, 4, d, dtype=dtype), torch.full((3,), 4)))}
        large = {**_prefixed(IMAGE_PREFIX, model.prepare_images(torch.zeros(5, regions, d, dtype=dtype))),
                 **_prefixed(TEXT_PREFIX, model.prepare_texts(torch.zeros(7, 6, d, dtype=dtype), torch.full((7,), 6)))}
    symbols = {(2, 5): N_IMAGES, (3, 7): N_CAPTIONS, (4, 6): LENGTH}
    for name, tensor in small.items():
        shapes[name] = [symbols.get((a, b), a) for a, b in zip(tensor.shape, large[name].shape)]
    return shapes


def _prefixed(prefix: str, items: Prepared) -> Prepared:
    return {prefix + name: tensor for name, tensor in items.items()}


def _dtype_name(tensor_dtype: torch.dtype) -> str:
    return str(tensor_dtype).removeprefix("torch.")


def graph_specs(model: RetrievalModel, regions: int) -> dict[str, GraphSpec]:
    """The three graphs' inputs and outputs for ``model`` with ``regions`` regions per image."""
    image_names, text_names = _prepared_names(model)
    shapes = _symbolic_shapes(model, regions)
    float_type = _dtype_name(next(model.parameters()).dtype)
    image_outputs = [TensorSpec(IMAGE_PREFIX + n, float_type, shapes[IMAGE_PREFIX + n]) for n in image_names]
    text_outputs = [TensorSpec(TEXT_PREFIX + n, float_type, shapes[TEXT_PREFIX + n]) for n in text_names]
    lengths = TensorSpec("lengths", "int64", [N_CAPTIONS])
    return {
        "image_encoder": GraphSpec("image_encoder", [TensorSpec("features", float_type, [N_IMAGES, regions, model.config.img_dim])],
                                   image_outputs),
        "text_encoder": GraphSpec("text_encoder", [TensorSpec("ids", "int64", [N_CAPTIONS, LENGTH]), lengths], text_outputs),
        "pair_scorer": GraphSpec("pair_scorer", [*image_outputs, *text_outputs, lengths],
                                 [TensorSpec("scores", float_type, [N_IMAGES, N_CAPTIONS])]),
    }


class ImageEncoderGraph(nn.Module):
    def __init__(self, model: RetrievalModel) -> None:
        super().__init__()
        self.model = model
        self.names = _prepared_names(model)[0]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prepared = self.model.prepare_images(self.model.img_enc(features))
        return tuple(prepared[n] for n in self.names)


class TextEncoderGraph(nn.Module):
    def __init__(self, model: RetrievalModel) -> None:
        super().__init__()
        self.model = model
        self.names = _prepared_names(model)[1]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prepared = self.model.prepare_texts(self.model.txt_enc(ids, lengths), lengths)
        return tuple(prepared[n] for n in self.names)


class PairScorerGraph(nn.Module):
    def __init__(self, model: RetrievalModel) -> None:
        super().__init__()
        self.model = model
        self.image_names, self.text_names = _prepared_names(model)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        n_img = len(self.image_names)
        images = dict(zip(self.image_names, tensors[:n_img]))
        texts = dict(zip(self.text_names, tensors[n_img:-1]))
        texts["lengths"] = tensors[-1]
        return self.model.score_prepared(images, texts)


def graph_modules(model: RetrievalModel) -> dict[str, nn.Module]:
    return {"image_encoder": ImageEncoderGraph(model), "text_encoder": TextEncoderGraph(model),
            "pair_scorer": PairScorerGraph(model)}
