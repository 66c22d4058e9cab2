"""Backends the runtime can score with, and how ``auto`` picks one."""

from __future__ import annotations

import torch

from xmr.cpu import CpuFeatures, cpu_features
from xmr.device import resolve_device
from xmr.errors import BackendUnavailableError, ConfigError, InputError
from xmr.export.tensorrt import load_tensorrt
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.backends.base import PRECISIONS, Backend, Prepared
from xmr.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, cuda_provider_available
from xmr.runtime.backends.openvino_backend import OpenVINOBackend
from xmr.runtime.backends.tensorrt_backend import TensorRTBackend, engines_problem
from xmr.runtime.backends.torch_backend import TorchBackend

BACKENDS = {"tensorrt": TensorRTBackend, "onnxruntime": OnnxRuntimeBackend, "openvino": OpenVINOBackend,
            "torch": TorchBackend}
THREADED = ("onnxruntime", "openvino")  # CPU backends that take a thread count

__all__ = ["BACKENDS", "PRECISIONS", "Backend", "OnnxRuntimeBackend", "OpenVINOBackend", "Prepared", "TensorRTBackend",
           "TorchBackend", "auto_candidates", "check_device", "create_backend", "cpu_candidates"]


def check_device(device: object, backend: str) -> str | None:
    """``device`` as ``None``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``xmr.device.resolve_device``:
    a CUDA device must exist here); a bad spelling is an ``InputError``."""
    if device is None:
        return None
    try:
        resolve_device(device)  # type: ignore[arg-type]
    except ConfigError as e:
        raise InputError(f"{e}, or leave it unset (a GPU when there is one)") from e
    except BackendUnavailableError as e:
        raise BackendUnavailableError(f"{backend} on {e}") from e
    return str(device)


def auto_candidates(artifacts: Artifacts, precision: str, device: str | None,
                    features: CpuFeatures | None = None) -> list[str]:
    """Backends ``auto`` tries for ``precision``, in order (docs/runtime.md says why).

    GPU: TensorRT engines, then ONNX Runtime's CUDA provider (not bf16), then PyTorch. CPU:
    ``cpu_candidates`` for this CPU's ``features``."""
    gpu = device is None or str(device).startswith("cuda")
    names = []
    if gpu and torch.cuda.is_available():
        if engines_problem(artifacts, precision, load_tensorrt("tensorrt")) is None:
            names.append("tensorrt")
        if cuda_provider_available() and precision != "bf16":
            names.append("onnxruntime")
        if precision in ("fp32", "fp16", "bf16"):
            names.append("torch")
    if device is None or str(device) == "cpu":
        names += cpu_candidates(precision, features or cpu_features())
    return list(dict.fromkeys(names))


def cpu_candidates(precision: str, features: CpuFeatures) -> list[str]:
    """CPU backends for ``precision``, fastest first on a CPU with ``features``.

    fp32: OpenVINO first on CPUs with AMX tiles (Sapphire Rapids and later, where it measured
    fastest), else ONNX Runtime first; PyTorch last. bf16: OpenVINO, then PyTorch, on every CPU:
    OpenVINO's bf16 keeps more of the computation in float32 and ranked closer to fp32 (docs/
    runtime.md); without bf16 units it is emulated (a warning says so): the same scores, slower
    than fp32. fp16 and int8: ONNX Runtime, the one CPU backend for those graphs."""
    if precision == "fp32":
        amx = features.bf16_units == "AMX-BF16"
        return ["openvino", "onnxruntime", "torch"] if amx else ["onnxruntime", "openvino", "torch"]
    if precision == "bf16":
        return ["openvino", "torch"]
    return ["onnxruntime"]


def create_backend(artifacts: Artifacts, name: str, precision: str, device: str | None = None, **options) -> Backend:
    if not isinstance(name, str) or name not in ("auto", *BACKENDS):
        raise InputError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    device = check_device(device, name)
    if name == "auto":
        tried = []
        for candidate in auto_candidates(artifacts, precision, device):
            try:
                return _create(artifacts, candidate, precision, _auto_device(candidate, device), options)
            except BackendUnavailableError as e:
                tried.append(str(e))
        why = "; ".join(tried) or "it needs usable TensorRT engines or onnxruntime-gpu (torch: fp32, fp16, bf16)"
        raise BackendUnavailableError(f"no backend can run {precision} on {device or 'this machine'}: {why}")
    return _create(artifacts, name, precision, device, options)


def _auto_device(candidate: str, device: str | None) -> str | None:
    if device is not None:
        return device
    cpu_only = candidate == "openvino" or (candidate == "onnxruntime" and not cuda_provider_available())
    return "cpu" if not torch.cuda.is_available() or cpu_only else "cuda"


def _create(artifacts: Artifacts, name: str, precision: str, device: str | None, options: dict) -> Backend:
    if name in THREADED:
        return BACKENDS[name](artifacts, precision, device, threads=options.get("threads"),
                              spin=options.get("spin", True))
    return BACKENDS[name](artifacts, precision, device)
