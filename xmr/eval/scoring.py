"""Encode a split once, then score the full image x caption matrix in blocks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xmr.data.precomp import PrecompSplit
from xmr.models.base import RetrievalModel, select_items
from xmr.progress import progress

# Largest per-block intermediate, in elements: pairs x tokens x 2D (IMRAM's memory input).
# CPU: 2^23 floats (32 MB) measured fastest at the released sizes (bench/scoring_cost.py);
# larger blocks fall out of cache and lose up to half the throughput. GPU: 2^26 (256 MB).
BLOCK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}


@dataclass
class EncodedSplit:
    img_emb: torch.Tensor  # (Ni, R, D)
    cap_emb: torch.Tensor  # (Nt, L_max, D), zero beyond each length
    lengths: torch.Tensor  # (Nt,)


@torch.no_grad()
def encode_split(model: RetrievalModel, split: PrecompSplit, batch_size: int = 256, show_progress: bool = True) -> EncodedSplit:
    """Image and caption embeddings of a whole split (each item encoded once)."""
    device = next(model.parameters()).device
    model.eval()
    images, captions, lengths = [], [], []
    n_img_batches = -(-split.n_images // batch_size)
    n_cap_batches = -(-split.n_captions // batch_size)
    with progress(show_progress) as bar:
        task = bar.add_task("encode", total=n_img_batches + n_cap_batches, info="")
        for start in range(0, split.n_images, batch_size):
            idx = np.arange(start, min(start + batch_size, split.n_images))
            images.append(model.encode_images(split.image_batch(idx).to(device)).cpu())
            bar.advance(task)
        for start in range(0, split.n_captions, batch_size):
            ids, lens = split.caption_batch(range(start, min(start + batch_size, split.n_captions)))
            captions.append(model.encode_texts(ids.to(device), lens.to(device)).cpu())
            lengths.append(lens)
            bar.advance(task)
    max_len = max(c.size(1) for c in captions)
    cap_emb = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, max_len - c.size(1))) for c in captions])
    return EncodedSplit(torch.cat(images), cap_emb, torch.cat(lengths))


def block_shape(n_images: int, n_captions: int, tokens: int, dim: int, budget: int = BLOCK_ELEMENTS["cpu"]) -> tuple[int, int]:
    """(images, captions) per block so that pairs x tokens x 2D stays within ``budget``."""
    pairs = max(1, budget // max(1, tokens * 2 * dim))
    image_block = max(1, min(n_images, int(pairs ** 0.5)))
    caption_block = max(1, min(n_captions, pairs // image_block))
    return image_block, caption_block


@torch.no_grad()
def score_matrix(model: RetrievalModel, encoded: EncodedSplit, show_progress: bool = True,
                 budget: int | None = None) -> np.ndarray:
    """float32 scores ``[Ni, Nt]`` (rows images). Every image and caption is prepared once
    (the per-item part of the fast scorer); captions are scored in blocks of similar length,
    each block cut to its own longest caption, so padding costs little."""
    model.eval()
    device = next(model.parameters()).device
    budget = budget or BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"])
    img_emb, cap_emb, lengths = encoded.img_emb, encoded.cap_emb, encoded.lengths
    n_img, n_cap = img_emb.size(0), cap_emb.size(0)
    order = torch.argsort(lengths, stable=True)
    tokens = img_emb.size(1) + int(lengths.max())
    image_block, caption_block = block_shape(n_img, n_cap, tokens, img_emb.size(-1), budget)
    out = np.empty((n_img, n_cap), dtype=np.float32)
    images = model.prepare_images(img_emb.to(device))
    n_blocks = -(-n_cap // caption_block) * -(-n_img // image_block)
    with progress(show_progress) as bar:
        task = bar.add_task("score", total=n_blocks, info=f"{n_img}x{n_cap} pairs")
        for c in range(0, n_cap, caption_block):
            cols = order[c : c + caption_block]
            block_len = int(lengths[cols].max())
            texts = model.prepare_texts(cap_emb[cols, :block_len].to(device), lengths[cols].to(device))
            for i in range(0, n_img, image_block):
                scores = model.score_prepared(select_items(images, slice(i, i + image_block)), texts)
                out[i : i + image_block, cols.numpy()] = scores.float().cpu().numpy()
                bar.advance(task)
    return out
