"""Lower-precision versions of the exported fp32 graphs.

FP16: weights and compute in float16 with float32 inputs and outputs (``keep_io_types``),
converted by onnxconverter-common. Ops listed in ``FP16_KEEP_FP32`` stay in float32 with
casts at their borders: ``Cast``, because the converter cannot retype a ``Cast`` to
float (mask -> float) and would leave the graph ill-typed. The text encoder's ``GRU`` is
then put back in float32 (``recurrences_in_fp32``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx

PRECISIONS = ("fp32", "fp16")
FP16_KEEP_FP32: tuple[str, ...] = ("Cast",)


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
        if node.op_type != "GRU":
            continue
        for i, name in enumerate(node.input):
            if name and i != 4:  # sequence_lens (input 4) is int32
                cast = f"{name}/as_fp32/{node.name}"
                casts.append(onnx.helper.make_node("Cast", [name], [cast], to=onnx.TensorProto.FLOAT, name=cast))
                node.input[i] = cast
        for i, name in enumerate(node.output):
            if name:
                inner = f"{name}/fp32"
                casts.append(onnx.helper.make_node("Cast", [inner], [name], to=onnx.TensorProto.FLOAT16, name=f"{name}/as_fp16"))
                node.output[i] = inner
    graph.node.extend(casts)
    return _sorted(model)


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
