"""Data: SCAN precomp splits, vocabularies, tokenisation and the synthetic dataset."""

from xmr.data.precomp import SPLITS, PrecompSplit, find_vocab, load_split
from xmr.data.synth import SynthConfig, write_synthetic
from xmr.data.tokenize import encode_caption, encode_captions, pad_token_ids, tokenize
from xmr.data.vocab import Vocabulary

__all__ = [
    "SPLITS", "PrecompSplit", "SynthConfig", "Vocabulary", "encode_caption", "encode_captions",
    "find_vocab", "load_split", "pad_token_ids", "tokenize", "write_synthetic",
]
