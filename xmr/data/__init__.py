"""Data: SCAN precomp splits, vocabularies, tokenisation and the synthetic dataset.
Names load on first use, so the vocabulary and the synthetic set come without torch."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "precomp": ["SPLITS", "PrecompSplit", "find_vocab", "load_split"],
    "synth": ["DEFAULT_DATA", "SynthConfig", "write_synthetic"],
    "tokenize": ["encode_caption", "encode_captions", "pad_token_ids", "tokenize"],
    "vocab": ["Vocabulary"],
})
