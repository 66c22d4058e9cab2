"""Score a split with exported graphs in ONNX Runtime (CPU): the reference for every precision.

The three graphs are chained by name: the encoders' outputs are the pair scorer's inputs
(``image_*`` / ``text_*``, plus ``lengths``). Every image and caption is encoded once;
captions are scored in blocks of similar length, so a block is padded to little more than
its own longest caption.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xmr.data.precomp import PrecompSplit
from xmr.progress import progress

IMAGE_BLOCK, CAPTION_BLOCK = 50, 100  # pairs per pair-scorer call: small models, CPU

Arrays = dict[str, np.ndarray]


def onnx_sessions(paths: dict[str, Path], threads: int = 0, providers: list | None = None) -> dict:
    """An ONNX Runtime session per graph, created once; ``threads`` intra-op threads (0: ONNX
    Runtime's default, all cores); CPU unless ``providers`` says otherwise."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # no notes about unused initializers
    return {name: ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
            for name, path in paths.items()}


class OnnxPipeline:
    """ONNX Runtime sessions for ``image_encoder``, ``text_encoder`` and ``pair_scorer``."""

    def __init__(self, paths: dict[str, Path], threads: int = 0) -> None:
        self.sessions = onnx_sessions(paths, threads)
        self.image_names = [o.name for o in self.sessions["image_encoder"].get_outputs()]
        self.text_names = [o.name for o in self.sessions["text_encoder"].get_outputs()]

    def encode_images(self, features: np.ndarray) -> Arrays:
        outputs = self.sessions["image_encoder"].run(self.image_names, {"features": features})
        return dict(zip(self.image_names, outputs))

    def encode_texts(self, ids: np.ndarray, lengths: np.ndarray) -> Arrays:
        outputs = self.sessions["text_encoder"].run(self.text_names, {"ids": ids, "lengths": lengths})
        return dict(zip(self.text_names, outputs))

    def score(self, images: Arrays, texts: Arrays, lengths: np.ndarray) -> np.ndarray:
        return self.sessions["pair_scorer"].run(["scores"], {**images, **texts, "lengths": lengths})[0]


def take(items: Arrays, index: slice | np.ndarray) -> Arrays:
    return {name: array[index] for name, array in items.items()}


def caption_blocks(lengths: np.ndarray, size: int) -> list[np.ndarray]:
    """Caption indices in blocks of ``size``, shortest captions first (similar lengths together)."""
    order = np.argsort(lengths, kind="stable")
    return [order[s : s + size] for s in range(0, len(order), size)]


def score_split(pipeline: OnnxPipeline, split: PrecompSplit, n_images: int | None = None,
                show_progress: bool = False, description: str = "score") -> np.ndarray:
    """float32 scores ``[Ni, Nt]`` of the first ``n_images`` images (all by default) and
    their captions."""
    n_images = min(n_images or split.n_images, split.n_images)
    n_captions = n_images * split.per_image
    images = [pipeline.encode_images(split.image_batch(range(s, min(s + IMAGE_BLOCK, n_images))).numpy())
              for s in range(0, n_images, IMAGE_BLOCK)]
    _, all_lengths = split.caption_batch(range(n_captions))
    scores = np.empty((n_images, n_captions), dtype=np.float32)
    blocks = caption_blocks(all_lengths.numpy(), CAPTION_BLOCK)
    with progress(show_progress) as bar:
        task = bar.add_task(description, total=len(blocks), info=f"{n_images}x{n_captions} pairs")
        for cols in blocks:
            ids, lengths = (t.numpy() for t in split.caption_batch(cols))
            texts = pipeline.encode_texts(ids, lengths)
            for i, block in enumerate(images):
                rows = slice(i * IMAGE_BLOCK, i * IMAGE_BLOCK + len(next(iter(block.values()))))
                scores[rows, cols] = pipeline.score(block, texts, lengths)
            bar.advance(task)
    return scores
