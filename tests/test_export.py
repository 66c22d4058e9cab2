"""ONNX export: every graph of every model and mode matches PyTorch in ONNX Runtime (bf16:
OpenVINO), has no control flow, and a failed check stops the export."""

import sys

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from xmr.errors import ExportError
from xmr.export.graphs import graph_specs
from xmr.export.onnx_export import TOLERANCES, export_model, forbidden_ops
from xmr.export.precision import graph_path
from conftest import MODEL_VARIANTS, tiny_model

REGIONS = 5


@pytest.mark.parametrize("kind, fields", MODEL_VARIANTS)
def test_every_graph_matches_pytorch_in_onnx_runtime(tmp_path, kind, fields):
    model = tiny_model(kind, **fields)
    parity = export_model(model, tmp_path, regions=REGIONS, precisions=("fp16",))
    assert set(parity) == {"fp32", "fp16"}
    for precision, graphs in parity.items():
        assert set(graphs) == {"image_encoder", "text_encoder", "pair_scorer"}
        for graph, outputs in graphs.items():
            assert outputs and all(diff <= TOLERANCES[precision] for diff in outputs.values()), (precision, graph, outputs)
            onnx_graph = onnx.load(str(graph_path(tmp_path, graph, precision))).graph
            assert not forbidden_ops(onnx_graph)
            assert "Einsum" not in {node.op_type for node in onnx_graph.node}
            io_types = {t.type.tensor_type.elem_type for t in [*onnx_graph.input, *onnx_graph.output]}
            assert TensorProto.FLOAT16 not in io_types  # fp32 (and int64) inputs and outputs at every precision
            weight_types = {w.data_type for w in onnx_graph.initializer if len(w.dims) == 2}
            assert TensorProto.FLOAT16 not in weight_types if precision == "fp32" else TensorProto.FLOAT not in weight_types
    assert parity["fp32"]["pair_scorer"]["scores"] <= 1e-4


