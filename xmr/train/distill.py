"""``xmr distill``: a prefilter head for a checkpoint that has none (or a new one), on its frozen encoders.

The cross-attention model is the teacher. Every train caption is encoded once (the encoders
are frozen), then the head trains on batches of distinct images, each with one of its
captions: a contrastive term on the ground truth (``losses.contrastive_loss``) plus a
listwise KL divergence from the teacher's in-batch rankings to the head's, both ways (each
caption over the first ``teacher_items`` images of the batch, each of those images over their
captions: scoring pairs is what costs, ``teacher_items``² per step). The teacher's scores
are standardised per row before its softmax, so one temperature fits CAMP's probabilities
and IMRAM's sums of cosines alike. The weights of the model are not changed: the new
checkpoint scores every pair exactly as the old one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmr.config import check_float, check_int, config_to_dict
from xmr.data.precomp import PrecompSplit
from xmr.device import resolve_device
from xmr.errors import ConfigError
from xmr.eval.metrics import recall_at
from xmr.models.base import RetrievalModel
from xmr.models.checkpoint import save_checkpoint
from xmr.models.losses import TEMPERATURE, contrastive_loss
from xmr.models.prefilter import PrefilterHeads
from xmr.progress import console, progress

ENCODE_BATCH = 256  # items per encoder call while the split is encoded
RECALL_KS = (1, 8, 32, 128)  # the dev report's shortlist sizes


@dataclass
class DistillConfig:
    """How the head is trained (saved in the new checkpoint's metadata)."""

    VERSION = 1

    global_dim: int = 0  # the head's vectors (0: the checkpoint's head's size, else min(256, embed_size))
    epochs: int = 10
    batch_size: int = 128  # distinct images per batch, one caption each
    learning_rate: float = 1e-3
    kl_weight: float = 1.0  # of the teacher's listwise term beside the ground-truth contrastive term
    teacher_items: int = 32  # the teacher ranks the first this many images x captions of a batch (its cost: their square)
    teacher_temperature: float = 0.5  # of the softmax over the teacher's standardised scores
    seed: int = 0
    device: str = "cpu"
    max_steps: int = 0  # stop after this many steps (0: no limit)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "global_dim", self.global_dim, 0)
        check_int(owner, "epochs", self.epochs, 1)
        check_int(owner, "batch_size", self.batch_size, 2)
        check_float(owner, "learning_rate", self.learning_rate, 0.0, above=True)
        check_float(owner, "kl_weight", self.kl_weight, 0.0)
        check_int(owner, "teacher_items", self.teacher_items, 2)
        check_float(owner, "teacher_temperature", self.teacher_temperature, 0.0, above=True)
        check_int(owner, "seed", self.seed, 0, 2**63 - 1)
        check_int(owner, "max_steps", self.max_steps, 0)
        resolve_device(self.device)


@dataclass
class EncodedSplit:
    """A split's region and word embeddings, encoded once by the frozen encoders."""

    regions: torch.Tensor  # [Ni, R, D]
    words: torch.Tensor  # [Nt, L, D], zero beyond each caption's length
    lengths: torch.Tensor  # [Nt]
    per_image: int


@torch.no_grad()
def split_embeddings(model: RetrievalModel, split: PrecompSplit, device: torch.device) -> EncodedSplit:
    regions = torch.cat([model.encode_images(split.image_batch(range(s, min(s + ENCODE_BATCH, split.n_images))).to(device))
                         for s in range(0, split.n_images, ENCODE_BATCH)])
    longest = max(len(split.caption_ids(i)) for i in range(split.n_captions))
    words = torch.zeros(split.n_captions, longest, model.config.embed_size, device=device)
    lengths = torch.empty(split.n_captions, dtype=torch.int64)
    for start in range(0, split.n_captions, ENCODE_BATCH):
        ids, batch_lengths = split.caption_batch(range(start, min(start + ENCODE_BATCH, split.n_captions)))
        encoded = model.encode_texts(ids.to(device), batch_lengths.to(device))
        words[start : start + len(ids), : encoded.size(1)] = encoded
        lengths[start : start + len(ids)] = batch_lengths
    return EncodedSplit(regions, words, lengths.to(device), split.per_image)


def image_batches(n_images: int, per_image: int, batch_size: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch: every caption once, in batches of distinct images with one caption each."""
    batches = []
    for round_ in rng.permuted(np.tile(np.arange(per_image), (n_images, 1)), axis=1).T:  # a caption of each image per round
        images = rng.permutation(n_images)
        for chunk in np.array_split(images, max(1, n_images // batch_size)):
            batches.append((chunk, chunk * per_image + round_[chunk]))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def listwise_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of each row's softmax: student logits ``similarities / TEMPERATURE``,
    teacher's standardised scores over ``temperature``."""
    standard = (teacher - teacher.mean(1, keepdim=True)) / (teacher.std(1, keepdim=True) + 1e-6)
    target = torch.softmax(standard / temperature, dim=1)
    return torch.nn.functional.kl_div(torch.log_softmax(student / TEMPERATURE, dim=1), target, reduction="batchmean")


def distill_step(model: RetrievalModel, optimizer: torch.optim.Optimizer, encoded: EncodedSplit,
                 images: np.ndarray, captions: np.ndarray, cfg: DistillConfig) -> float:
    regions = encoded.regions[torch.from_numpy(images).to(encoded.regions.device)]
    index = torch.from_numpy(captions).to(encoded.words.device)
    lengths = encoded.lengths[index]
    words = encoded.words[index][:, : int(lengths.max())]
    image_vectors, text_vectors = model.global_images(regions), model.global_texts(words, lengths)
    similarities = image_vectors @ text_vectors.T
    loss = contrastive_loss(image_vectors, text_vectors)
    if cfg.kl_weight:
        n = min(cfg.teacher_items, len(images))
        with torch.no_grad():  # [n images, n captions], image i with caption i
            teacher = model.score(regions[:n], words[:n, : int(lengths[:n].max())], lengths[:n])
        student = similarities[:n, :n]
        loss = loss + cfg.kl_weight * (listwise_kl(student, teacher, cfg.teacher_temperature)
                                       + listwise_kl(student.T, teacher.T, cfg.teacher_temperature)) / 2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def prefilter_recall(model: RetrievalModel, encoded: EncodedSplit, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """The prefilter's recall@K on an encoded split, in percent (``eval.metrics.recall_at``)."""
    images = model.global_images(encoded.regions)
    texts = model.global_texts(encoded.words, encoded.lengths)
    return recall_at((images @ texts.T).cpu().numpy(), encoded.per_image, ks)


def _first_images(encoded: EncodedSplit, n: int) -> EncodedSplit:
    n = min(n, encoded.regions.size(0))
    return EncodedSplit(encoded.regions[:n], encoded.words[: n * encoded.per_image], encoded.lengths[: n * encoded.per_image],
                        encoded.per_image)


def with_new_heads(model: RetrievalModel, global_dim: int) -> RetrievalModel:
    """``model`` with fresh prefilter heads of ``global_dim`` (its config updated), its other weights shared."""
    if not model.config.CROSS_ATTENTION:
        raise ConfigError(f"a {model.kind} model is itself a dual encoder: it needs no prefilter head")
    dim = global_dim or (model.config.global_dim or min(256, model.config.embed_size))
    model.config = dataclasses.replace(model.config, global_dim=dim)
    model.prefilter = PrefilterHeads(model.config.embed_size, dim).to(next(model.parameters()).device)
    return model


def distill(model: RetrievalModel, train_split: PrecompSplit, dev_split: PrecompSplit | None, cfg: DistillConfig,
            out: Path, show_progress: bool = True, metadata: dict[str, Any] | None = None,
            new_heads: bool = True) -> dict[str, Any]:
    """Train prefilter heads for ``model`` (in place: new ones, or its own with ``new_heads=False``)
    and save it to ``out``; returns the log (the dev recall@K of the starting and the trained
    head, per epoch; the train split's first 1,000 images when there is no dev split)."""
    train_split.check_fits(model.config)
    if dev_split is not None:
        dev_split.check_fits(model.config)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = model.to(device).eval()
    if new_heads or model.prefilter is None:
        model = with_new_heads(model, cfg.global_dim)
    heads = model.prefilter
    assert heads is not None
    for p in model.parameters():
        p.requires_grad_(False)
    for p in heads.parameters():
        p.requires_grad_(True)
    rng = np.random.default_rng(cfg.seed)
    started = time.perf_counter()
    with console.status("encoding the train and dev splits once") if show_progress else contextlib.nullcontext():
        encoded = split_embeddings(model, train_split, device)
        dev = split_embeddings(model, dev_split, device) if dev_split is not None else _first_images(encoded, 1000)
    log: dict[str, Any] = {"distill_config": config_to_dict(cfg), "before": prefilter_recall(model, dev), "epochs": []}
    optimizer = torch.optim.Adam(heads.parameters(), lr=cfg.learning_rate)
    step = 0
    with progress(show_progress) as bar:
        for epoch in range(cfg.epochs):
            batches = image_batches(train_split.n_images, train_split.per_image, cfg.batch_size, rng)
            task = bar.add_task(f"distill {epoch + 1}/{cfg.epochs}", total=len(batches), info="")
            heads.train()
            losses = []
            for images, captions in batches:
                losses.append(distill_step(model, optimizer, encoded, images, captions, cfg))
                step += 1
                bar.update(task, advance=1, info=f"loss {np.mean(losses[-20:]):.3f}")
                if cfg.max_steps and step >= cfg.max_steps:
                    break
            heads.eval()
            recall = prefilter_recall(model, dev)
            log["epochs"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "steps": step, "dev": recall,
                                  "seconds": time.perf_counter() - started})
            if cfg.max_steps and step >= cfg.max_steps:
                break
    for p in model.parameters():
        p.requires_grad_(True)
    log["dev"] = log["epochs"][-1]["dev"]
    log["seconds"] = time.perf_counter() - started
    save_checkpoint(model, out, {**(metadata or {}), "prefilter": log})
    return log
