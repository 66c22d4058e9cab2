"""The exported fp32 ONNX graphs in OpenVINO on the CPU: fp32, or bf16 on the CPU's bf16 units.

bf16 is OpenVINO's inference precision (``INFERENCE_PRECISION_HINT``) over the fp32 graphs:
OpenVINO runs the matrix products and what it fuses with them in bfloat16 on AMX-BF16 (or
AVX-512 BF16) and keeps inputs and outputs float32, so galleries look like every other
backend's. On a CPU without those units OpenVINO emulates it: bf16 scores, slower than fp32
(a warning says so). fp16 and int8 are not offered: xmr's int8 graphs are quantized for
ONNX Runtime and TensorRT, and OpenVINO computes them wrongly (docs/int8.md).

The text encoder runs in ONNX Runtime (fp32): OpenVINO 2026.4 ignores a GRU's
``sequence_lens`` when the batch axis is dynamic, so every caption shorter than the longest of
its batch came out wrong (measured: words off by up to 0.9; correct with static shapes). It
is encoded once per caption, off the pair path, so this costs little.

Compiled models are cached in ``openvino-cache/`` inside the artifact directory when it is
writable, so a second load does not recompile (``from_cache`` says, per graph). OpenVINO keys
an entry by the graph alone and applies the inference precision when it loads one, so fp32
and bf16 share it. Threads: the cores this process may use, as for ONNX Runtime.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from xmr.cpu import available_cores
from xmr.errors import ArtifactError, BackendUnavailableError, first_line
from xmr.export.manifest import OPENVINO_CACHE
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.backends.base import EMULATED, GraphBackend, bf16_emulated
from xmr.runtime.backends.onnxruntime_backend import onnx_sessions, run_on_cpu
from xmr.runtime.inputs import positive_int

INFERENCE_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
OPENVINO_GRAPHS = ("image_encoder", "pair_scorer")  # the text encoder runs in ONNX Runtime (module docstring)


def openvino_problem(precision: str, device: str | torch.device | None) -> str | None:
    """Why the openvino backend cannot run ``precision`` on ``device`` here, or None if it can."""
    if device is not None and torch.device(device).type != "cpu":
        return f"openvino runs on the CPU here, not {device}; use tensorrt, onnxruntime or torch there"
    if precision not in INFERENCE_PRECISIONS:
        return (f"openvino runs fp32 and bf16, not {precision} (xmr's int8 graphs are quantized for onnxruntime and "
                f"tensorrt; fp16 graphs run on onnxruntime)")
    return None


class OpenVINOBackend(GraphBackend):
    name = "openvino"

    def __init__(self, artifacts: Artifacts, precision: str, device: str | torch.device | None = None,
                 threads: int | None = None, spin: bool = True) -> None:
        """``spin``: for the ONNX Runtime text encoder (``onnx_sessions``)."""
        super().__init__(artifacts, precision)
        if (problem := openvino_problem(precision, device)) is not None:
            raise BackendUnavailableError(problem)
        try:
            import openvino
        except ImportError as e:
            raise BackendUnavailableError("openvino is not installed (pip install openvino)") from e
        self.device = torch.device("cpu")
        self.emulated = bf16_emulated(precision, self.device)
        self.threads = available_cores() if threads is None else positive_int(threads, "threads")
        core = openvino.Core()
        cache_dir = _cache_dir(artifacts)
        if cache_dir is not None:
            core.set_property({"CACHE_DIR": str(cache_dir)})
        options = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[precision],
                   "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
        self.requests, self.inputs, self.outputs, self.from_cache = {}, {}, {}, {}
        text_encoder = artifacts.graph("text_encoder", "fp32")
        self.sessions = onnx_sessions({"text_encoder": text_encoder}, self.threads, spin=spin)
        self.inputs["text_encoder"] = [i.name for i in self.sessions["text_encoder"].get_inputs()]
        self.outputs["text_encoder"] = [o.name for o in self.sessions["text_encoder"].get_outputs()]
        for graph in OPENVINO_GRAPHS:
            path = artifacts.graph(graph, "fp32")
            try:
                compiled = core.compile_model(str(path), "CPU", options)
            except RuntimeError as e:  # OpenVINO reports unreadable graphs as RuntimeError
                raise ArtifactError(f"openvino cannot load {path.name} of {artifacts.directory} "
                                    f"({first_line(e)[:200]}); re-export it") from e
            self.requests[graph] = compiled.create_infer_request()  # keeps its compiled model alive
            self.from_cache[graph] = bool(compiled.get_property("LOADED_FROM_CACHE"))
            self.inputs[graph] = [_graph_name(port, artifacts, graph, "inputs") for port in compiled.inputs]
            self.outputs[graph] = [_graph_name(port, artifacts, graph, "outputs") for port in compiled.outputs]
        self.check_io(self.inputs, self.outputs)

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if graph == "text_encoder":
            return run_on_cpu(self.sessions[graph], self.inputs[graph], self.outputs[graph], feeds)
        arrays = [np.ascontiguousarray(feeds[name].numpy()) for name in self.inputs[graph]]
        results = self.requests[graph].infer(arrays)  # outputs copied out of the request's buffers
        return {name: torch.from_numpy(results[i]) for i, name in enumerate(self.outputs[graph])}

    def describe(self) -> str:
        return f"{self.name} {self.precision} (cpu, {self.threads} threads{EMULATED if self.emulated else ''})"


def _graph_name(port: object, artifacts: Artifacts, graph: str, side: str) -> str:
    """The manifest's name for an OpenVINO port (a port may carry several tensor names)."""
    names = port.get_names()
    listed = [t["name"] for t in artifacts.manifest["graphs"][graph][side]]
    matches = [name for name in listed if name in names]
    if len(matches) != 1:
        raise ArtifactError(f"{graph} has a port named {sorted(names)} that its manifest does not list exactly once "
                            f"({listed}); re-export"[:300])
    return matches[0]


def _cache_dir(artifacts: Artifacts) -> Path | None:
    """``openvino-cache/`` in the artifact directory, created if the directory is writable; else None."""
    if artifacts.directory is None or not os.access(artifacts.directory, os.W_OK):
        return None
    cache = artifacts.directory / OPENVINO_CACHE
    if cache.is_symlink() or (cache.exists() and not cache.is_dir()):
        return None
    try:
        cache.mkdir(exist_ok=True)
    except OSError:
        return None
    return cache
