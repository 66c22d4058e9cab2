"""TensorRT engines from ``xmr export`` (GPU only; TensorRT >= 10).

IO buffers are torch CUDA tensors (their ``data_ptr`` goes to ``set_tensor_address``): no
pycuda, which has no wheels and needs a CUDA toolkit to build. One execution context per
CUDA stream, created on first use, so the scheduler's streams run launches concurrently.
Engines are tied to the GPU and TensorRT version they were built with: both are checked
against the manifest before anything is deserialized.
"""

from __future__ import annotations

import torch

from xmr.errors import ArtifactError, BackendUnavailableError
from xmr.export.graphs import GRAPHS, LENGTH, N_CAPTIONS, N_IMAGES
from xmr.export.tensorrt import load_tensorrt, tensorrt_unavailable
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.backends.base import GraphBackend
from xmr.runtime.schedule import Limits


def engines_problem(artifacts: Artifacts, precision: str, trt: object | None) -> str | None:
    """Why the artifacts' engines cannot run here for ``precision``, or None if they can."""
    engines = artifacts.manifest.get("engines") or {}
    if (unavailable := tensorrt_unavailable(trt)) is not None:
        return unavailable
    if not engines.get("built"):
        return f"the artifacts have no TensorRT engines ({engines.get('reason', 'not built')}); re-export on this GPU"
    missing = [g for g in GRAPHS if precision not in engines.get("files", {}).get(g, {})]
    if missing:
        return f"no {precision} engine for {', '.join(missing)}; re-export (or calibrate) with TensorRT on this GPU"
    if engines.get("tensorrt") != trt.__version__:
        return f"engines were built with TensorRT {engines.get('tensorrt')}, this is {trt.__version__}; re-export"
    major, minor = torch.cuda.get_device_capability()
    if engines.get("compute_capability") != f"{major}.{minor}":
        return (f"engines were built for {engines.get('gpu')} (compute capability {engines.get('compute_capability')}), "
                f"this GPU is {torch.cuda.get_device_name()} ({major}.{minor}); re-export on this GPU")
    return None


def profile_limits(artifacts: Artifacts) -> Limits:
    """Most images, captions and tokens the engines' optimisation profile takes (its max sizes)."""
    profile = artifacts.manifest.get("profile")
    profile = profile if isinstance(profile, dict) else {}
    limits = []
    for axis in (N_IMAGES, N_CAPTIONS, LENGTH):
        sizes = profile.get(axis)
        valid = isinstance(sizes, list) and len(sizes) == 3 and all(isinstance(s, int) and s >= 1 for s in sizes)
        if sizes is not None and not valid:
            raise ArtifactError(f"{artifacts.directory}: manifest profile {axis!r} must be [min, opt, max] sizes >= 1, "
                                f"got {sizes!r}; re-export"[:300])
        limits.append(sizes[2] if valid else None)
    return Limits(*limits)


class TensorRTBackend(GraphBackend):
    name = "tensorrt"

    def __init__(self, artifacts: Artifacts, precision: str, device: str | torch.device | None = None) -> None:
        super().__init__(artifacts, precision)
        if device is not None and torch.device(device).type != "cuda":
            raise BackendUnavailableError(f"tensorrt runs on CUDA GPUs only, not {device}; use onnxruntime or torch there")
        trt = load_tensorrt("tensorrt")
        problem = engines_problem(artifacts, precision, trt)
        if problem is not None:
            raise BackendUnavailableError(f"tensorrt {precision}: {problem}")
        self.trt = trt
        self.device = torch.device(device or "cuda")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {}
        for graph in GRAPHS:
            path = artifacts.engine(graph, precision)  # {"file", "sha256"}, confined and checked like the graphs
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BackendUnavailableError(f"TensorRT could not deserialize {path.name}; re-export on this GPU")
            self.engines[graph] = engine
        self.contexts: dict[tuple[str, int], object] = {}
        self.limits = profile_limits(artifacts)

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        trt, engine = self.trt, self.engines[graph]
        stream = torch.cuda.current_stream(self.device)
        key = (graph, stream.cuda_stream)  # one execution context per stream, created on first use
        if key not in self.contexts:
            self.contexts[key] = engine.create_execution_context()
        context = self.contexts[key]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        keep = []
        for name in inputs:
            tensor = feeds[name].to(self._torch_dtype(engine.get_tensor_dtype(name))).contiguous()
            keep.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in [n for n in names if n not in inputs]:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(engine.get_tensor_dtype(name)), device=self.device)
            context.set_tensor_address(name, outputs[name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {graph} engine")
        for tensor in keep:  # inputs converted here must outlive the launch
            tensor.record_stream(stream)
        return {name: t.float() for name, t in outputs.items()}

    def _torch_dtype(self, dtype: object) -> torch.dtype:
        trt = self.trt
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.int64: torch.int64,
                trt.int32: torch.int32, trt.bool: torch.bool}[dtype]

