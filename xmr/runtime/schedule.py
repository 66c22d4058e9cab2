"""How the Ni x Nt score matrix is cut into pair-scorer launches.

Captions are sorted by length and grouped; each group is one column block, padded only to
its own longest caption, and sized so that the largest per-pair intermediate (pairs x
tokens x 2D floats, IMRAM's memory input) fits the memory budget at that length — short
captions get wider blocks. Images are cut into row blocks of a fixed size: square blocks'
rows, or more when few captions leave budget over (a single caption against a gallery). Every block also
stays inside the backend's limits (a TensorRT engine's optimisation profile).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The block-budget policy (the one place): the largest per-block intermediate, in elements,
# pairs x tokens x 2D (IMRAM's memory input). CPU: 2^23 elements, measured fastest for ONNX
# Runtime fp32 at the released sizes (bench/scoring_cost.py); larger blocks fall out of cache and
# lose up to half the throughput. Other CPU backends and precisions where measured otherwise
# (bench/cpu_backends.py, docs/benchmarks.md). GPU: a fraction of the free device memory, never
# below the CPU figure.
CPU_BLOCK_ELEMENTS = 1 << 23
CPU_BLOCK_BUDGETS: dict[tuple[str, str], int] = {  # (backend, precision) -> elements, where not 2^23
    ("openvino", "fp32"): 1 << 24,  # 2^24 vs 2^23: +3% IMRAM, +15% CAMP (2 AVX-512 cores, 2026-12-02)
}
GPU_MEMORY_FRACTION = 0.5  # of the free device memory, for one block's intermediates
LIVE_INTERMEDIATES = 8  # per-pair tensors of the block's largest size alive at once (measured upper bound)
ELEMENT_BYTES = {"fp16": 2, "bf16": 2}  # else 4 (fp32 intermediates; int8 graphs dequantize to fp32)


def default_budget(device: torch.device, backend: str = "", precision: str = "fp32") -> int:
    """Elements of a block's largest intermediate for ``backend`` running ``precision`` on ``device``."""
    if device.type != "cuda":
        return CPU_BLOCK_BUDGETS.get((backend, precision), CPU_BLOCK_ELEMENTS)
    free, _ = torch.cuda.mem_get_info(device)
    element_bytes = ELEMENT_BYTES.get(precision, 4)
    return max(CPU_BLOCK_ELEMENTS, int(free * GPU_MEMORY_FRACTION) // (element_bytes * LIVE_INTERMEDIATES))


@dataclass(frozen=True)
class Limits:
    """Most images, captions and tokens one launch may take (None: unbounded)."""

    images: int | None = None
    captions: int | None = None
    length: int | None = None


@dataclass(frozen=True)
class CaptionGroup:
    """Caption indices of one column block (ascending length) and the length it is padded to."""

    index: np.ndarray
    length: int


@dataclass(frozen=True)
class Plan:
    image_block: int
    groups: list[CaptionGroup]
    n_images: int

    @property
    def launches(self) -> int:
        return len(self.groups) * -(-self.n_images // self.image_block)

    def padding_efficiency(self, lengths: np.ndarray) -> float:
        """Real caption tokens / tokens computed (1.0: no padding)."""
        computed = computed_tokens(self.groups)
        return float(np.sum(lengths)) / computed if computed else 1.0


def computed_tokens(groups: list[CaptionGroup]) -> int:
    """Caption tokens the launches compute (padding included), per image."""
    return sum(len(g.index) * g.length for g in groups)


def _cap(value: int, limit: int | None) -> int:
    return max(1, value if limit is None else min(value, limit))


def pair_elements(regions: int, length: int, dim: int) -> int:
    """Floats of the largest per-pair intermediate: (regions + length) tokens x 2D."""
    return (regions + length) * 2 * dim


def plan_blocks(n_images: int, lengths: np.ndarray, regions: int, dim: int, budget: int = CPU_BLOCK_ELEMENTS,
                limits: Limits = Limits(), bucketed: bool = True) -> Plan:
    """Blocks for scoring ``n_images`` images against captions of ``lengths``.

    ``bucketed=False`` keeps the captions in their given order (the baseline padding
    efficiency is measured against); the block sizes follow the same budget."""
    lengths = np.asarray(lengths)
    if len(lengths) == 0 or n_images == 0:
        return Plan(1, [], n_images)
    longest = int(lengths.max())
    pairs_at_longest = max(1, budget // pair_elements(regions, longest, dim))
    # square blocks, or as many images as the budget leaves when there are few captions (one query)
    rows = max(int(pairs_at_longest ** 0.5), pairs_at_longest // len(lengths))
    image_block = _cap(min(n_images, rows), limits.images)
    order = np.argsort(lengths, kind="stable") if bucketed else np.arange(len(lengths))
    groups, start = [], 0
    while start < len(order):
        stop, group_len = start, 0
        while stop < len(order):
            candidate_len = max(group_len, int(lengths[order[stop]]))
            width = budget // (image_block * pair_elements(regions, candidate_len, dim))
            if stop > start and (stop - start + 1 > _cap(width, limits.captions)):
                break
            group_len, stop = candidate_len, stop + 1
        groups.append(CaptionGroup(order[start:stop], group_len))
        start = stop
    return Plan(image_block, groups, n_images)
