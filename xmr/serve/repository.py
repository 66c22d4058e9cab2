"""A Triton model repository for xmr's serving models, written from one ``ServeConfig``.

Three Python-backend models run ``xmr.serve.triton_model`` (the tensor names are fixed; see
docs/serving.md):

- ``xmr_search_text``: ``text`` BYTES ``[1]`` (a caption per row), optional ``k`` INT32
  ``[1]`` -> ``indices`` INT64 ``[k]``, ``scores`` FP32 ``[k]``: the top-k images;
- ``xmr_search_image``: ``features`` FP32 ``[R, img_dim]``, optional ``k`` -> the top-k
  captions (only with a caption gallery);
- ``xmr_score_pairs``: ``features`` FP32 ``[R, img_dim]`` and ``text`` BYTES ``[1]`` ->
  ``score`` FP32 ``[1]``.

Each ``config.pbtxt`` is built as Triton's own ``ModelConfig`` protobuf (from
``tritonclient``) and written in its text format, so a repository is valid by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmr.errors import InputError
from xmr.runtime.inputs import positive_int

SEARCH_TEXT, SEARCH_IMAGE, SCORE_PAIRS = "xmr_search_text", "xmr_search_image", "xmr_score_pairs"
MODEL_PY = "from xmr.serve.triton_model import TritonPythonModel  # noqa: F401  (xmr's Python-backend model)\n"


@dataclass(frozen=True)
class ServeConfig:
    """What ``xmr serve`` runs: the artifacts and galleries, the scorer's options, the
    server's addresses and Triton's dynamic batcher (per model)."""

    artifacts: str
    images: str | None = None  # image features (.npy, [N, R, img_dim]) or a saved image gallery directory
    captions: str | None = None  # captions (.txt, one per line) or a saved caption gallery directory
    backend: str = "auto"
    precision: str = "fp32"
    device: str | None = None
    threads: int | None = None  # CPU threads per model instance (None: the cores split among the instances)
    instances: int = 1  # Triton instances per model, each its own process with its own Scorer and gallery
    k: int = 10  # results per query when a request gives no k
    shortlist: int | None = None  # two-stage search: gallery items rescored per query (None: exhaustive)
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 64  # rows (queries, pairs) in one batch
    max_queue_delay_us: int = 2000
    max_queue: int = 256  # requests waiting per model; beyond it Triton rejects (503 / UNAVAILABLE)

    def validate(self) -> None:
        for name in ("k", "instances", "http_port", "grpc_port", "metrics_port", "max_batch", "max_queue"):
            positive_int(getattr(self, name), name.replace("_", "-"))
        positive_int(self.max_queue_delay_us, "max-queue-delay-us", minimum=0)
        if self.shortlist is not None:
            positive_int(self.shortlist, "shortlist")
        ports = [self.http_port, self.grpc_port, self.metrics_port]
        if len(set(ports)) != 3:
            raise InputError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")


def model_names(config: ServeConfig) -> list[str]:
    """The models a configuration serves."""
    return ([SEARCH_TEXT] if config.images is not None else []) + [SCORE_PAIRS] + \
        ([SEARCH_IMAGE] if config.captions is not None else [])


def model_config(name: str, config: ServeConfig, regions: int, img_dim: int, gpu: bool,
                 parameters: dict[str, str] | None = None) -> Any:
    """Triton's ``ModelConfig`` protobuf of model ``name``; ``parameters`` replace the ones
    made from ``config`` (what ``triton_model`` reads at load)."""
    from tritonclient.grpc import model_config_pb2 as pb

    types = pb.DataType
    text = pb.ModelInput(name="text", data_type=types.TYPE_STRING, dims=[1])
    features = pb.ModelInput(name="features", data_type=types.TYPE_FP32, dims=[regions, img_dim])
    k = pb.ModelInput(name="k", data_type=types.TYPE_INT32, dims=[1], optional=True)
    top = [pb.ModelOutput(name="indices", data_type=types.TYPE_INT64, dims=[-1]),
           pb.ModelOutput(name="scores", data_type=types.TYPE_FP32, dims=[-1])]
    inputs, outputs = {SEARCH_TEXT: ([text, k], top), SEARCH_IMAGE: ([features, k], top),
                       SCORE_PAIRS: ([features, text], [pb.ModelOutput(name="score", data_type=types.TYPE_FP32,
                                                                       dims=[1])])}[name]
    batching = pb.ModelDynamicBatching(max_queue_delay_microseconds=config.max_queue_delay_us,
                                       default_queue_policy=pb.ModelQueuePolicy(max_queue_size=config.max_queue))
    kind = pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU
    parameters = {"task": name, "artifacts": str(Path(config.artifacts).resolve()), "backend": config.backend,
                  "precision": config.precision, "device": config.device or "",
                  "threads": str(config.threads or default_threads(config.instances)),
                  "k": str(config.k), "shortlist": str(config.shortlist or ""),
                  "gallery": _gallery_for(name, config), **(parameters or {})}
    instances = pb.ModelInstanceGroup(kind=kind, count=config.instances)
    return pb.ModelConfig(name=name, backend="python", max_batch_size=config.max_batch, input=inputs, output=outputs,
                          dynamic_batching=batching, instance_group=[instances],
                          parameters={key: pb.ModelParameter(string_value=value) for key, value in parameters.items()})


def default_threads(instances: int) -> int:
    """CPU threads per model instance by default: the cores this process may use, split among
    a model's ``instances`` (at least one each). Each instance is its own process; their ONNX
    Runtime pools do not spin-wait (``Scorer.load(spin=False)``), so an idle model leaves its
    cores to a busy one (measured on 2 cores, text->image at 16 clients: 2 threads each
    without spinning 1.4x the QPS of 1 thread each; 2 threads each spinning stalled 1
    request in 20 for ~0.5 s)."""
    from xmr.cpu import available_cores

    return max(1, available_cores() // instances)


def gallery_source(name: str, config: ServeConfig) -> str | None:
    """The gallery model ``name`` searches (``--images``, ``--captions``), None for pair scoring."""
    return {SEARCH_TEXT: config.images, SEARCH_IMAGE: config.captions}.get(name)


def _gallery_for(name: str, config: ServeConfig) -> str:
    source = gallery_source(name, config)
    return "" if source is None else str(Path(source).resolve())


def write_repository(root: Path, config: ServeConfig, regions: int, img_dim: int, gpu: bool = False) -> Path:
    """The model repository for ``config`` under ``root`` (a new directory): per model
    ``NAME/config.pbtxt`` and ``NAME/1/model.py``."""
    root.mkdir(parents=True)
    for name in model_names(config):
        write_python_model(root / name, model_config(name, config, regions, img_dim, gpu))
    return root


def write_model_config(directory: Path, message: Any) -> None:
    """``directory/config.pbtxt``: ``message`` (a ``ModelConfig``) in protobuf text format."""
    from google.protobuf import text_format

    (directory / "config.pbtxt").write_text(text_format.MessageToString(message), encoding="utf-8")


def write_python_model(directory: Path, message: Any) -> None:
    """A Python-backend model running ``triton_model`` at ``directory``: its config and ``1/model.py``."""
    (directory / "1").mkdir(parents=True, exist_ok=True)
    write_model_config(directory, message)
    (directory / "1" / "model.py").write_text(MODEL_PY, encoding="utf-8")


def read_model_config(path: Path) -> Any:
    """A ``config.pbtxt`` parsed as Triton's ``ModelConfig`` (a ``text_format.ParseError`` if it is not one)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    return text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())
