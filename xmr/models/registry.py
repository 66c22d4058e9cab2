"""Model kinds by name."""

from __future__ import annotations

from typing import Any

from xmr.config import config_from_dict
from xmr.data.vocab import Vocabulary
from xmr.errors import ConfigError
from xmr.models.base import RetrievalModel
from xmr.models.camp import Camp
from xmr.models.config import CampConfig, DualEncoderConfig, ImramConfig, ModelConfig
from xmr.models.dual import DualEncoder
from xmr.models.imram import Imram

MODELS: dict[str, tuple[type[ModelConfig], type[RetrievalModel]]] = {
    "camp": (CampConfig, Camp),
    "imram": (ImramConfig, Imram),
    "dual": (DualEncoderConfig, DualEncoder),
}


def list_models() -> list[str]:
    return list(MODELS)


def cross_attention_models() -> list[str]:
    """The registered kinds whose scores attend across regions and words (all but the
    dual-encoder baseline): the models ``xmr export``, ``calibrate`` and ``serve-bench`` take."""
    return [kind for kind, (config, _) in MODELS.items() if config.CROSS_ATTENTION]


def config_class(kind: str) -> type[ModelConfig]:
    if kind not in MODELS:
        raise ConfigError(f"unknown model {kind!r}; choose one of {', '.join(MODELS)}")
    return MODELS[kind][0]


def make_config(kind: str, **fields: Any) -> ModelConfig:
    return config_from_dict(config_class(kind), fields)


def build_model(config: ModelConfig, vocab: Vocabulary | None = None) -> RetrievalModel:
    """A freshly initialised model for ``config`` (its kind comes from the config class)."""
    return MODELS[config.KIND][1](config, vocab)
