"""Recall against work for two-stage retrieval: rsum and pairs scored per shortlist size K.

For each checkpoint (with a prefilter head: ``xmr train`` makes one, ``xmr distill`` adds one),
exported once to fp32 graphs and scored by ``--backend`` (ONNX Runtime by default: the
model's scores within 1e-5, faster than PyTorch on a CPU), the test split is encoded once; then exhaustive cross-attention (every pair), the prefilter
alone (inner products of the head's vectors) and, for each K, the ALBEF/BLIP protocol
(``xmr.eval.shortlist``: each query's K best by the prefilter rescored exactly, both ways).
Writes JSON and a PNG (rsum against K with the two reference lines; pairs scored against K).

    xmr data synth && xmr train --model imram && xmr train --model camp
    python bench/shortlist_curve.py runs/imram/checkpoint.pt runs/camp/checkpoint.pt \
        --json docs/results/shortlist_curve.json --png docs/results/shortlist_curve.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from results import artifacts_for, write_results
from xmr.data import DEFAULT_DATA, load_split
from xmr.eval import recall_report
from xmr.eval.shortlist import shortlist_recall, split_galleries
from xmr.models.checkpoint import load_checkpoint
from xmr.runtime import Scorer

KS = (1, 4, 8, 16, 32, 64, 128, 256)
console = Console(width=140)


def curve(checkpoint: Path, data: Path, split_name: str, ks: tuple[int, ...], backend: str, root: Path) -> dict[str, Any]:
    model = load_checkpoint(checkpoint)
    split = load_split(data, split_name, model.vocab)
    scorer = Scorer.load(artifacts_for(checkpoint, root), backend=backend, device="cpu")
    images, texts = split_galleries(scorer, split)
    started = time.perf_counter()
    exhaustive = recall_report(scorer.score(images, texts), split.per_image)
    exhaustive_seconds = time.perf_counter() - started
    points = [shortlist_recall(scorer, images, texts, split.per_image, k).to_dict() for k in ks]
    return {"checkpoint": str(checkpoint), "model": model.kind, "backend": repr(scorer), "split": split_name, "images": split.n_images,
            "captions": split.n_captions, "global_dim": model.config.global_dim,
            "exhaustive": {"metrics": exhaustive.to_dict(), "pairs_scored": split.n_images * split.n_captions,
                           "seconds": exhaustive_seconds},
            "prefilter": points[0]["prefilter"], "shortlists": points}


def show(result: dict[str, Any]) -> None:
    table = Table(title=f"{result['model']} {result['checkpoint']}: {result['images']} images x {result['captions']} "
                        f"captions ({result['split']})")
    for name in ("", "i2t R@1", "t2i R@1", "rsum", "Δ rsum", "prefilter recall@K i2t / t2i", "pairs scored", "fewer",
                 "s"):
        table.add_column(name, justify="right")
    base = result["exhaustive"]
    table.add_row("exhaustive", f"{base['metrics']['i2t_r1']:.1f}", f"{base['metrics']['t2i_r1']:.1f}",
                  f"{base['metrics']['rsum']:.1f}", "", "", f"{base['pairs_scored']:,}", "1.0x", f"{base['seconds']:.1f}")
    pre = result["prefilter"]
    table.add_row("prefilter alone", f"{pre['i2t_r1']:.1f}", f"{pre['t2i_r1']:.1f}", f"{pre['rsum']:.1f}",
                  f"{pre['rsum'] - base['metrics']['rsum']:+.1f}", "", "0", "", "")
    for point in result["shortlists"]:
        m, recall = point["metrics"], point["prefilter_recall_at_k"]
        table.add_row(f"K = {point['k']}", f"{m['i2t_r1']:.1f}", f"{m['t2i_r1']:.1f}", f"{m['rsum']:.1f}",
                      f"{m['rsum'] - base['metrics']['rsum']:+.1f}",
                      f"{100 * recall['i2t']:.1f} / {100 * recall['t2i']:.1f}", f"{point['pairs_scored']:,}",
                      f"{base['pairs_scored'] / point['pairs_scored']:.1f}x", f"{point['seconds']:.1f}")
    console.print(table)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (recall_axis, pairs_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for result, colour in zip(results, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        ks = [p["k"] for p in result["shortlists"]]
        label = result["model"].upper()
        recall_axis.plot(ks, [p["metrics"]["rsum"] for p in result["shortlists"]], "o-", color=colour,
                         label=f"{label}: shortlist K, reranked")
        recall_axis.axhline(result["exhaustive"]["metrics"]["rsum"], color=colour, linestyle="--",
                            label=f"{label}: exhaustive cross-attention")
        recall_axis.axhline(result["prefilter"]["rsum"], color=colour, linestyle=":", label=f"{label}: prefilter alone")
        pairs_axis.plot(ks, [p["pairs_scored"] for p in result["shortlists"]], "o-", color=colour,
                        label=f"{label}: shortlist K")
        pairs_axis.axhline(result["exhaustive"]["pairs_scored"], color=colour, linestyle="--",
                           label=f"{label}: exhaustive")
    for axis in (recall_axis, pairs_axis):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("shortlist K (items rescored per query)")
        axis.grid(alpha=0.3)
    recall_axis.set_ylabel("rsum (R@1+5+10, both ways)")
    recall_axis.legend(fontsize=7, loc="lower right")
    pairs_axis.set_yscale("log")
    pairs_axis.set_ylabel("pairs scored by cross-attention (both ways)")
    pairs_axis.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Two-stage retrieval on the synthetic test split ({results[0]['images']} images)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", default="test")
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="shortlist sizes, comma-separated")
    parser.add_argument("--json", type=Path, default=Path("runs/shortlist_curve.json"))
    parser.add_argument("--png", type=Path, default=Path("runs/shortlist_curve.png"))
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--artifacts", type=Path, default=Path("runs/shortlist-curve"), help="where the graphs go")
    args = parser.parse_args()
    ks = tuple(int(k) for k in args.ks.split(","))
    results = []
    for checkpoint in args.checkpoints:
        results.append(curve(checkpoint, args.data, args.split, ks, args.backend, args.artifacts))
        show(results[-1])
    write_results(args.json, results)
    plot(results, args.png)
    console.print(f"wrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
