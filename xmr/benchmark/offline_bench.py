"""Offline throughput: the full N x M score matrix per backend and precision, against the
authors' evaluation loop and our vectorised PyTorch model, in one run.

Each row loads a ``Scorer``, runs every graph once untimed (a backend's first launch
allocates and compiles), encodes all N images and a sample of the captions (timed), then
scores all N images against chunks of the sampled captions until its time budget is spent:
pairs per second is measured on that work and the full matrix's time extrapolated from it
(``extrapolated`` says so). Its fraction of peak is against the peak of the units it runs on
(``hardware.row_peak``). The authors' loop — one caption at a time against every image, in
PyTorch fp32, as the released evaluation code does — is timed after one untimed caption in
``authors_repeats`` repeats of at least ``AUTHORS_MIN_CAPTIONS`` captions: its rate is their
median, their spread is reported beside it. Each row also scores the synthetic test split for
its recall and its change against fp32.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmr.benchmark.hardware import Hardware, UtilisationMonitor, row_peak
from xmr.benchmark.workload import Inputs
from xmr.calibration.accuracy import accuracy, mean_rank_agreement
from xmr.config import check_float, check_int
from xmr.data import load_split
from xmr.data.precomp import PrecompSplit
from xmr.errors import XmrError, first_line
from xmr.eval import model_scorer, split_scores
from xmr.models.base import RetrievalModel
from xmr.models.checkpoint import load_checkpoint
from xmr.models.flops import encoder_flops, released_evaluation_flops, scoring_cost
from xmr.runtime import Scorer
from xmr.runtime.artifacts import Artifacts

# (backend, precision) rows, by backend, each from its widest type down
CANDIDATES = (("torch", "fp32"), ("torch", "bf16"), ("torch", "fp16"),
              ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8"),
              ("openvino", "fp32"), ("openvino", "bf16"),
              ("tensorrt", "bf16"), ("tensorrt", "fp16"), ("tensorrt", "int8"))
GRAM_BLOCK = 50  # captions per block assumed when amortising the pair scorer's per-block Gram matrices
WARM_UP_ITEMS = 8  # images and captions each encoder runs untimed before a row's timings
AUTHORS_MIN_CAPTIONS = 3  # captions per timed repeat of the authors' loop, at least


@dataclass
class OfflineConfig:
    images: int = 1000
    captions_per_image: int = 5
    seconds: float = 15.0  # scoring time budget per row
    encode_captions: int = 500  # captions encoded (timed) and cycled through while scoring
    authors_seconds: float = 10.0  # the authors' loop's timing budget, split across its repeats
    authors_repeats: int = 5  # timed repeats of the authors' loop; its rate is their median
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("images", "captions_per_image", "encode_captions", "authors_repeats"):
            check_int("serve-bench", name, getattr(self, name))
        for name in ("seconds", "authors_seconds"):
            check_float("serve-bench", name, getattr(self, name), 0.0, above=True)

    @property
    def captions(self) -> int:
        return self.images * self.captions_per_image


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def score_for_seconds(scorer: Scorer, images: Any, texts: Any, seconds: float, device: str) -> tuple[int, float]:
    """(pairs, seconds) of scoring ``images`` against chunks of ``texts`` until ``seconds`` pass
    (at least one chunk), after one untimed chunk of one caption (the first launch allocates).
    Chunks cycle through the captions in order, starting with one caption and growing to about
    a fifth of the budget, so the budget is kept at any matrix size."""
    scorer.score(images, texts.select(np.arange(1)))
    _sync(device)
    n, pairs, elapsed, start, size = len(texts), 0, 0.0, 0, 1
    while elapsed < seconds or pairs == 0:
        index = np.arange(start, start + size) % n
        chunk = texts.select(index)
        _sync(device)
        took, _ = timed(lambda: scorer.score(images, chunk))
        elapsed += took
        pairs += len(images) * len(index)
        start = (start + size) % n
        size = int(np.clip(size * seconds / 5 / max(took, 1e-6), 1, min(n, 4 * size)))
    return pairs, elapsed


def warm_up_encoders(scorer: Scorer, inputs: Inputs) -> None:
    """One untimed launch of each encoder on the first ``WARM_UP_ITEMS`` items, so that no
    timing includes the backend's first launch (sessions allocating, kernels compiling)."""
    scorer.encode_images(inputs.features[:WARM_UP_ITEMS])
    scorer.encode_texts((inputs.ids[:WARM_UP_ITEMS], inputs.lengths[:WARM_UP_ITEMS]))
    _sync(scorer.device)


