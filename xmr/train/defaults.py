"""The pipeline behind the ``xmr`` commands, as library calls with the commands' parameter names.

``xmr train`` is ``train_model``, ``xmr eval`` is ``evaluate_checkpoint``, ``xmr export`` is
``export_checkpoint``, ``xmr calibrate`` is ``calibrate_model`` and ``xmr distill`` is
``distill_checkpoint`` (``xmr data synth`` is
``xmr.data.write_synthetic``, ``xmr import-checkpoint`` is
``xmr.models.authors.convert_authors_checkpoint``). What a command does when an input is not
given is here too, and makes it only when it is missing:

- ``ensure_checkpoint(model)``: README's ``runs/MODEL/checkpoint.pt``, trained on the default
  synthetic data (``data/synth``, written first if it holds no dataset);
- ``ensure_artifacts(model)``: ``artifacts/MODEL``, exported from that checkpoint (or the
  one given) when it has no manifest.

This module sits above export, calibration and training and may use them all; nothing
below it imports it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from xmr.calibration.calibrate import DEFAULT_TARGET, calibrate_artifacts
from xmr.calibration.config import CalibrationConfig
from xmr.config import check_int, save_json
from xmr.data import DEFAULT_DATA, SynthConfig, Vocabulary, find_vocab, load_split, write_synthetic
from xmr.errors import CheckpointError, ConfigError, ExportError, MissingFileError
from xmr.eval import EVAL_FORMAT, EvalResult, evaluate, is_eval_json, model_scorer
from xmr.eval.evaluate import checkpoint_spec
from xmr.eval.shortlist import ShortlistResult, evaluate_shortlist, evaluate_shortlist_on_ray
from xmr.export.artifacts import check_export_options, export_artifacts, is_artifact_directory
from xmr.export.manifest import MANIFEST
from xmr.export.onnx_export import OPSET
from xmr.export.precision import PRECISIONS as GRAPH_PRECISIONS
from xmr.export.tensorrt import BuildOptions, ProfileShapes
from xmr.matrix.run import RayOptions
from xmr.models import build_model, load_checkpoint, make_config
from xmr.models.authors import check_output_is_not_input
from xmr.models.checkpoint import is_checkpoint_file
from xmr.models.config import SIZES
from xmr.models.registry import config_class
from xmr.outputs import check_output_dir, check_output_file
from xmr.progress import console
from xmr.train.distill import DistillConfig, distill
from xmr.train.trainer import BEST, TrainConfig, default_config, is_run_directory, train

PRECISIONS = (*GRAPH_PRECISIONS, "int8")  # what `xmr export --precision` takes (int8: through calibration)


def run_directory(model: str) -> Path:
    """Where ``xmr train --model MODEL`` writes by default: ``runs/MODEL``."""
    return Path("runs") / model


def artifact_directory(model: str) -> Path:
    """Where ``xmr export --model MODEL`` writes by default: ``artifacts/MODEL``."""
    return Path("artifacts") / model


@dataclass(frozen=True)
class TrainedRun:
    """What ``train_model`` wrote: the best dev-rsum checkpoint and the training log."""

    checkpoint: Path
    log: dict[str, Any]


def train_model(model: str, data: Path = DEFAULT_DATA, out: Optional[Path] = None, vocab: Optional[Path] = None,
                size: str = "small", embed_size: Optional[int] = None, word_dim: Optional[int] = None,
                mode: str = "full", steps: int = 3, config: Optional[TrainConfig] = None, overwrite: bool = False,
                show_progress: bool = True, global_dim: Optional[int] = None) -> TrainedRun:
    """``xmr train``: a fresh ``model`` of ``size`` (``embed_size``/``word_dim``/``global_dim``
    override it; ``global_dim`` is the prefilter head's, cross-attention models only, 0 for
    none; ``mode`` and ``steps`` are IMRAM's) trained with ``config`` (default: the model's,
    ``default_config``) on ``data``'s train split, the best dev-rsum checkpoint kept in ``out``
    (default ``runs/MODEL``). The vocabulary is ``vocab``, else the one in ``data``. ``out``
    is checked before the data is read."""
    config_class(model)  # an unknown kind fails first, naming the registered ones
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    config = config or default_config(model)
    out = Path(out) if out is not None else run_directory(model)
    check_output_dir(out, is_run_directory, overwrite, "run directory")
    data = Path(data)
    vocabulary = Vocabulary.load(vocab or find_vocab(data))
    train_split = load_split(data, "train", vocabulary)
    dev_split = load_split(data, "dev", vocabulary)
    given = {"embed_size": embed_size, "word_dim": word_dim, "global_dim": global_dim}
    dims = {**SIZES[size], **{name: value for name, value in given.items() if value is not None}}
    if not config_class(model).CROSS_ATTENTION and global_dim is None:
        dims["global_dim"] = 0  # the sizes' heads are for the cross-attention models
    extra = {"mode": mode, "steps": steps} if model == "imram" else {}
    torch.manual_seed(config.seed)  # the seed decides the initial weights too: the same options, the same run
    net = build_model(make_config(model, vocab_size=len(vocabulary), img_dim=train_split.img_dim, **dims, **extra),
                      vocabulary)
    log = train(net, train_split, dev_split, config, out, show_progress=show_progress, overwrite=overwrite)
    return TrainedRun(out / BEST, log)


def distilled_path(checkpoint: Path) -> Path:
    """Where ``xmr distill CKPT`` writes by default: ``CKPT``'s name with ``.prefilter`` before the suffix."""
    return checkpoint.with_name(f"{checkpoint.stem}.prefilter{checkpoint.suffix or '.pt'}")


