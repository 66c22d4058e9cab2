"""``xmr export``: a checkpoint in, one self-describing artifact directory out.

``<out>/manifest.json`` is the only way the runtime reads an artifact directory (through
``xmr.export.manifest``, which imports no ``onnx``): model kind and config, vocabulary
(``vocab.json`` beside it, with its sha256), the source checkpoint's sha256, every graph file
per precision with its inputs and outputs (names, dtypes, shapes with named dynamic axes),
the opset, the parity measured at export, TensorRT engines (or why none were built), tool
versions and the creation time.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import platform
import shutil
from pathlib import Path
from typing import Any

from xmr.config import config_to_dict
from xmr.errors import ArtifactError, ExportError
from xmr.export.graphs import GRAPHS, graph_specs
from xmr.export.manifest import FORMAT, MANIFEST, MANIFEST_VERSION, OPENVINO_CACHE, listed_files, read_manifest
from xmr.export.onnx_export import OPSET, TOLERANCES, export_model
from xmr.export.precision import graph_path
from xmr.export.tensorrt import BuildOptions, ProfileShapes, build_engine, load_tensorrt, tensorrt_unavailable
from xmr.models.checkpoint import load_checkpoint
from xmr.outputs import check_output_dir, keep_foreign, staged_directory, write_text
from xmr.paths import file_sha256

CHECKPOINT = "checkpoint.pt"  # a copy of the source checkpoint: the artifacts are self-contained
DEFAULT_REGIONS = 36  # bottom-up features; checkpoints trained by xmr record their own
MAX_REGIONS = 1024  # bottom-up features have 10..100 regions; more is a mistake that would exhaust memory
MIN_OPSET, MAX_OPSET = 17, 20  # LayerNormalization-era opsets that onnx, ONNX Runtime and TensorRT all read
TIMING_CACHE = "timing.cache"  # TensorRT builder timings, kept across re-exports
EXPORT_TOOLS = ("xmr", "torch", "onnx", "onnxruntime", "onnxconverter-common", "ml_dtypes", "openvino")
BF16_MIN_CAPABILITY = (8, 0)  # TensorRT runs bfloat16 from Ampere on


def tool_versions(packages: tuple[str, ...] = EXPORT_TOOLS) -> dict[str, str]:
    """Python's version and those of ``packages`` that are installed."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def build_engines(out_dir: Path, specs: dict, precisions: tuple[str, ...], profile: ProfileShapes,
                  options: BuildOptions, required: bool) -> dict[str, Any]:
    """Build TensorRT engines on this machine's GPU, or say why not (an error if ``required``).
    A precision this GPU cannot run (bf16 before compute capability 8.0) is left out, the
    reason under ``skipped``."""
    import torch

    trt = load_tensorrt("tensorrt")
    if (reason := tensorrt_unavailable(trt)) is not None:
        if required:
            raise ExportError(f"cannot build TensorRT engines: {reason}")
        return {"built": False, "reason": reason}
    major, minor = torch.cuda.get_device_capability()
    skipped = {}
    if "bf16" in precisions and (major, minor) < BF16_MIN_CAPABILITY:
        skipped["bf16"] = f"bf16 engines need compute capability >= 8.0, this GPU has {major}.{minor}"
    files = {}
    for name in GRAPHS:
        for precision in (p for p in precisions if p not in skipped):
            path = graph_path(out_dir, name, precision).with_suffix(".engine")
            path.write_bytes(build_engine(trt, graph_path(out_dir, name, precision), specs[name], profile, options))
            files.setdefault(name, {})[precision] = {"file": path.name, "sha256": file_sha256(path)}
    return {"built": True, "files": files, "skipped": skipped, "tensorrt": trt.__version__,
            "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "workspace_bytes": options.workspace_bytes, "builder_optimization_level": options.optimization_level,
            "timing_cache": options.timing_cache.name if options.timing_cache else None}


