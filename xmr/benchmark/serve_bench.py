"""``xmr serve-bench``: offline throughput and online latency, side by side with the authors'
way, on this machine, in one run (docs/benchmarks.md shows the output)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmr.benchmark.hardware import hardware_for
from xmr.benchmark.offline_bench import CANDIDATES, OfflineConfig, run_offline
from xmr.benchmark.online_bench import OnlineConfig, Workload, run_online
from xmr.benchmark.shortlist_bench import ShortlistBenchConfig, run_shortlist_bench
from xmr.benchmark.workload import accuracy_data, build_default_artifacts, random_inputs
from xmr.config import check_int
from xmr.device import resolve_device
from xmr.errors import ConfigError, XmrError
from xmr.export.artifacts import export_artifacts, tool_versions
from xmr.export.manifest import MANIFEST, read_manifest
from xmr.outputs import check_output_dir, write_text
from xmr.progress import progress
from xmr.runtime import BatchedScorer, Scorer

REPORT, PLOT = "serve_bench.json", "serve_bench.png"
REMOTE_REPORT = "serve_bench_remote.json"  # serve-bench --target
FORMAT = "xmr-serve-bench"
MODELS = ("imram", "camp")


def is_serve_bench_output(directory: Path) -> bool:
    """A directory ``xmr serve-bench`` wrote: its report, plot and the artifacts it built."""
    names = {p.name for p in directory.iterdir()}
    if not names <= {REPORT, PLOT, REMOTE_REPORT, "artifacts"}:
        return False
    if REPORT not in names:
        return True  # empty, or only what serve-bench --target wrote
    try:
        return json.loads((directory / REPORT).read_text()).get("format") == FORMAT
    except (ValueError, OSError, AttributeError):
        return False


@dataclass
class ServeBenchConfig:
    model: str = "imram"
    checkpoint: Path | None = None  # None: random seeded weights at the released sizes
    artifacts: Path | None = None  # None: built under out/ (from the checkpoint, or random)
    data: Path | None = None  # precomp data whose test split gives the recall (None: synthetic)
    out: Path = Path("runs/serve-bench")
    device: str | None = None  # None: cuda when present
    backends: tuple[str, ...] | None = None  # None: all
    precisions: tuple[str, ...] | None = None  # None: all
    test_images: int = 40
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    shortlist: ShortlistBenchConfig = field(default_factory=ShortlistBenchConfig)
    overwrite: bool = False  # replace ``out`` even if it is not a serve-bench output

    def __post_init__(self) -> None:
        check_int("serve-bench", "test_images", self.test_images)
        if self.model not in MODELS:
            raise ConfigError(f"serve-bench measures {' or '.join(MODELS)}, not {self.model!r}")
        unknown = sorted(set(self.backends or ()) - {b for b, _ in CANDIDATES})
        unknown += sorted(set(self.precisions or ()) - {p for _, p in CANDIDATES})
        if unknown:
            raise ConfigError(f"unknown backend or precision {', '.join(unknown)}; backends: "
                              f"{', '.join(dict.fromkeys(b for b, _ in CANDIDATES))}; precisions: "
                              f"{', '.join(dict.fromkeys(p for _, p in CANDIDATES))}")
        if self.device is not None:
            resolve_device(self.device)

    @classmethod
    def quick(cls, **overrides: Any) -> ServeBenchConfig:
        """A smoke run: 100 x 500 pairs, short timings, small galleries."""
        return cls(**{"test_images": 20, "offline": OfflineConfig(images=100, seconds=2.0, encode_captions=200,
                                                                 authors_seconds=2.0),
                      "online": OnlineConfig(seconds=1.5, gallery_images=20, clients=(1, 4), load_fractions=(0.5, 1.2),
                                             delays_ms=(0.0, 5.0)),
                      "shortlist": ShortlistBenchConfig(galleries=(100,), shortlist=16, seconds=1.0, min_requests=2,
                                                        sample_queries=8), **overrides})


def environment() -> dict[str, Any]:
    versions = tool_versions(("xmr", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy"))
    return {"command": " ".join(["xmr", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("xmr") else " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "versions": versions,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def prepare_artifacts(config: ServeBenchConfig, show_progress: bool) -> tuple[Path, Path]:
    """The artifact directory and the precomp data for recall, building what is missing."""
    root = config.out / "artifacts"
    if config.checkpoint is None and config.artifacts is None:
        return build_default_artifacts(config.model, root, config.test_images, show_progress)
    artifacts = config.artifacts or root / config.checkpoint.stem
    if not (artifacts / MANIFEST).is_file():
        if config.checkpoint is None:
            raise FileNotFoundError(f"no artifacts at {artifacts} and no --checkpoint to build them from")
        export_artifacts(config.checkpoint, artifacts, ("fp32", "fp16"))
    manifest = read_manifest(artifacts)
    if manifest["model"] != config.model:
        raise XmrError(f"{artifacts} holds a {manifest['model']} model, not {config.model}; pass --model {manifest['model']}")
    data = config.data or accuracy_data(root, manifest["regions"], manifest["config"]["img_dim"], config.test_images)
    return artifacts, data


def candidates(config: ServeBenchConfig) -> list[tuple[str, str]]:
    return [(b, p) for b, p in CANDIDATES if (config.backends is None or b in config.backends)
            and (config.precisions is None or p in config.precisions)]


def run_serve_bench(config: ServeBenchConfig, show_progress: bool = True) -> dict[str, Any]:
    """Every figure of the report (``REPORT``), measured on this machine."""
    check_output_dir(config.out, is_serve_bench_output, config.overwrite, "serve-bench output")  # before measuring
    artifacts, data = prepare_artifacts(config, show_progress)
    manifest = read_manifest(artifacts)
    model_config = manifest["config"]
    inputs = random_inputs(config.offline.images, config.offline.captions, manifest["regions"], model_config["img_dim"],
                           model_config["vocab_size"], config.offline.seed)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hardware = hardware_for(device)
    rows = candidates(config)
    online_settings = (len(config.online.clients) + len(config.online.load_fractions) + max(0, len(config.online.delays_ms) - 1))
    with progress(show_progress) as bar:
        shortlist_settings = 4 * len(config.shortlist.galleries) + 1
        task = bar.add_task("serve-bench", total=len(rows) + 1 + 2 * online_settings + shortlist_settings, info="")

        def advance(label: str) -> None:
            bar.update(task, advance=1, info=label)

        offline = run_offline(artifacts, data, inputs, config.offline, hardware, rows, config.device,
                              config.test_images, advance)
        measured = [r for r in offline["rows"] if "skipped" not in r]
        if not measured:
            reasons = "; ".join(f"{r['backend']} {r['precision']}: {r['skipped']}" for r in offline["rows"])
            raise XmrError(f"no backend/precision could run here ({reasons or 'none selected'})")
        best = max(measured, key=lambda r: r["pairs_per_second"])
        with Scorer.load(artifacts, backend=best["backend"], precision=best["precision"], device=config.device) as scorer:
            with BatchedScorer(scorer) as front:
                online = run_online(front, workloads(scorer, inputs, config.online), config.online, advance)
                shortlist = run_shortlist_bench(front, best["pairs_per_second"], config.shortlist, advance)
    return {"format": FORMAT, "environment": environment(), "hardware": hardware.as_dict(),
            "config": json.loads(json.dumps(dataclasses.asdict(config), default=_json_value)),
            "artifacts": str(artifacts), "model": manifest["model"], "model_config": model_config,
            "regions": manifest["regions"],
            "matrix": {"images": config.offline.images, "captions": config.offline.captions,
                       "pairs": config.offline.images * config.offline.captions},
            "offline": offline, "online": {"backend": best["backend"], "precision": best["precision"], "results": online},
            "shortlist": shortlist}


def workloads(scorer: Scorer, inputs: Any, config: OnlineConfig) -> list[Workload]:
    """Text -> image over an image gallery, image -> text over a caption gallery (5 per image)."""
    n = min(config.gallery_images, len(inputs.features))
    images = scorer.encode_images(inputs.features[:n])
    texts = scorer.encode_texts((inputs.ids[: 5 * n], inputs.lengths[: 5 * n]))
    captions = [(inputs.ids[i : i + 1, : inputs.lengths[i]], inputs.lengths[i : i + 1]) for i in range(len(inputs.lengths))]
    return [Workload("text->image", images, captions), Workload("image->text", texts, list(inputs.features))]


def _json_value(value: Any) -> Any:
    """What ``json.dumps`` cannot write itself: paths as strings, numpy scalars as numbers."""
    if isinstance(value, (Path, np.floating, np.integer)):
        return str(value) if isinstance(value, Path) else value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_report(report: dict[str, Any], out: Path) -> Path:
    return write_text(out / REPORT, json.dumps(report, indent=2, default=_json_value) + "\n")
