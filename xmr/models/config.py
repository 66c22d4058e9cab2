"""Model configs: one dataclass per model kind, versioned and saved in every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from xmr.errors import ConfigError

IMRAM_MODES = ("text", "image", "full")


@dataclass
class ModelConfig:
    """Fields every model shares: the image and text encoders (the released sizes are defaults)."""

    VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = ""

    vocab_size: int = 8481  # rows of the word embedding (Flickr30K vocabulary: 8481)
    word_dim: int = 300  # word embedding size
    embed_size: int = 1024  # joint embedding size D (GRU hidden size, region projection size)
    img_dim: int = 2048  # region feature size (bottom-up features: 2048)
    img_norm: bool = True  # l2-normalise each region embedding
    txt_norm: bool = True  # l2-normalise each word embedding

    def __post_init__(self) -> None:
        for name in ("vocab_size", "word_dim", "embed_size", "img_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class CampConfig(ModelConfig):
    """CAMP, the released ``gate_fusion_new`` configuration (concat fusion, self-attention reduction)."""

    KIND: ClassVar[str] = "camp"

    img_norm: bool = False  # released: no_imgnorm
    txt_norm: bool = False  # released: no_txtnorm
    num_heads: int = 4  # heads h of the summary-attention reduction (num_attn)


@dataclass
class ImramConfig(ModelConfig):
    """IMRAM: K steps of iterative matching with memory distillation units."""

    KIND: ClassVar[str] = "imram"

    mode: str = "full"  # "text" (words attend regions), "image" (regions attend words), "full" (both)
    steps: int = 3  # K matching steps (iteration_step)
    lambda_softmax: float = 9.0  # inverse temperature of the attention softmax
    memory_norm: bool = False  # l2-normalise the query after each memory update (released: off)
    margin: float = 0.2  # triplet ranking loss margin

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in IMRAM_MODES:
            raise ConfigError(f"IMRAM mode must be one of {IMRAM_MODES}, got {self.mode!r}")
        if self.steps < 1:
            raise ConfigError(f"IMRAM steps must be >= 1, got {self.steps}")


@dataclass
class DualEncoderConfig(ModelConfig):
    """Baseline without cross-attention: mean-pooled regions and words, cosine similarity."""

    KIND: ClassVar[str] = "dual"

    margin: float = 0.2
