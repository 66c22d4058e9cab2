"""Models: CAMP, IMRAM and a dual-encoder baseline behind one API.

``encode_images(features) -> [Ni, R, D]``, ``encode_texts(ids, lengths) -> [Nt, L, D]``,
``score(img_emb, cap_emb, lengths) -> [Ni, Nt]``, ``similarity(features, ids, lengths)``.
Names load on first use, so the configs and the registry come without torch.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "base": ["RetrievalModel"], "camp": ["Camp"], "imram": ["Imram"], "dual": ["DualEncoder"],
    "config": ["CampConfig", "DualEncoderConfig", "ImramConfig", "ModelConfig"],
    "registry": ["build_model", "cross_attention_models", "list_models", "make_config"],
    "checkpoint": ["load_checkpoint", "save_checkpoint"],
})
