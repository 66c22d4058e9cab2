"""``xmr export``: a checkpoint in, one self-describing artifact directory out.

``<out>/manifest.json`` is the only way the runtime reads an artifact directory: model kind
and config, vocabulary (``vocab.json`` beside it, with its sha256), the source checkpoint's
sha256, every graph file per precision with its inputs and outputs (names, dtypes, shapes
with named dynamic axes), the opset, the parity measured at export, TensorRT engines (or why
none were built), tool versions and the creation time.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

from xmr.config import config_to_dict
from xmr.errors import ExportError
from xmr.export.graphs import GRAPHS, GraphSpec, TensorSpec, graph_specs
from xmr.export.onnx_export import OPSET, TOLERANCES, export_model
from xmr.export.precision import graph_path
from xmr.export.tensorrt import BuildOptions, ProfileShapes, build_engine, load_tensorrt, tensorrt_unavailable
from xmr.models.checkpoint import file_sha256, load_checkpoint

MANIFEST = "manifest.json"
CHECKPOINT = "checkpoint.pt"  # a copy of the source checkpoint: the artifacts are self-contained
MANIFEST_VERSION = 1
DEFAULT_REGIONS = 36  # bottom-up features; checkpoints trained by xmr record their own


EXPORT_TOOLS = ("xmr", "torch", "onnx", "onnxruntime", "onnxconverter-common")


def tool_versions(packages: tuple[str, ...] = EXPORT_TOOLS) -> dict[str, str]:
    """Python's version and those of ``packages`` that are installed."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def read_manifest(artifacts: Path) -> dict[str, Any]:
    path = artifacts / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {artifacts}: not an xmr artifact directory (run `xmr export` first)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "xmr-artifacts" or manifest.get("format_version") != MANIFEST_VERSION:
        raise ExportError(f"{path} is not an xmr artifact manifest of version {MANIFEST_VERSION}; re-export it")
    return manifest


def write_manifest(artifacts: Path, manifest: dict[str, Any]) -> Path:
    """Replace ``artifacts/manifest.json`` atomically."""
    path = artifacts / MANIFEST
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, path)
    return path


def manifest_specs(manifest: dict[str, Any]) -> dict[str, GraphSpec]:
    """The graphs' input/output specs as recorded in a manifest."""
    return {name: GraphSpec(name, [TensorSpec(**t) for t in graph["inputs"]], [TensorSpec(**t) for t in graph["outputs"]])
            for name, graph in manifest["graphs"].items()}


def build_engines(out_dir: Path, specs: dict, precisions: tuple[str, ...], profile: ProfileShapes,
                  options: BuildOptions, required: bool) -> dict[str, Any]:
    """Build TensorRT engines on this machine's GPU, or say why not (an error if ``required``)."""
    import torch

    trt = load_tensorrt("tensorrt")
    reason = tensorrt_unavailable(trt)
    if reason is not None:
        if required:
            raise ExportError(f"cannot build TensorRT engines: {reason}")
        return {"built": False, "reason": reason}
    files = {}
    for name in GRAPHS:
        for precision in precisions:
            path = graph_path(out_dir, name, precision).with_suffix(".engine")
            path.write_bytes(build_engine(trt, graph_path(out_dir, name, precision), specs[name], profile, options))
            files.setdefault(name, {})[precision] = path.name
    major, minor = torch.cuda.get_device_capability()
    return {"built": True, "files": files, "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}", "workspace_bytes": options.workspace_bytes,
            "builder_optimization_level": options.optimization_level,
            "timing_cache": options.timing_cache.name if options.timing_cache else None}


