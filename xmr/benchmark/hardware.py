"""What the benchmark runs on: the device, its peak arithmetic rate per precision, and how busy it was.

Peaks are the roofline's ceiling, one per precision, each from the units that precision runs
on. CPU (``xmr.cpu.cpu_features``): cores this process may use x clock x operations per cycle
per core of those units. fp32: the fp32 FMA vectors, two FMA ports (AVX-512 64 FLOPs/cycle,
AVX2 32, neither 8). bf16: AMX-BF16 tiles (1,024) or AVX-512 BF16 dot products (128), else
the fp32 peak (bf16 is emulated on the fp32 units). int8: AMX-INT8 tiles (2,048 OPs/cycle),
AVX-512 VNNI (256) or AVX-VNNI (128) dot products, else the fp32 peak. fp16: the fp32 peak
(no CPU path xmr uses computes fp16 faster). GPU: the datasheet's dense figures (fp32 CUDA
cores; fp16, bf16 and int8 tensor cores). ``row_peak`` says which of them a serve-bench row
runs at.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from xmr.cpu import CpuFeatures, available_cores, cpu_features
from xmr.runtime.backends import PRECISIONS


# dense peak FLOP/s (int8: OP/s) from NVIDIA's datasheets; the first matching name wins; T4 has no bf16
GPU_PEAKS: list[tuple[str, dict[str, float | None]]] = [
    ("H100 PCIe", {"fp32": 51.2e12, "fp16": 756e12, "bf16": 756e12, "int8": 1513e12}),
    ("H100", {"fp32": 66.9e12, "fp16": 989e12, "bf16": 989e12, "int8": 1979e12}),
    ("H200", {"fp32": 66.9e12, "fp16": 989e12, "bf16": 989e12, "int8": 1979e12}),
    ("A100", {"fp32": 19.5e12, "fp16": 312e12, "bf16": 312e12, "int8": 624e12}),
    ("L40S", {"fp32": 91.6e12, "fp16": 362e12, "bf16": 362e12, "int8": 733e12}),
    ("L4", {"fp32": 30.3e12, "fp16": 121e12, "bf16": 121e12, "int8": 242e12}),
    ("A10", {"fp32": 31.2e12, "fp16": 125e12, "bf16": 125e12, "int8": 250e12}),
    ("T4", {"fp32": 8.1e12, "fp16": 65e12, "bf16": None, "int8": 130e12}),
]
GPU_UNITS = {"fp32": "CUDA cores", "fp16": "tensor cores", "bf16": "tensor cores", "int8": "tensor cores"}

# operations per cycle per core of each CPU unit (xmr.cpu's names)
FP32_FLOPS_PER_CYCLE = {"AVX-512": 64, "AVX2": 32}  # 2 FMA ports x 16 or 8 lanes x 2 FLOPs
GENERIC_UNITS = "no AVX2"  # 4-wide vectors, multiply and add on separate ports: 8 FLOPs/cycle
GENERIC_FP32_FLOPS_PER_CYCLE = 8
BF16_FLOPS_PER_CYCLE = {"AMX-BF16": 1024, "AVX-512 BF16": 128}
INT8_OPS_PER_CYCLE = {"AMX-INT8": 2048, "AVX-512 VNNI": 256, "AVX-VNNI": 128}

# CPU rows that compute at another precision's rate than their own (any other row: its own)
CPU_COMPUTE_PRECISION = {
    ("onnxruntime", "fp16"): "fp32",  # no fp16 GEMM on x86: the CPU provider computes fp16 graphs at fp32 speed
}
# ONNX Runtime int8 rows run at the int8 units' rate, AMX-INT8 where the CPU has it. The CPU
# provider turns the Q/DQ graphs' int8 activations into uint8 (QDQS8ToU8Transformer), and MLAS
# dispatches u8s8 GEMMs to AMX tiles when the CPU has AMX-TILE and AMX-INT8 and Linux grants
# the tile state (onnxruntime/core/mlas/lib/platform.cpp: GemmU8S8Dispatch =
# MlasGemmU8S8DispatchAmx after MlasInitAMX; kernels in qgemm_kernel_amx.cpp). The onnxruntime
# 1.32 wheel's libonnxruntime.so holds those kernels (ldtilecfg, tileloadd, tdpbusd). That
# kernel falls back to AVX-512 VNNI for small GEMMs, so the AMX peak is the honest ceiling.


@dataclass
class Hardware:
    """The device a serve-bench run measured on, and its peaks by precision."""

    kind: str  # cpu | cuda
    name: str
    cores: int  # CPU: cores this process may use; GPU: streaming multiprocessors
    peak_flops: dict[str, float | None]  # by precision (int8: OP/s); None: unknown
    peak_units: dict[str, str | None]  # by precision: the units that peak comes from ("AMX-BF16", "tensor cores")
    peak_sources: dict[str, str]  # by precision: how the peak was worked out
    peak_source: str  # the whole in one line

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CpuUnits:
    """The units one precision runs on in a CPU, and what they do per cycle per core."""

    units: str  # xmr.cpu's name: "AVX-512", "AMX-INT8", ...
    per_cycle: int  # operations per cycle per core
    operation: str  # what is counted: "fp32 FLOPs", "int8 OPs", ...
    note: str = ""  # why these units, when they are not the precision's own


def cpu_units(features: CpuFeatures) -> dict[str, CpuUnits]:
    """The units each precision's CPU peak comes from (the module docstring gives the rule)."""
    fp32_name = features.fp32_units or GENERIC_UNITS
    fp32 = CpuUnits(fp32_name, FP32_FLOPS_PER_CYCLE.get(fp32_name, GENERIC_FP32_FLOPS_PER_CYCLE), "fp32 FLOPs")
    units = {"fp32": fp32, "fp16": CpuUnits(fp32.units, fp32.per_cycle, fp32.operation, "no faster fp16 path")}
    if features.bf16_units is None:
        units["bf16"] = CpuUnits(fp32.units, fp32.per_cycle, fp32.operation, "no bf16 units: emulated")
    else:
        units["bf16"] = CpuUnits(features.bf16_units, BF16_FLOPS_PER_CYCLE[features.bf16_units], "bf16 FLOPs")
    if features.int8_units is None:
        units["int8"] = CpuUnits(fp32.units, fp32.per_cycle, fp32.operation, "no int8 dot products")
    else:
        units["int8"] = CpuUnits(features.int8_units, INT8_OPS_PER_CYCLE[features.int8_units], "int8 OPs")
    return units


