"""Retrieval accuracy of exported graphs per precision, in ONNX Runtime (CPU), on a split.

Runs the artifact directory's three graphs (fp32 and every other precision it holds) over a
whole split: encoders once per item, the pair scorer on blocks of similar-length captions;
reports R@1/5/10 both ways, rsum, ΔR against fp32, mean and max absolute score error.

    xmr export --model imram && python bench/export_accuracy.py --artifacts artifacts/imram \\
        --json docs/results/export_accuracy_imram.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

from xmr.data import Vocabulary, load_split
from xmr.eval import recall_report, split_scores
from xmr.runtime import Scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("data/synth"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    manifest = json.loads((args.artifacts / "manifest.json").read_text())
    split = load_split(args.data, args.split, Vocabulary.load(args.artifacts / manifest["vocab"]["file"]))
    precisions = list(manifest["graphs"]["pair_scorer"]["files"])
    scores = {p: split_scores(Scorer.load(args.artifacts, backend="onnxruntime", precision=p, device="cpu"), split)
              for p in precisions}
    rows = {}
    for p in precisions:
        report = recall_report(scores[p], split.per_image).to_dict()
        error = np.abs(scores[p].astype(np.float64) - scores["fp32"])
        rows[p] = {"recall": report, "mean_abs_score_error": float(error.mean()), "max_abs_score_error": float(error.max())}
    base = rows["fp32"]["recall"]
    print(f"{manifest['model']} on {args.data}/{args.split} ({split.n_images} x {split.n_captions} pairs), ONNX Runtime CPU")
    for p, r in rows.items():
        rec = r["recall"]
        keys = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
        print(f"{p:5} " + " ".join(f"{k} {rec[k]:.1f} ({rec[k] - base[k]:+.1f})" for k in keys)
              + f"  score error mean {r['mean_abs_score_error']:.2g} max {r['max_abs_score_error']:.2g}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
                                         "model": manifest["model"], "split": args.split, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
