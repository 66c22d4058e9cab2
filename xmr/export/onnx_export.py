"""Export the three graphs to ONNX and prove each one against the PyTorch model.

Every export is checked before it is kept: ``onnx.checker`` (full check, with shape
inference), no control-flow or sequence ops anywhere (IMRAM's steps are unrolled), and a CPU
runtime against PyTorch on inputs with real shapes: ONNX Runtime, or OpenVINO for bf16
(ONNX Runtime's CPU provider has no bfloat16 kernels). A failed check raises ``ExportError``
with the numbers and leaves no graph behind.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import torch

from xmr.errors import ExportError
from xmr.export.graphs import GRAPHS, GraphSpec, graph_modules, graph_specs
from xmr.export.precision import PRECISIONS, convert_to_bf16, convert_to_fp16, graph_path
from xmr.models.base import RetrievalModel

OPSET = 18  # parsed by TensorRT 10 and 11 (and TensorRT-RTX)
# Largest absolute difference from PyTorch fp32, any output. bf16's worst measured (PARITY_CASES,
# OpenVINO): 4.6e-2 on the test models (CAMP's image_self_scores; seeds 1-6: <= 4.3e-2), 2.5e-2
# at the released size (CAMP image_fuse_self; IMRAM 1.1e-3); fp16's 2e-2 has ~10x over its worst
# (2.3e-3), bfloat16 rounds 8x coarser, so 1e-1: 2x over the worst, 4x at the released size.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}
FORBIDDEN_OPS = frozenset({"Loop", "If", "Scan", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
                           "SequenceInsert", "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence"})


@dataclass
class ParityCase:
    """One validation input set: ``n_images`` x ``lengths`` captions."""

    n_images: int
    lengths: tuple[int, ...]


# Ni != Nt, one pair, lengths from 1 to the maximum, unsorted
PARITY_CASES = (ParityCase(3, (7, 1, 4, 7, 2)), ParityCase(1, (3,)), ParityCase(4, (1, 2, 3, 4, 5, 6, 7, 8, 9)))


def example_inputs(model: RetrievalModel, regions: int, case: ParityCase, seed: int = 0) -> dict[str, torch.Tensor]:
    """Region features, token ids (0-padded) and lengths of one case."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(case.lengths, dtype=torch.int64)
    ids = torch.randint(4, model.config.vocab_size, (len(case.lengths), max(case.lengths)), generator=g)
    ids[torch.arange(ids.size(1))[None, :] >= lengths[:, None]] = 0
    features = torch.randn(case.n_images, regions, model.config.img_dim, generator=g).abs()
    return {"features": features, "ids": ids, "lengths": lengths}


