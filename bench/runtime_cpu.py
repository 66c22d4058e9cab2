"""``Scorer`` on CPU at the released sizes: which backend ``auto`` should take, and what length
bucketing buys, in one run.

For IMRAM (full) and CAMP with random weights (the models' own init, seeded) at D = 1024,
R = 36 regions of 2048-d features, word_dim 300: export the fp32 graphs, then score an
images x captions matrix through ``Scorer`` with

1. ``torch`` and ``onnxruntime`` fp32 (both bucketed): pairs per second of ``score`` on encoded
   galleries, plus the encoders' items per second;
2. ``onnxruntime`` with bucketing off (captions in their given order, same block budget):
   padding efficiency (real tokens / computed tokens) and pairs per second.

Inputs from ``xmr.benchmark.workload.random_inputs`` (as ``xmr serve-bench``): caption lengths
normal, mean 12.3 and sd 5 words (about Flickr30K's), clipped to [4, 40], plus <start>/<end>.

    python bench/runtime_cpu.py --json docs/results/runtime_cpu.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from results import write_results

from xmr.benchmark.workload import random_inputs
from xmr.data.synth import synth_vocabulary
from xmr.export.artifacts import export_artifacts
from xmr.models import build_model, make_config
from xmr.models.checkpoint import save_checkpoint
from xmr.runtime import Scorer

MODELS = {"imram-full": ("imram", {"mode": "full"}), "camp": ("camp", {})}
REGIONS, IMG_DIM = 36, 2048
console = Console(width=120)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best of ``repeats`` wall-clock seconds (after one warm-up call) and the last result."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_model(name: str, work: Path, n_images: int, n_captions: int, repeats: int) -> list[dict]:
    kind, fields = MODELS[name]
    torch.manual_seed(0)
    vocab = synth_vocabulary()
    model = build_model(make_config(kind, vocab_size=len(vocab), img_dim=IMG_DIM, embed_size=1024, word_dim=300,
                                    **fields), vocab)
    checkpoint = save_checkpoint(model, work / f"{name}.pt", {"regions": REGIONS})
    artifacts = work / name
    export_artifacts(checkpoint, artifacts, ("fp32",), engine=False)
    data = random_inputs(n_images, n_captions, REGIONS, IMG_DIM, len(vocab))
    features, captions = data.features, (data.ids, data.lengths)
    rows, reference = [], None
    for backend, bucketed in (("torch", True), ("onnxruntime", True), ("onnxruntime", False)):
        with Scorer.load(artifacts, backend=backend, device="cpu", bucketed=bucketed) as scorer:
            encode_images, images = timed(lambda: scorer.encode_images(features), 1)
            encode_texts, texts = timed(lambda: scorer.encode_texts(captions), 1)
            seconds, scores = timed(lambda: scorer.score(images, texts), repeats)
            plan = scorer.plan(images, texts)
        reference = scores if reference is None else reference
        rows.append({"model": name, "backend": backend, "bucketed": bucketed, "pairs": n_images * n_captions,
                     "score_seconds": seconds, "pairs_per_second": n_images * n_captions / seconds,
                     "images_per_second": n_images / encode_images, "captions_per_second": n_captions / encode_texts,
                     "launches": plan.launches, "image_block": plan.image_block,
                     "padding_efficiency": plan.padding_efficiency(captions[1]),
                     "max_abs_diff_vs_torch": float(np.abs(scores - reference).max())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="timed score calls per row (best is kept)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += run_model(name, Path(tmp), args.images, args.captions, args.repeats)
    table = Table(title=f"Scorer on CPU ({os.cpu_count()} cores), {args.images} x {args.captions} pairs, fp32")
    for column in ("model", "backend", "bucketed", "pairs/s", "vs torch", "padding eff.", "launches", "images/s",
                   "captions/s", "max |diff|"):
        table.add_column(column, justify="right")
    for r in rows:
        torch_row = next(t for t in rows if t["model"] == r["model"] and t["backend"] == "torch")
        table.add_row(r["model"], r["backend"], str(r["bucketed"]), f"{r['pairs_per_second']:,.0f}",
                      f"{r['pairs_per_second'] / torch_row['pairs_per_second']:.2f}x", f"{r['padding_efficiency']:.2f}",
                      str(r["launches"]), f"{r['images_per_second']:,.0f}", f"{r['captions_per_second']:,.0f}",
                      f"{r['max_abs_diff_vs_torch']:.1e}")
    console.print(table)
    if args.json:
        write_results(args.json, rows, ("torch", "onnxruntime"))


if __name__ == "__main__":
    main()
