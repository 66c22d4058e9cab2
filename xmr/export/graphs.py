"""The three graphs every model is exported as, as ``nn.Module``s over plain tensors.

- ``image_encoder``: region features ``[Ni, R, img_dim]`` -> the prepared image tensors
  (``model.prepare_images`` of the region embeddings: the embeddings themselves plus the
  fast scorer's per-image precomputations);
- ``text_encoder``: token ids ``[Nt, L]`` + lengths ``[Nt]`` -> the prepared caption tensors;
- ``pair_scorer``: all of those -> scores ``[Ni, Nt]`` (``model.score_prepared``).

A model with prefilter heads (``config.global_dim``) adds one output to each encoder:
``image_global`` / ``text_global``, unit vectors ``[N, G]`` (not pair-scorer inputs).

Input and output names, and which axes are dynamic, come from the model's declared
``prepared_spec()`` through one adapter (``PreparedIO``: ``image_`` / ``text_`` prefixes,
``lengths`` apart), here once (``GraphSpec``), and are used by the exporter, the validator,
the manifest and the runtime's PyTorch backend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from xmr.models.base import ITEMS, LENGTH, REGIONS, Prepared, PreparedSpec, RetrievalModel

IMAGE_PREFIX, TEXT_PREFIX = "image_", "text_"
# The prefilter head's vectors ``[N, G]``: extra encoder outputs of a model with heads, not pair-scorer inputs.
IMAGE_GLOBAL, TEXT_GLOBAL = "image_global", "text_global"
GLOBAL_OUTPUTS = (IMAGE_GLOBAL, TEXT_GLOBAL)
N_IMAGES, N_CAPTIONS = "n_images", "n_captions"  # the item axes; LENGTH ("length") is the spec's own
GRAPHS = ("image_encoder", "text_encoder", "pair_scorer")


def split_global(outputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """An encoder's outputs by name -> (the pair scorer's inputs among them, the head's vectors or None)."""
    prepared = {name: t for name, t in outputs.items() if name not in GLOBAL_OUTPUTS}
    vectors = [t for name, t in outputs.items() if name in GLOBAL_OUTPUTS]
    return prepared, vectors[0] if vectors else None


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

    def io(self) -> dict[str, list[dict]]:
        """Inputs and outputs as a manifest records them."""
        return {"inputs": [asdict(t) for t in self.inputs], "outputs": [asdict(t) for t in self.outputs]}


@dataclass(frozen=True)
class PreparedIO:
    """A model's prepared tensors (``PreparedSpec``) under the graphs' IO names and back:
    ``image_`` / ``text_`` + the spec's name, in the spec's order; ``lengths`` apart."""

    spec: PreparedSpec

    @property
    def image_names(self) -> list[str]:
        return [IMAGE_PREFIX + t.name for t in self.spec.images]

    @property
    def text_names(self) -> list[str]:
        return [TEXT_PREFIX + t.name for t in self.spec.texts]

    def to_graph_images(self, prepared: Prepared) -> Prepared:
        """``prepare_images``' dict -> ``{"image_regions": ..., ...}``."""
        return {IMAGE_PREFIX + t.name: prepared[t.name] for t in self.spec.images}

    def to_graph_texts(self, prepared: Prepared) -> Prepared:
        """``prepare_texts``' dict -> ``{"text_words": ..., ...}`` (``lengths`` left out)."""
        return {TEXT_PREFIX + t.name: prepared[t.name] for t in self.spec.texts}

    def from_graph(self, images: Prepared, texts: Prepared, lengths: torch.Tensor) -> tuple[Prepared, Prepared]:
        """Graph-named tensors -> ``score_prepared``'s ``images``, ``texts`` (``lengths`` inside)."""
        return ({t.name: images[IMAGE_PREFIX + t.name] for t in self.spec.images},
                {**{t.name: texts[TEXT_PREFIX + t.name] for t in self.spec.texts}, "lengths": lengths})

    def shapes(self, regions: int) -> dict[str, list[int | str]]:
        """Each graph-named tensor's shape: items -> ``n_images`` / ``n_captions``, regions ->
        ``regions``; ``length`` stays a dynamic axis, config sizes stay ints."""
        image = {ITEMS: N_IMAGES, REGIONS: regions}
        text = {ITEMS: N_CAPTIONS, REGIONS: regions}
        return {**{IMAGE_PREFIX + t.name: [image.get(a, a) for a in t.axes] for t in self.spec.images},
                **{TEXT_PREFIX + t.name: [text.get(a, a) for a in t.axes] for t in self.spec.texts}}


def graph_specs(model: RetrievalModel, regions: int) -> dict[str, GraphSpec]:
    """The three graphs' inputs and outputs for ``model`` with ``regions`` regions per image."""
    io = PreparedIO(model.prepared_spec())
    shapes = io.shapes(regions)
    float_type = str(next(model.parameters()).dtype).removeprefix("torch.")
    image_outputs = [TensorSpec(n, float_type, shapes[n]) for n in io.image_names]
    text_outputs = [TensorSpec(n, float_type, shapes[n]) for n in io.text_names]
    lengths = TensorSpec("lengths", "int64", [N_CAPTIONS])
    heads = ([TensorSpec(IMAGE_GLOBAL, float_type, [N_IMAGES, model.config.global_dim])],
             [TensorSpec(TEXT_GLOBAL, float_type, [N_CAPTIONS, model.config.global_dim])]) if model.prefilter else ([], [])
    return {
        "image_encoder": GraphSpec("image_encoder", [TensorSpec("features", float_type, [N_IMAGES, regions, model.config.img_dim])],
                                   image_outputs + heads[0]),
        "text_encoder": GraphSpec("text_encoder", [TensorSpec("ids", "int64", [N_CAPTIONS, LENGTH]), lengths],
                                  text_outputs + heads[1]),
        "pair_scorer": GraphSpec("pair_scorer", [*image_outputs, *text_outputs, lengths],
                                 [TensorSpec("scores", float_type, [N_IMAGES, N_CAPTIONS])]),
    }


class _PreparedGraph(nn.Module):
    def __init__(self, model: RetrievalModel) -> None:
        super().__init__()
        self.model, self.io = model, PreparedIO(model.prepared_spec())


class ImageEncoderGraph(_PreparedGraph):
    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        regions = self.model.img_enc(features)
        outputs = tuple(self.io.to_graph_images(self.model.prepare_images(regions)).values())
        return outputs + (self.model.global_images(regions),) if self.model.prefilter else outputs


class TextEncoderGraph(_PreparedGraph):
    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        words = self.model.txt_enc(ids, lengths)
        outputs = tuple(self.io.to_graph_texts(self.model.prepare_texts(words, lengths)).values())
        return outputs + (self.model.global_texts(words, lengths),) if self.model.prefilter else outputs


class PairScorerGraph(_PreparedGraph):
    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        images = dict(zip(self.io.image_names, tensors))  # zip stops after the image tensors
        texts = dict(zip(self.io.text_names, tensors[len(images):-1]))
        return self.model.score_prepared(*self.io.from_graph(images, texts, tensors[-1]))


def graph_modules(model: RetrievalModel) -> dict[str, nn.Module]:
    return {"image_encoder": ImageEncoderGraph(model), "text_encoder": TextEncoderGraph(model),
            "pair_scorer": PairScorerGraph(model)}