@torch.no_grad()
def graph_inputs(modules: dict[str, torch.nn.Module], spec: dict[str, GraphSpec],
                 raw: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The inputs of each graph for one case (the pair scorer's come from the encoders, whose
    prefilter vectors it does not take)."""
    images = dict(zip((t.name for t in spec["image_encoder"].outputs), modules["image_encoder"](raw["features"])))
    texts = dict(zip((t.name for t in spec["text_encoder"].outputs), modules["text_encoder"](raw["ids"], raw["lengths"])))
    encoded = {**images, **texts, "lengths": raw["lengths"]}
    return {"image_encoder": {"features": raw["features"]},
            "text_encoder": {"ids": raw["ids"], "lengths": raw["lengths"]},
            "pair_scorer": {t.name: encoded[t.name] for t in spec["pair_scorer"].inputs}}


def forbidden_ops(graph: onnx.GraphProto) -> set[str]:
    """Control-flow and sequence ops anywhere in ``graph``, subgraphs included."""
    found = set()
    for node in graph.node:
        if node.op_type in FORBIDDEN_OPS:
            found.add(node.op_type)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                found |= forbidden_ops(attribute.g)
    return found


def separate_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every graph output that other nodes also read its own ``Identity`` node, so that
    precision converters can cast the output without retyping what the graph computes with it."""
    graph = model.graph
    consumed = {name for node in graph.node for name in node.input}
    for output in graph.output:
        if output.name not in consumed:
            continue
        inner = f"{output.name}/inner"
        for node in graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
            node.input[:] = [inner if i == output.name else i for i in node.input]
        graph.node.append(onnx.helper.make_node("Identity", [inner], [output.name], name=f"{output.name}/output"))
    return model


def export_graph(module: torch.nn.Module, spec: GraphSpec, inputs: dict[str, torch.Tensor], path: Path,
                 opset: int = OPSET) -> Path:
    """Export one graph to ``path`` and run the structural checks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module, tuple(inputs[t.name] for t in spec.inputs), str(path), dynamo=False,
                          opset_version=opset, input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes())
    onnx.save(separate_outputs(onnx.load(str(path))), str(path))
    return check_graph(path, spec.name)


def check_graph(path: Path, name: str) -> Path:
    """``path`` if ``onnx.checker`` (full check) passes and it holds no control flow; else
    removes it and raises ``ExportError``."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        path.unlink(missing_ok=True)
        raise ExportError(f"{name}: onnx.checker failed on {path.name}: {e}") from e
    if found := forbidden_ops(onnx.load(str(path)).graph):
        path.unlink(missing_ok=True)
        raise ExportError(f"{name}: control-flow/sequence ops in the graph: {', '.join(sorted(found))}")
    return path


Run = Callable[[dict[str, np.ndarray]], list[np.ndarray]]  # input arrays by name -> the requested outputs


@dataclass(frozen=True)
class Runtime:
    """A CPU runtime that runs a graph file for validation: ``load(path, output_names)``
    returns a ``Run``."""

    name: str
    load: Callable[[Path, list[str]], Run]


def onnxruntime_run(path: Path, outputs: list[str]) -> Run:
    """``path`` in ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(outputs, feeds)


def import_openvino() -> ModuleType:
    """The ``openvino`` module, or an ``ExportError`` saying that bf16 needs it."""
    try:
        import openvino
    except ImportError as e:
        raise ExportError("bf16 graphs are validated with OpenVINO (ONNX Runtime's CPU provider has no bfloat16 "
                          "kernels), which is not installed: pip install openvino") from e
    return openvino


def openvino_run(path: Path, outputs: list[str]) -> Run:
    """``path`` in OpenVINO's CPU plugin at f32 inference precision, which computes every tensor
    in the graph's own type (bfloat16 where the graph says so, never upcast or downcast). Each
    input set is compiled at its own static shapes: with dynamic shapes the CPU plugin ignores
    ``GRU``'s ``sequence_lens`` (OpenVINO 2026.4: padded steps are run, the backward direction
    starts at the padding)."""
    openvino = import_openvino()
    core = openvino.Core()
    model = core.read_model(str(path))

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        model.reshape({port_named(model.inputs, name, path): openvino.PartialShape(list(value.shape))
                       for name, value in feeds.items()})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled({port_named(compiled.inputs, name, path): value for name, value in feeds.items()})
        return [result[port_named(compiled.outputs, name, path)] for name in outputs]

    return run


def port_named(ports: Sequence[Any], name: str, path: Path) -> Any:
    """The OpenVINO port of ``ports`` that carries the tensor ``name`` (a port may carry several names)."""
    for port in ports:
        if name in set(port.get_names()):
            return port
    raise ExportError(f"{path.name}: OpenVINO has no port named {name!r}")


ONNX_RUNTIME = Runtime("ONNX Runtime", onnxruntime_run)
OPENVINO = Runtime("OpenVINO", openvino_run)
VALIDATORS = {"bf16": OPENVINO}  # ONNX Runtime for every other precision


def validator(precision: str) -> Runtime:
    """The runtime that validates graphs of ``precision``."""
    return VALIDATORS.get(precision, ONNX_RUNTIME)


def max_differences(path: Path, module: torch.nn.Module, spec: GraphSpec,
                    cases: list[dict[str, torch.Tensor]], runtime: Runtime = ONNX_RUNTIME) -> dict[str, float]:
    """Largest absolute difference of each output over the input sets ``cases``, ``runtime``
    (CPU) running ``path`` against PyTorch running ``module``."""
    run = runtime.load(path, [t.name for t in spec.outputs])
    diffs = {t.name: 0.0 for t in spec.outputs}
    for inputs in cases:
        got = run({t.name: inputs[t.name].numpy() for t in spec.inputs})
        with torch.no_grad():
            expected = module(*(inputs[t.name] for t in spec.inputs))
        expected = expected if isinstance(expected, tuple) else (expected,)
        for t, g, e in zip(spec.outputs, got, expected):
            diffs[t.name] = max(diffs[t.name], output_difference(spec.name, t.name, runtime.name, g, e.numpy()))
    return diffs


def output_difference(graph: str, output: str, engine: str, got: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference of one output, ``engine``'s against PyTorch's; raises
    ``ExportError`` on a shape mismatch or a value that is not finite."""
    if got.shape != expected.shape:
        raise ExportError(f"{graph}: output {output} has shape {got.shape} in {engine}, {expected.shape} in PyTorch")
    for name, values in ((engine, got), ("PyTorch", expected)):
        if not np.isfinite(values).all():  # NaN compares unequal to everything: never a pass
            raise ExportError(f"{graph}: output {output} holds NaN or Inf in {name}; the weights or "
                              f"the export are broken")
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()) if got.size else 0.0


