"""Writes a benchmark's results as JSON with what reproduces them: command, date, machine, versions."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from xmr.export.artifacts import export_artifacts, tool_versions
from xmr.export.manifest import MANIFEST, read_manifest
from xmr.paths import file_sha256


def write_results(path: Path, rows: list[dict[str, Any]], packages: tuple[str, ...] = ("torch", "onnxruntime")) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        **tool_versions(packages), "rows": rows}, indent=2) + "\n")


def artifacts_for(checkpoint: Path, root: Path) -> Path:
    """fp32 artifacts of ``checkpoint`` under ``root``, exported again when the checkpoint changed."""
    out = root / f"{checkpoint.parent.name}-{checkpoint.stem}"
    if not (out / MANIFEST).is_file() or read_manifest(out)["source_checkpoint"].get("sha256") != file_sha256(checkpoint):
        export_artifacts(checkpoint, out, ("fp32",), engine=False)
    return out
