"""Training as the authors do it: Adam, gradient-norm clipping at 2, step decay of the lr.

An epoch visits every caption once; a batch is B captions with their images, and the
model's loss is computed on the B x B score matrix (diagonal = matching pairs), on all
negatives for ``warmup_epochs`` and on the hardest negatives after that (both are the
authors' loss variants). After each epoch the dev split is evaluated and the best-rsum
checkpoint is kept.

A model with prefilter heads trains them beside its own loss (``prefilter_weight`` x the
contrastive loss of their vectors, on detached embeddings and clipped apart: the
cross-attention weights follow exactly the run without heads), then the best checkpoint's
heads are refined for ``prefilter_epochs`` on its frozen encoders with the model as teacher
(``xmr.train.distill``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmr.config import check_float, check_int, config_to_dict, save_json
from xmr.data.precomp import PrecompSplit
from xmr.device import resolve_device
from xmr.errors import TrainingError
from xmr.eval.evaluate import evaluate
from xmr.models.base import RetrievalModel
from xmr.models.checkpoint import load_checkpoint, save_checkpoint
from xmr.models.losses import contrastive_loss
from xmr.outputs import check_output_dir
from xmr.progress import console, progress
from xmr.train.distill import DistillConfig, distill

BEST = "checkpoint.pt"
LAST = "last.pt"
LOG = "train_log.json"


@dataclass
class TrainConfig:
    """Optimisation settings (the authors': Adam, clip 2, lr x0.1 every ``lr_update`` epochs)."""

    VERSION = 1

    epochs: int = 4
    batch_size: int = 64
    learning_rate: float = 1e-3  # the authors use 2e-4 for the released sizes (see docs/training.md)
    lr_update: int = 2  # epochs between decays of the learning rate
    lr_decay: float = 0.1
    grad_clip: float = 2.0
    warmup_epochs: int = 2  # epochs on all negatives before the hardest-negative loss (max_violation)
    seed: int = 0
    device: str = "cpu"
    max_steps: int = 0  # stop after this many steps (0: no limit); for smoke runs
    prefilter_weight: float = 1.0  # weight of the prefilter heads' contrastive loss (models with heads)
    prefilter_epochs: int = 10  # then the best checkpoint's heads are refined on its frozen encoders (``distill``)

    def __post_init__(self) -> None:
        """Every field checked up front (``ConfigError`` naming it and its range; a CUDA
        device this machine lacks: ``BackendUnavailableError``)."""
        owner = type(self).__name__
        check_int(owner, "epochs", self.epochs, 1)
        check_int(owner, "batch_size", self.batch_size, 2)  # the loss needs negatives
        check_float(owner, "learning_rate", self.learning_rate, 0.0, above=True)
        check_int(owner, "lr_update", self.lr_update, 1)
        check_float(owner, "lr_decay", self.lr_decay, 0.0, 1.0, above=True)
        check_float(owner, "grad_clip", self.grad_clip, 0.0)
        check_int(owner, "warmup_epochs", self.warmup_epochs, 0)
        check_int(owner, "seed", self.seed, 0, 2**63 - 1)
        check_int(owner, "max_steps", self.max_steps, 0)
        check_float(owner, "prefilter_weight", self.prefilter_weight, 0.0)
        check_int(owner, "prefilter_epochs", self.prefilter_epochs, 0)
        resolve_device(self.device)


SCHEDULES: dict[str, dict[str, int]] = {"camp": {"epochs": 8, "lr_update": 4}}
"""Model kinds whose default schedule differs from ``TrainConfig``'s. CAMP's BCE loss is still
climbing when the lr decays after 2 epochs on the synthetic set (best dev rsum 548.5 in 4
epochs); 4 epochs at 1e-3 and 4 at 1e-4 reach 576.7 (docs/training.md)."""


def default_config(model: str, **settings: Any) -> TrainConfig:
    """``TrainConfig`` with ``model``'s default schedule (``SCHEDULES``), ``settings`` over it."""
    return TrainConfig(**{**SCHEDULES.get(model, {}), **settings})


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    return cfg.learning_rate * cfg.lr_decay ** (epoch // cfg.lr_update)


def caption_batches(n_captions: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled caption indices in batches; the remainder is spread so no batch is smaller than 2."""
    return np.array_split(rng.permutation(n_captions), max(1, n_captions // batch_size))


def train_step(model: RetrievalModel, optimizer: torch.optim.Optimizer, split: PrecompSplit,
               captions: np.ndarray, cfg: TrainConfig, hardest: bool = True) -> float:
    """One optimizer step on the captions ``captions``; the loss, or ``FloatingPointError``
    when it is not finite (``train`` turns that into a ``TrainingError`` saying where)."""
    device = resolve_device(cfg.device)
    images = split.image_batch([split.image_of_caption(int(c)) for c in captions]).to(device)
    ids, lengths = split.caption_batch(captions)
    ids, lengths = ids.to(device), lengths.to(device)
    img_emb, cap_emb = model.encode_images(images), model.encode_texts(ids, lengths)
    loss = model.loss(model.score(img_emb, cap_emb, lengths), hardest)  # (B, B) scores
    if model.prefilter is not None and cfg.prefilter_weight:  # detached: the heads' loss never reaches the encoders
        loss = loss + cfg.prefilter_weight * contrastive_loss(model.global_images(img_emb.detach()),
                                                              model.global_texts(cap_emb.detach(), lengths))
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {float(loss.detach())}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:  # the heads apart: their gradients do not change how the rest is clipped
        heads = list(model.prefilter.parameters()) if model.prefilter is not None else []  # in module order:
        head_ids = {id(p) for p in heads}  # the norm's sum, so the run, does not depend on a set's order
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if id(p) not in head_ids], cfg.grad_clip)
        if heads:
            torch.nn.utils.clip_grad_norm_(heads, cfg.grad_clip)
    optimizer.step()
    return float(loss.detach())


def is_run_directory(path: Path) -> bool:
    """True when ``path`` holds the ``train_log.json`` that ``train`` writes before anything
    else: a run directory, whose files a new run may replace (``check_output_dir`` accepts an
    empty directory anyway)."""
    try:
        log = json.loads((path / LOG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(log, dict) and "train_config" in log and "epochs" in log


def check_splits(model: RetrievalModel, train_split: PrecompSplit, dev_split: PrecompSplit | None,
                 cfg: TrainConfig) -> None:
    """The splits fit the model and the run: ``DataError``/``VocabError`` naming the split
    whose features or vocabulary differ, ``TrainingError`` when a batch cannot be filled."""
    train_split.check_fits(model.config)
    if dev_split is not None:
        dev_split.check_features(train_split.img_dim, train_split.regions, f"the train split {train_split.name}")
        dev_split.check_fits(model.config)
    if train_split.n_captions < cfg.batch_size:
        raise TrainingError(f"{train_split.name}: {train_split.n_captions} captions, fewer than batch_size "
                            f"{cfg.batch_size}; lower --batch-size (>= 2) or use a larger train split")


def diverged(cause: FloatingPointError, step: int, epoch: int, cfg: TrainConfig, kept: Path | None) -> TrainingError:
    """The error that stops a run whose loss is not finite: where, and what to try."""
    saved = f"the best checkpoint so far is {kept}" if kept else "no epoch finished, nothing was saved"
    return TrainingError(f"training diverged at step {step} (epoch {epoch}, lr {learning_rate(cfg, epoch - 1):g}): {cause}; "
                         f"lower --lr (now {cfg.learning_rate:g}) or --grad-clip, or use more --warmup-epochs; {saved}")


def train(model: RetrievalModel, train_split: PrecompSplit, dev_split: PrecompSplit | None,
          cfg: TrainConfig, out_dir: str | Path, show_progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train ``model`` in place; writes ``train_log.json`` (first, then after every epoch),
    ``checkpoint.pt`` (best dev rsum) and ``last.pt`` to ``out_dir``, each atomically.
    Returns the log.

    Checked before any step: ``out_dir`` can hold the run (``OutputError``: a file, not
    writable, or a non-empty directory that is not a run directory, unless ``overwrite``), the splits fit the model and each other (``check_splits``). A loss that
    is not finite stops the run with a ``TrainingError`` naming the step and epoch."""
    out = Path(out_dir)
    check_splits(model, train_split, dev_split, cfg)
    check_output_dir(out, is_run_directory, overwrite, "training output directory")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(resolve_device(cfg.device))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    log: dict[str, Any] = {"train_config": config_to_dict(cfg), "model": model.kind, "epochs": []}
    save_json(log, out / LOG)
    best_rsum, step, started = -1.0, 0, time.perf_counter()
    with progress(show_progress) as bar:
        for epoch in range(cfg.epochs):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, epoch)
            batches = caption_batches(train_split.n_captions, cfg.batch_size, rng)
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(batches), info="")
            model.train()
            losses = []
            for captions in batches:
                try:
                    losses.append(train_step(model, optimizer, train_split, captions, cfg, epoch >= cfg.warmup_epochs))
                except FloatingPointError as e:
                    raise diverged(e, step + 1, epoch + 1, cfg, out / BEST if log["epochs"] else None) from e
                step += 1
                bar.update(task, advance=1, info=f"loss {np.mean(losses[-20:]):.3f}")
                if cfg.max_steps and step >= cfg.max_steps:
                    break
            entry: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "steps": step,
                                     "lr": learning_rate(cfg, epoch), "seconds": time.perf_counter() - started}
            if dev_split is not None:
                entry["dev"] = evaluate(model, dev_split, show_progress=False).report.to_dict()
                console.print(f"epoch {epoch + 1}: loss {entry['loss']:.4f}  dev rsum {entry['dev']['rsum']:.1f}")
            log["epochs"].append(entry)
            rsum = entry["dev"]["rsum"] if dev_split is not None else float(epoch)
            metadata = {"epoch": epoch + 1, "dev": entry.get("dev"), "train_config": config_to_dict(cfg),
                        "regions": train_split.regions}
            if rsum > best_rsum:
                best_rsum = rsum
                save_checkpoint(model, out / BEST, metadata)
            save_checkpoint(model, out / LAST, metadata)
            save_json(log, out / LOG)
            if cfg.max_steps and step >= cfg.max_steps:
                break
    if model.prefilter is not None and cfg.prefilter_epochs:
        best = load_checkpoint(out / BEST, map_location=cfg.device)
        log["prefilter"] = distill(best, train_split, dev_split,
                                   DistillConfig(epochs=cfg.prefilter_epochs, seed=cfg.seed, device=cfg.device),
                                   out / BEST, show_progress, best.checkpoint_metadata, new_heads=False)
    log.update(best_dev_rsum=best_rsum, seconds=time.perf_counter() - started)
    save_json(log, out / LOG)
    model.eval()
    return log
