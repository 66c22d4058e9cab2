"""The torch device a command runs on, checked before any work."""

from __future__ import annotations

import re

import torch

from xmr.errors import BackendUnavailableError, ConfigError

_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` (``"cpu"``, ``"cuda"`` or ``"cuda:N"``) as a ``torch.device`` this machine has.

    ``ConfigError`` for any other spelling; ``BackendUnavailableError`` when CUDA is asked for
    and torch has none (CPU-only build, no GPU, no driver) or has no GPU ``N``."""
    if isinstance(device, torch.device):
        device = str(device)
    match = _DEVICE.fullmatch(device.strip()) if isinstance(device, str) else None
    if match is None or (match[1] == "cpu" and match[2] is not None):
        raise ConfigError(f"unknown device {device!r}; choose from cpu, cuda, cuda:N (N: a GPU index)"[:300])
    if match[1] == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU or driver found"
        raise BackendUnavailableError(f"device {device!r}: no CUDA GPU is available here ({build}); use device cpu")
    index = int(match[2]) if match[2] is not None else None
    if index is not None and index >= torch.cuda.device_count():
        raise BackendUnavailableError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                      f"device(s), numbered from 0")
    return torch.device("cuda", index)