@dataclass(frozen=True)
class DistilledRun:
    """What ``distill_checkpoint`` wrote: the checkpoint with its new head and the distillation log."""

    checkpoint: Path
    log: dict[str, Any]


def distill_checkpoint(checkpoint: Path, data: Path = DEFAULT_DATA, out: Optional[Path] = None,
                       config: Optional[DistillConfig] = None, overwrite: bool = False,
                       show_progress: bool = True) -> DistilledRun:
    """``xmr distill``: ``checkpoint`` with new prefilter heads trained on ``data``'s train
    split against its own cross-attention scores (``xmr.train.distill``), written to ``out``
    (default ``distilled_path(checkpoint)``; never the input itself, checked before any work)."""
    config = config or DistillConfig()
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else distilled_path(checkpoint)
    check_output_is_not_input(checkpoint, out, "being distilled", "it")
    check_output_file(out, is_checkpoint_file, overwrite, "--out")
    net = load_checkpoint(checkpoint, map_location=config.device)
    if net.vocab is None:
        raise CheckpointError(f"{checkpoint} holds no vocabulary to read the captions of {data} with")
    train_split, dev_split = load_split(data, "train", net.vocab), load_split(data, "dev", net.vocab)
    metadata = {**net.checkpoint_metadata, "distilled_from": {"file": str(checkpoint), "sha256": net.checkpoint_sha256}}
    log = distill(net, train_split, dev_split, config, out, show_progress=show_progress, metadata=metadata)
    return DistilledRun(out, log)


def _has_dataset(data: Path) -> bool:
    try:
        find_vocab(data)
    except MissingFileError:
        return False
    return True


