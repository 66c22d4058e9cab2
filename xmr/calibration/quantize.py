"""INT8 graphs with explicit Q/DQ nodes, by ONNX Runtime's static quantizer.

The form TensorRT's strongly typed INT8 path consumes: ``QuantizeLinear``/``DequantizeLinear``
on the inputs of every ``MatMul``/``Gemm``, weights symmetric per output channel, activations
symmetric per tensor, biases left in float (TensorRT rejects int32 biases), outputs of the
matmuls not re-quantized (they feed float element-wise ops). Activation ranges come from the
calibration set and are cached as JSON (ONNX Runtime's own format), so re-quantizing (another
fallback set, a rebuild) skips calibration.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from xmr.errors import CalibrationError
from xmr.calibration.dataset import Arrays

QUANTIZED_OPS = ("MatMul", "Gemm")


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def quantizable_nodes(path: Path) -> list[str]:
    """Names of the nodes INT8 quantization applies to, in graph order."""
    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in QUANTIZED_OPS]


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Matmul nodes every input of which is dequantized (i.e. that run in INT8)."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in QUANTIZED_OPS and all(i in dequantized for i in n.input[:2])]


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice (pre-processing, non-constant biases) on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _reader(feeds: list[Arrays]):
    from onnxruntime.quantization import CalibrationDataReader

    batches = iter(feeds)

    class Reader(CalibrationDataReader):
        def get_next(self) -> Arrays | None:
            return next(batches, None)

    return Reader()


def collect_ranges(fp32_path: Path, feeds: list[Arrays], ranges_path: Path, method: str = "minmax",
                   percentile: float = 99.999) -> None:
    """Activation ranges of ``fp32_path`` over ``feeds`` by ONNX Runtime's calibrator, saved as
    its JSON cache. One batch per pass, so batches may differ in shape (caption lengths): its
    histogram methods cannot stack such batches, but merge histograms across passes."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    if not feeds:
        raise ValueError(f"no calibration data for {fp32_path.name}")
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
        calibrator = create_calibrator(Path(fp32_path), list(QUANTIZED_OPS),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=_method(method),
                                       extra_options={"percentile": percentile} if method == "percentile" else {})
        try:
            for feed in feeds:
                calibrator.collect_data(_reader([feed]))
        except ValueError as e:  # numpy cannot bin a (nearly) constant activation
            raise CalibrationError(f"{method} calibration of {fp32_path.name} failed in ONNX Runtime ({e}): an "
                                   f"activation is nearly constant over the calibration set; use --method minmax") from e
        ranges = calibrator.compute_data()
    save_tensors_data(ranges, ranges_path)


def quantize_graph(fp32_path: Path, out_path: Path, feeds: list[Arrays] | None, ranges_path: Path,
                   method: str = "minmax", percentile: float = 99.999, exclude: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Write the INT8 Q/DQ version of ``fp32_path`` to ``out_path``; returns it.

    Activation ranges are read from ``ranges_path`` when it exists, else collected over
    ``feeds`` with ``method`` (``collect_ranges``) and saved there first. Nodes in ``exclude`` stay in float32."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if not ranges_path.is_file():
        collect_ranges(fp32_path, feeds or [], ranges_path, method, percentile)
    options = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
               "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS), "DedicatedQDQPair": True}
    with _quiet_quantizer():
        quantize_static(str(fp32_path), str(out_path), None,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude), calibrate_method=_method(method),
                        extra_options=options, calibration_cache_path=str(ranges_path))
    model = unshare_quantization_parameters(onnx.load(str(out_path)))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out_path))
    return model


def unshare_quantization_parameters(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every Q/DQ node its own scale and zero-point initializers.

    The quantizer shares them between all Q/DQ nodes of one tensor. ONNX Runtime's CPU
    optimizer then cannot turn those pairs into its uint8 form, and the matmuls they feed
    stay float (DQ -> fp32 MatMul): measured 1.8-2x slower than with its integer kernels.
    Same values, same graph for TensorRT."""
    initializers = {i.name: i for i in model.graph.initializer}
    uses = Counter(name for node in model.graph.node for name in node.input)
    copies = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for position in (1, 2):
            name = node.input[position] if len(node.input) > position else ""
            if name in initializers and uses[name] > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(initializers[name])
                copy.name = f"{name}/{node.name}"
                copies.append(copy)
                node.input[position] = copy.name
                uses[name] -= 1
    model.graph.initializer.extend(copies)
    return model
