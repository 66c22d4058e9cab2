"""Encode a split once, then score the full image x caption matrix in blocks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xmr.data.precomp import PrecompSplit
from xmr.models.base import RetrievalModel
from xmr.progress import progress

# Largest per-block intermediate, in elements: pairs x tokens x 2D (IMRAM's memory input,
# CAMP's fusion input). 2^26 floats = 256 MB in float32.
BLOCK_ELEMENTS = 1 << 26


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


def block_shape(n_images: int, n_captions: int, tokens: int, dim: int, budget: int = BLOCK_ELEMENTS) -> tuple[int, int]:
    """(images, captions) per block so that pairs x tokens x 2D stays within ``budget``."""
    pairs = max(1, budget // max(1, tokens * 2 * dim))
    image_block = max(1, min(n_images, int(pairs ** 0.5)))
    caption_block = max(1, min(n_captions, pairs // image_block))
    return image_block, caption_block


@torch.no_grad()
def score_matrix(model: RetrievalModel, encoded: EncodedSplit, show_progress: bool = True,
                 budget: int = BLOCK_ELEMENTS) -> np.ndarray:
    """float32 scores ``[Ni, Nt]`` (rows images). Captions are scored in blocks of similar
    length, each block cut to its own longest caption, so padding costs little."""
    model.eval()
    device = next(model.parameters()).device
    img_emb, cap_emb, lengths = encoded.img_emb, encoded.cap_emb, encoded.lengths
    n_img, n_cap = img_emb.size(0), cap_emb.size(0)
    order = torch.argsort(lengths, stable=True)
    tokens = img_emb.size(1) + int(lengths.max())
    image_block, caption_block = block_shape(n_img, n_cap, tokens, img_emb.size(-1), budget)
    out = np.empty((n_img, n_cap), dtype=np.float32)
    blocks = [(i, c) for c in range(0, n_cap, caption_block) for i in range(0, n_img, image_block)]
    with progress(show_progress) as bar:
        task = bar.add_task("score", total=len(blocks), info=f"{n_img}x{n_cap} pairs")
        for i, c in blocks:
            cols = order[c : c + caption_block]
            block_len = int(lengths[cols].max())
            caps = cap_emb[cols, :block_len].to(device)
            imgs = img_emb[i : i + image_block].to(device)
            out[i : i + image_block, cols.numpy()] = model.score(imgs, caps, lengths[cols].to(device)).float().cpu().numpy()
            bar.advance(task)
    return out
