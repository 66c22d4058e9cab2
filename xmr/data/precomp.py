"""SCAN "precomp" splits: ``<split>_ims.npy`` (or ``_feat.npy``) + ``<split>_caps.txt``.

Features are ``float32 [N_images, R, img_dim]`` bottom-up region features, memory-mapped
(COCO's train split is ~16 GB). Captions are one per line, ``captions_per_image``
consecutive lines per image (5 in Flickr30K/COCO; 1 when there are as many captions as
images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xmr.data.tokenize import encode_caption, pad_token_ids
from xmr.data.vocab import Vocabulary
from xmr.errors import DataError

SPLITS = ("train", "dev", "test", "testall")
FEATURE_SUFFIXES = ("_ims.npy", "_feat.npy")


def feature_path(data_dir: Path, split: str) -> Path:
    for suffix in FEATURE_SUFFIXES:
        candidate = data_dir / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    names = " or ".join(f"{split}{s}" for s in FEATURE_SUFFIXES)
    raise FileNotFoundError(f"no image features for split {split!r} in {data_dir}: expected {names}")


def load_features(path: Path) -> np.ndarray:
    """Memory-map ``[N, R, img_dim]`` features, checking shape and dtype."""
    try:
        feats = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from e
    if feats.ndim != 3:
        raise DataError(f"{path}: features must be [N_images, regions, img_dim], got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise DataError(f"{path}: features must be floating point, got {feats.dtype}")
    if feats.shape[0] == 0:
        raise DataError(f"{path}: no images")
    return feats


def read_captions(path: Path) -> list[str]:
    """One caption per line; a trailing newline is fine, an empty line inside is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"{path}:{number}: empty caption line (captions must stay aligned with images)")
    return lines


def captions_per_image(n_captions: int, n_images: int, source: Path) -> int:
    if n_captions % n_images != 0:
        raise DataError(
            f"{source}: {n_captions} captions for {n_images} images; "
            "the count must be a multiple of the number of images (5 per image, or 1)"
        )
    return n_captions // n_images


@dataclass
class PrecompSplit:
    """One split: memory-mapped features, raw captions and their token ids (built lazily)."""

    features: np.ndarray  # (N_images, R, img_dim), memory-mapped
    captions: list[str]  # N_images * captions_per_image
    vocab: Vocabulary
    name: str = "split"
    _ids: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.per_image = captions_per_image(len(self.captions), len(self.features), Path(self.name))

    @property
    def n_images(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @property
    def regions(self) -> int:
        return int(self.features.shape[1])

    @property
    def img_dim(self) -> int:
        return int(self.features.shape[2])

    def image_of_caption(self, caption_index: int) -> int:
        return caption_index // self.per_image

    def caption_ids(self, index: int) -> list[int]:
        ids = self._ids.get(index)
        if ids is None:
            ids = self._ids[index] = encode_caption(self.captions[index], self.vocab)
        return ids

    def image_batch(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        """float32 ``[len(indices), R, img_dim]`` copied out of the memory map."""
        return torch.from_numpy(np.ascontiguousarray(self.features[np.asarray(indices)], dtype=np.float32))

    def caption_batch(self, indices: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded token ids ``[len(indices), L]`` and lengths ``[len(indices)]``."""
        return pad_token_ids([self.caption_ids(int(i)) for i in indices])


def load_split(data_dir: str | Path, split: str, vocab: Vocabulary) -> PrecompSplit:
    """Load ``split`` from a precomp directory (features memory-mapped)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory not found: {data_dir}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    feats = load_features(feature_path(data_dir, split))
    caps_path = data_dir / f"{split}_caps.txt"
    captions = read_captions(caps_path)
    return PrecompSplit(features=feats, captions=captions, vocab=vocab, name=str(caps_path))


def find_vocab(data_dir: str | Path) -> Path:
    """The vocabulary JSON shipped inside a precomp directory (``vocab.json`` or ``*_vocab.json``)."""
    data_dir = Path(data_dir)
    candidates = [data_dir / "vocab.json", *sorted(data_dir.glob("*_vocab.json"))]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no vocabulary in {data_dir} (looked for vocab.json and *_vocab.json); pass --vocab PATH"
    )