def measure_backend(artifacts: Path, backend: str, precision: str, device: str | None, inputs: Inputs,
                    config: OfflineConfig, split: PrecompSplit) -> dict[str, Any]:
    """One row: load, warm up, encode, score for the time budget, and score the accuracy split."""
    try:
        load_seconds, scorer = timed(lambda: Scorer.load(artifacts, backend=backend, precision=precision, device=device))
    except (XmrError, ValueError) as e:  # unavailable here, or no graphs of this precision: the row says why
        return {"backend": backend, "precision": precision, "skipped": first_line(e)}
    if scorer.emulated:  # minutes of work to measure what is slower than fp32 by construction
        scorer.close()
        return {"backend": backend, "precision": precision,
                "skipped": "bf16 is emulated on this CPU (no AMX-BF16 or AVX-512 BF16): slower than fp32, not measured"}
    sample = min(config.encode_captions, len(inputs.lengths))
    with scorer, UtilisationMonitor(scorer.device) as util:
        warm_up_encoders(scorer, inputs)
        image_seconds, images = timed(lambda: scorer.encode_images(inputs.features))
        caption_seconds, texts = timed(lambda: scorer.encode_texts((inputs.ids[:sample], inputs.lengths[:sample])))
        pairs, score_seconds = score_for_seconds(scorer, images, texts, config.seconds, scorer.device)
        efficiency = scorer.stats()["padding_efficiency"]
        del images, texts
        accuracy_scores = split_scores(scorer, split)
    pairs_per_second = pairs / score_seconds
    n_pairs = config.images * config.captions
    encode_total = image_seconds * config.images / len(inputs.features) + caption_seconds * config.captions / sample
    return {"backend": scorer.backend, "precision": scorer.precision, "device": scorer.device,
            "load_seconds": load_seconds, "images_per_second": len(inputs.features) / image_seconds,
            "captions_per_second": sample / caption_seconds, "encode_seconds": encode_total,
            "pairs_timed": pairs, "score_seconds_timed": score_seconds, "pairs_per_second": pairs_per_second,
            "score_seconds": n_pairs / pairs_per_second, "total_seconds": encode_total + n_pairs / pairs_per_second,
            "extrapolated": pairs < n_pairs or sample < config.captions, "padding_efficiency": efficiency,
            "peak_process_bytes": util.peak_rss_bytes, "peak_gpu_bytes": util.peak_gpu_bytes, "cpu_utilisation": util.cpu,
            "gpu_utilisation": util.gpu, "_split_scores": accuracy_scores}


def authors_repeat(score_caption: Callable[[int], object], first: int, seconds: float,
                   device: str) -> tuple[int, float]:
    """(captions, seconds) of one timed repeat of the authors' loop: ``score_caption`` on
    captions ``first``, ``first + 1``, ... one at a time until ``seconds`` pass and at least
    ``AUTHORS_MIN_CAPTIONS`` are done."""
    captions = 0
    elapsed = 0.0
    while elapsed < seconds or captions < AUTHORS_MIN_CAPTIONS:
        _sync(device)
        took, _ = timed(lambda: score_caption(first + captions))
        _sync(device)
        elapsed += took
        captions += 1
    return captions, elapsed


def repeat_summary(rates: list[float]) -> dict[str, Any]:
    """The rate the repeats of a timing give (their median) and how far they spread."""
    median = statistics.median(rates)
    return {"pairs_per_second": median, "pairs_per_second_repeats": rates, "pairs_per_second_min": min(rates),
            "pairs_per_second_max": max(rates), "pairs_per_second_spread": (max(rates) - min(rates)) / median}


def authors_baseline(model: RetrievalModel, inputs: Inputs, config: OfflineConfig, device: str) -> dict[str, Any]:
    """The released evaluation's way: every caption alone against all images, PyTorch fp32.

    One untimed caption first, then ``config.authors_repeats`` timed repeats sharing
    ``config.authors_seconds``; ``pairs_per_second`` is the repeats' median."""
    model = model.to(device).eval()
    sample = min(config.encode_captions, len(inputs.lengths))
    with torch.no_grad(), UtilisationMonitor(device) as util:
        img_emb = torch.cat([model.encode_images(torch.from_numpy(inputs.features[i : i + 128]).to(device))
                             for i in range(0, len(inputs.features), 128)])
        lengths = torch.from_numpy(inputs.lengths[:sample]).to(device)
        cap_emb = model.encode_texts(torch.from_numpy(inputs.ids[:sample]).to(device), lengths)

        def score_caption(index: int) -> object:
            c = index % sample
            return model.score_authors_style(img_emb, cap_emb[c : c + 1], lengths[c : c + 1])

        score_caption(0)  # the warm-up: not timed
        _sync(device)
        budget = config.authors_seconds / config.authors_repeats
        captions: list[int] = []
        seconds: list[float] = []
        for _ in range(config.authors_repeats):
            done, took = authors_repeat(score_caption, 1 + sum(captions), budget, device)
            captions.append(done)
            seconds.append(took)
    rates = [len(inputs.features) * c / s for c, s in zip(captions, seconds)]
    summary = repeat_summary(rates)
    n_pairs = config.images * config.captions
    return {"backend": "authors' loop (torch)", "precision": "fp32", "device": device,
            "pairs_timed": len(inputs.features) * sum(captions), "captions_timed": sum(captions),
            "score_seconds_timed": sum(seconds), "repeats": config.authors_repeats, "captions_per_repeat": captions,
            "seconds_per_repeat": seconds, **summary, "score_seconds": n_pairs / summary["pairs_per_second"],
            "extrapolated": True, "peak_process_bytes": util.peak_rss_bytes, "cpu_utilisation": util.cpu,
            "gpu_utilisation": util.gpu}


