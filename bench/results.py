"""Writes a benchmark's results as JSON with what reproduces them: command, date, machine, versions."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from xmr.export.artifacts import tool_versions


def write_results(path: Path, rows: list[dict[str, Any]], packages: tuple[str, ...] = ("torch", "onnxruntime")) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        **tool_versions(packages), "rows": rows}, indent=2) + "\n")
