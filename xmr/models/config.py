"""Model configs: one dataclass per model kind, versioned and saved in every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from xmr.config import check_bool, check_choice, check_float, check_int, check_memory
from xmr.errors import ConfigError

IMRAM_MODES = ("text", "image", "full")
HEAD_WIDTH = 4  # hidden units of the prefilter head's MLP, per global dimension
MAX_STEPS = 100  # IMRAM matching steps; the paper uses 1-3
# Model sizes: "small" trains on the synthetic set in minutes on a CPU; "paper" is the released size.
# ``global_dim``: the prefilter head's vectors (``xmr train`` trains one for the cross-attention models).
SIZES = {"small": {"embed_size": 64, "word_dim": 64, "global_dim": 64},
         "paper": {"embed_size": 1024, "word_dim": 300, "global_dim": 256}}


@dataclass
class ModelConfig:
    """Fields every model shares: the image and text encoders (the released sizes are defaults)."""

    VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = ""
    CROSS_ATTENTION: ClassVar[bool] = True  # scores attend across regions and words (what export and serving take)
    SQUARE_MATRICES: ClassVar[int] = 0  # D x D weight blocks beyond the shared encoders (parameter estimate)

    vocab_size: int = 8481  # rows of the word embedding (Flickr30K vocabulary: 8481)
    word_dim: int = 300  # word embedding size
    embed_size: int = 1024  # joint embedding size D (GRU hidden size, region projection size)
    img_dim: int = 2048  # region feature size (bottom-up features: 2048)
    img_norm: bool = True  # l2-normalise each region embedding
    txt_norm: bool = True  # l2-normalise each word embedding
    global_dim: int = 0  # the prefilter head's global vectors (0: no head; the authors' models have none)

    def __post_init__(self) -> None:
        """Every field checked (``ConfigError`` naming it and its range); then the weights'
        size against the available memory, so a typo (``embed_size=10**7``) fails here and
        not in an allocation."""
        owner = type(self).__name__
        for name in ("vocab_size", "word_dim", "embed_size", "img_dim"):
            check_int(owner, name, getattr(self, name), 1)
        for name in ("img_norm", "txt_norm"):
            check_bool(owner, name, getattr(self, name))
        check_int(owner, "global_dim", self.global_dim, 0)
        if self.global_dim and not self.CROSS_ATTENTION:
            raise ConfigError(f"{owner}: global_dim must be 0: a prefilter head shortlists for cross-attention, and "
                              f"this model is itself a dual encoder")
        self.check_fields(owner)
        check_memory(owner, f"the float32 weights (about {self.parameter_estimate():,} parameters)",
                     4 * self.parameter_estimate(), "lower embed_size, word_dim, img_dim or vocab_size")

    def check_fields(self, owner: str) -> None:
        """The fields of a model kind (the shared ones are checked by ``__post_init__``)."""

    def parameter_estimate(self) -> int:
        """Parameters, about: word embedding, bidirectional GRU, region projection and the
        kind's ``SQUARE_MATRICES`` D x D blocks."""
        d, w, g = self.embed_size, self.word_dim, self.global_dim
        heads = 2 * (HEAD_WIDTH * g * (d + 1) + (HEAD_WIDTH * g + 1) * g)  # two GlobalHead MLPs
        return (self.vocab_size * w + 6 * (w + d + 2) * d + (self.img_dim + 1) * d + self.SQUARE_MATRICES * d * d
                + heads)


@dataclass
class CampConfig(ModelConfig):
    """CAMP, the released ``gate_fusion_new`` configuration (concat fusion, self-attention reduction)."""

    KIND: ClassVar[str] = "camp"
    SQUARE_MATRICES: ClassVar[int] = 16

    img_norm: bool = False  # released: no_imgnorm
    txt_norm: bool = False  # released: no_txtnorm
    num_heads: int = 4  # heads h of the summary-attention reduction (num_attn)

    def check_fields(self, owner: str) -> None:
        check_int(owner, "num_heads", self.num_heads, 1)

    def parameter_estimate(self) -> int:
        """Shared estimate plus the two summary-attention head layers (``num_heads`` x D each)."""
        return super().parameter_estimate() + 2 * self.num_heads * (self.embed_size + 1)


@dataclass
class ImramConfig(ModelConfig):
    """IMRAM: K steps of iterative matching with memory distillation units."""

    KIND: ClassVar[str] = "imram"
    SQUARE_MATRICES: ClassVar[int] = 8

    mode: str = "full"  # "text" (words attend regions), "image" (regions attend words), "full" (both)
    steps: int = 3  # K matching steps (iteration_step)
    lambda_softmax: float = 9.0  # inverse temperature of the attention softmax
    memory_norm: bool = False  # l2-normalise the query after each memory update (released: off)
    margin: float = 0.2  # triplet ranking loss margin

    def check_fields(self, owner: str) -> None:
        check_choice(owner, "mode", self.mode, IMRAM_MODES)
        check_int(owner, "steps", self.steps, 1, MAX_STEPS)
        check_float(owner, "lambda_softmax", self.lambda_softmax, 0.0, above=True)
        check_bool(owner, "memory_norm", self.memory_norm)
        check_float(owner, "margin", self.margin, 0.0)  # the triplet loss margin


@dataclass
class DualEncoderConfig(ModelConfig):
    """Baseline without cross-attention: mean-pooled regions and words, cosine similarity."""

    KIND: ClassVar[str] = "dual"
    CROSS_ATTENTION: ClassVar[bool] = False

    margin: float = 0.2

    def check_fields(self, owner: str) -> None:
        check_float(owner, "margin", self.margin, 0.0)  # the triplet loss margin