def ensure_checkpoint(model: str, data: Path = DEFAULT_DATA, out: Optional[Path] = None,
                      synth: Optional[SynthConfig] = None, size: str = "small", embed_size: Optional[int] = None,
                      word_dim: Optional[int] = None, mode: str = "full", steps: int = 3,
                      config: Optional[TrainConfig] = None, show_progress: bool = True) -> Path:
    """The checkpoint ``out/checkpoint.pt`` (default README's ``runs/MODEL/checkpoint.pt``);
    when it is missing, ``model`` is trained there first (``train_model`` with these options,
    and progress) on ``data``, which is written first with ``synth`` (default: the
    ``xmr data synth`` dataset) when it holds no dataset. Nothing is trained or written when
    the checkpoint exists."""
    data = Path(data)
    out = Path(out) if out is not None else run_directory(model)
    checkpoint = out / BEST
    if checkpoint.is_file():
        return checkpoint
    synthesize = not _has_dataset(data) if data.is_dir() else not data.exists()
    if show_progress:
        where = "the default synthetic data" if data == DEFAULT_DATA else f"{data}"
        commands = [f"xmr data synth{'' if data == DEFAULT_DATA else f' -o {data}'}"] if synthesize else []
        commands.append(f"xmr train --model {model}{'' if data == DEFAULT_DATA else f' --data {data}'}"
                        f"{'' if out == run_directory(model) else f' -o {out}'}")
        console.print(f"no checkpoint at {checkpoint}: training {model} on {where} "
                      f"(as `{' && '.join(commands)}`; a few minutes on a CPU)")
    if synthesize:
        write_synthetic(data, synth)
    return train_model(model, data, out, size=size, embed_size=embed_size, word_dim=word_dim, mode=mode, steps=steps,
                       config=config, show_progress=show_progress).checkpoint


@dataclass(frozen=True)
class CheckpointEval:
    """What ``evaluate_checkpoint`` measured: the model kind and its recall (exhaustive, or with
    a shortlist; ``exhaustive_seconds`` when both were measured)."""

    kind: str
    result: EvalResult | None
    shortlist: ShortlistResult | None = None
    exhaustive_seconds: float | None = None


def evaluate_checkpoint(checkpoint: Path, data: Path = DEFAULT_DATA, split: str = "test", fold5: bool = False,
                        vocab: Optional[Path] = None, device: str = "cpu", json_out: Optional[Path] = None,
                        overwrite: bool = False, show_progress: bool = True, shortlist: Optional[int] = None,
                        compare: bool = False, ray: Optional[RayOptions] = None) -> CheckpointEval:
    """``xmr eval``: recall of ``checkpoint`` on ``data``'s ``split`` (COCO's 5-fold 1K with
    ``fold5``), tokenised with ``vocab`` (default: the checkpoint's), written to ``json_out``
    too when given (checked before any work). ``shortlist=K``: the two-stage protocol
    (``xmr.eval.shortlist``) instead, and exhaustive recall beside it with ``compare``. ``ray``:
    the exhaustive score matrix on a Ray cluster (``xmr.matrix``)."""
    if shortlist is not None:
        check_int("xmr eval", "--shortlist", shortlist, 1)
        if fold5:
            raise ConfigError("--shortlist evaluates a whole split; it does not take --fold5")
    elif compare:
        raise ConfigError("--compare puts exhaustive recall beside a shortlist's; give --shortlist K too")
    if json_out is not None:
        check_output_file(json_out, is_eval_json, overwrite, "--json")
    net = load_checkpoint(checkpoint, map_location=device)
    vocabulary = Vocabulary.load(vocab) if vocab else net.vocab
    if vocabulary is None:
        raise CheckpointError(f"{checkpoint} holds no vocabulary; pass --vocab")
    if shortlist is not None and net.prefilter is None:
        raise CheckpointError(f"{checkpoint} has no prefilter head, which --shortlist needs; add one with "
                              f"`xmr distill {checkpoint}`")
    data_split = load_split(data, split, vocabulary)
    result, short, seconds = None, None, None
    if shortlist is None or compare:
        started = time.perf_counter()
        result = evaluate(net, data_split, fold5=fold5, show_progress=show_progress, ray=ray, checkpoint=checkpoint)
        seconds = time.perf_counter() - started
    if shortlist is not None:
        data_split.check_fits(net.config)
        if ray is not None:
            spec = checkpoint_spec(checkpoint, data_split, device)
            short = evaluate_shortlist_on_ray(spec, data_split, shortlist, ray, show_progress)
        else:
            scorer = model_scorer(net, data_split)
            with console.status(f"scoring a {shortlist}-item shortlist per query") if show_progress else \
                    contextlib.nullcontext():
                short = evaluate_shortlist(scorer, data_split, shortlist)
    if json_out is not None:
        save_json({"format": EVAL_FORMAT, "checkpoint": str(checkpoint), "split": split, "fold5": fold5,
                   **(result.to_dict() if result is not None else {}),
                   **({"shortlist": short.to_dict(), "exhaustive_seconds": seconds} if short is not None else {})},
                  json_out)
    return CheckpointEval(net.kind, result, short, seconds if short is not None else None)


