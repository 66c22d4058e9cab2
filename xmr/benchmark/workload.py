"""What ``xmr serve-bench`` scores: inputs at the released models' sizes, and the artifacts
it builds when none are given.

Without a checkpoint the benchmark builds its own: random seeded weights at the released
sizes (D = 1024, R = 36 regions of 2048-d features, word_dim 300, the Flickr30K vocabulary's
size), exported to fp32/fp16/bf16 (bf16: for TensorRT engines on a GPU) and calibrated to
int8 on synthetic data of the same shape, so every figure is at real cost. Caption lengths follow Flickr30K's (about 12.3 words, sd 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xmr.calibration.calibrate import calibrate_artifacts
from xmr.calibration.config import CalibrationConfig
from xmr.data import SynthConfig, Vocabulary, write_synthetic
from xmr.data.synth import synthetic_words
from xmr.export.artifacts import export_artifacts
from xmr.export.manifest import MANIFEST, read_manifest
from xmr.models import build_model, make_config
from xmr.models.checkpoint import save_checkpoint

F30K_VOCAB_SIZE = 8481  # words in SCAN's Flickr30K precomp vocabulary (f30k_precomp_vocab.json)
RELEASED = {"embed_size": 1024, "word_dim": 300, "img_dim": 2048, "global_dim": 256}  # with a prefilter head
RELEASED_REGIONS = 36
MEAN_WORDS, SD_WORDS, MIN_WORDS, MAX_WORDS = 12.3, 5.0, 4, 40  # Flickr30K-like caption lengths


@dataclass
class Inputs:
    features: np.ndarray  # (N, R, img_dim) float32
    ids: np.ndarray  # (M, L) int64, 0-padded, <start>/<end> included
    lengths: np.ndarray  # (M,)


def caption_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """Tokens per caption: words ~ N(12.3, 5) clipped to [4, 40], plus ``<start>``/``<end>``."""
    words = np.clip(np.round(rng.standard_normal(n) * SD_WORDS + MEAN_WORDS), MIN_WORDS, MAX_WORDS)
    return words.astype(np.int64) + 2


def random_inputs(n_images: int, n_captions: int, regions: int, img_dim: int, vocab_size: int, seed: int = 0) -> Inputs:
    """Non-negative region features (like bottom-up ones) and captions of random words."""
    rng = np.random.default_rng(seed)
    features = np.abs(rng.standard_normal((n_images, regions, img_dim), dtype=np.float32))
    lengths = caption_lengths(n_captions, rng)
    ids = rng.integers(4, vocab_size, (n_captions, int(lengths.max())))
    ids[:, 0], ids[np.arange(n_captions), lengths - 1] = 1, 2  # <start>, <end>
    ids[np.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 0
    return Inputs(features, ids, lengths)


def released_size_vocabulary() -> Vocabulary:
    """The synthetic words, padded with filler words to the Flickr30K vocabulary's size."""
    words = list(synthetic_words())
    fillers = [f"word{i:04d}" for i in range(F30K_VOCAB_SIZE)]
    return Vocabulary.from_words(words + fillers[: F30K_VOCAB_SIZE - 4 - len(words)])


def accuracy_data(root: Path, regions: int, img_dim: int, test_images: int) -> Path:
    """A synthetic precomp dataset of the model's shape (written once)."""
    data = root / f"synth-{regions}x{img_dim}"
    if not (data / "test_caps.txt").is_file():
        write_synthetic(data, SynthConfig(n_train=64, n_dev=16, n_test=test_images, regions=regions, img_dim=img_dim))
    return data


def build_default_artifacts(model: str, root: Path, test_images: int, show_progress: bool = True) -> tuple[Path, Path]:
    """``root/<model>``: random seeded released-size weights, exported (fp32, fp16, bf16) and
    calibrated (int8); and the synthetic data beside them. Reused when present."""
    data = accuracy_data(root, RELEASED_REGIONS, RELEASED["img_dim"], test_images)
    artifacts = root / model
    if not (artifacts / MANIFEST).is_file() or not read_manifest(artifacts)["config"].get("global_dim"):
        torch.manual_seed(0)
        vocab = released_size_vocabulary()
        net = build_model(make_config(model, vocab_size=len(vocab), **RELEASED), vocab)
        checkpoint = save_checkpoint(net, root / f"{model}-random.pt", {"regions": RELEASED_REGIONS,
                                                                         "weights": "random, seed 0"})
        export_artifacts(checkpoint, artifacts, ("fp32", "fp16", "bf16"), engine=None)
    if "int8" not in read_manifest(artifacts)["graphs"]["pair_scorer"]["files"]:
        calibrate_artifacts(artifacts, data, CalibrationConfig(images=16, image_batch=8, caption_batch=40, pair_images=4),
                            accuracy_target=0.5, eval_images=16, report_split=None, show_progress=show_progress)
    return artifacts, data
