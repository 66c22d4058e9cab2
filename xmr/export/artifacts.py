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
import platform
from pathlib import Path
from typing import Any

from xmr.config import config_to_dict
from xmr.errors import ExportError
from xmr.export.graphs import GRAPHS, graph_specs
from xmr.export.onnx_export import OPSET, TOLERANCES, export_model
from xmr.export.precision import graph_path
from xmr.export.tensorrt import BuildOptions, ProfileShapes, build_engine, load_tensorrt
from xmr.models.checkpoint import file_sha256, load_checkpoint

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_REGIONS = 36  # bottom-up features; checkpoints trained by xmr record their own


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("xmr", "torch", "onnx", "onnxruntime", "onnxconverter-common"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _engines(out_dir: Path, specs: dict, precisions: tuple[str, ...], profile: ProfileShapes,
             options: BuildOptions, required: bool) -> dict[str, Any]:
    """Build TensorRT engines on this machine's GPU, or say why not (an error if ``required``)."""
    import torch

    trt = load_tensorrt("tensorrt")
    reason = ("TensorRT is not installed (pip install tensorrt)" if trt is None
              else "no CUDA GPU is available" if not torch.cuda.is_available() else None)
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
    others = tuple(p for p in precisions if p != "fp32")
    parity = export_model(model, out_dir, regions=regions, precisions=others, opset=opset)
    specs = graph_specs(model, regions)
    vocab_file = None
    if model.vocab is not None:
        vocab_file = out_dir / "vocab.json"
        vocab_file.write_text(json.dumps(model.vocab.to_dict()))
    manifest = {
        "format": "xmr-artifacts", "format_version": MANIFEST_VERSION,
        "model": model.kind, "config": config_to_dict(model.config), "regions": regions,
        "vocab": None if vocab_file is None else {"file": vocab_file.name, "sha256": file_sha256(vocab_file)},
        "source_checkpoint": {"path": str(checkpoint), "sha256": model.checkpoint_sha256},
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
        else _engines(out_dir, specs, tuple(parity), profile, build, required=bool(engine)),
        "tools": tool_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

