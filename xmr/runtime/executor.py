"""Runs a plan's blocks on a backend and writes each block's scores into the output matrix.

CPU: one block after another (each launch already uses every core). GPU: blocks alternate
over two or more CUDA streams; each block's scores are copied device -> pinned host buffer
on its own stream, and the host scatters a buffer into the output only when that stream's
event says the copy is done — so the next block's gathering and compute overlap the
previous block's copy-out. Pinned buffers are allocated once per call and reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from xmr.runtime.backends.base import Backend
from xmr.runtime.gallery import ImageGallery, TextGallery
from xmr.runtime.schedule import Plan

STREAMS = 2


@dataclass
class Block:
    rows: slice
    columns: np.ndarray  # caption indices (ascending length)
    length: int


def row_blocks(plan: Plan) -> list[slice]:
    return [slice(i, min(i + plan.image_block, plan.n_images)) for i in range(0, plan.n_images, plan.image_block)]


def run_plan(backend: Backend, images: ImageGallery, texts: TextGallery, plan: Plan, out: np.ndarray,
             advance: Callable[[], None] = lambda: None) -> np.ndarray:
    """Scores of ``images`` x ``texts`` into ``out`` (float32 ``[Ni, Nt]``), block by block."""
    if backend.device.type == "cuda":
        return _run_streams(backend, images, texts, plan, out, advance)
    for group in plan.groups:  # a caption group's tensors are gathered once, for all its image blocks
        index = torch.from_numpy(group.index)
        text_items = texts.block(index, group.length, backend.device)
        lengths = texts.lengths[index].to(backend.device)
        for rows in row_blocks(plan):
            image_items = {n: t[rows] for n, t in images.items.items()}
            out[rows, group.index] = backend.score(image_items, text_items, lengths).cpu().numpy()
            advance()
    return out


class _Slot:
    """One stream with its pinned host buffer and the block whose scores are in flight."""

    def __init__(self, device: torch.device, rows: int, columns: int) -> None:
        self.stream = torch.cuda.Stream(device)
        self.host = torch.empty((rows, columns), dtype=torch.float32, pin_memory=torch.cuda.is_available())
        self.done = torch.cuda.Event()
        self.pending: Block | None = None

    def drain(self, out: np.ndarray) -> None:
        if self.pending is not None:
            self.done.synchronize()
            block = self.pending
            out[block.rows, block.columns] = self.staging(block.rows.stop - block.rows.start, len(block.columns)).numpy()
            self.pending = None

    def staging(self, rows: int, columns: int) -> torch.Tensor:
        """A contiguous ``[rows, columns]`` view of the pinned buffer (one async copy, no host-side gather)."""
        return self.host.view(-1)[: rows * columns].view(rows, columns)


def _run_streams(backend: Backend, images: ImageGallery, texts: TextGallery, plan: Plan, out: np.ndarray,
                 advance: Callable[[], None]) -> np.ndarray:
    device = backend.device
    widest = max((len(g.index) for g in plan.groups), default=1)
    slots = [_Slot(device, plan.image_block, widest) for _ in range(STREAMS)]
    producer = torch.cuda.current_stream(device)
    for slot in slots:
        slot.stream.wait_stream(producer)  # galleries were written on the caller's stream
    todo = [Block(rows, group.index, group.length) for group in plan.groups for rows in row_blocks(plan)]
    for n, block in enumerate(todo):
        slot = slots[n % STREAMS]
        slot.drain(out)
        with torch.cuda.stream(slot.stream):
            index = torch.from_numpy(block.columns)
            text_items = texts.block(index, block.length, device)
            lengths = texts.lengths[index].to(device, non_blocking=True)
            image_items = {name: t[block.rows] for name, t in images.items.items()}
            scores = backend.score(image_items, text_items, lengths)
            slot.staging(scores.size(0), scores.size(1)).copy_(scores, non_blocking=True)
            slot.done.record(slot.stream)
        slot.pending = block
        advance()
    for slot in slots:
        slot.drain(out)
    return out