def cpu_peak_source(cores: int, mhz: float, units: CpuUnits) -> str:
    """How a CPU peak is worked out, e.g. "2 cores x 2.60 GHz x 1024 bf16 FLOPs/cycle (AMX-BF16)"."""
    note = f"; {units.note}" if units.note else ""
    return f"{cores} cores x {mhz / 1e3:.2f} GHz x {units.per_cycle} {units.operation}/cycle ({units.units}{note})"


def cpu_hardware() -> Hardware:
    """This CPU's peaks, from the cores this process may use, the clock and the units it reports."""
    features = cpu_features()
    cores = available_cores()
    units = cpu_units(features)
    names: dict[str, str | None] = {precision: u.units for precision, u in units.items()}
    listed = ", ".join(f"{precision} {name}" for precision, name in names.items())
    if features.mhz is None:
        peaks: dict[str, float | None] = dict.fromkeys(units)
        sources = dict.fromkeys(units, "unknown clock: no peak")
        return Hardware("cpu", features.name, cores, peaks, names, sources, f"unknown clock: no peak ({listed})")
    peaks = {precision: cores * features.mhz * 1e6 * u.per_cycle for precision, u in units.items()}
    sources = {precision: cpu_peak_source(cores, features.mhz, u) for precision, u in units.items()}
    summary = f"{cores} cores x {features.mhz / 1e3:.2f} GHz: {listed}"
    return Hardware("cpu", features.name, cores, peaks, names, sources, summary)