def export_artifacts(checkpoint: Path, out_dir: Path, precisions: tuple[str, ...] = ("fp32", "fp16"),
                     regions: int | None = None, opset: int = OPSET, engine: bool | None = None,
                     profile: ProfileShapes | None = None, build: BuildOptions | None = None,
                     expected_model: str | None = None) -> dict[str, Any]:
    """Export ``checkpoint`` into ``out_dir`` and write its manifest; returns the manifest.

    ``engine``: None builds TensorRT engines when TensorRT and a GPU are present, True
    requires them, False skips them. ``regions`` defaults to the checkpoint's training data
    (its metadata), else ``DEFAULT_REGIONS``. ``expected_model``: refuse another kind."""
    model = load_checkpoint(checkpoint)
    if expected_model is not None and model.kind != expected_model:
        raise ValueError(f"{checkpoint} holds a {model.kind} model, not {expected_model}; "
                         f"pass --model {model.kind} or another --checkpoint")
    regions = regions or int(model.checkpoint_metadata.get("regions") or DEFAULT_REGIONS)
    profile = profile or ProfileShapes()
    build = build or BuildOptions(timing_cache=out_dir / "timing.cache")  # kept for rebuilds
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir, prefix=".export-"))
    try:
        manifest = _export_into(model, checkpoint, work, regions, precisions, opset, engine, profile, build)
        install_artifacts(out_dir, work, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _export_into(model, checkpoint: Path, out_dir: Path, regions: int, precisions: tuple[str, ...], opset: int,
                 engine: bool | None, profile: ProfileShapes, build: BuildOptions) -> dict[str, Any]:
    others = tuple(p for p in precisions if p != "fp32")
    parity = export_model(model, out_dir, regions=regions, precisions=others, opset=opset)
    specs = graph_specs(model, regions)
    shutil.copyfile(checkpoint, out_dir / CHECKPOINT)  # the runtime's PyTorch backend loads it from here
    vocab_file = None
    if model.vocab is not None:
        vocab_file = out_dir / "vocab.json"
        vocab_file.write_text(json.dumps(model.vocab.to_dict()))
    return {
        "format": "xmr-artifacts", "format_version": MANIFEST_VERSION,
        "model": model.kind, "config": config_to_dict(model.config), "regions": regions,
        "vocab": None if vocab_file is None else {"file": vocab_file.name, "sha256": file_sha256(vocab_file)},
        "source_checkpoint": {"path": str(checkpoint), "sha256": model.checkpoint_sha256},
        "checkpoint": {"file": CHECKPOINT, "sha256": model.checkpoint_sha256},
        "opset": opset,
        "graphs": {name: {"inputs": [dataclasses.asdict(t) for t in specs[name].inputs],
                          "outputs": [dataclasses.asdict(t) for t in specs[name].outputs],
                          "files": {p: {"file": graph_path(out_dir, name, p).name,
                                        "sha256": file_sha256(graph_path(out_dir, name, p)),
                                        "precision": p, "max_abs_diff_vs_torch_fp32": parity[p][name],
                                        "tolerance": TOLERANCES[p]} for p in parity}}
                   for name in GRAPHS},
        "profile": {axis: list(sizes) for axis, sizes in profile.sizes.items()},  # min, opt, max
        "engines": {"built": False, "reason": "not requested"} if engine is False
        else build_engines(out_dir, specs, tuple(parity), profile, build, required=bool(engine)),
        "tools": tool_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


ARTIFACT_EXTRAS = ("calibration", "int8_report.json", "int8_report.md")  # written by ``xmr calibrate``


def listed_files(manifest: dict[str, Any]) -> set[str]:
    """Every graph, engine and checkpoint file a manifest lists."""
    graphs = {f["file"] for g in manifest.get("graphs", {}).values() for f in g.get("files", {}).values()}
    checkpoint = {manifest["checkpoint"]["file"]} if manifest.get("checkpoint") else set()
    return graphs | checkpoint | {f for g in manifest.get("engines", {}).get("files", {}).values() for f in g.values()}


def install_artifacts(out_dir: Path, work: Path, manifest: dict[str, Any]) -> None:
    """Move the new files in ``work`` (same filesystem) into ``out_dir`` and write ``manifest``.

    The old manifest goes first and the new one is written last, so the directory never
    holds a manifest that lists missing or stale files. Files the old manifest listed and the
    new one does not, and INT8 extras not rewritten, are removed; other files are left alone."""
    old = out_dir / MANIFEST
    stale = set(ARTIFACT_EXTRAS)
    if old.is_file():
        try:
            stale |= listed_files(json.loads(old.read_text())) - listed_files(manifest)
        except (ValueError, AttributeError, KeyError, TypeError):
            pass
        old.unlink()
    for name in stale | {p.name for p in work.iterdir()}:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for path in work.iterdir():
        os.replace(path, out_dir / path.name)
    write_manifest(out_dir, manifest)
