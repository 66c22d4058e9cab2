"""ONNX export: every graph of every model and mode matches PyTorch in ONNX Runtime, has no
control flow, and a failed check stops the export."""

import onnx
import pytest
import torch
from onnx import TensorProto, helper

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

