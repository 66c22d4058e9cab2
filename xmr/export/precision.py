"""Lower-precision versions of the exported fp32 graphs.

FP16: weights and compute in float16 with float32 inputs and outputs (``keep_io_types``),
converted by onnxconverter-common. Ops listed in ``FP16_KEEP_FP32`` stay in float32 with
casts at their borders: ``Cast``, because the converter cannot retype a ``Cast`` to
float (mask -> float) and would leave the graph ill-typed. The text encoder's ``GRU`` is
then put back in float32 (``recurrences_in_fp32``).

BF16: the fp16 graph retyped to bfloat16 (``convert_to_bf16``), so the op placement above is
reused: what runs in float16 there runs in bfloat16 here, what stays float32 stays float32.
Every weight and constant is rounded from the fp32 graph's value (bfloat16 has float32's
range: the l2-norm eps stays 1e-8, the -1e9 mask fill stays -1e9), and a node whose ONNX
schema at the graph's opset takes no bfloat16 (``ConstantOfShape`` before opset 20, ``TopK``
on float16) is computed in float32 with casts at its borders. Inputs and outputs stay float32.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

PRECISIONS = ("fp32", "fp16", "bf16")
FP16_KEEP_FP32: tuple[str, ...] = ("Cast",)
ONNX_DOMAINS = ("", "ai.onnx")


def graph_path(out_dir: Path, graph: str, precision: str) -> Path:
    """``image_encoder.onnx`` for fp32, ``image_encoder.fp16.onnx`` and so on otherwise."""
    return out_dir / (f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx")


def convert_to_fp16(fp32_path: Path, out_path: Path, keep_fp32: tuple[str, ...] = FP16_KEEP_FP32) -> Path:
    from onnxconverter_common import float16

    model = onnx.load(str(fp32_path))
    del model.graph.value_info[:]  # stale float32 annotations would contradict the converted types
    with warnings.catch_warnings():  # constants below float16's range (the l2-norm eps 1e-8) become 1e-7
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(keep_fp32))
    onnx.save(recurrences_in_fp32(converted), str(out_path))
    return out_path


def recurrences_in_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run every ``GRU`` in float32 inside a float16 graph (casts around it): TensorRT's strongly
    typed parser rejects a float16 ``GRU``, and the recurrence is per caption, off the pair path.
    (Done here because keeping ``GRU`` in float32 through the converter's block list hangs.)"""
    graph = model.graph
    casts = []
    for node in graph.node:
        if node.op_type == "GRU":  # sequence_lens (input 4) is int32
            casts += float32_borders(node, [i for i, n in enumerate(node.input) if n and i != 4],
                                     [i for i, n in enumerate(node.output) if n], TensorProto.FLOAT16)
    graph.node.extend(casts)
    return _sorted(model)


def convert_to_bf16(fp32_path: Path, fp16_path: Path, out_path: Path) -> Path:
    """The fp16 graph at ``fp16_path`` retyped to bfloat16, with the weights and constants of
    the fp32 graph at ``fp32_path`` rounded to bfloat16, written to ``out_path``."""
    fp32 = onnx.load(str(fp32_path))
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_path)))
    graph = model.graph
    types = tensor_types(graph)
    weights = {t.name: t for t in fp32.graph.initializer}
    for i, weight in enumerate(graph.initializer):
        if weight.data_type == TensorProto.FLOAT16:
            graph.initializer[i].CopyFrom(retyped(weight, weights.get(weight.name), TensorProto.BFLOAT16))
    constants = node_tensors(fp32.graph)
    opset = onnx_opset(model)
    casts = []
    for node in graph.node:
        in_bf16 = accepts_bf16(node, opset)
        retype_attributes(node, constants, TensorProto.BFLOAT16 if in_bf16 else TensorProto.FLOAT)
        if not in_bf16:
            float16 = [i for i, name in enumerate(node.input) if types.get(name) == TensorProto.FLOAT16]
            casts += float32_borders(node, float16, [i for i, name in enumerate(node.output)
                                                     if types.get(name) == TensorProto.FLOAT16], TensorProto.BFLOAT16)
    graph.node.extend(casts)
    del graph.value_info[:]  # the inferred float16 annotations would contradict the new types
    onnx.save(_sorted(model), str(out_path))
    return out_path


