"""The ``xmr`` command line: thin wrappers over the library, one function per command.

Each command parses its options, builds the configs, calls one library function with the same
parameter names (``xmr.train.defaults``: ``train_model``, ``evaluate_checkpoint``,
``export_checkpoint``, ``calibrate_model``; ``write_synthetic``, ``convert_authors_checkpoint``,
``run_serve_bench``) and prints what it returned. Model choices come from the registry.

Errors users cause (``XmrError``, missing files, unwritable outputs, bad options) print one
line, ``error: ...``, on stderr and exit with status 2; Ctrl-C prints ``interrupted`` and
exits 130. Anything else is a bug and keeps its traceback (``XMR_DEBUG=1`` shows it for
user errors too).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from typer._click import exceptions as click_errors

# Only what the options need is imported here (no torch, no onnx): ``xmr --help`` and a mistyped
# option answer at once; each command imports the library it calls.
from xmr.calibration.config import METHODS
from xmr.data import DEFAULT_DATA
from xmr.errors import InputError, XmrError
from xmr.models.config import IMRAM_MODES, SIZES
from xmr.models.registry import cross_attention_models, list_models
from xmr.progress import console

app = typer.Typer(help="Fast inference runtime for cross-attention text-image retrieval (CAMP, IMRAM).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
data_app = typer.Typer(help="Datasets in the SCAN precomp format.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# OSErrors a user causes (a path, a full or read-only disk): one line, like XmrError
USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EISDIR,
               errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.ENAMETOOLONG, errno.ELOOP, errno.EXDEV, errno.EFBIG}
RAY_HELP = 'Run on Ray (pip install -e ".[ray]"): a local cluster on this machine, or the one --ray-address names.'
RAY_ADDRESS_HELP = "A running Ray cluster, HEAD:6379 (implies --ray)."
WORKERS_HELP = "Ray actors [default: one per GPU, else one per 4 CPUs]."
OVERWRITE_HELP = "Replace what is at the output path even if xmr did not write it."


def _choices(name: str, values: Sequence[str]) -> type[Enum]:
    """An option's choices as the str Enum Typer takes, from the library's own list."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


# Choices come from the library: a newly registered model (or size, method) appears here by itself.
ModelKind = _choices("ModelKind", list_models())  # every registered model (train)
CrossAttentionModel = _choices("CrossAttentionModel", cross_attention_models())  # export, calibrate, serve-bench
AuthorsModel = _choices("AuthorsModel", cross_attention_models())  # import-checkpoint: the authors released both
ImramMode = _choices("ImramMode", sorted(IMRAM_MODES, key=lambda m: m != "full"))  # the default first
Size = _choices("Size", list(SIZES))
CalibrationMethodName = _choices("CalibrationMethodName", METHODS)


def one_line(message: object) -> str:
    """``message`` on one line, whatever it holds (lists, newlines) and however wide the terminal."""
    return "; ".join(" ".join(part.split()) for part in str(message).splitlines() if part.strip())


def _fail(message: object, status: int = 2) -> int:
    sys.stderr.write(f"error: {one_line(message)}\n" if status == 2 else f"{one_line(message)}\n")
    sys.stderr.flush()
    return status


