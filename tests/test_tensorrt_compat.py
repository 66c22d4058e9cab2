"""Every exported graph parses and builds with the TensorRT builder code users run.

On machines without TensorRT and a GPU this uses TensorRT for RTX, which builds engines ahead
of time for a chosen compute capability (SM80 and SM89 here). Engines are not executed here,
and TensorRT-RTX has no Hopper target: a pass is strong evidence, not proof (docs/export.md).
"""

import pytest
from onnx import TensorProto, helper, save

from xmr.errors import ExportError
from xmr.export.graphs import GraphSpec, TensorSpec, graph_specs
from xmr.export.onnx_export import export_model
from xmr.export.tensorrt import BuildOptions, ProfileShapes, build_engine, load_tensorrt
from conftest import MODEL_VARIANTS, tiny_model

trt = load_tensorrt("tensorrt_rtx")
pytestmark = pytest.mark.skipif(trt is None, reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13)")
TARGETS = ("SM80", "SM89")


@pytest.mark.parametrize("kind, fields", MODEL_VARIANTS)
def test_every_graph_builds_for_each_target(tmp_path, kind, fields):
    model = tiny_model(kind, **fields)
    export_model(model, tmp_path, regions=5)
    for name, spec in graph_specs(model, 5).items():
        for target in TARGETS:
            engine = build_engine(trt, tmp_path / f"{name}.onnx", spec, ProfileShapes(), BuildOptions(compute_capability=target))
            assert len(engine) > 1000, (name, target)


def test_unparsable_graph_is_an_export_error(tmp_path):
    node = helper.make_node("Unique", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m"])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "unique.onnx")
    spec = GraphSpec("unique", [TensorSpec("x", "float32", ["n"])], [TensorSpec("y", "float32", ["m"])])
    with pytest.raises(ExportError, match="could not parse unique.onnx"):
        build_engine(trt, tmp_path / "unique.onnx", spec, ProfileShapes({"n": (1, 4, 8)}))


def test_timing_cache_is_written_and_reused(tmp_path):
    model = tiny_model("camp")
    export_model(model, tmp_path, regions=5)
    spec = graph_specs(model, 5)["image_encoder"]
    options = BuildOptions(compute_capability="SM89", timing_cache=tmp_path / "timing.cache")
    build_engine(trt, tmp_path / "image_encoder.onnx", spec, ProfileShapes(), options)
    assert options.timing_cache.stat().st_size > 0
    build_engine(trt, tmp_path / "image_encoder.onnx", spec, ProfileShapes(), options)