def cost_model(artifacts: Artifacts, model: RetrievalModel, inputs: Inputs, hardware: Hardware) -> dict[str, Any]:
    """Matmul FLOPs per item of each graph and per pair of each form at the mean caption
    length (xmr.models.flops); the pair scorer's includes its per-block Gram matrices."""
    length, regions, n_images = int(round(float(inputs.lengths.mean()))), artifacts.regions, len(inputs.features)
    fast = scoring_cost(model.config, regions, length, "fast")
    encoders = encoder_flops(model.config, regions, length)
    return {"mean_caption_tokens": length, "regions": regions,
            "graphs": {"image_encoder_flops_per_image": encoders["image"] + fast.per_image,
                       "text_encoder_flops_per_caption": encoders["caption"] + fast.per_caption,
                       "pair_scorer_flops_per_pair": fast.block(n_images, GRAM_BLOCK) / (n_images * GRAM_BLOCK)},
            "authors_flops_per_pair": released_evaluation_flops(model.config, regions, length, n_images, 1) / n_images,
            "hardware": hardware.as_dict()}


def add_ratios(rows: list[dict[str, Any]], authors: dict[str, Any], cost: dict[str, Any], hardware: Hardware,
               reference: np.ndarray, split: PrecompSplit) -> None:
    """Speedups over the authors' loop (its median rate) and our PyTorch fp32 row, achieved
    FLOP/s and the fraction of the peak of the units each row runs on, and accuracy on the
    split against ``reference`` (fp32 scores)."""
    torch_fp32 = next((r for r in rows if r["backend"] == "torch" and r["precision"] == "fp32" and "skipped" not in r), None)
    authors["flops_per_second"] = cost["authors_flops_per_pair"] * authors["pairs_per_second"]
    add_peak(authors, hardware, "torch", "fp32")
    for row in (r for r in rows if "skipped" not in r):
        row["speedup_vs_authors"] = row["pairs_per_second"] / authors["pairs_per_second"]
        row["speedup_vs_torch_fp32"] = row["pairs_per_second"] / torch_fp32["pairs_per_second"] if torch_fp32 else None
        row["flops_per_second"] = cost["graphs"]["pair_scorer_flops_per_pair"] * row["pairs_per_second"]
        add_peak(row, hardware, row["backend"], row["precision"])
        metrics = accuracy(row.pop("_split_scores"), reference, split.per_image)
        metrics["rank_agreement"] = mean_rank_agreement(metrics)
        row["accuracy"] = metrics


def add_peak(row: dict[str, Any], hardware: Hardware, backend: str, precision: str) -> None:
    """The peak ``row`` (its ``flops_per_second`` measured) runs at: which precision's, which
    units', that peak, and the fraction of it the row achieved."""
    peak_precision, peak_unit = row_peak(hardware, backend, precision)
    peak = hardware.peak_flops.get(peak_precision)
    row["peak_precision"] = peak_precision
    row["peak_unit"] = peak_unit
    row["peak_flops"] = peak
    row["fraction_of_peak"] = row["flops_per_second"] / peak if peak else None


def run_offline(artifacts: Path, data: Path, inputs: Inputs, config: OfflineConfig, hardware: Hardware,
                candidates: list[tuple[str, str]], device: str | None, test_images: int,
                advance=lambda label: None) -> dict[str, Any]:
    opened = Artifacts.open(artifacts)
    split = load_split(data, "test", opened.vocab)
    split = PrecompSplit(split.features[:test_images], split.captions[: test_images * split.per_image], opened.vocab,
                         split.name)
    model = load_checkpoint(opened.checkpoint())
    reference = split_scores(model_scorer(model, split), split)
    rows = []
    for backend, precision in candidates:
        advance(f"{backend} {precision}")
        rows.append(measure_backend(artifacts, backend, precision, device, inputs, config, split))
    advance("authors' loop")
    authors = authors_baseline(model, inputs, config, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cost = cost_model(opened, model, inputs, hardware)
    add_ratios(rows, authors, cost, hardware, reference, split)
    return {"rows": rows, "authors": authors, "cost_model": cost, "accuracy_split": {
        "data": str(data), "split": "test", "images": split.n_images, "captions": split.n_captions,
        "reference": "PyTorch fp32 model"}}
