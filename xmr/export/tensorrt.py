"""TensorRT engines from the exported ONNX graphs (TensorRT >= 10, strongly typed).

Precision comes from the graph (fp32 / fp16 tensors, explicit Q/DQ for int8), never from
builder flags: TensorRT 11 removed ``BuilderFlag.FP16/INT8``. The same code drives
``tensorrt`` (NVIDIA GPUs, engines for the GPU it runs on) and ``tensorrt_rtx`` (TensorRT for
RTX), which parses and builds ahead of time without a GPU for a chosen compute capability:
CI uses it to prove every graph parses and builds. Both modules are imported lazily.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from xmr.errors import ExportError
from xmr.export.graphs import LENGTH, N_CAPTIONS, N_IMAGES, GraphSpec

MODULES = ("tensorrt", "tensorrt_rtx")
MAX_PROFILE_SIZE = 1 << 16  # items or tokens per launch; far beyond any GPU's memory at the released sizes
OPTIMIZATION_LEVELS = range(0, 6)  # TensorRT's builder_optimization_level


@dataclass
class ProfileShapes:
    """min / opt / max of every dynamic axis; the runtime's block sizes live inside these."""

    sizes: dict[str, tuple[int, int, int]] = field(default_factory=lambda: {
        N_IMAGES: (1, 16, 64), N_CAPTIONS: (1, 64, 256), LENGTH: (1, 32, 64)})

    def __post_init__(self) -> None:
        for axis, (low, opt, high) in self.sizes.items():
            if not 1 <= low <= opt <= high <= MAX_PROFILE_SIZE:
                raise ExportError(f"TensorRT profile for {axis}: need 1 <= min <= opt <= max <= {MAX_PROFILE_SIZE}, "
                                  f"got {low}, {opt}, {high}")

    @classmethod
    def up_to(cls, images: int, captions: int, length: int) -> ProfileShapes:
        """A profile from 1 to each maximum, optimised for a quarter of the images and captions and
        half the length (``xmr export --max-images/--max-captions/--max-length``)."""
        for option, value in (("--max-images", images), ("--max-captions", captions), ("--max-length", length)):
            if not 1 <= value <= MAX_PROFILE_SIZE:
                raise ExportError(f"{option} {value} is out of range 1..{MAX_PROFILE_SIZE}")
        return cls({N_IMAGES: (1, max(1, images // 4), images), N_CAPTIONS: (1, max(1, captions // 4), captions),
                    LENGTH: (1, max(1, length // 2), length)})

    def shape(self, spec_shape: list[int | str], which: int) -> tuple[int, ...]:
        """The concrete shape of one input at min (0), opt (1) or max (2)."""
        try:
            return tuple(d if isinstance(d, int) else self.sizes[d][which] for d in spec_shape)
        except KeyError as e:
            raise ExportError(f"no profile size for the dynamic axis {e.args[0]!r}") from e


def load_tensorrt(name: str) -> ModuleType | None:
    """``tensorrt`` or ``tensorrt_rtx`` if it imports here (the builder included), else None."""
    if name not in MODULES:
        raise ValueError(f"TensorRT module must be one of {MODULES}, got {name!r}")
    try:
        trt = importlib.import_module(name)
        trt.Builder  # noqa: B018  (the lean/dispatch runtimes import but have no builder)
    except (ImportError, OSError, AttributeError):
        return None
    return trt


def tensorrt_unavailable(trt: ModuleType | None) -> str | None:
    """Why TensorRT engines cannot be built or run here (``trt``: ``load_tensorrt``'s result), or None."""
    import torch

    if trt is None:
        return "TensorRT is not installed (pip install tensorrt)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None


@dataclass
class BuildOptions:
    workspace_bytes: int = 4 << 30
    optimization_level: int = 3
    compute_capability: str | None = None  # tensorrt_rtx only: "SM80", "SM89", ...; None: portable
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise ExportError(f"--optimization-level {self.optimization_level} is out of range "
                              f"{OPTIMIZATION_LEVELS.start}..{OPTIMIZATION_LEVELS.stop - 1}")
        if self.workspace_bytes < 1 << 20:
            raise ExportError(f"the TensorRT workspace must be at least 1 MiB, got {self.workspace_bytes} bytes")

    @classmethod
    def from_gib(cls, workspace_gib: float, optimization_level: int) -> BuildOptions:
        if not math.isfinite(workspace_gib) or not 0 < workspace_gib <= 1024:
            raise ExportError(f"--workspace-gib {workspace_gib} is out of range: give a size in (0, 1024] GiB")
        return cls(workspace_bytes=int(workspace_gib * (1 << 30)), optimization_level=optimization_level)


def build_engine(trt: ModuleType, onnx_path: Path, spec: GraphSpec, profile: ProfileShapes,
                 options: BuildOptions | None = None) -> bytes:
    """A serialized engine for one exported graph; raises ``ExportError`` on any failure."""
    options = options or BuildOptions()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.optimization_level
    if options.compute_capability is not None:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, options.compute_capability), 0)
    timing_cache = options.timing_cache
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)  # ``cache`` must outlive the build
    optimization_profile = builder.create_optimization_profile()
    for tensor in spec.inputs:
        if tensor.dynamic_axes():
            optimization_profile.set_shape(tensor.name, *(profile.shape(tensor.shape, i) for i in range(3)))
    config.add_optimization_profile(optimization_profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"TensorRT failed to build an engine for {onnx_path.name} (see the log above)")
    if timing_cache is not None:
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(engine))
