"""The package layout is the pipeline: each layer imports only the layers before it, and
``import xmr.runtime`` loads only what serving needs (no onnx, no training, no benchmark)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xmr.data import SynthConfig, Vocabulary, write_synthetic
from xmr.export.artifacts import export_artifacts
from xmr.models import build_model, make_config
from xmr.models.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xmr"

# Lowest first; a module may import its own layer and any layer before it. "base": the
# top-level modules anyone may import.
LAYERS = ["base", "data", "models", "export", "runtime", "serve", "matrix", "eval", "calibration", "train", "benchmark",
          "cli"]
BASE = {"xmr", "xmr.errors", "xmr.config", "xmr.paths", "xmr.outputs", "xmr.progress", "xmr.device", "xmr.cpu"}

# What serving does not need: none of it may be loaded by ``import xmr.runtime``.
NOT_FOR_SERVING = ["onnx", "onnxruntime.quantization", "matplotlib", "xmr.train", "xmr.calibration", "xmr.eval",
                   "xmr.benchmark", "xmr.cli", "xmr.export.artifacts", "xmr.export.onnx_export"]
BACKEND_LIBRARIES = ["onnxruntime", "openvino", "tensorrt", "tensorrt_rtx"]  # only once that backend is created


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    """The layer of an ``xmr`` module, or None if it is not placed in one."""
    if module in BASE:
        return "base"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS[1:] else None


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, module: str, known: set[str]) -> list[tuple[int, str]]:
    """Every ``xmr`` module ``path`` imports (anywhere in it, functions included), with its line."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # ``from xmr import runtime`` imports the module xmr.runtime
                name = f"{base}.{alias.name}"
                found.append((node.lineno, name if name in known else base))
    return list(dict.fromkeys((line, name) for line, name in found if name == "xmr" or name.startswith("xmr.")))


def test_every_module_is_placed_in_a_layer():
    unplaced = sorted(name for name in modules() if layer_of(name) is None)
    assert not unplaced, (f"modules in no layer (add their package to LAYERS in {Path(__file__).name}, "
                          f"where it sits in the pipeline): {unplaced}")


def test_no_import_runs_up_the_pipeline():
    known = set(modules())
    upward = []
    for name, path in modules().items():
        here = LAYERS.index(layer_of(name) or "cli")
        for line, target in imported(path, name, known):
            there = layer_of(target)
            if there is None:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}, which is in no layer")
            elif LAYERS.index(there) > here:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({LAYERS[here]} -> {there})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import_inside_a_function(tmp_path):
    """The parser above finds imports anywhere in a module, relative ones resolved."""
    source = tmp_path / "scorer.py"
    source.write_text("def f():\n    from xmr.eval.scoring import x\n    from ..eval import metrics\n")
    found = imported(source, "xmr.runtime.scorer", {"xmr.eval.metrics"})
    assert found == [(2, "xmr.eval.scoring"), (3, "xmr.eval.metrics")]
    assert [layer_of(t) for _, t in found] == ["eval", "eval"]


def loaded_after(code: str, *args: str) -> dict[str, list[str]]:
    """Run ``code`` in a fresh interpreter: which watched modules (or their submodules) it loaded."""
    script = (f"import json, sys\n{code}\n"
              f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
              f"{{w.split('.')[0] for w in {NOT_FOR_SERVING + BACKEND_LIBRARIES!r}}})))\n")
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])

    def seen(watched: list[str]) -> list[str]:
        return [w for w in watched if any(m == w or m.startswith(w + ".") for m in loaded)]

    return {"not for serving": seen(NOT_FOR_SERVING), "backend libraries": seen(BACKEND_LIBRARIES)}


def test_importing_the_runtime_loads_nothing_serving_does_not_need():
    assert loaded_after("import xmr.runtime") == {"not for serving": [], "backend libraries": []}


def test_the_watch_list_would_see_a_heavy_import():
    """The check above is not vacuous: the exporter does load onnx."""
    assert "onnx" in loaded_after("import xmr.export.artifacts")["not for serving"]


def test_the_command_line_starts_without_torch_or_onnx():
    """``xmr --help`` and a mistyped option answer at once: the options come from modules that
    load neither torch nor onnx (each command imports the library it calls)."""
    code = ("import sys, xmr.cli\nfrom xmr.models import list_models\nlist_models()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'onnxruntime'}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", (run.stdout, run.stderr[-2000:])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("layering") / "synth"
    write_synthetic(data, SynthConfig(n_train=8, n_dev=4, n_test=4, regions=4, img_dim=8, seed=2))
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = build_model(make_config("imram", vocab_size=len(vocab), img_dim=8, embed_size=8, word_dim=8), vocab)
    checkpoint = save_checkpoint(model, data.parent / "imram.pt", {"regions": 4})
    out = data.parent / "artifacts"
    export_artifacts(checkpoint, out, ("fp32",), engine=False)
    return out


def test_a_torch_scorer_loads_no_backend_library(artifacts):
    code = ("import sys\nimport numpy as np\nfrom xmr.runtime import Scorer\n"
            "scorer = Scorer.load(sys.argv[1], backend='torch', device='cpu')\n"
            "scores = scorer.score(np.random.default_rng(0).standard_normal((2, 4, 8), dtype=np.float32), "
            "['a red car .', 'a dog .'])\n"
            "assert scores.shape == (2, 2), scores.shape")
    assert loaded_after(code, str(artifacts)) == {"not for serving": [], "backend libraries": []}


def test_an_onnxruntime_scorer_loads_onnxruntime_and_still_no_onnx(artifacts):
    """The other side of the check above: creating that backend is what imports its library."""
    pytest.importorskip("onnxruntime")
    code = "import sys\nfrom xmr.runtime import Scorer\nScorer.load(sys.argv[1], backend='onnxruntime', device='cpu')"
    assert loaded_after(code, str(artifacts)) == {"not for serving": [], "backend libraries": ["onnxruntime"]}


def test_an_openvino_scorer_loads_openvino_and_onnxruntime_for_its_text_encoder(artifacts):
    pytest.importorskip("openvino")
    code = "import sys\nfrom xmr.runtime import Scorer\nScorer.load(sys.argv[1], backend='openvino', device='cpu')"
    assert loaded_after(code, str(artifacts)) == {"not for serving": [], "backend libraries": ["onnxruntime", "openvino"]}