def export_model(model: RetrievalModel, out_dir: Path, regions: int = 36, precisions: tuple[str, ...] = ("fp32",),
                 opset: int = OPSET, tolerances: dict[str, float] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Export, check and validate the three graphs of ``model`` into ``out_dir``, in fp32 and
    each other requested precision (fp16 converted from the fp32 graphs, bf16 from fp32 and fp16).

    Every graph of every precision is compared with the float32 PyTorch model over
    ``PARITY_CASES`` (``validator``: ONNX Runtime, OpenVINO for bf16). Returns the largest
    difference per precision (in ``PRECISIONS`` order), graph and output; raises
    ``ExportError`` listing every output over its precision's tolerance (``TOLERANCES``), and
    removes the failing graph."""
    tolerances = {**TOLERANCES, **(tolerances or {})}
    if unknown := set(precisions) - set(PRECISIONS):
        raise ExportError(f"unknown precision {', '.join(sorted(unknown))}; choose from {', '.join(PRECISIONS)}")
    if "bf16" in precisions:
        import_openvino()  # before any work
    model = model.float().eval()
    specs, modules = graph_specs(model, regions), graph_modules(model)
    cases = [graph_inputs(modules, specs, example_inputs(model, regions, case, seed=i))
             for i, case in enumerate(PARITY_CASES)]
    wanted = [p for p in PRECISIONS if p == "fp32" or p in precisions]  # fp16 before the bf16 derived from it
    parity: dict[str, dict[str, dict[str, float]]] = {p: {} for p in wanted}
    for name in GRAPHS:
        fp32_path = export_graph(modules[name], specs[name], cases[0][name], graph_path(out_dir, name, "fp32"), opset)
        for precision in parity:
            path = converted(fp32_path, out_dir, name, precision, fp16_exported="fp16" in parity)
            runtime = validator(precision)
            parity[precision][name] = worst = max_differences(path, modules[name], specs[name],
                                                              [case[name] for case in cases], runtime)
            failures = [f"- {out}: max diff = {d:.3g}" for out, d in worst.items() if not d <= tolerances[precision]]
            if failures:
                path.unlink(missing_ok=True)
                raise ExportError(f"{name} ({precision}): {runtime.name} differs from PyTorch by more than "
                                  f"{tolerances[precision]}:\n" + "\n".join(failures))
    return parity


def converted(fp32_path: Path, out_dir: Path, name: str, precision: str, fp16_exported: bool) -> Path:
    """The ``precision`` graph of ``name`` in ``out_dir``, converted from ``fp32_path`` and
    checked. bf16 is derived from the fp16 graph: the exported one (``fp16_exported``) or a
    temporary one that is removed afterwards."""
    out_path = graph_path(out_dir, name, precision)
    if precision == "fp32":
        return fp32_path
    if precision == "fp16":
        return check_graph(convert_to_fp16(fp32_path, out_path), name)
    if fp16_exported:
        return check_graph(convert_to_bf16(fp32_path, graph_path(out_dir, name, "fp16"), out_path), name)
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        fp16_path = convert_to_fp16(fp32_path, Path(scratch) / out_path.name)
        return check_graph(convert_to_bf16(fp32_path, fp16_path, out_path), name)