def datasheet_hardware(name: str, sms: int) -> Hardware:
    """The GPU called ``name`` with its datasheet's peaks (None where the table has no figure)."""
    peaks = next((p for key, p in GPU_PEAKS if key in name), None)
    if peaks is None:
        unknown = f"no datasheet figure for {name}"
        return Hardware("cuda", name, sms, dict.fromkeys(PRECISIONS), dict(GPU_UNITS),
                        dict.fromkeys(PRECISIONS, unknown), unknown)
    units: dict[str, str | None] = {}
    sources: dict[str, str] = {}
    for precision in PRECISIONS:
        unit = GPU_UNITS[precision]
        if peaks[precision] is None:
            units[precision] = None
            sources[precision] = f"{name} has no {precision} {unit}"
        else:
            units[precision] = unit
            sources[precision] = f"{name} datasheet, dense, {unit}"
    return Hardware("cuda", name, sms, dict(peaks), units, sources, "datasheet (dense)")


def gpu_hardware(device: str) -> Hardware:
    """The GPU ``device`` (``cuda``, ``cuda:N``) with its datasheet's peaks."""
    name = torch.cuda.get_device_name(torch.device(device))
    sms = torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return datasheet_hardware(name, sms)


def hardware_for(device: str) -> Hardware:
    """The hardware ``device`` (``cpu``, ``cuda``, ``cuda:N``) names."""
    if device.startswith("cuda"):
        return gpu_hardware(device)
    return cpu_hardware()


def row_peak(hardware: Hardware, backend: str, precision: str) -> tuple[str, str | None]:
    """(precision, units) of the peak a serve-bench row of ``backend`` at ``precision`` runs at on
    ``hardware``: its own precision's (int8 on AMX-INT8, bf16 on AMX-BF16 or AVX-512 BF16 where
    the CPU has them), except CPU rows in ``CPU_COMPUTE_PRECISION`` (ONNX Runtime fp16: fp32 units)."""
    compute = precision
    if hardware.kind == "cpu":
        compute = CPU_COMPUTE_PRECISION.get((backend, precision), precision)
    return compute, hardware.peak_units.get(compute)


def _rss_bytes() -> int:
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, not current: best available


@dataclass
class Utilisation:
    seconds: float = 0.0
    cpu: float = 0.0  # process CPU time / (wall time x cores)
    peak_rss_bytes: int = 0
    gpu: float | None = None  # NVML utilisation, mean over samples
    peak_gpu_bytes: int | None = None  # torch's peak allocation on the device
    samples: list[float] = field(default_factory=list, repr=False)


class UtilisationMonitor:
    """Samples this process's memory (and the GPU's utilisation through NVML when present)
    every ``interval`` seconds while the ``with`` block runs."""

    def __init__(self, device: str = "cpu", interval: float = 0.05) -> None:
        self.device, self.interval = device, interval
        self.result = Utilisation()
        self._stop = threading.Event()
        self._nvml = _nvml_handle(device)

    def __enter__(self) -> Utilisation:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start_wall, self._start_cpu = time.perf_counter(), time.process_time()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self.result

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            self.result.peak_gpu_bytes = torch.cuda.max_memory_allocated(self.device)
        self._stop.set()
        self._thread.join()
        self.result.seconds = wall = time.perf_counter() - self._start_wall
        self.result.cpu = (time.process_time() - self._start_cpu) / max(wall, 1e-9) / available_cores()
        if self.result.samples:
            self.result.gpu = sum(self.result.samples) / len(self.result.samples)

    def _sample(self) -> None:
        while True:
            self.result.peak_rss_bytes = max(self.result.peak_rss_bytes, _rss_bytes())
            if self._nvml is not None:
                import pynvml

                self.result.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu / 100)
            if self._stop.wait(self.interval):
                return


def _nvml_handle(device: str) -> object | None:
    """An NVML handle for ``device`` (nvidia-ml-py), or None on CPU or without NVML."""
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(torch.device(device).index or 0)
    except Exception:  # noqa: BLE001  (no library, no driver: utilisation is simply not reported)
        return None