def export_checkpoint(model: str, checkpoint: Optional[Path] = None, out: Optional[Path] = None,
                      precision: Sequence[str] = ("fp32", "fp16"), data: Path = DEFAULT_DATA,
                      engine: Optional[bool] = None, regions: Optional[int] = None, opset: int = OPSET,
                      profile: Optional[ProfileShapes] = None, build: Optional[BuildOptions] = None,
                      overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """``xmr export``: the ONNX graphs of ``checkpoint`` (default ``ensure_checkpoint(model)``)
    in ``out`` (default ``artifacts/MODEL``), fp32 always and the other ``precision`` names;
    int8 runs ``calibrate_artifacts`` with its defaults on ``data``. TensorRT engines as
    ``export_artifacts`` builds them (``engine``). Returns the manifest. The options and
    ``out`` are checked before any training or export."""
    precisions = tuple(precision)
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ExportError(f"unknown precision {', '.join(sorted(unknown))}; choose from {', '.join(PRECISIONS)}")
    out = Path(out) if out is not None else artifact_directory(model)
    check_export_options(regions, opset)
    check_output_dir(out, is_artifact_directory, overwrite, "artifact directory")  # before any training
    path = checkpoint or ensure_checkpoint(model, show_progress=show_progress)
    exported = tuple(dict.fromkeys(("fp32", *(p for p in precisions if p != "int8"))))
    with console.status(f"exporting {model} from {path}") if show_progress else contextlib.nullcontext():
        manifest = export_artifacts(path, out, exported, regions, opset, engine, profile, build,
                                    expected_model=model, overwrite=overwrite)
    if "int8" in precisions:
        manifest = calibrate_artifacts(out, data, engine=engine, show_progress=show_progress, expected_model=model)
    return manifest


def ensure_artifacts(model: str, out: Optional[Path] = None, checkpoint: Optional[Path] = None,
                     data: Path = DEFAULT_DATA, show_progress: bool = True) -> Path:
    """The artifact directory ``out`` (default ``artifacts/MODEL``); when it has no manifest,
    ``export_checkpoint(model, checkpoint, out)`` with the export defaults first (which
    trains ``ensure_checkpoint(model)`` when ``checkpoint`` is None and that is missing).
    Nothing is exported when the manifest exists."""
    out = Path(out) if out is not None else artifact_directory(model)
    if (out / MANIFEST).is_file():
        return out
    if show_progress:
        console.print(f"no artifacts in {out}: exporting {model} first")
    export_checkpoint(model, checkpoint, out, data=data, show_progress=show_progress)
    return out


def calibrate_model(model: str, artifacts: Optional[Path] = None, checkpoint: Optional[Path] = None,
                    data: Path = DEFAULT_DATA, config: Optional[CalibrationConfig] = None,
                    accuracy_target: float = DEFAULT_TARGET, eval_split: str = "dev", eval_images: int = 100,
                    report_split: Optional[str] = "test", sensitivity: bool = False, engine: Optional[bool] = None,
                    show_progress: bool = True) -> dict[str, Any]:
    """``xmr calibrate``: INT8 graphs added to ``ensure_artifacts(model, artifacts, checkpoint)``,
    calibrated on ``data`` with ``config`` (see ``calibrate_artifacts``; ``report_split=None``
    skips the report). Returns the manifest."""
    artifacts = ensure_artifacts(model, artifacts, checkpoint, data, show_progress=show_progress)
    return calibrate_artifacts(artifacts, data, config, accuracy_target=accuracy_target, eval_split=eval_split,
                               eval_images=eval_images, report_split=report_split, measure_sensitivity=sensitivity,
                               engine=engine, show_progress=show_progress, expected_model=model)