def export_artifacts(checkpoint: Path, out_dir: Path, precisions: tuple[str, ...] = ("fp32", "fp16"),
                     regions: int | None = None, opset: int = OPSET, engine: bool | None = None,
                     profile: ProfileShapes | None = None, build: BuildOptions | None = None,
                     expected_model: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Export ``checkpoint`` into ``out_dir`` and write its manifest; returns the manifest.

    ``engine``: None builds TensorRT engines when TensorRT and a GPU are present, True
    requires them, False skips them. ``regions`` defaults to the checkpoint's training data
    (its metadata), else ``DEFAULT_REGIONS``. ``expected_model``: refuse another kind.
    ``out_dir`` is replaced as a whole (``install``); a non-empty directory that is not an
    artifact directory is refused unless ``overwrite``."""
    check_output_dir(out_dir, is_artifact_directory, overwrite, "artifact directory")
    check_export_options(regions, opset)
    model = load_checkpoint(checkpoint)
    if expected_model is not None and model.kind != expected_model:
        raise ExportError(f"{checkpoint} holds a {model.kind} model, not {expected_model}; "
                          f"pass --model {model.kind} or another --checkpoint")
    recorded = model.checkpoint_metadata.get("regions")
    regions = regions or (recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else DEFAULT_REGIONS)
    check_export_options(regions, opset)
    profile = profile or ProfileShapes()
    with staged_directory(out_dir) as work:
        copy_timing_cache(out_dir, work)
        options = dataclasses.replace(build or BuildOptions(), timing_cache=work / TIMING_CACHE)
        manifest = _export_into(model, checkpoint, work, regions, precisions, opset, engine, profile, options)
        install(out_dir, work, manifest)
    return manifest


def copy_timing_cache(old: Path, new: Path) -> None:
    """The TensorRT timing cache of ``old`` copied (not linked: the builder rewrites it) into ``new``."""
    if (old / TIMING_CACHE).is_file() and not (old / TIMING_CACHE).is_symlink():
        shutil.copy2(old / TIMING_CACHE, new / TIMING_CACHE)


def check_export_options(regions: int | None, opset: int) -> None:
    if regions is not None and not 1 <= regions <= MAX_REGIONS:
        raise ExportError(f"--regions {regions} is out of range: regions per image must be in 1..{MAX_REGIONS}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset} is out of range: xmr exports opsets {MIN_OPSET}..{MAX_OPSET} "
                          f"(TensorRT 10/11 parse up to {MAX_OPSET})")


def _export_into(model, checkpoint: Path, out_dir: Path, regions: int, precisions: tuple[str, ...], opset: int,
                 engine: bool | None, profile: ProfileShapes, build: BuildOptions) -> dict[str, Any]:
    parity = export_model(model, out_dir, regions=regions, precisions=precisions, opset=opset)  # fp32 always
    specs = graph_specs(model, regions)
    shutil.copyfile(checkpoint, out_dir / CHECKPOINT)  # the runtime's PyTorch backend loads it from here
    vocab_file = None
    if model.vocab is not None:
        vocab_file = out_dir / "vocab.json"
        model.vocab.save(vocab_file)
    return {
        "format": FORMAT, "format_version": MANIFEST_VERSION,
        "model": model.kind, "config": config_to_dict(model.config), "regions": regions,
        "vocab": None if vocab_file is None else {"file": vocab_file.name, "sha256": file_sha256(vocab_file)},
        "source_checkpoint": {"path": str(checkpoint), "sha256": model.checkpoint_sha256},
        "checkpoint": {"file": CHECKPOINT, "sha256": model.checkpoint_sha256},
        "opset": opset,
        "graphs": {name: {**specs[name].io(),
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


# written by ``xmr calibrate``, and by the runtime's openvino backend (re-export drops its cache)
ARTIFACT_EXTRAS = ("calibration", "int8_report.json", "int8_report.md", OPENVINO_CACHE)


def is_artifact_directory(directory: Path) -> bool:
    return bool(owned_entries(directory))  # empty only without a valid manifest


def owned_entries(directory: Path) -> set[str]:
    """The entries of an artifact directory that xmr wrote: its manifest, what the manifest
    lists and the extras export and calibrate write (nothing if there is no valid manifest)."""
    try:
        manifest = read_manifest(directory)
    except ArtifactError:
        return set()
    return {MANIFEST, TIMING_CACHE, *ARTIFACT_EXTRAS} | listed_files(manifest)


def install(out_dir: Path, work: Path, manifest: dict[str, Any], replaced: set[str] | None = None) -> None:
    """Complete the new artifact directory ``work`` (it becomes ``out_dir`` when the staging
    block ends): entries of ``out_dir`` that xmr did not write (a user's notes) are carried
    over; so are xmr's own unless ``replaced`` is None (a new export replaces all of them) or
    names them (calibrate replaces its INT8 files). The manifest is written last. Nothing
    outside ``out_dir`` is read for this or touched."""
    keep_foreign(out_dir, work, {MANIFEST} | (owned_entries(out_dir) if replaced is None else replaced))
    write_text(work / MANIFEST, json.dumps(manifest, indent=2) + "\n")
