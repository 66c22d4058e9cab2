"""Versioned dataclass configs that round-trip through plain dicts (and JSON)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from xmr.errors import ConfigError

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a dataclass config, with its class ``version``."""
    out = dataclasses.asdict(config)
    out["version"] = type(config).VERSION
    return out


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build ``cls`` from ``data``; unknown fields and other versions are refused."""
    data = dict(data)
    version = data.pop("version", cls.VERSION)  # type: ignore[attr-defined]
    if version != cls.VERSION:  # type: ignore[attr-defined]
        raise ConfigError(
            f"{cls.__name__} version {version} is not supported (this xmr reads version "
            f"{cls.VERSION}); re-create the file with this xmr version"  # type: ignore[attr-defined]
        )
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {unknown}")
    return cls(**data)


def save_json(data: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
