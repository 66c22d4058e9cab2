"""Model kinds by name. The model classes (torch) load when a model is built, so listing
the kinds and reading their configs costs nothing."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from xmr.config import config_from_dict
from xmr.errors import ConfigError
from xmr.models.config import CampConfig, DualEncoderConfig, ImramConfig, ModelConfig

if TYPE_CHECKING:
    from xmr.data.vocab import Vocabulary
    from xmr.models.base import RetrievalModel

# kind -> (config class, the model class as "module.Class" in this package)
MODELS: dict[str, tuple[type[ModelConfig], str]] = {
    "camp": (CampConfig, "camp.Camp"),
    "imram": (ImramConfig, "imram.Imram"),
    "dual": (DualEncoderConfig, "dual.DualEncoder"),
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
    module, _, name = MODELS[config.KIND][1].partition(".")
    return getattr(importlib.import_module(f"xmr.models.{module}"), name)(config, vocab)
