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

from xmr.models.base import RetrievalModel

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


def _prepared_shapes(model: RetrievalModel, n_images: int, regions: int, n_captions: int,
                     length: int) -> dict[str, torch.Size]:
    """Shapes of the prepared image and caption tensors (prefixed names, text without
    ``lengths``) for zero inputs of the given sizes, in ``prepare_*``'s order."""
    d, dtype = model.config.embed_size, _float_dtype(model)
    with torch.no_grad():
        images = model.prepare_images(torch.zeros(n_images, regions, d, dtype=dtype))
        texts = model.prepare_texts(torch.zeros(n_captions, length, d, dtype=dtype), torch.full((n_captions,), length))
    return {**{IMAGE_PREFIX + n: t.shape for n, t in images.items()},
            **{TEXT_PREFIX + n: t.shape for n, t in texts.items() if n != "lengths"}}


def _prepared_names(model: RetrievalModel) -> tuple[list[str], list[str]]:
    """Keys of the prepared image and text dicts (text without ``lengths``), in a fixed order."""
    names = list(_prepared_shapes(model, 1, 2, 1, 2))
    return ([n.removeprefix(IMAGE_PREFIX) for n in names if n.startswith(IMAGE_PREFIX)],
            [n.removeprefix(TEXT_PREFIX) for n in names if n.startswith(TEXT_PREFIX)])


def _symbolic_shapes(model: RetrievalModel, regions: int) -> dict[str, list[int | str]]:
    """Shapes of every prepared tensor with dynamic axes named, found by preparing two sizes."""
    small, large = _prepared_shapes(model, 2, regions, 3, 4), _prepared_shapes(model, 5, regions, 7, 6)
    symbols = {(2, 5): N_IMAGES, (3, 7): N_CAPTIONS, (4, 6): LENGTH}
    return {name: [symbols.get((a, b), a) for a, b in zip(shape, large[name])] for name, shape in small.items()}


def _float_dtype(model: RetrievalModel) -> torch.dtype:
    return next(model.parameters()).dtype


def graph_specs(model: RetrievalModel, regions: int) -> dict[str, GraphSpec]:
    """The three graphs' inputs and outputs for ``model`` with ``regions`` regions per image."""
    image_names, text_names = _prepared_names(model)
    shapes = _symbolic_shapes(model, regions)
    float_type = str(_float_dtype(model)).removeprefix("torch.")
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
