"""Models: CAMP, IMRAM and a dual-encoder baseline behind one API.

``encode_images(features) -> [Ni, R, D]``, ``encode_texts(ids, lengths) -> [Nt, L, D]``,
``score(img_emb, cap_emb, lengths) -> [Ni, Nt]``, ``similarity(features, ids, lengths)``.
"""

from xmr.models.base import RetrievalModel
from xmr.models.camp import Camp
from xmr.models.checkpoint import load_checkpoint, save_checkpoint
from xmr.models.config import CampConfig, DualEncoderConfig, ImramConfig, ModelConfig
from xmr.models.dual import DualEncoder
from xmr.models.imram import Imram
from xmr.models.registry import build_model, cross_attention_models, list_models, make_config

__all__ = [
    "Camp", "CampConfig", "DualEncoder", "DualEncoderConfig", "Imram", "ImramConfig", "ModelConfig",
    "RetrievalModel", "build_model", "cross_attention_models", "list_models", "load_checkpoint", "make_config", "save_checkpoint",
]
