"""The exported ONNX graphs in ONNX Runtime: CPU (any precision) or its CUDA provider.

Sessions are created once. On CPU, torch tensors are handed over as numpy views (no copy)
with intra-op threads set to the cores this process may use. On CUDA, IO binding feeds the
device tensors in place and binds the output to a torch CUDA tensor, so nothing crosses the
bus between the encoders and the pair scorer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xmr.cpu import available_cores
from xmr.errors import ArtifactError, BackendUnavailableError, first_line
from xmr.export.graphs import GRAPHS, LENGTH, N_CAPTIONS, N_IMAGES
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.backends.base import GraphBackend
from xmr.runtime.inputs import positive_int


def onnx_sessions(paths: dict[str, Path], threads: int = 0, providers: list | None = None, spin: bool = True) -> dict:
    """An ONNX Runtime session per graph, created once; ``threads`` intra-op threads (0: ONNX
    Runtime's default, all cores); CPU unless ``providers`` says otherwise. ``spin=False``:
    idle pool threads sleep instead of spin-waiting, so processes sharing cores do not
    preempt each other (measured: 1.4x the QPS of ``xmr serve`` at 16 clients on 2 cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # no notes about unused initializers
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return {name: ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
            for name, path in paths.items()}


def run_on_cpu(session: object, inputs: list[str], outputs: list[str],
               feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``outputs`` of a CPU session, by name, for the ``inputs`` it takes out of ``feeds``
    (torch CPU tensors, handed over as numpy views: no copy)."""
    arrays = session.run(outputs, {name: feeds[name].numpy() for name in inputs})
    return {name: torch.from_numpy(array) for name, array in zip(outputs, arrays)}


def cuda_provider_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


class OnnxRuntimeBackend(GraphBackend):
    name = "onnxruntime"

    def __init__(self, artifacts: Artifacts, precision: str, device: str | torch.device | None = None,
                 threads: int | None = None, paths: dict[str, Path] | None = None, spin: bool = True) -> None:
        """Sessions over the artifacts' ``precision`` graphs, or over ``paths`` (graph name ->
        file: graphs made from these artifacts' fp32 ones, e.g. INT8 candidates, read with
        the artifacts' IO spec)."""
        super().__init__(artifacts, precision)
        if precision == "bf16":
            raise BackendUnavailableError("onnxruntime has no bf16 kernels; bf16 runs on openvino or torch (CPU: "
                                          "native with AMX-BF16 or AVX-512 BF16, emulated elsewhere) and on tensorrt "
                                          "or torch (GPUs)")
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise BackendUnavailableError("onnxruntime is not installed (pip install onnxruntime)") from e
        self.device = torch.device(device or ("cuda" if cuda_provider_available() else "cpu"))
        if self.device.type == "cuda" and not cuda_provider_available():
            raise BackendUnavailableError("onnxruntime on cuda needs onnxruntime-gpu (CUDAExecutionProvider) and a "
                                          "CUDA GPU; neither is here" if not torch.cuda.is_available() else
                                          "onnxruntime on cuda needs onnxruntime-gpu (no CUDAExecutionProvider)")
        providers = ([("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
                     if self.device.type == "cuda" else ["CPUExecutionProvider"])
        self.threads = available_cores() if threads is None else positive_int(threads, "threads")
        paths = paths or {g: artifacts.graph(g, precision) for g in GRAPHS}
        try:
            self.sessions = onnx_sessions(paths, self.threads, providers, spin)
        except Exception as e:  # onnxruntime raises its own types for files it cannot read
            first = first_line(e)[:200]
            raise ArtifactError(f"onnxruntime cannot load the {precision} graphs of {artifacts.directory} ({first}); "
                                f"re-export them") from e
        self.outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}
        self.inputs = {g: [i.name for i in s.get_inputs()] for g, s in self.sessions.items()}
        self.specs = {g: artifacts.outputs(g) for g in GRAPHS}
        self.check_io(self.inputs, self.outputs)  # the graph files must be the graphs the manifest describes

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda":
            return self._run_bound(graph, {name: feeds[name] for name in self.inputs[graph]})
        return run_on_cpu(self.sessions[graph], self.inputs[graph], self.outputs[graph], feeds)

    def _run_bound(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IO binding on CUDA: inputs read in place, outputs written into torch CUDA tensors
        allocated here at the shapes the manifest gives (nothing crosses the bus)."""
        session = self.sessions[graph]
        binding = session.io_binding()
        sizes = _axis_sizes(feeds)
        device_id = self.device.index or 0
        for name, tensor in feeds.items():
            tensor = tensor.contiguous()
            feeds[name] = tensor  # keep alive until the run ends
            binding.bind_input(name, "cuda", device_id, _numpy_dtype(tensor.dtype), list(tensor.shape), tensor.data_ptr())
        outputs = {}
        for spec in self.specs[graph]:
            shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
            outputs[spec.name] = torch.empty(shape, dtype=torch.float32, device=self.device)
            binding.bind_output(spec.name, "cuda", device_id, np.float32, shape, outputs[spec.name].data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written on our stream must be complete
        session.run_with_iobinding(binding)
        return outputs

    def describe(self) -> str:
        where = f"{self.device}" if self.device.type == "cuda" else f"cpu, {self.threads} threads"
        return f"{self.name} {self.precision} ({where})"


def _axis_sizes(feeds: dict[str, torch.Tensor]) -> dict[str, int]:
    """The dynamic axes' sizes in one call, read off its inputs."""
    sizes = {}
    for name, tensor in feeds.items():
        if name == "features" or name.startswith("image_"):
            sizes[N_IMAGES] = tensor.size(0)
        elif name in ("ids", "lengths") or name.startswith("text_"):
            sizes[N_CAPTIONS] = tensor.size(0)
            if tensor.dim() > 1:
                sizes[LENGTH] = tensor.size(1)
    return sizes


def _numpy_dtype(dtype: torch.dtype) -> type:
    return {torch.float32: np.float32, torch.int64: np.int64, torch.float16: np.float16}[dtype]
