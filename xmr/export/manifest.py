"""``manifest.json``, the one file through which an artifact directory is read: its name,
format and version, the structural check, the files it lists and the graph specs it records.

Light on purpose (no ``onnx``, no exporter): the runtime reads manifests through this module,
``xmr.export.artifacts`` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xmr.errors import ArtifactError
from xmr.export.graphs import (
    GLOBAL_OUTPUTS, GRAPHS, IMAGE_GLOBAL, N_CAPTIONS, N_IMAGES, TEXT_GLOBAL, GraphSpec, TensorSpec,
)
from xmr.paths import inside, require

MANIFEST = "manifest.json"
FORMAT = "xmr-artifacts"
MANIFEST_VERSION = 1
OPENVINO_CACHE = "openvino-cache"  # the runtime's compiled OpenVINO models, inside the artifact directory


def read_manifest(artifacts: Path) -> dict[str, Any]:
    """The manifest of an artifact directory, its structure checked (``ArtifactError`` naming
    what is wrong); the files it lists are checked when they are used (``xmr.paths.checked_file``)."""
    path = artifacts / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST} in {artifacts}: not an xmr artifact directory (run `xmr export` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({type(e).__name__}: {e}); re-export it") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("format_version") != MANIFEST_VERSION:
        raise ArtifactError(f"{path} is not an xmr artifact manifest of version {MANIFEST_VERSION}; re-export it")
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Every key the runtime and ``xmr calibrate`` read, with its type and consistency: one
    ``ArtifactError`` naming the first problem (the files themselves are checked when used)."""
    where = str(path)
    for key, kind in (("model", str), ("config", dict), ("regions", int), ("source_checkpoint", dict),
                      ("checkpoint", dict), ("graphs", dict), ("profile", dict), ("engines", dict)):
        require(manifest, key, kind, where)
    for key in ("img_dim", "vocab_size", "embed_size"):
        if require(manifest["config"], key, int, f"{where}: config") < 1:
            raise ArtifactError(f"{where}: config {key!r} must be >= 1, got {manifest['config'][key]}")
    if manifest["regions"] < 1:
        raise ArtifactError(f"{where}: 'regions' must be >= 1, got {manifest['regions']}")
    require(manifest["source_checkpoint"], "sha256", str, f"{where}: source_checkpoint")
    if manifest.get("vocab") is not None:
        require(manifest, "vocab", dict, where)
    names: dict[str, set[str]] = {}
    for graph in GRAPHS:
        entry = require(manifest["graphs"], graph, dict, f"{where}: graphs")
        for precision, file in require(entry, "files", dict, f"{where}: graphs.{graph}").items():
            require(file, "file", str, f"{where}: graphs.{graph}.files.{precision}")
        for side in ("inputs", "outputs"):
            for tensor in require(entry, side, list, f"{where}: graphs.{graph}"):
                context = f"{where}: graphs.{graph}.{side}"
                require(tensor, "name", str, context)
                require(tensor, "dtype", str, context)
                shape = require(tensor, "shape", list, context)
                if not shape or any(isinstance(d, bool) or not isinstance(d, (int, str)) for d in shape):
                    raise ArtifactError(f"{context}: {tensor['name']} has shape {shape!r}; dims are sizes or axis names"[:300])
            names[f"{graph}.{side}"] = {t["name"] for t in entry[side]}
    features = [t["shape"] for t in manifest["graphs"]["image_encoder"]["inputs"] if t["name"] == "features"]
    if features != [[N_IMAGES, manifest["regions"], manifest["config"]["img_dim"]]]:
        raise ArtifactError(f"{where}: image_encoder takes features {features}, not [n_images, regions "
                            f"{manifest['regions']}, img_dim {manifest['config']['img_dim']}] as the manifest says; re-export")
    encoded = (names["image_encoder.outputs"] | names["text_encoder.outputs"] | {"lengths"}) - set(GLOBAL_OUTPUTS)
    check_prefilter(manifest, where)
    if names["pair_scorer.inputs"] != encoded:
        raise ArtifactError(f"{where}: pair_scorer inputs {sorted(names['pair_scorer.inputs'])} are not the encoders' "
                            f"outputs {sorted(encoded)}; re-export")
    if "files" in manifest["engines"] and not isinstance(manifest["engines"]["files"], dict):
        raise ArtifactError(f"{where}: 'engines' must be an object with a 'files' object; re-export")
    for name in listed_files(manifest):  # plain names inside the directory, or the manifest is refused
        inside(path.parent, name, f"{where}: a listed file")


def check_prefilter(manifest: dict[str, Any], where: str) -> None:
    """The prefilter head's outputs: both encoders' or neither, ``[items, global_dim]`` as the config says."""
    dim = manifest["config"].get("global_dim", 0)
    graphs = manifest["graphs"]
    heads = {graph: [t["shape"] for t in graphs[graph]["outputs"] if t["name"] == name]
             for graph, name in (("image_encoder", IMAGE_GLOBAL), ("text_encoder", TEXT_GLOBAL))}
    expected = {"image_encoder": [[N_IMAGES, dim]] if dim else [], "text_encoder": [[N_CAPTIONS, dim]] if dim else []}
    if heads != expected:
        raise ArtifactError(f"{where}: the encoders' prefilter outputs {heads} are not what config global_dim "
                            f"{dim!r} implies {expected}; re-export"[:400])


def manifest_specs(manifest: dict[str, Any]) -> dict[str, GraphSpec]:
    """The graphs' input/output specs as recorded in a manifest."""
    def tensors(entries: list[dict[str, Any]]) -> list[TensorSpec]:
        return [TensorSpec(t["name"], t["dtype"], list(t["shape"])) for t in entries]

    return {name: GraphSpec(name, tensors(graph["inputs"]), tensors(graph["outputs"]))
            for name, graph in manifest["graphs"].items() if name in GRAPHS}


def listed_files(manifest: dict[str, Any]) -> set[str]:
    """Every file name a manifest lists (graphs, engines, checkpoint, vocabulary)."""
    graphs = {f.get("file") for g in manifest.get("graphs", {}).values() for f in g.get("files", {}).values()}
    singles = {manifest[k].get("file") for k in ("checkpoint", "vocab") if isinstance(manifest.get(k), dict)}
    engines = {f.get("file") if isinstance(f, dict) else f
               for g in manifest.get("engines", {}).get("files", {}).values() for f in g.values()}
    return {n if isinstance(n, str) else repr(n) for n in graphs | singles | engines}

