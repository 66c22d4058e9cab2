"""The calibration set: real images and captions of a train or dev split, as graph inputs.

- image encoder: the sampled images' region features, in batches;
- text encoder: every caption of those images, in batches of similar length (so every length
  bucket is seen, each batch padded as the runtime pads it);
- pair scorer: the encoders' fp32 outputs, in blocks that pair each caption batch with some of
  its own images (matching pairs) **and** with other images (non-matching pairs): ranking is
  decided among the non-matching pairs, so their activation ranges must be seen too.

The test split is refused: scales fitted on it would leak into the reported accuracy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from xmr.calibration.config import MIN_IMAGES, CalibrationConfig
from xmr.data.precomp import PrecompSplit
from xmr.errors import CalibrationError
from xmr.export.graphs import split_global
from xmr.runtime.backends import Backend

Arrays = dict[str, np.ndarray]  # one graph's inputs (or outputs) by name

@dataclass
class CalibrationSet:
    """Inputs of each graph (a list of feeds), and what they were drawn from."""

    feeds: dict[str, list[Arrays]]
    images: int
    captions: int
    matching_pairs: int
    non_matching_pairs: int
    caption_lengths: list[int]  # shortest, longest
    sha256: str = field(default="")

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "feeds"}


def check_split(split: PrecompSplit, name: str, img_dim: int, regions: int) -> PrecompSplit:
    """``split``; fails early, saying what to change, when the split ``name`` cannot serve this model."""
    if split.img_dim != img_dim:
        raise CalibrationError(f"{name} features are {split.img_dim}-d but the model takes {img_dim}-d "
                               f"features: calibrate with the data the model was trained on (--data)")
    if split.regions != regions:
        raise CalibrationError(f"{name} images have {split.regions} regions but the graphs were exported "
                               f"for {regions}: re-export with --regions {split.regions} or use matching data")
    if split.n_captions == 0:
        raise CalibrationError(f"the {name} split has no captions")
    if split.n_images < MIN_IMAGES:
        raise CalibrationError(f"the {name} split has {split.n_images} images; calibration needs at least "
                               f"{MIN_IMAGES} (use a larger split, e.g. --split train)")
    return split


def _hash(feeds: dict[str, list[Arrays]], config: CalibrationConfig) -> str:
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for feed in [f for graph in sorted(feeds) for f in feeds[graph]]:
        for name in sorted(feed):
            digest.update(name.encode() + np.ascontiguousarray(feed[name]).tobytes())
    return digest.hexdigest()


def caption_blocks(lengths: np.ndarray, size: int) -> list[np.ndarray]:
    """Caption indices in blocks of ``size``, shortest captions first (similar lengths together)."""
    order = np.argsort(lengths, kind="stable")
    return [order[s : s + size] for s in range(0, len(order), size)]


def _numpy(tensors: dict[str, torch.Tensor]) -> Arrays:
    """Encoder outputs as the pair scorer's input arrays (a prefilter head's vectors left out)."""
    return {name: t.cpu().numpy() for name, t in split_global(tensors)[0].items()}


def build_calibration_set(split: PrecompSplit, encoders: Backend, config: CalibrationConfig) -> CalibrationSet:
    """Sample ``config.images`` images of ``split`` with all their captions and turn them into
    the inputs of the three graphs (the pair scorer's through the fp32 ``encoders``, a CPU
    backend of the artifacts' fp32 graphs)."""
    config.validate()
    rng = np.random.default_rng(config.seed)
    images = np.sort(rng.choice(split.n_images, size=min(config.images, split.n_images), replace=False))
    captions = (images[:, None] * split.per_image + np.arange(split.per_image)).ravel()
    features = [split.image_batch(images[s : s + config.image_batch]).numpy()
                for s in range(0, len(images), config.image_batch)]
    encoded_images = [_numpy(encoders.encode_images(torch.from_numpy(f))) for f in features]
    embedded = {name: np.concatenate([e[name] for e in encoded_images]) for name in encoded_images[0]}
    _, lengths = split.caption_batch(captions)
    text_feeds, pair_feeds, matching, pairs = [], [], 0, 0
    for block in caption_blocks(lengths.numpy(), config.caption_batch):
        ids, block_lengths = (t.numpy() for t in split.caption_batch(captions[block]))
        text_feeds.append({"ids": ids, "lengths": block_lengths})
        texts = _numpy(encoders.encode_texts(torch.from_numpy(ids), torch.from_numpy(block_lengths)))
        own = np.unique(block // split.per_image)  # positions (in ``images``) of the captions' images
        n_own = min(len(own), max(1, config.pair_images // 2))
        chosen_own = rng.choice(own, size=n_own, replace=False)
        others = np.setdiff1d(np.arange(len(images)), own)
        chosen = np.concatenate([chosen_own, rng.choice(others, size=min(len(others), config.pair_images - n_own),
                                                        replace=False)])
        pair_feeds.append({**{n: a[chosen] for n, a in embedded.items()}, **texts, "lengths": block_lengths})
        matching += int(np.isin(block // split.per_image, chosen_own).sum())
        pairs += len(chosen) * len(block)
    feeds = {"image_encoder": [{"features": f} for f in features], "text_encoder": text_feeds,
             "pair_scorer": pair_feeds}
    return CalibrationSet(feeds, len(images), len(captions), matching, pairs - matching,
                          [int(lengths.min()), int(lengths.max())], _hash(feeds, config))