def tensor_types(graph: onnx.GraphProto) -> dict[str, int]:
    """The element type of every typed tensor of ``graph`` (after shape inference), by name."""
    typed = [*graph.value_info, *graph.input, *graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in typed}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def node_tensors(graph: onnx.GraphProto) -> dict[tuple[str, str], TensorProto]:
    """The tensor attributes of ``graph``'s nodes (``Constant`` values and the like), by the
    node's first output and the attribute's name: both survive the float16 conversion."""
    tensors = {}
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR and node.output:
                tensors[node.output[0], attribute.name] = attribute.t
    return tensors


def onnx_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain that ``model`` imports."""
    return next(o.version for o in model.opset_import if o.domain in ONNX_DOMAINS)


def retyped(tensor: TensorProto, fp32: TensorProto | None, elem_type: int) -> TensorProto:
    """``tensor`` (float16) as ``elem_type`` (bfloat16 or float), rounded from its float32
    original ``fp32`` where there is one, else from its float16 value."""
    if fp32 is not None and fp32.data_type == TensorProto.FLOAT:
        values = numpy_helper.to_array(fp32)
    else:
        values = numpy_helper.to_array(tensor).astype(np.float32)
    dtype = ml_dtypes.bfloat16 if elem_type == TensorProto.BFLOAT16 else np.float32
    return numpy_helper.from_array(values.astype(dtype), tensor.name)


def accepts_bf16(node: onnx.NodeProto, opset: int) -> bool:
    """Whether every type constraint of ``node``'s schema at ``opset`` that takes float16 also
    takes bfloat16 (an op without float16 inputs needs no retyping)."""
    schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    allowed = [c.allowed_type_strs for c in schema.type_constraints]
    return all("tensor(bfloat16)" in types for types in allowed if "tensor(float16)" in types)


def retype_attributes(node: onnx.NodeProto, fp32_tensors: dict[tuple[str, str], TensorProto], elem_type: int) -> None:
    """``node``'s float16 attributes as ``elem_type``: a ``Cast`` to float16 casts to
    bfloat16, a float16 tensor (``Constant``, ``ConstantOfShape``) takes its fp32 value."""
    for attribute in node.attribute:
        if attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
            attribute.i = TensorProto.BFLOAT16
        if attribute.type == AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT16:
            fp32 = fp32_tensors.get((node.output[0], attribute.name)) if node.output else None
            attribute.t.CopyFrom(retyped(attribute.t, fp32, elem_type))


def float32_borders(node: onnx.NodeProto, inputs: list[int], outputs: list[int], elem_type: int) -> list[onnx.NodeProto]:
    """Rewire ``node`` to read its ``inputs`` and write its ``outputs`` (positions) in float32
    where the graph around it holds ``elem_type``; returns the casts to add at its borders."""
    casts = []
    for i in inputs:
        name = node.input[i]
        cast = f"{name}/as_fp32/{node.name}"
        casts.append(onnx.helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT, name=cast))
        node.input[i] = cast
    suffix = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}[elem_type]
    for i in outputs:
        name = node.output[i]
        inner = f"{name}/fp32"
        casts.append(onnx.helper.make_node("Cast", [inner], [name], to=elem_type, name=f"{name}/as_{suffix}"))
        node.output[i] = inner
    return casts


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in topological order (ONNX requires it; the casts were appended at the end)."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or a dangling input")
        ordered += ready
        available.update(o for node in ready for o in node.output)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    del graph.node[:]
    graph.node.extend(ordered)
    return model
