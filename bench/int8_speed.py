"""INT8 against FP32 in ONNX Runtime (CPU), per graph, at the released models' sizes, in one run.

Sizes: D = 1024, R = 36 regions of 2048-d features, word_dim 300, random weights (the
models' own init, seeded). The INT8 graphs are calibrated exactly as ``xmr calibrate`` does
(same quantizer, same calibration-set builder) on a small synthetic dataset with 36 x 2048-d
regions; their accuracy means nothing with random weights (docs/int8.md has the accuracy of
trained models), only their speed does here. Caption lengths: 14 tokens (Flickr30K's mean
12.3 words plus <start>/<end>).

    python bench/int8_speed.py --json docs/results/int8_speed.json

Pair-scorer blocks: 8 x 8 pairs is the CPU block of ``xmr eval`` at these sizes (a 2^23-element
budget), the larger ones show the trend. ``--profile`` adds where the pair scorer's time goes at
8 x 8 (ONNX Runtime's profiler, share of kernel time per operator type), in both precisions.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from results import write_results

from xmr.calibration.config import CalibrationConfig
from xmr.calibration.dataset import build_calibration_set
from xmr.calibration.fallback import Quantizer
from xmr.data import SynthConfig, load_split, write_synthetic
from xmr.data.synth import synth_vocabulary
from xmr.export.artifacts import export_artifacts
from xmr.export.graphs import GRAPHS
from xmr.models import build_model, make_config
from xmr.models.checkpoint import save_checkpoint
from xmr.runtime import OnnxRuntimeBackend
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.backends.onnxruntime_backend import onnx_sessions

MODELS = {"imram-full": ("imram", {"mode": "full"}), "camp": ("camp", {})}
REGIONS, IMG_DIM, LENGTH = 36, 2048, 14
PAIR_BLOCKS = ((8, 8), (16, 16), (16, 64))
console = Console(width=140)


def throughput(session, feeds: dict[str, np.ndarray], items: int, seconds: float) -> float:
    session.run(None, feeds)  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, feeds)
        runs += 1
    return items * runs / (time.perf_counter() - start)


def operator_shares(path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int = 10) -> dict[str, float]:
    """Share of kernel time per operator type over ``runs`` runs after a warm-up run."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "profile")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    first = min((e for e in events if e["name"] == "model_run"), key=lambda e: e["ts"])
    warm = first["ts"] + first["dur"]  # the first run (allocations, first touches) is left out
    times: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= warm:
            times[event["args"]["op_name"]] += event["dur"]
    total = sum(times.values())
    return {op: t / total for op, t in times.most_common()}


def graph_feeds(encoders: OnnxRuntimeBackend, vocab_size: int, n_images: int, n_captions: int) -> dict[str, tuple]:
    """(feeds, items) of each graph for one block; the pair scorer's come from the fp32 encoders."""
    g = np.random.default_rng(0)
    features = np.abs(g.standard_normal((n_images, REGIONS, IMG_DIM), dtype=np.float32))
    ids = g.integers(4, vocab_size, (n_captions, LENGTH))
    lengths = np.full(n_captions, LENGTH)
    images = {n: t.numpy() for n, t in encoders.encode_images(torch.from_numpy(features)).items()}
    texts = {n: t.numpy() for n, t in encoders.encode_texts(torch.from_numpy(ids), torch.from_numpy(lengths)).items()}
    return {"image_encoder": ({"features": features}, n_images),
            "text_encoder": ({"ids": ids, "lengths": lengths}, n_captions),
            "pair_scorer": ({**images, **texts, "lengths": lengths}, n_images * n_captions)}


def run_model(name: str, work: Path, data: Path, seconds: float, threads: int, profile: bool) -> list[dict]:
    kind, fields = MODELS[name]
    torch.manual_seed(0)
    vocab = synth_vocabulary()
    model = build_model(make_config(kind, vocab_size=len(vocab), img_dim=IMG_DIM, embed_size=1024, word_dim=300, **fields),
                        vocab)
    out = work / name
    export_artifacts(save_checkpoint(model, work / f"{name}.pt", {"regions": REGIONS}), out, ("fp32",), engine=False)
    artifacts = Artifacts.open(out)
    fp32 = {g: artifacts.graph(g, "fp32") for g in GRAPHS}
    encoders = OnnxRuntimeBackend(artifacts, "fp32", "cpu", threads=threads)
    config = CalibrationConfig(images=32)
    calibration = build_calibration_set(load_split(data, "train", vocab), encoders, config)
    ranges = work / f"{name}-ranges"
    ranges.mkdir()
    int8 = Quantizer(fp32, calibration, config, ranges).build(work / f"{name}-int8")
    sessions = {p: onnx_sessions(paths, threads) for p, paths in (("fp32", fp32), ("int8", int8))}
    rows = []
    encoder_feeds = graph_feeds(encoders, len(vocab), 64, 128)
    for graph in ("image_encoder", "text_encoder"):
        feeds, items = encoder_feeds[graph]
        rows.append({"model": name, "graph": graph, "block": f"{items} {'images' if graph == 'image_encoder' else 'captions'}",
                     **{p: throughput(sessions[p][graph], feeds, items, seconds) for p in sessions}})
    for n_images, n_captions in PAIR_BLOCKS:
        feeds, items = graph_feeds(encoders, len(vocab), n_images, n_captions)["pair_scorer"]
        rows.append({"model": name, "graph": "pair_scorer", "block": f"{n_images}x{n_captions} pairs",
                     **{p: throughput(sessions[p]["pair_scorer"], feeds, items, seconds) for p in sessions}})
        if profile and (n_images, n_captions) == PAIR_BLOCKS[0]:
            rows[-1]["operator_shares"] = {p: operator_shares(paths["pair_scorer"], feeds, threads)
                                           for p, paths in (("fp32", fp32), ("int8", int8))}
    for row in rows:
        row["int8_over_fp32"] = row["int8"] / row["fp32"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per graph and precision")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    parser.add_argument("--profile", action="store_true", help="also profile the pair scorer per operator type")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic(data, SynthConfig(n_train=64, n_dev=8, n_test=8, regions=REGIONS, img_dim=IMG_DIM))
        for name in args.models:
            rows += run_model(name, Path(tmp), data, args.seconds, args.threads, args.profile)
    table = Table(title=f"ONNX Runtime CPU, {os.cpu_count()} cores: items (images, captions or pairs) per second")
    for column in ("model", "graph", "block", "fp32 /s", "int8 /s", "int8 / fp32"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["model"], r["graph"], r["block"], f"{r['fp32']:,.0f}", f"{r['int8']:,.0f}", f"{r['int8_over_fp32']:.2f}x")
    console.print(table)
    for r in rows:
        if "operator_shares" in r:
            shares = Table(title=f"{r['model']} pair scorer, {r['block']}: share of kernel time per operator type")
            for column in ("precision", "operators (top 8)"):
                shares.add_column(column)
            for precision, ops in r["operator_shares"].items():
                shares.add_row(precision, ", ".join(f"{op} {100 * v:.0f}%" for op, v in list(ops.items())[:8]))
            console.print(shares)
    if args.json:
        write_results(args.json, rows, ("onnxruntime",))


if __name__ == "__main__":
    main()
