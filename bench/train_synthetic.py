"""Train CAMP, IMRAM and the dual-encoder baseline on the default synthetic set and compare.

Answers two questions of the models issue on this machine, in one run:
- does each trained model reach R@1 >= 3x an untrained one's?
- do CAMP and IMRAM beat a dual encoder with the same encoders and budget by >= 10 rsum?

    python bench/train_synthetic.py --data data/synth --out runs/bench_synth --json docs/results/train_synthetic.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from xmr.data import SynthConfig, Vocabulary, load_split, write_synthetic
from xmr.eval import evaluate
from xmr.models import build_model, make_config
from xmr.train import TrainConfig, train

SMALL = {"embed_size": 64, "word_dim": 64}


def run_model(kind: str, data: Path, out: Path, cfg: TrainConfig) -> dict:
    vocab = Vocabulary.load(data / "vocab.json")
    train_split, dev, test = (load_split(data, s, vocab) for s in ("train", "dev", "test"))
    torch.manual_seed(cfg.seed)
    model = build_model(make_config(kind, vocab_size=len(vocab), img_dim=train_split.img_dim, **SMALL), vocab)
    untrained = evaluate(model, test, show_progress=False).report.to_dict()
    started = time.perf_counter()
    log = train(model, train_split, dev, cfg, out / kind)
    train_seconds = time.perf_counter() - started
    best = torch.load(out / kind / "checkpoint.pt", weights_only=True)["state_dict"]
    model.load_state_dict(best)
    trained = evaluate(model, test, show_progress=False).report.to_dict()
    return {"untrained": untrained, "trained": trained, "train_seconds": train_seconds,
            "best_dev_rsum": log["best_dev_rsum"]}


def markdown(results: dict) -> str:
    rows = ["| model | R@1 i2t | R@1 t2i | rsum | untrained rsum | R@1 (mean) / untrained | train time |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, r in results["models"].items():
        t, u = r["trained"], r["untrained"]
        ratio = (t["i2t_r1"] + t["t2i_r1"]) / max(u["i2t_r1"] + u["t2i_r1"], 1e-9)
        rows.append(f"| {kind} | {t['i2t_r1']:.1f} | {t['t2i_r1']:.1f} | {t['rsum']:.1f} | {u['rsum']:.1f} "
                    f"| {ratio:.0f}x | {r['train_seconds'] / 60:.1f} min |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/synth"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_synth"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--models", nargs="+", default=["dual", "camp", "imram"])
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    args = parser.parse_args()
    if not (args.data / "train_ims.npy").exists():
        write_synthetic(args.data, SynthConfig())
    cfg = TrainConfig(epochs=args.epochs)
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": "python " + " ".join(sys.argv),
        "train_config": vars(cfg),
        "synth_config": json.loads((args.data / "synth_config.json").read_text()),
        "models": {kind: run_model(kind, args.data, args.out, cfg) for kind in args.models},
    }
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
