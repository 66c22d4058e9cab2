"""A self-contained Triton model repository for GPU fleets, written from an artifact directory.

    DIR/
      xmr_image_encoder/  config.pbtxt  1/model.plan (TensorRT engine) or 1/model.onnx
      xmr_text_encoder/   ...
      xmr_pair_scorer/    ...
      xmr_score_pairs/    config.pbtxt  1/model.py  artifacts/{manifest.json, vocab}
      xmr_search_text/    ... and gallery/ (with --images)
      xmr_search_image/   ... and gallery/ (with --captions)
      xmr_repository.json what was written, from what

The three exported graphs are ``tensorrt_plan`` models when the artifacts hold engines of
the precision asked for, ``onnxruntime_onnx`` models otherwise; their inputs and outputs are
the manifest's. The front models (the tensor names of ``xmr serve``, docs/serving.md) are
Python-backend models running ``triton_model`` with backend ``triton``: the Scorer's
tokenization and block planning, each block a BLS call to the graph models
(``bls_backend``). Every path inside is relative to its model, so the directory can be
copied to any server. Files are copied, not linked (editing the repository never changes the
artifacts). The server's Python needs xmr installed (``pip install xmr``).
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any

from xmr.errors import ArtifactError, InputError
from xmr.export.artifacts import tool_versions
from xmr.export.graphs import GRAPHS
from xmr.export.manifest import MANIFEST
from xmr.outputs import check_output_dir, staged_directory
from xmr.paths import inside
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.backends.base import PRECISIONS
from xmr.runtime.backends.tensorrt_backend import profile_limits
from xmr.runtime.gallery import gallery_files, is_gallery
from xmr.runtime.schedule import pair_elements
from xmr.serve.repository import (
    ServeConfig, gallery_source, model_config, model_names, write_model_config, write_python_model,
)
from xmr.serve.server import check_sources

GRAPH_MODELS = {graph: f"xmr_{graph}" for graph in GRAPHS}
BLS_BACKEND = "triton"  # the backend parameter of front models whose graphs are models of the same server
PLAN, ONNX = "tensorrt_plan", "onnxruntime_onnx"
RECORD = "xmr_repository.json"
ARTIFACTS, GALLERY = "artifacts", "gallery"  # beside a front model's config: manifest and vocabulary; its gallery
DATA_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


def is_repository(path: Path) -> bool:
    """Whether ``path`` is a repository this module wrote (it holds ``xmr_repository.json``)."""
    return (path / RECORD).is_file()


def graph_platform(artifacts: Artifacts, precision: str) -> str:
    """``tensorrt_plan`` when the artifacts hold an engine of ``precision`` for every graph, else ``onnxruntime_onnx``."""
    engines = artifacts.manifest.get("engines") or {}
    files = engines.get("files") if isinstance(engines.get("files"), dict) else {}
    built = engines.get("built") and all(isinstance(files.get(g), dict) and precision in files[g] for g in GRAPHS)
    return PLAN if built else ONNX


def graph_model_config(graph: str, artifacts: Artifacts, platform: str) -> Any:
    """Triton's ``ModelConfig`` of one exported graph: the manifest's tensors (dynamic axes
    as -1), no Triton batching (the front models send whole blocks), one instance on a GPU
    (a TensorRT engine) or wherever Triton finds one (ONNX Runtime)."""
    from tritonclient.grpc import model_config_pb2 as pb

    spec = artifacts.manifest["graphs"][graph]
    tensors = {side: [(t["name"], _data_type(t["dtype"], graph), [d if isinstance(d, int) else -1 for d in t["shape"]])
                      for t in spec[side]] for side in ("inputs", "outputs")}
    kind = pb.ModelInstanceGroup.KIND_GPU if platform == PLAN else pb.ModelInstanceGroup.KIND_AUTO
    return pb.ModelConfig(
        name=GRAPH_MODELS[graph], platform=platform, max_batch_size=0,
        input=[pb.ModelInput(name=n, data_type=pb.DataType.Value(t), dims=d) for n, t, d in tensors["inputs"]],
        output=[pb.ModelOutput(name=n, data_type=pb.DataType.Value(t), dims=d) for n, t, d in tensors["outputs"]],
        instance_group=[pb.ModelInstanceGroup(kind=kind, count=1)])


def _data_type(dtype: object, graph: str) -> str:
    if dtype not in DATA_TYPES:
        raise ArtifactError(f"the manifest gives {graph} a tensor of dtype {dtype!r}, which no exported graph has; "
                            f"re-export")
    return DATA_TYPES[dtype]  # type: ignore[index]


def plan_budget(artifacts: Artifacts) -> int:
    """The block budget (``Scorer``'s elements) at which the engines' largest profile block fits:
    with engines the profile, not memory, bounds a block."""
    limits = profile_limits(artifacts)
    if None in (limits.images, limits.captions, limits.length):
        raise ArtifactError(f"{artifacts.directory}: the manifest lists engines but no complete profile; re-export")
    return limits.images * limits.captions * pair_elements(artifacts.regions, limits.length,  # type: ignore[operator]
                                                           artifacts.config["embed_size"])


def write_graph_repository(out: Path, config: ServeConfig, overwrite: bool = False) -> dict[str, Any]:
    """The repository for ``config`` (its artifacts, precision, galleries, batching) at ``out``;
    returns its record (also saved as ``xmr_repository.json``)."""
    if config.precision not in PRECISIONS:
        raise InputError(f"unknown precision {config.precision!r}; choose from {', '.join(PRECISIONS)}")
    artifacts = check_sources(config)
    check_output_dir(out, is_repository, overwrite, "Triton repository")
    platform = graph_platform(artifacts, config.precision)
    with staged_directory(out) as staged:
        for graph in GRAPHS:
            source = (artifacts.engine(graph, config.precision) if platform == PLAN
                      else artifacts.graph(graph, config.precision))
            directory = staged / GRAPH_MODELS[graph]
            (directory / "1").mkdir(parents=True)
            shutil.copyfile(source, directory / "1" / ("model.plan" if platform == PLAN else "model.onnx"))
            write_model_config(directory, graph_model_config(graph, artifacts, platform))
        for name in model_names(config):
            directory = staged / name
            directory.mkdir()
            parameters = {"artifacts": ARTIFACTS, "backend": BLS_BACKEND, "graphs": platform, "gallery": ""}
            if platform == PLAN:
                parameters["block_budget"] = str(plan_budget(artifacts))
            if (source := gallery_source(name, config)) is not None:
                parameters["gallery"] = f"{GALLERY}/{_copy_gallery(Path(source), directory / GALLERY)}"
            write_python_model(directory, model_config(name, config, artifacts.regions, artifacts.config["img_dim"],
                                                       gpu=False, parameters=parameters))
            _copy_artifacts(artifacts, directory / ARTIFACTS)
        record = {"artifacts": str(Path(config.artifacts).resolve()), "model": artifacts.kind,
                  "source_checkpoint": artifacts.identity, "precision": config.precision, "graphs": platform,
                  "models": [*GRAPH_MODELS.values(), *model_names(config)],
                  "batching": {"max_batch": config.max_batch, "max_queue_delay_us": config.max_queue_delay_us,
                               "max_queue": config.max_queue},
                  "instances": config.instances, "k": config.k, "shortlist": config.shortlist,
                  "tools": tool_versions(("xmr", "tritonclient", "protobuf")),
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        (staged / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _copy_artifacts(artifacts: Artifacts, directory: Path) -> None:
    """What a front model reads of the artifacts: the manifest and the vocabulary (checked)."""
    directory.mkdir()
    shutil.copyfile(artifacts.directory / MANIFEST, directory / MANIFEST)
    vocab = artifacts.checked(artifacts.manifest["vocab"], "vocabulary")
    shutil.copyfile(vocab, directory / vocab.name)


def _copy_gallery(source: Path, directory: Path) -> str:
    """``source`` (features, captions or a saved gallery) under ``directory``; its name there."""
    directory.mkdir()
    if is_gallery(source):  # its listed files only, each a plain regular file (loading the copy checks the rest)
        (directory / source.name).mkdir()
        for name in sorted(gallery_files(source)):
            path = inside(source, name, f"gallery {source}", InputError)
            if not path.is_file():
                raise InputError(f"gallery {source} lists {name}, which is missing or not a regular file")
            shutil.copyfile(path, directory / source.name / name)
    else:  # features (.npy) or captions (.txt): check_sources checked which
        shutil.copyfile(source, directory / source.name)
    return source.name

