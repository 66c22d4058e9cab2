"""Versioned dataclass configs that round-trip through plain dicts (and JSON), and the
field checks every config uses (one function per kind of check, raising ``ConfigError``)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Sequence, TypeVar

from xmr.errors import ConfigError
from xmr.outputs import write_text

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a dataclass config, with its class ``version``."""
    out = dataclasses.asdict(config)
    out["version"] = type(config).VERSION
    return out


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build ``cls`` from ``data``; unknown fields and other versions are refused."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: a config must be a JSON object of fields, got {type(data).__name__}")
    data = dict(data)
    version = data.pop("version", cls.VERSION)  # type: ignore[attr-defined]
    if version != cls.VERSION:  # type: ignore[attr-defined]
        raise ConfigError(f"{cls.__name__} version {version!r} is not supported (this xmr reads version "
                          f"{cls.VERSION}); re-create the file with this xmr version")  # type: ignore[attr-defined]
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {unknown}"[:300])
    return cls(**data)


def save_json(data: dict[str, Any], path: str | Path) -> None:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    write_text(Path(path), json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- field checks

def _range_text(minimum: float | None, maximum: float | None, above: bool) -> str:
    low = "" if minimum is None else f"{'>' if above else '>='} {minimum:g}"
    high = "" if maximum is None else f"<= {maximum:g}"
    return " and ".join(p for p in (low, high) if p) or "any value"


def check_int(owner: str, name: str, value: object, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) in ``[minimum, maximum]``; else ``ConfigError``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ConfigError(f"{owner}: {name} must be an integer, got {value!r}"[:300])
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ConfigError(f"{owner}: {name} must be an integer {_range_text(minimum, maximum, False)}, got {value}"[:300])
    return int(value)


def check_float(owner: str, name: str, value: object, minimum: float | None = None, maximum: float | None = None,
                above: bool = False) -> float:
    """``value`` if it is a finite real number ``>= minimum`` (``> minimum`` when ``above``)
    and ``<= maximum``; else ``ConfigError`` naming the valid range."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ConfigError(f"{owner}: {name} must be a number, got {value!r}"[:300])
    rule = _range_text(minimum, maximum, above)
    if not math.isfinite(value):
        raise ConfigError(f"{owner}: {name} must be a finite number ({rule}), got {value}")
    low_ok = minimum is None or (value > minimum if above else value >= minimum)
    if not low_ok or (maximum is not None and value > maximum):
        raise ConfigError(f"{owner}: {name} must be {rule}, got {value:g}")
    return float(value)


def check_bool(owner: str, name: str, value: object) -> bool:
    """``value`` if it is a bool; else ``ConfigError``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}: {name} must be true or false, got {value!r}"[:300])
    return value


def check_choice(owner: str, name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else ``ConfigError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{owner}: {name} must be one of {', '.join(choices)}, got {value!r}"[:300])
    return value


# ---------------------------------------------------------------- memory

def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get without swapping (``MemAvailable`` of /proc/meminfo,
    else the free physical pages); None where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(owner: str, what: str, nbytes: int, hint: str) -> None:
    """Refuse (``ConfigError``) an allocation of about ``nbytes`` that exceeds the available memory."""
    available = available_memory_bytes()
    if available is not None and nbytes > available:
        raise ConfigError(f"{owner}: {what} would take about {format_bytes(nbytes)} of memory but only "
                          f"{format_bytes(available)} is available; {hint}")
