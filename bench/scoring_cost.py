"""Cost of pair scoring at the released sizes, before (the authors' way) and after (xmr's
fast form), in one run:

1. analytic matmul FLOPs per pair for the authors' form, the direct form and the fast form,
   each checked here against torch's flop counter at these sizes;
2. the extra per-item storage of the fast form's precomputations;
3. measured CPU throughput of a full score matrix: ``Scorer.score`` over the PyTorch model
   (``TorchBackend.from_model``: the encoders with the fast form's per-item preparation, then
   length-bucketed blocks of the pair stage) against ``score_authors_style`` (a Python loop over captions,
   each against every image, as the released evaluation code does), timed on a subset of
   captions and extrapolated linearly.

    python bench/scoring_cost.py --json docs/results/scoring_cost.json

Sizes: D = 1024, R = 36 regions, random weights (the models' own init). Caption lengths are
drawn from a normal distribution with mean 12.3 and sd 5 words (about Flickr30K's), clipped
to [4, 40], plus <start>/<end>.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from xmr.models import build_model, make_config
from xmr.models.flops import FORMS, released_evaluation_flops, scoring_cost
from xmr.runtime import Scorer, TorchBackend

MODELS = {"imram-full": ("imram", {"mode": "full"}), "imram-text": ("imram", {"mode": "text"}),
          "imram-image": ("imram", {"mode": "image"}), "camp": ("camp", {})}
REGIONS, DIM = 36, 1024
console = Console(width=120)


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def check_against_counter(model, length: int) -> None:
    """The analytic counts equal what torch counts, at the released sizes (2 x 3 pairs)."""
    img, cap, lengths = torch.randn(2, REGIONS, DIM), torch.randn(3, length, DIM), torch.full((3,), length)
    images, texts = model.prepare_images(img), model.prepare_texts(cap, lengths)
    costs = {form: scoring_cost(model.config, REGIONS, length, form) for form in FORMS}
    measured = (counted_flops(lambda: model.score_prepared(images, texts)),
                counted_flops(lambda: model.score(img, cap, lengths, direct=True)),
                counted_flops(lambda: model.score_authors_style(img, cap, lengths)))
    expected = (costs["fast"].block(2, 3), costs["direct"].total(2, 3),
                released_evaluation_flops(model.config, REGIONS, length, 2, 3))
    if measured != expected:
        sys.exit(f"{model.kind} L={length}: analytic FLOPs {expected} differ from torch's flop counter {measured}")


def extra_bytes(model, length: int) -> dict[str, float]:
    """Bytes per image / caption the fast form stores beyond the plain embeddings (float32)."""
    with torch.no_grad():
        images = model.prepare_images(torch.randn(1, REGIONS, DIM))
        texts = model.prepare_texts(torch.randn(1, length, DIM), torch.tensor([length]))
    plain = {"image": REGIONS * DIM * 4, "caption": length * DIM * 4}
    extra = {"image": sum(t.nbytes for n, t in images.items() if n != "regions"),
             "caption": sum(t.nbytes for n, t in texts.items() if n not in ("words", "lengths"))}
    return {f"{side}_{kind}": value for side in plain for kind, value in
            (("plain_bytes", plain[side]), ("extra_bytes", extra[side]), ("extra_ratio", extra[side] / plain[side]))}


def caption_lengths(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 5 + 12.3).round().clamp(4, 40).long() + 2


def inputs(model, n_images: int, n_captions: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random region features, token ids (0-padded) and lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = caption_lengths(n_captions, seed)
    ids = torch.randint(4, model.config.vocab_size, (n_captions, int(lengths.max())), generator=g)
    ids[torch.arange(ids.size(1))[None, :] >= lengths[:, None]] = 0
    return torch.randn(n_images, REGIONS, model.config.img_dim, generator=g), ids, lengths


def fast_matrix_flops(model, lengths: torch.Tensor, n_images: int) -> int:
    """Pair-stage and per-item FLOPs of the fast form (Gram matrices: once per block, left out)."""
    costs = [scoring_cost(model.config, REGIONS, int(n), "fast") for n in lengths]
    return sum(c.per_pair * n_images + c.per_caption for c in costs) + costs[0].per_image * n_images


def authors_matrix_flops(model, lengths: torch.Tensor, n_images: int) -> int:
    return sum(released_evaluation_flops(model.config, REGIONS, int(n), n_images, 1) for n in lengths)


def throughput(model, n_images: int, n_captions: int, authors_captions: int) -> dict[str, float]:
    features, ids, lengths = inputs(model, n_images, n_captions)
    started = time.perf_counter()
    Scorer(TorchBackend.from_model(model, REGIONS)).score(features, (ids, lengths))
    fast_seconds = time.perf_counter() - started
    subset = lengths[:authors_captions]
    with torch.no_grad():
        img_emb = model.encode_images(features)
        cap_emb = model.encode_texts(ids[:authors_captions, : int(subset.max())], subset)
        model.score_authors_style(img_emb, cap_emb[:1], subset[:1])  # warm-up
        started = time.perf_counter()
        model.score_authors_style(img_emb, cap_emb, subset)
        authors_seconds = time.perf_counter() - started
    fast_rate, authors_rate = n_images * n_captions / fast_seconds, n_images * authors_captions / authors_seconds
    return {"images": n_images, "captions": n_captions, "authors_captions_timed": authors_captions,
            "fast_seconds": fast_seconds, "authors_seconds_extrapolated": n_images * n_captions / authors_rate,
            "fast_pairs_per_s": fast_rate, "authors_pairs_per_s": authors_rate, "speedup": fast_rate / authors_rate,
            "fast_gflops_per_s": fast_matrix_flops(model, lengths, n_images) / fast_seconds / 1e9,
            "authors_gflops_per_s": authors_matrix_flops(model, subset, n_images) / authors_seconds / 1e9}


def flops_table(rows: list[dict]) -> Table:
    table = Table(title=f"Matmul GFLOP per pair, D = {DIM}, R = {REGIONS} (checked against torch's flop counter)")
    for column in ("model", "L", *FORMS, "authors / fast", "stored extra per image / caption"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(r["model"], str(r["length"]), *(f"{r[f]['per_pair'] / 1e9:.3f}" for f in FORMS),
                      f"{r['authors']['per_pair'] / r['fast']['per_pair']:.1f}x",
                      f"{r['storage']['image_extra_ratio']:.2f}x / {r['storage']['caption_extra_ratio']:.2f}x")
    return table


def speed_table(rows: dict[str, dict]) -> Table:
    table = Table(title="CPU score matrix: fast form vs the authors' loop (same run)")
    for column in ("model", "pairs", "authors pairs/s", "fast pairs/s", "speedup", "authors GFLOP/s", "fast GFLOP/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['images']} x {r['captions']}", f"{r['authors_pairs_per_s']:.0f}",
                      f"{r['fast_pairs_per_s']:.0f}", f"{r['speedup']:.1f}x", f"{r['authors_gflops_per_s']:.0f}",
                      f"{r['fast_gflops_per_s']:.0f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[14, 16], help="caption lengths of the FLOP table")
    parser.add_argument("--images", type=int, default=100, help="score matrix rows (Flickr30K 1K test: 1000)")
    parser.add_argument("--captions", type=int, default=500, help="score matrix columns (Flickr30K 1K test: 5000)")
    parser.add_argument("--authors-captions", type=int, default=10, help="captions the authors' loop is timed on")
    parser.add_argument("--speed-models", nargs="+", default=["imram-full", "camp"], choices=list(MODELS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    flops_rows, speed_rows = [], {}
    for name, (kind, fields) in MODELS.items():
        model = build_model(make_config(kind, **fields)).eval()
        for length in args.lengths:
            check_against_counter(model, length)
            flops_rows.append({"model": name, "length": length, "storage": extra_bytes(model, length),
                               **{form: scoring_cost(model.config, REGIONS, length, form).as_dict() for form in FORMS}})
        if name in args.speed_models:
            speed_rows[name] = throughput(model, args.images, args.captions, args.authors_captions)
    console.print(flops_table(flops_rows))
    console.print(speed_table(speed_rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version()},
            "regions": REGIONS, "embed_size": DIM, "flops": flops_rows, "throughput": speed_rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
