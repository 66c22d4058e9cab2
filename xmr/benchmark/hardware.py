"""What the benchmark runs on: the device, its peak arithmetic rate, and how busy it was.

Peaks are the roofline's ceiling. CPU: cores this process may use x clock x FLOPs per cycle
per core from the vector units the CPU reports (two FMA units: AVX-512 64 fp32 FLOPs/cycle,
AVX2 32; AVX-512 VNNI int8 dot products 4x the fp32 rate; fp16 has no faster CPU path than
fp32). GPU: the datasheet's dense figures (fp32 CUDA cores; fp16 and int8 tensor cores).
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from xmr.runtime.backends.onnxruntime_backend import available_cores

# dense peak FLOP/s (int8: OP/s) from NVIDIA's datasheets; the first matching name wins
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"fp32": 51.2e12, "fp16": 756e12, "int8": 1513e12}),
    ("H100", {"fp32": 66.9e12, "fp16": 989e12, "int8": 1979e12}),
    ("H200", {"fp32": 66.9e12, "fp16": 989e12, "int8": 1979e12}),
    ("A100", {"fp32": 19.5e12, "fp16": 312e12, "int8": 624e12}),
    ("L40S", {"fp32": 91.6e12, "fp16": 362e12, "int8": 733e12}),
    ("L4", {"fp32": 30.3e12, "fp16": 121e12, "int8": 242e12}),
    ("A10", {"fp32": 31.2e12, "fp16": 125e12, "int8": 250e12}),
    ("T4", {"fp32": 8.1e12, "fp16": 65e12, "int8": 130e12}),
]


@dataclass
class Hardware:
    kind: str  # cpu | cuda
    name: str
    cores: int
    peak_flops: dict[str, float | None]  # by precision
    peak_source: str

    def as_dict(self) -> dict:
        return asdict(self)


def _cpuinfo() -> dict[str, str]:
    path = Path("/proc/cpuinfo")
    info: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first processor's value
    return info


def cpu_hardware() -> Hardware:
    info, cores = _cpuinfo(), available_cores()
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    mhz = float(info["cpu MHz"]) if "cpu MHz" in info else None
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    if mhz is None:
        return Hardware("cpu", name, cores, {"fp32": None, "fp16": None, "int8": None}, "unknown clock: no peak")
    fp32 = cores * mhz * 1e6 * per_cycle
    int8 = fp32 * 4 if "avx512_vnni" in flags or "avx_vnni" in flags else fp32
    source = (f"{cores} cores x {mhz / 1e3:.2f} GHz x {per_cycle} fp32 FLOPs/cycle"
              f"{' (int8: VNNI, 4x)' if int8 > fp32 else ''}")
    return Hardware("cpu", name, cores, {"fp32": fp32, "fp16": fp32, "int8": int8}, source)


def hardware_for(device: str) -> Hardware:
    if not device.startswith("cuda"):
        return cpu_hardware()
    name = torch.cuda.get_device_name(torch.device(device))
    peaks = next((p for key, p in GPU_PEAKS if key in name), None)
    return Hardware("cuda", name, torch.cuda.get_device_properties(torch.device(device)).multi_processor_count,
                    dict(peaks) if peaks else {"fp32": None, "fp16": None, "int8": None},
                    "datasheet (dense)" if peaks else f"no datasheet figure for {name}")


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
