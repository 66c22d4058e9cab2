"""Export the three graphs to ONNX and prove each one against the PyTorch model.

Every export is checked before it is kept: ``onnx.checker`` (full check, with shape
inference), no control-flow or sequence ops anywhere (IMRAM's steps are unrolled), and ONNX
Runtime (CPU) against PyTorch on inputs with real shapes; a failed check raises
``ExportError`` with the numbers and leaves no graph behind.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from xmr.errors import ExportError
from xmr.export.graphs import GRAPHS, GraphSpec, graph_modules, graph_specs
from xmr.export.precision import PRECISIONS, convert_to_fp16, graph_path
from xmr.models.base import RetrievalModel

OPSET = 18  # parsed by TensorRT 10 and 11 (and TensorRT-RTX)
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}  # largest absolute difference from PyTorch fp32, any output
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
    """The inputs of each graph for one case (the pair scorer's come from the encoders)."""
    images = dict(zip((t.name for t in spec["image_encoder"].outputs), modules["image_encoder"](raw["features"])))
    texts = dict(zip((t.name for t in spec["text_encoder"].outputs), modules["text_encoder"](raw["ids"], raw["lengths"])))
    return {"image_encoder": {"features": raw["features"]},
            "text_encoder": {"ids": raw["ids"], "lengths": raw["lengths"]},
            "pair_scorer": {**images, **texts, "lengths": raw["lengths"]}}


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
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        path.unlink(missing_ok=True)
        raise ExportError(f"{spec.name}: onnx.checker failed: {e}") from e
    if found := forbidden_ops(onnx.load(str(path)).graph):
        path.unlink(missing_ok=True)
        raise ExportError(f"{spec.name}: control-flow/sequence ops in the graph: {', '.join(sorted(found))}")
    return path


def max_differences(path: Path, module: torch.nn.Module, spec: GraphSpec,
                    inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference of each output, ONNX Runtime (CPU) against PyTorch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([t.name for t in spec.outputs], {t.name: inputs[t.name].numpy() for t in spec.inputs})
    with torch.no_grad():
        expected = module(*(inputs[t.name] for t in spec.inputs))
    expected = expected if isinstance(expected, tuple) else (expected,)
    diffs = {}
    for t, g, e in zip(spec.outputs, got, expected):
        if g.shape != tuple(e.shape):
            raise ExportError(f"{spec.name}: output {t.name} has shape {g.shape} in ONNX Runtime, {tuple(e.shape)} in PyTorch")
        for engine, values in (("ONNX Runtime", g), ("PyTorch", e.numpy())):
            if not np.isfinite(values).all():  # NaN compares unequal to everything: never a pass
                raise ExportError(f"{spec.name}: output {t.name} holds NaN or Inf in {engine}; the weights or "
                                  f"the export are broken")
        diffs[t.name] = float(np.abs(g.astype(np.float64) - e.double().numpy()).max()) if g.size else 0.0
    return diffs


def export_model(model: RetrievalModel, out_dir: Path, regions: int = 36, precisions: tuple[str, ...] = ("fp32",),
                 opset: int = OPSET, tolerances: dict[str, float] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Export, check and validate the three graphs of ``model`` into ``out_dir``, in fp32 and
    each other requested precision (converted from the fp32 graphs).

    Every graph of every precision is compared with the float32 PyTorch model over
    ``PARITY_CASES``. Returns the largest difference per precision, graph and output; raises
    ``ExportError`` listing every output over its precision's tolerance (``TOLERANCES``), and
    removes the failing graph."""
    tolerances = {**TOLERANCES, **(tolerances or {})}
    if unknown := set(precisions) - set(PRECISIONS):
        raise ExportError(f"unknown precision {', '.join(sorted(unknown))}; choose from {', '.join(PRECISIONS)}")
    model = model.float().eval()
    specs, modules = graph_specs(model, regions), graph_modules(model)
    cases = [graph_inputs(modules, specs, example_inputs(model, regions, case, seed=i))
             for i, case in enumerate(PARITY_CASES)]
    parity: dict[str, dict[str, dict[str, float]]] = {p: {} for p in ("fp32", *precisions)}
    for name in GRAPHS:
        fp32_path = export_graph(modules[name], specs[name], cases[0][name], graph_path(out_dir, name, "fp32"), opset)
        for precision in parity:
            path = fp32_path if precision == "fp32" else convert_to_fp16(fp32_path, graph_path(out_dir, name, precision))
            diffs = [max_differences(path, modules[name], specs[name], case[name]) for case in cases]
            parity[precision][name] = worst = {out: max(d[out] for d in diffs) for out in diffs[0]}
            failures = [f"- {out}: max diff = {d:.3g}" for out, d in worst.items() if not d <= tolerances[precision]]
            if failures:
                path.unlink(missing_ok=True)
                raise ExportError(f"{name} ({precision}): ONNX Runtime differs from PyTorch by more than "
                                  f"{tolerances[precision]}:\n" + "\n".join(failures))
    return parity
