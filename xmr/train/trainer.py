"""Training as the authors do it: Adam, gradient-norm clipping at 2, step decay of the lr.

An epoch visits every caption once; a batch is B captions with their images, and the
model's loss is computed on the B x B score matrix (diagonal = matching pairs), on all
negatives for ``warmup_epochs`` and on the hardest negatives after that (both are the
authors' loss variants). After each epoch the dev split is evaluated and the best-rsum
checkpoint is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmr.config import config_to_dict, save_json
from xmr.data.precomp import PrecompSplit
from xmr.eval.evaluate import evaluate
from xmr.models.base import RetrievalModel
from xmr.models.checkpoint import save_checkpoint
from xmr.progress import console, progress

BEST = "checkpoint.pt"
LAST = "last.pt"


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

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the loss needs negatives), got {self.batch_size}")
        if self.epochs < 1 or self.learning_rate <= 0 or self.lr_update < 1 or self.warmup_epochs < 0:
            raise ValueError("epochs and lr_update must be >= 1, learning_rate > 0 and warmup_epochs >= 0")


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    return cfg.learning_rate * cfg.lr_decay ** (epoch // cfg.lr_update)


def caption_batches(n_captions: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled caption indices in batches; the remainder is spread so no batch is smaller than 2."""
    order = rng.permutation(n_captions)
    n_batches = max(1, n_captions // batch_size)
    return np.array_split(order, n_batches)


def train_step(model: RetrievalModel, optimizer: torch.optim.Optimizer, split: PrecompSplit,
               captions: np.ndarray, cfg: TrainConfig, hardest: bool = True) -> float:
    device = torch.device(cfg.device)
    images = split.image_batch([split.image_of_caption(int(c)) for c in captions]).to(device)
    ids, lengths = split.caption_batch(captions)
    scores = model.similarity(images, ids.to(device), lengths.to(device))  # (B, B)
    loss = model.loss(scores, hardest)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training diverged: loss is {float(loss)}; lower --lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return float(loss.detach())


def train(model: RetrievalModel, train_split: PrecompSplit, dev_split: PrecompSplit | None,
          cfg: TrainConfig, out_dir: str | Path, show_progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in place; writes ``checkpoint.pt`` (best dev rsum), ``last.pt`` and
    ``train_log.json`` to ``out_dir``. Returns the log."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(cfg.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    log: dict[str, Any] = {"train_config": config_to_dict(cfg), "model": model.kind, "epochs": []}
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
                losses.append(train_step(model, optimizer, train_split, captions, cfg, epoch >= cfg.warmup_epochs))
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
            if cfg.max_steps and step >= cfg.max_steps:
                break
    log["best_dev_rsum"] = best_rsum
    log["seconds"] = time.perf_counter() - started
    save_json(log, out / "train_log.json")
    model.eval()
    return log
