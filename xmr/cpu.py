"""The CPU this process runs on: the cores it may use and the matrix units it has.

The units come from the flags Linux reports in ``/proc/cpuinfo`` (elsewhere none are known,
and only the generic paths are assumed): AMX tiles (``amx_tile`` with ``amx_bf16`` /
``amx_int8``, Intel Sapphire Rapids and later), AVX-512 BF16 and VNNI dot products, AVX2.
``xmr.runtime`` picks CPU backends from them and ``xmr.benchmark.hardware`` takes its
per-precision peaks from them; tests inject ``CpuFeatures`` to cover other CPUs.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuFeatures:
    name: str
    flags: frozenset[str]
    mhz: float | None = None

    @property
    def fp32_units(self) -> str | None:
        """The widest fp32 FMA vectors: ``AVX-512`` or ``AVX2`` (None: neither)."""
        if "avx512f" in self.flags:
            return "AVX-512"
        return "AVX2" if {"avx2", "fma"} <= self.flags else None

    @property
    def bf16_units(self) -> str | None:
        """``AMX-BF16`` tiles, else ``AVX-512 BF16`` dot products, else None (bf16 is emulated)."""
        if {"amx_tile", "amx_bf16"} <= self.flags:
            return "AMX-BF16"
        return "AVX-512 BF16" if "avx512_bf16" in self.flags else None

    @property
    def int8_units(self) -> str | None:
        """``AMX-INT8`` tiles, else ``AVX-512 VNNI`` or ``AVX-VNNI`` dot products, else None."""
        if {"amx_tile", "amx_int8"} <= self.flags:
            return "AMX-INT8"
        if "avx512_vnni" in self.flags:
            return "AVX-512 VNNI"
        return "AVX-VNNI" if "avx_vnni" in self.flags else None


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's entries of ``/proc/cpuinfo`` (empty where there is none)."""
    info: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, colon, value = line.partition(":")
            if colon:
                info.setdefault(key.strip(), value.strip())
    return info


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's CPU, read once."""
    info = _cpuinfo()
    try:
        mhz = float(info["cpu MHz"]) if "cpu MHz" in info else None
    except ValueError:
        mhz = None
    name = info.get("model name") or platform.processor() or platform.machine()
    return CpuFeatures(name, frozenset(info.get("flags", "").split()), mhz)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count): the CPU
    backends' default threads, and what the benchmark's utilisation is relative to."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