def _os_message(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


def run(argv: Sequence[str]) -> int:
    """Run ``xmr`` with ``argv`` (without the program name); returns the exit status."""
    command = typer.main.get_command(app)
    debug = bool(os.environ.get("XMR_DEBUG"))
    try:
        with command.make_context("xmr", list(argv)) as ctx:
            command.invoke(ctx)
    except typer.Exit as e:
        return e.exit_code
    except click_errors.NoArgsIsHelpError:
        return 0  # the help was printed
    except click_errors.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "xmr"
        return _fail(f"{where}: {e.format_message()} (see {where} --help)")
    except (KeyboardInterrupt, typer.Abort):
        return _fail("interrupted", 130)
    except (XmrError, FileNotFoundError) as e:
        if debug:
            raise
        return _fail(e)
    except OSError as e:
        if debug or e.errno not in USER_ERRNOS:
            raise
        return _fail(_os_message(e))
    return 0


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(DEFAULT_DATA, "--out", "-o", help="Directory to write the dataset to."),
    n_train: int = typer.Option(2000, help="Training images (5 captions each)."),
    n_dev: int = typer.Option(200, help="Dev images."),
    n_test: int = typer.Option(500, help="Test images."),
    regions: int = typer.Option(12, help="Regions per image."),
    objects: int = typer.Option(3, help="Objects per image (the rest of the regions are clutter)."),
    img_dim: int = typer.Option(128, help="Region feature size."),
    noise: float = typer.Option(0.5, help="Per-region noise, relative to a prototype's norm."),
    scale: float = typer.Option(10.0, help="Norm of the region prototypes (real bottom-up features: tens)."),
    seed: int = typer.Option(0, help="Random seed; the same options give the same files."),
    vocab: Optional[Path] = typer.Option(None, help="Write this SCAN vocabulary (e.g. the Flickr30K one) instead of the small built-in one."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Write a synthetic dataset (train/dev/test) where cross-attention matters."""
    from xmr.data import SynthConfig, Vocabulary, write_synthetic

    cfg = SynthConfig(n_train=n_train, n_dev=n_dev, n_test=n_test, regions=regions, objects=objects,
                      img_dim=img_dim, noise=noise, scale=scale, seed=seed)
    write_synthetic(out, cfg, Vocabulary.load(vocab) if vocab else None, overwrite=overwrite)
    console.print(f"wrote synthetic dataset to {out}")


@app.command()
def train(
    model: ModelKind = typer.Option(..., "--model", "-m", help="Model to train."),
    data: Path = typer.Option(DEFAULT_DATA, help="Precomp data directory (train and dev splits)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory [default: runs/MODEL]."),
    vocab: Optional[Path] = typer.Option(None, help="Vocabulary JSON [default: the one in --data]."),
    size: Size = typer.Option(Size("small"), help="small: D=64, word_dim=64, prefilter 64; paper: D=1024, "
                                                  "word_dim=300, prefilter 256."),
    embed_size: Optional[int] = typer.Option(None, help="Joint embedding size D (overrides --size)."),
    word_dim: Optional[int] = typer.Option(None, help="Word embedding size (overrides --size)."),
    prefilter_dim: Optional[int] = typer.Option(None, help="Global vectors of the prefilter head trained beside "
                                                "CAMP/IMRAM (overrides --size; 0: no head)."),
    prefilter_weight: float = typer.Option(1.0, help="Weight of the prefilter head's contrastive loss."),
    prefilter_epochs: int = typer.Option(10, help="Then epochs refining the head on the best checkpoint's frozen "
                                         "encoders (as xmr distill)."),
    mode: ImramMode = typer.Option(ImramMode("full"), help="IMRAM matching mode."),
    steps: int = typer.Option(3, help="IMRAM matching steps K."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs [default: 4; camp: 8]."),
    batch_size: int = typer.Option(64, help="Captions per batch."),
    lr: float = typer.Option(1e-3, help="Initial Adam learning rate."),
    lr_update: Optional[int] = typer.Option(None, help="Decay the learning rate x0.1 every this many epochs "
                                            "[default: 2; camp: 4]."),
    grad_clip: float = typer.Option(2.0, help="Gradient norm clipping threshold."),
    warmup_epochs: int = typer.Option(2, help="Epochs on all negatives before the hardest-negative loss."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    seed: int = typer.Option(0, help="Random seed."),
    max_steps: int = typer.Option(0, help="Stop after this many steps (0: run all epochs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Train CAMP, IMRAM or the dual-encoder baseline; keeps the best dev-rsum checkpoint."""
    from xmr.train import default_config
    from xmr.train.defaults import train_model

    schedule = {name: value for name, value in (("epochs", epochs), ("lr_update", lr_update)) if value is not None}
    config = default_config(model.value, **schedule, batch_size=batch_size, learning_rate=lr, grad_clip=grad_clip,
                            warmup_epochs=warmup_epochs, seed=seed, device=device, max_steps=max_steps,
                            prefilter_weight=prefilter_weight, prefilter_epochs=prefilter_epochs)
    run = train_model(model.value, data=data, out=out, vocab=vocab, size=size.value, embed_size=embed_size,
                      word_dim=word_dim, mode=mode.value, steps=steps, config=config, overwrite=overwrite,
                      global_dim=prefilter_dim)
    console.print(f"best dev rsum {run.log['best_dev_rsum']:.1f}; checkpoint: {run.checkpoint}")


def _report_table(title: str, metrics: dict[str, float]) -> Table:
    table = Table(title=title)
    for name in ("i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "rsum", "i2t medr", "t2i medr"):
        table.add_column(name, justify="right")
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr")
    table.add_row(*(f"{metrics[k]:.1f}" for k in keys))
    return table


def _shortlist_table(title: str, rows: list[tuple[str, dict[str, float], str, str]]) -> Table:
    table = Table(title=title)
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    for name in ("", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "rsum", "pairs scored", "s"):
        table.add_column(name, justify="right")
    for name, metrics, pairs, seconds in rows:
        table.add_row(name, *(f"{metrics[k]:.1f}" for k in keys), pairs, seconds)
    return table


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Argument(..., help="xmr checkpoint (from `xmr train` or `xmr import-checkpoint`)."),
    data: Path = typer.Option(DEFAULT_DATA, help="Precomp data directory."),
    split: str = typer.Option("test", help="Split: train, dev, test or testall."),
    fold5: bool = typer.Option(False, help="COCO 1K protocol: mean over 5 folds of 1000 images."),
    vocab: Optional[Path] = typer.Option(None, help="Vocabulary JSON [default: the checkpoint's]."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics as JSON here."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    shortlist: Optional[int] = typer.Option(None, help="Two-stage: rescore only each query's K best by the prefilter "
                                            "head (ALBEF/BLIP k_test), both ways."),
    compare: bool = typer.Option(False, "--compare", help="With --shortlist: exhaustive recall beside it."),
    ray: bool = typer.Option(False, "--ray", help=RAY_HELP),
    ray_address: Optional[str] = typer.Option(None, help=RAY_ADDRESS_HELP),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
) -> None:
    """Recall@1/5/10 both ways, rsum, medr and meanr of a checkpoint on a split."""
    from xmr.train.defaults import evaluate_checkpoint

    measured = evaluate_checkpoint(checkpoint, data=data, split=split, fold5=fold5, vocab=vocab, device=device,
                                   json_out=json_out, overwrite=overwrite, shortlist=shortlist, compare=compare,
                                   ray=_ray_options(ray, ray_address, workers))
    title = f"{measured.kind} on {data}/{split}{' (5-fold 1K)' if fold5 else ''}"
    if measured.shortlist is None:
        console.print(_report_table(title, measured.result.report.to_dict()))
        return
    short = measured.shortlist
    rows = [(f"shortlist {short.k}", short.report.to_dict(), f"{short.pairs_scored:,}", f"{short.seconds:.1f}"),
            ("prefilter alone", short.prefilter.to_dict(), "0", "")]
    if measured.result is not None:
        rows.insert(0, ("exhaustive", measured.result.report.to_dict(), f"{short.exhaustive_pairs:,}",
                        f"{measured.exhaustive_seconds:.1f}"))
    console.print(_shortlist_table(title, rows))
    recall = short.prefilter_recall
    console.print(f"prefilter recall@{short.k}: i2t {100 * recall['i2t']:.1f}%, t2i {100 * recall['t2i']:.1f}%; "
                  f"cross-attention scored {short.pairs_scored:,} of {short.exhaustive_pairs:,} pairs "
                  f"({short.exhaustive_pairs / max(1, short.pairs_scored):.1f}x fewer)")


@app.command("distill")
def distill_command(
    checkpoint: Path = typer.Argument(..., help="xmr checkpoint to add a prefilter head to (its weights stay as they are)."),
    data: Path = typer.Option(DEFAULT_DATA, help="Precomp data directory (train and dev splits)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output checkpoint (default: CKPT.prefilter.pt beside CKPT)."),
    prefilter_dim: int = typer.Option(0, help="Global vectors of the head (0: the checkpoint's head's, else "
                                      "min(256, D))."),
    epochs: int = typer.Option(10, help="Epochs over the train captions."),
    batch_size: int = typer.Option(128, help="Distinct images per batch (one caption each)."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    kl_weight: float = typer.Option(1.0, help="Weight of the teacher's listwise KL beside the contrastive term."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    seed: int = typer.Option(0, help="Random seed."),
    max_steps: int = typer.Option(0, help="Stop after this many steps (0: run all epochs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Train a prefilter head on a checkpoint's frozen encoders, its cross-attention scores the teacher."""
    from xmr.train.distill import DistillConfig
    from xmr.train.defaults import distill_checkpoint

    config = DistillConfig(global_dim=prefilter_dim, epochs=epochs, batch_size=batch_size, learning_rate=lr,
                           kl_weight=kl_weight, device=device, seed=seed, max_steps=max_steps)
    run = distill_checkpoint(checkpoint, data=data, out=out, config=config, overwrite=overwrite)
    before, after = run.log["before"], run.log["dev"]
    table = Table(title=f"prefilter recall@K on {data}/dev (untrained head -> distilled)")
    for name in before:
        table.add_column(name, justify="right")
    table.add_row(*(f"{before[n]:.1f} -> {after[n]:.1f}" for n in before))
    console.print(table)
    console.print(f"checkpoint with the head: {run.checkpoint} (export it: xmr export --checkpoint {run.checkpoint})")


@app.command("import-checkpoint")
def import_checkpoint(
    path: Path = typer.Argument(..., help="Checkpoint saved by the authors' CAMP or IMRAM training code."),
    model: AuthorsModel = typer.Option(..., "--model", "-m", help="Which authors' code saved it."),
    vocab: Path = typer.Option(..., help="The SCAN vocabulary JSON it was trained with."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the xmr checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Convert an authors' checkpoint to an xmr checkpoint (no authors' code, easydict or GPU needed)."""
    from xmr.models.authors import convert_authors_checkpoint

    net = convert_authors_checkpoint(path, model.value, vocab=vocab, out=out, overwrite=overwrite)
    console.print(f"wrote {out}: {net.kind} {json.dumps(vars(net.config))}", highlight=False)


def _print_export(manifest: dict, out: Path) -> None:
    for name, graph in manifest["graphs"].items():
        for p, entry in graph["files"].items():
            if "max_abs_diff_vs_torch_fp32" in entry:  # int8 entries are checked by calibration, below
                worst = max(entry["max_abs_diff_vs_torch_fp32"].values())
                console.print(f"{name:14} {p}: {out / entry['file']}  max |diff| vs PyTorch {worst:.2g}")
    engines = manifest["engines"]
    console.print("TensorRT engines: " + (f"built for {engines['gpu']}" if engines["built"]
                                          else f"skipped ({engines['reason']})"))


def _print_int8(manifest: dict, artifacts: Path) -> None:
    """The INT8 graphs of ``manifest`` and the accuracy report beside it."""
    from xmr.calibration.report import REPORT

    for graph, entry in manifest["int8"]["nodes"].items():
        console.print(f"{graph:14} int8: {artifacts / manifest['graphs'][graph]['files']['int8']['file']}  "
                      f"{len(entry['quantized'])} matmuls in INT8, {len(entry['fallback'])} kept in float32")
    path = artifacts / f"{REPORT}.json"
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    table = Table(title=f"{report['model']} on {report['split']}: fp32 vs lower precisions (ONNX Runtime CPU)")
    for name in ("precision", "rsum", "Δ rsum", "mean |err|", "max |err|", "ρ i2t", "ρ t2i", "worst ρ"):
        table.add_column(name, justify="right")
    for name, r in report["rows"].items():
        table.add_row(name, f"{r['rsum']:.1f}", f"{r['delta_rsum']:+.1f}", f"{r['mean_abs_score_error']:.2g}",
                      f"{r['max_abs_score_error']:.2g}", f"{r['i2t_spearman_mean']:.4f}", f"{r['t2i_spearman_mean']:.4f}",
                      f"{min(r['i2t_spearman_min'], r['t2i_spearman_min']):.3f}")
    console.print(table)
    console.print(report["verdict"], highlight=False)


@app.command("export")
def export_command(
    model: CrossAttentionModel = typer.Option(..., "--model", "-m", help="Model to export."),
    checkpoint: Optional[Path] = typer.Option(None, help="xmr checkpoint [default: runs/MODEL/checkpoint.pt, "
                                                          "trained on the synthetic data first if missing]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact directory [default: artifacts/MODEL]."),
    precision: str = typer.Option("fp32,fp16", help="Comma-separated precisions: fp32, fp16, bf16, int8 (fp32 is "
                                                    "always written; bf16 is validated with OpenVINO and builds "
                                                    "TensorRT engines on SM80+ only; int8 runs `xmr calibrate` with "
                                                    "its defaults)."),
    data: Path = typer.Option(DEFAULT_DATA, help="Precomp data for int8 calibration."),
    engine: Optional[bool] = typer.Option(None, "--engine/--no-engine",
                                          help="Build TensorRT engines [default: when TensorRT and a GPU are present]."),
    regions: Optional[int] = typer.Option(None, help="Regions per image R [default: the checkpoint's training data, else 36]."),
    max_images: int = typer.Option(64, help="TensorRT profile: most images per block."),
    max_captions: int = typer.Option(256, help="TensorRT profile: most captions per block."),
    max_length: int = typer.Option(64, help="TensorRT profile: longest caption in tokens."),
    opset: int = typer.Option(18, help="ONNX opset (18 is parsed by TensorRT 10 and 11)."),
    workspace_gib: float = typer.Option(4.0, help="TensorRT builder workspace limit, GiB."),
    optimization_level: int = typer.Option(3, help="TensorRT builder optimisation level (0-5)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Export a CAMP or IMRAM checkpoint to ONNX (image encoder, text encoder, pair scorer),
    check every graph against PyTorch, and build TensorRT engines where possible."""
    from xmr.export.tensorrt import BuildOptions, ProfileShapes
    from xmr.train.defaults import artifact_directory, export_checkpoint

    out = out or artifact_directory(model.value)
    profile = ProfileShapes.up_to(max_images, max_captions, max_length)
    build = BuildOptions.from_gib(workspace_gib, optimization_level)
    precisions = _names(precision) or ()
    manifest = export_checkpoint(model.value, checkpoint=checkpoint, out=out, precision=precisions, data=data,
                                 engine=engine, regions=regions, opset=opset, profile=profile, build=build,
                                 overwrite=overwrite)
    _print_export(manifest, out)
    if "int8" in precisions:
        _print_int8(manifest, out)
    console.print(f"manifest: {out / 'manifest.json'}")


@app.command("calibrate")
def calibrate_command(
    model: CrossAttentionModel = typer.Option(..., "--model", "-m", help="Model to quantize."),
    artifacts: Optional[Path] = typer.Option(None, help="Artifact directory [default: artifacts/MODEL, exported first if missing]."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint to export when there are no artifacts yet "
                                                          "[default: runs/MODEL/checkpoint.pt]."),
    data: Path = typer.Option(DEFAULT_DATA, help="Precomp data directory (calibration, evaluation and report splits)."),
    split: str = typer.Option("train", "--split", help="Calibration split: train or dev (never test)."),
    images: int = typer.Option(128, "--calibration-images", help="Images sampled for calibration (with all their captions)."),
    method: CalibrationMethodName = typer.Option(CalibrationMethodName("minmax"), help="How activation ranges are chosen."),
    percentile: float = typer.Option(99.999, help="Percentile of |activation| kept (--method percentile)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    accuracy_target: float = typer.Option(0.99, help="Fraction of fp32 to keep on the evaluation split: rsum and mean "
                                                     "per-query rank correlation; nodes fall back to float32 until met."),
    eval_split: str = typer.Option("dev", help="Split the accuracy target is checked on (train or dev)."),
    eval_images: int = typer.Option(100, help="Images of the evaluation split used (with their captions)."),
    report_split: str = typer.Option("test", help="Split of the final accuracy report ('none' to skip)."),
    sensitivity: bool = typer.Option(False, "--sensitivity/--no-sensitivity",
                                     help="Measure every node's sensitivity even when no fallback is needed."),
    engine: Optional[bool] = typer.Option(None, "--engine/--no-engine",
                                          help="Build INT8 TensorRT engines [default: when TensorRT and a GPU are present]."),
) -> None:
    """INT8 graphs (explicit Q/DQ) calibrated on real data, with an accuracy report against fp32/fp16."""
    from xmr.calibration.config import CalibrationConfig
    from xmr.train.defaults import artifact_directory, calibrate_model

    artifacts = artifacts or artifact_directory(model.value)
    config = CalibrationConfig(split=split, images=images, method=method.value, percentile=percentile, seed=seed)
    manifest = calibrate_model(model.value, artifacts=artifacts, checkpoint=checkpoint, data=data, config=config,
                               accuracy_target=accuracy_target, eval_split=eval_split, eval_images=eval_images,
                               report_split=None if report_split == "none" else report_split,
                               sensitivity=sensitivity, engine=engine)
    _print_int8(manifest, artifacts)


@app.command("serve-bench")
def serve_bench_command(
    model: CrossAttentionModel = typer.Option(CrossAttentionModel("imram"), "--model", "-m", help="Model to measure."),
    checkpoint: Optional[Path] = typer.Option(None, help="Weights to measure [default: random seeded weights at the "
                                                          "released sizes: D 1024, 36 x 2048-d regions, word_dim 300]."),
    artifacts: Optional[Path] = typer.Option(None, help="Existing artifact directory to measure [default: built under "
                                                         "OUT/artifacts, once]."),
    data: Optional[Path] = typer.Option(None, help="Precomp data whose test split gives each row's recall "
                                                   "[default: synthetic data of the model's shape]."),
    out: Path = typer.Option(Path("runs/serve-bench"), "--out", "-o", help="Where the report (JSON, PNG) goes."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run: 100 x 500 pairs, short timings."),
    images: Optional[int] = typer.Option(None, help="Images N of the N x 5N matrix [default: 1000, the Flickr30K 1K test]."),
    seconds: Optional[float] = typer.Option(None, help="Scoring time per backend/precision row, seconds [default: 15]."),
    online_seconds: Optional[float] = typer.Option(None, help="Time per online load setting, seconds [default: 4]."),
    gallery: Optional[int] = typer.Option(None, help="Online image gallery size [default: 100 on CPU, 1000 on GPU]."),
    backend: Optional[str] = typer.Option(None, help="Comma-separated backends to measure [default: all available]."),
    precision: Optional[str] = typer.Option(None, help="Comma-separated precisions to measure [default: all]."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda [default: cuda when present]."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    target: Optional[str] = typer.Option(None, help="Drive a running `xmr serve` instead: http://HOST:PORT or "
                                                    "grpc://HOST:PORT (queries: --data's test split; with "
                                                    "--artifacts, in-process submit rows beside it)."),
) -> None:
    """Throughput (full score matrix) and latency under load, per backend and precision, against
    the authors' evaluation loop and our PyTorch model, with each precision's recall."""
    import dataclasses

    if target is not None:
        _remote_serve_bench(target, data, artifacts, backend, precision, online_seconds, out, quick, overwrite)
        return
    import torch

    from xmr.benchmark.serve_bench import PLOT, ServeBenchConfig, run_serve_bench, write_report
    from xmr.benchmark.serve_report import plot_report, print_report

    config = ServeBenchConfig.quick() if quick else ServeBenchConfig()
    gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    offline = dataclasses.replace(config.offline, **{k: v for k, v in (("images", images), ("seconds", seconds))
                                                     if v is not None})
    if gallery is None and gpu and not quick:
        gallery = 1000
    online = dataclasses.replace(config.online, **{k: v for k, v in (
        ("seconds", online_seconds), ("gallery_images", gallery)) if v is not None})
    config = dataclasses.replace(
        config, model=model.value, checkpoint=checkpoint, artifacts=artifacts, data=data, out=out, device=device,
        backends=_names(backend), precisions=_names(precision), offline=offline, online=online, overwrite=overwrite)
    report = run_serve_bench(config)
    print_report(report, console)
    path = write_report(report, out)
    plot = plot_report(report, out / PLOT)
    console.print(f"report: {path}" + (f", plot: {plot}" if plot else " (no plot: pip install matplotlib)"))


SERVE_SESSION = """A session (docs/serving.md): start, wait for ready, search from Python.

\b
  xmr serve --artifacts artifacts/imram --images data/synth/test_ims.npy \\
      --captions data/synth/test_caps.txt
  curl -s -o /dev/null -w "%{http_code}\\n" localhost:8000/v2/health/ready  # 200

\b
  import numpy as np, tritonclient.http as http
  client = http.InferenceServerClient("127.0.0.1:8000")
  text = http.InferInput("text", [1, 1], "BYTES")
  text.set_data_from_numpy(np.array([[b"a dog runs ."]], dtype=object))
  print(client.infer("xmr_search_text", [text]).as_numpy("indices"))
"""


INSTANCES_HELP = "Instances per model: processes, each with its own scorer and gallery, running batches side by side."


@app.command("serve", epilog=SERVE_SESSION)
def serve_command(
    artifacts: Path = typer.Option(..., help="Artifact directory (xmr export)."),
    images: Path = typer.Option(..., help="Image gallery: region features .npy [N, R, img_dim] or a saved gallery."),
    captions: Optional[Path] = typer.Option(None, help="Caption gallery for xmr_search_image: a .txt (one caption "
                                                       "per line) or a saved gallery [default: none]."),
    backend: str = typer.Option("auto", help="auto, tensorrt, onnxruntime, openvino or torch."),
    precision: str = typer.Option("fp32", help="fp32, fp16, bf16 or int8."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda [default: cuda when present]."),
    threads: Optional[int] = typer.Option(None, help="CPU threads per model instance [default: the available "
                                                     "cores / --instances; idle models do not spin]."),
    instances: int = typer.Option(1, help=INSTANCES_HELP),
    k: int = typer.Option(10, help="Results per query when a request sends no k."),
    shortlist: Optional[int] = typer.Option(None, help="Two-stage search: gallery items rescored per query "
                                                       "[default: exhaustive]."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    http_port: int = typer.Option(8000, help="HTTP (KServe v2) port."),
    grpc_port: int = typer.Option(8001, help="gRPC (KServe v2) port."),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port."),
    max_batch: int = typer.Option(64, help="Triton's max_batch_size: rows (queries, pairs) per batch."),
    max_queue_delay_us: int = typer.Option(2000, help="How long a request waits for others to batch with, µs."),
    max_queue: int = typer.Option(256, help="Requests waiting per model; beyond it requests are rejected."),
) -> None:
    """Serve search and pair scoring over HTTP and gRPC with NVIDIA Triton Inference Server
    (PyTriton; pip install -e ".[serve]"). Stops on Ctrl-C or SIGTERM after in-flight requests."""
    from xmr.serve.repository import ServeConfig
    from xmr.serve.server import serve

    serve(ServeConfig(artifacts=str(artifacts), images=str(images), captions=None if captions is None else str(captions),
                      backend=backend, precision=precision, device=device, threads=threads, instances=instances, k=k,
                      shortlist=shortlist, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                      max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, max_queue=max_queue),
          announce=lambda line: console.print(line, soft_wrap=True))


@app.command("score-matrix")
def score_matrix_command(
    artifacts: Path = typer.Option(..., help="Artifact directory (xmr export)."),
    images: Path = typer.Option(..., help="Region features .npy [N, R, img_dim] (memory-mapped)."),
    captions: Path = typer.Option(..., help="Captions .txt, one per line."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (rerunning the same job resumes it)."),
    top_k: Optional[int] = typer.Option(None, help="Keep per image the K best captions and per caption the K best "
                                                   "images instead of the full matrix."),
    backend: str = typer.Option("auto", help="auto, tensorrt, onnxruntime, openvino or torch."),
    precision: str = typer.Option("fp32", help="fp32, fp16, bf16 or int8."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda [default: cuda when present]."),
    ray: bool = typer.Option(False, "--ray", help=RAY_HELP),
    ray_address: Optional[str] = typer.Option(None, help=RAY_ADDRESS_HELP),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    tile_images: int = typer.Option(512, help="Images per tile."),
    tile_captions: int = typer.Option(2048, help="Captions per tile."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Score every (image, caption) pair into a memory-mapped matrix (or per-row/column
    top-K), in tiles, in this process or on a Ray cluster; same results either way."""
    from xmr.matrix import MatrixJob, score_matrix

    options = _ray_options(ray, ray_address, workers)
    job = MatrixJob(artifacts=str(artifacts), images=str(images), captions=str(captions), backend=backend,
                    precision=precision, device=device, top_k=top_k, tile_images=tile_images,
                    tile_captions=tile_captions)
    result = score_matrix(job, out, ray=options, overwrite=overwrite)
    what = f"top-{top_k}" if top_k else "full matrix"
    console.print(f"wrote {out}: {what} of {result['shape'][0]} x {result['shape'][1]} pairs, {result['scored']} "
                  f"tiles scored, {result['skipped']} resumed", soft_wrap=True)


@app.command("triton-repo")
def triton_repo_command(
    artifacts: Path = typer.Option(..., help="Artifact directory (xmr export)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the model repository (a new directory)."),
    precision: str = typer.Option("fp32", help="Which exported graphs (or TensorRT engines) to serve: fp32, fp16, "
                                               "bf16 or int8."),
    images: Optional[Path] = typer.Option(None, help="Image gallery for xmr_search_text, copied in: features .npy "
                                                     "or a saved gallery [default: no xmr_search_text]."),
    captions: Optional[Path] = typer.Option(None, help="Caption gallery for xmr_search_image: .txt or a saved "
                                                       "gallery [default: no xmr_search_image]."),
    k: int = typer.Option(10, help="Results per query when a request sends no k."),
    shortlist: Optional[int] = typer.Option(None, help="Two-stage search: gallery items rescored per query."),
    max_batch: int = typer.Option(64, help="Front models' max_batch_size: rows per batch."),
    max_queue_delay_us: int = typer.Option(2000, help="How long a request waits for others to batch with, µs."),
    max_queue: int = typer.Option(256, help="Requests waiting per front model; beyond it requests are rejected."),
    instances: int = typer.Option(1, help=INSTANCES_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Write a Triton model repository for GPU fleets: the three graphs as tensorrt_plan models
    (when the artifacts hold engines of PRECISION) or onnxruntime models, and Python-backend
    (BLS) models with xmr serve's tensor names that schedule pair scoring over them."""
    from xmr.serve.graph_repository import write_graph_repository
    from xmr.serve.repository import ServeConfig

    config = ServeConfig(artifacts=str(artifacts), images=None if images is None else str(images),
                         captions=None if captions is None else str(captions), precision=precision, k=k,
                         shortlist=shortlist, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
                         max_queue=max_queue, instances=instances)
    record = write_graph_repository(out, config, overwrite=overwrite)
    console.print(f"wrote {out}: {record['graphs']} graphs ({precision}), models {', '.join(record['models'])}",
                  soft_wrap=True)


def _remote_serve_bench(target: str, data: Optional[Path], artifacts: Optional[Path], backend: Optional[str],
                        precision: Optional[str], seconds: Optional[float], out: Path, quick: bool,
                        overwrite: bool) -> None:
    from xmr.benchmark.remote_bench import RemoteConfig, remote_serve_bench
    from xmr.benchmark.serve_bench import REMOTE_REPORT, is_serve_bench_output
    from xmr.benchmark.serve_report import remote_table
    from xmr.outputs import check_output_dir, write_text

    config = RemoteConfig(target, **({"seconds": seconds} if seconds is not None else {"seconds": 1.5} if quick else {}),
                          **({"clients": (1, 4), "load_fractions": (0.7,)} if quick else {}))
    check_output_dir(out, is_serve_bench_output, overwrite, "serve-bench output")
    report = remote_serve_bench(config, data or DEFAULT_DATA, artifacts, backend or "auto", precision or "fp32")
    console.print(remote_table(report))
    path = write_text(out / REMOTE_REPORT, json.dumps(report, indent=2) + "\n")
    console.print(f"report: {path}")


def _ray_options(ray: bool, address: Optional[str], workers: Optional[int]) -> Any:
    """``--ray``, ``--ray-address``, ``--workers`` as ``RayOptions`` (None: not on Ray)."""
    from xmr.matrix.run import RayOptions

    if not ray and address is None:
        if workers is not None:
            raise InputError("--workers needs --ray")
        return None
    return RayOptions(address, workers)


def _names(value: Optional[str]) -> Optional[tuple[str, ...]]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