def test_text_encoder_graph_honours_each_length(tmp_path):
    """The exported GRU runs each caption on its own length: padding never leaks in."""
    import onnxruntime as ort

    model = tiny_model("imram")
    export_model(model, tmp_path, regions=REGIONS)
    session = ort.InferenceSession(str(tmp_path / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(4, 50, (3, 10))
    lengths = torch.tensor([4, 10, 1])
    out = session.run(None, {"ids": ids.numpy(), "lengths": lengths.numpy()})[0]
    for row, n in enumerate(lengths.tolist()):
        alone = session.run(None, {"ids": ids[row : row + 1, :n].numpy(), "lengths": lengths[row : row + 1].numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out[row, :n]), torch.from_numpy(alone[0]), rtol=0, atol=1e-6)
        assert (out[row, n:] == 0).all()


def test_specs_name_dynamic_axes():
    specs = graph_specs(tiny_model("camp"), REGIONS)
    scorer = specs["pair_scorer"]
    shapes = {t.name: t.shape for t in scorer.inputs}
    assert shapes["image_regions"] == ["n_images", REGIONS, 16]
    assert shapes["text_self_scores"] == ["n_captions", "length", "length"]
    assert shapes["lengths"] == ["n_captions"]
    assert [t.name for t in scorer.outputs] == ["scores"]


def _f32(name, *shape):
    return name, "float32", list(shape)


# What graph_specs gave before models declared their prepared tensors (it then prepared zeros
# at two sizes to find the dynamic axes), for tiny_model (D = 16, img_dim 12) and R = 5.
I, C, L = "n_images", "n_captions", "length"
CAMP_IO = ([_f32("image_regions", I, 5, 16), _f32("image_cross", I, 5, 16), _f32("image_self_scores", I, 5, 5),
            _f32("image_fuse_self", I, 5, 16), _f32("image_fuse_message", I, 5, 16)],
           [_f32("text_words", C, L, 16), _f32("text_cross", C, L, 16), _f32("text_self_scores", C, L, L),
            _f32("text_fuse_self", C, L, 16), _f32("text_fuse_message", C, L, 16)])
T2I_IO = ([_f32("image_t2i_context_part", I, 5, 32)], [_f32("text_t2i_query_part", C, L, 32)])
I2T_IO = ([_f32("image_i2t_query_part", I, 5, 32)], [_f32("text_i2t_context_part", C, L, 32)])
DUAL_IO = ([_f32("image_regions", I, 5, 16)], [_f32("text_words", C, L, 16)])
GRAPH_IO_BEFORE = {
    ("camp", None): CAMP_IO,
    ("imram", "full"): (DUAL_IO[0] + T2I_IO[0] + I2T_IO[0], DUAL_IO[1] + T2I_IO[1] + I2T_IO[1]),
    ("imram", "text"): (DUAL_IO[0] + T2I_IO[0], DUAL_IO[1] + T2I_IO[1]),
    ("imram", "image"): (DUAL_IO[0] + I2T_IO[0], DUAL_IO[1] + I2T_IO[1]),
    ("dual", None): DUAL_IO,
}


@pytest.mark.parametrize("kind, fields", MODEL_VARIANTS)
def test_graph_specs_are_unchanged(kind, fields):
    """Every graph's inputs and outputs (names, order, dtypes, shapes) as before the declared spec."""
    images, texts = GRAPH_IO_BEFORE[kind, fields.get("mode")]
    lengths = ("lengths", "int64", [C])
    expected = {"image_encoder": ([_f32("features", I, 5, 12)], images),
                "text_encoder": ([("ids", "int64", [C, L]), lengths], texts),
                "pair_scorer": ([*images, *texts, lengths], [_f32("scores", I, C)])}
    specs = graph_specs(tiny_model(kind, **fields), REGIONS)
    assert {name: ([(t.name, t.dtype, t.shape) for t in spec.inputs], [(t.name, t.dtype, t.shape) for t in spec.outputs])
            for name, spec in specs.items()} == expected


def test_control_flow_is_found_in_subgraphs_too():
    then = helper.make_graph([helper.make_node("Loop", ["n", "c"], ["y"])], "then", [], [])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=then)
    assert forbidden_ops(helper.make_graph([node], "g", [], [])) == {"If", "Loop"}


def test_parity_failure_stops_the_export_with_numbers(tmp_path):
    with pytest.raises(ExportError, match=r"image_encoder \(fp32\): ONNX Runtime differs .*\n- image_regions: max diff = "):
        export_model(tiny_model("imram"), tmp_path, regions=REGIONS, tolerances={"fp32": -1.0})
    assert not (tmp_path / "image_encoder.onnx").exists()


def test_fp16_text_encoder_runs_its_gru_in_fp32(tmp_path):
    """TensorRT's strongly typed parser rejects a float16 GRU: the recurrence stays float32."""
    export_model(tiny_model("imram"), tmp_path, regions=REGIONS, precisions=("fp16",))
    graph = onnx.load(str(graph_path(tmp_path, "text_encoder", "fp16"))).graph
    produced_by = {out: node for node in graph.node for out in node.output}
    weights = {w.name: w.data_type for w in graph.initializer}
    gru = next(node for node in graph.node if node.op_type == "GRU")
    for name in (gru.input[0], gru.input[1], gru.input[2]):
        cast = produced_by[name]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
    assert weights[produced_by[gru.input[1]].input[0]] == TensorProto.FLOAT16  # stored in float16



@pytest.mark.parametrize("kind, fields", MODEL_VARIANTS)
def test_bf16_graphs_compute_in_bfloat16_with_the_fp32_weights_rounded(tmp_path, kind, fields):
    """Strongly typed bfloat16 inside, float32 at the borders, every weight the fp32 one rounded
    to bfloat16, and a parity within tolerance yet above fp32's: bfloat16 was computed."""
    parity = export_model(tiny_model(kind, **fields), tmp_path, regions=REGIONS, precisions=("bf16",))
    assert list(parity) == ["fp32", "bf16"]
    rounded_weights = matmuls = 0
    assert not list(tmp_path.glob("*.fp16.onnx"))  # the fp16 graph it was derived from is not left behind
    for graph, outputs in parity["bf16"].items():
        path = graph_path(tmp_path, graph, "bf16")
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        assert all(diff <= TOLERANCES["bf16"] for diff in outputs.values()), (graph, outputs)
        assert max(outputs.values()) > 10 * max(parity["fp32"][graph].values()), (graph, outputs)
        io_types = {t.type.tensor_type.elem_type for t in [*model.graph.input, *model.graph.output]}
        assert io_types <= {TensorProto.FLOAT, TensorProto.INT64}
        types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
        types |= {w.name: w.data_type for w in model.graph.initializer}
        for node in (node for node in model.graph.node if node.op_type == "MatMul"):
            assert [types[name] for name in node.input] == [TensorProto.BFLOAT16] * 2, (graph, node.name)
            matmuls += 1
        assert TensorProto.FLOAT16 not in set(types.values())
        fp32_weights = {w.name: w for w in onnx.load(str(graph_path(tmp_path, graph, "fp32"))).graph.initializer}
        for weight in (w for w in model.graph.initializer if w.data_type == TensorProto.BFLOAT16):
            rounded = numpy_helper.to_array(fp32_weights[weight.name]).astype(ml_dtypes.bfloat16)
            assert np.array_equal(numpy_helper.to_array(weight).view(np.uint16), rounded.view(np.uint16)), weight.name
            rounded_weights += 1
    assert rounded_weights >= 2 and matmuls >= 1  # the image encoder's projection at least


def test_bf16_keeps_the_fp16_graph_when_asked_and_runs_unsupported_ops_in_fp32(tmp_path):
    """With fp16 requested too, bf16 is derived from the exported fp16 graph; ConstantOfShape
    (no bfloat16 before opset 20) runs in float32, cast to bfloat16 after; the l2-norm eps is
    the fp32 graph's 1e-8, not fp16's 1e-7."""
    parity = export_model(tiny_model("imram"), tmp_path, regions=REGIONS, precisions=("bf16", "fp16"))
    assert list(parity) == ["fp32", "fp16", "bf16"]
    graph = onnx.load(str(graph_path(tmp_path, "text_encoder", "bf16"))).graph
    consumers = {name: node for node in graph.node for name in node.input}
    filled = [node for node in graph.node if node.op_type == "ConstantOfShape"]
    float_fills = [node for node in filled if node.attribute[0].t.data_type != TensorProto.INT64]
    assert float_fills
    for node in float_fills:
        assert node.attribute[0].t.data_type == TensorProto.FLOAT
        cast = consumers[node.output[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.BFLOAT16
    constants = [numpy_helper.to_array(node.attribute[0].t) for node in graph.node if node.op_type == "Constant"]
    scalars = [float(c.astype(np.float32)) for c in constants if c.dtype == ml_dtypes.bfloat16 and c.size == 1]
    assert float(np.float32(1e-8).astype(ml_dtypes.bfloat16)) in scalars


def test_bf16_without_openvino_is_a_one_line_export_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(ExportError, match=r"^bf16 graphs are validated with OpenVINO .*pip install openvino$") as error:
        export_model(tiny_model("dual"), tmp_path, regions=REGIONS, precisions=("bf16",))
    assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())  # refused before any export


def test_openvino_validates_bfloat16_as_bfloat16(tmp_path):
    """The bf16 validator computes the graph's own types: a bfloat16 MatMul and Add come out
    bit for bit as numpy's bfloat16 emulation (float32 products, each result rounded), not as
    float32 arithmetic on bfloat16 weights."""
    from xmr.export.onnx_export import OPENVINO

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 32), dtype=np.float32), rng.standard_normal((32, 32), dtype=np.float32)
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.BFLOAT16),
             helper.make_node("MatMul", ["x16", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "x16"], ["sum"]),
             helper.make_node("Cast", ["sum"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
                              [numpy_helper.from_array(w.astype(ml_dtypes.bfloat16), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "bf16.onnx")
    y = OPENVINO.load(tmp_path / "bf16.onnx", ["y"])({"x": x})[0]

    def bf16(a):
        return a.astype(ml_dtypes.bfloat16).astype(np.float32)

    assert np.array_equal(y, bf16(bf16(bf16(x) @ bf16(w)) + bf16(x)))
    assert np.abs(y - (bf16(x) @ bf16(w) + bf16(x))).max() > 1e-3
