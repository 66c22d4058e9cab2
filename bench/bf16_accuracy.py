"""What bf16 costs in recall on trained models: each CPU bf16 backend against PyTorch fp32.

For each checkpoint (trained by ``xmr train``, as README's first command does), export the fp32
graphs (reused when present) and score the test split's first ``--images`` images and their
captions with PyTorch fp32 (the reference), OpenVINO bf16 and PyTorch bf16; report R@K, rsum,
Δ rsum, score errors and the per-query Spearman rank agreement (the worse direction's mean).
On a CPU without AMX-BF16 or AVX-512 BF16 bf16 is emulated (the same scores, slower), which is
why ``--images`` defaults to half the synthetic test split.

    xmr data synth && xmr train --model imram && xmr train --model camp
    python bench/bf16_accuracy.py runs/imram/checkpoint.pt runs/camp/checkpoint.pt --json docs/results/bf16_accuracy.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from results import artifacts_for
from xmr.benchmark.offline_bench import timed
from xmr.calibration.accuracy import accuracy, mean_rank_agreement
from xmr.cpu import cpu_features
from xmr.data import DEFAULT_DATA, load_split
from xmr.eval import split_scores
from xmr.export.artifacts import tool_versions
from xmr.models.checkpoint import load_checkpoint
from xmr.runtime import Scorer

BACKENDS = ("openvino", "torch")
console = Console(width=140)


def measure(checkpoint: Path, data: Path, images: int, root: Path) -> list[dict[str, Any]]:
    """One row per bf16 backend for ``checkpoint``, against its PyTorch fp32 scores."""
    artifacts = artifacts_for(checkpoint, root)
    split = load_split(data, "test", load_checkpoint(checkpoint).vocab)
    with Scorer.load(artifacts, backend="torch") as scorer:
        reference = split_scores(scorer, split, images)
    rows = []
    for backend in BACKENDS:
        with Scorer.load(artifacts, backend=backend, precision="bf16") as scorer:
            seconds, scores = timed(lambda: split_scores(scorer, split, images))
            emulated = scorer.emulated
        metrics = accuracy(scores, reference, split.per_image)
        rows.append({"checkpoint": str(checkpoint), "model": load_checkpoint(checkpoint).kind, "backend": backend,
                     "precision": "bf16", "emulated": emulated, "images": min(images, split.n_images),
                     "seconds": seconds, **metrics, "rank_agreement": mean_rank_agreement(metrics)})
    return rows


def table(rows: list[dict[str, Any]]) -> Table:
    out = Table(title="bf16 against PyTorch fp32 (test split)")
    for column in ("model", "backend", "images", "fp32 rsum", "bf16 rsum", "Δ rsum", "max |err|", "mean |err|", "rank ρ"):
        out.add_column(column, justify="right")
    for r in rows:
        out.add_row(r["model"], f"{r['backend']}{' (emulated)' if r['emulated'] else ''}", str(r["images"]),
                    f"{r['rsum'] - r['delta_rsum']:.2f}", f"{r['rsum']:.2f}", f"{r['delta_rsum']:+.2f}",
                    f"{r['max_abs_score_error']:.2g}", f"{r['mean_abs_score_error']:.2g}", f"{r['rank_agreement']:.5f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="precomp data with a test split")
    parser.add_argument("--images", type=int, default=250, help="test images scored (with their captions)")
    parser.add_argument("--artifacts-root", type=Path, default=Path("runs/bf16-accuracy"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [row for checkpoint in args.checkpoints for row in measure(checkpoint, args.data, args.images,
                                                                      args.artifacts_root)]
    console.print(table(rows))
    if args.json:
        cpu = cpu_features()
        environment = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "platform": platform.platform(), "cpu": cpu.name, "bf16_units": cpu.bf16_units,
                       "versions": tool_versions(("xmr", "torch", "onnxruntime", "openvino"))}
        args.json.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
