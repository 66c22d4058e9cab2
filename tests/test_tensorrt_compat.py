"""Every exported graph (fp32, fp16, bf16 and INT8 Q/DQ) parses and builds with the TensorRT builder code users run.

On machines without TensorRT and a GPU this uses TensorRT for RTX, which builds engines ahead
of time for a chosen compute capability (SM80 and SM89 here). Engines are not executed here,
and TensorRT-RTX has no Hopper target: a pass is strong evidence, not proof (docs/export.md).
"""

import pytest
from onnx import TensorProto, helper, save

from xmr.errors import ExportError
from xmr.export.graphs import GraphSpec, TensorSpec, graph_specs
from xmr.calibration.config import CalibrationConfig
from xmr.calibration.dataset import CalibrationSet
from xmr.calibration.fallback import Quantizer
from xmr.export.graphs import GLOBAL_OUTPUTS, GRAPHS, graph_modules
from xmr.export.onnx_export import PARITY_CASES, example_inputs, export_model, graph_inputs
from xmr.export.precision import graph_path
from xmr.export.tensorrt import BuildOptions, ProfileShapes, build_engine, load_tensorrt
from conftest import MODEL_VARIANTS, tiny_model

trt = load_tensorrt("tensorrt_rtx")
pytestmark = pytest.mark.skipif(trt is None, reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13)")
TARGETS = ("SM80", "SM89")
HEAD_VARIANTS = [("camp", {"global_dim": 6}), ("imram", {"mode": "full", "global_dim": 6})]  # prefilter heads


def _variant_id(variant):
    return f"{variant[0]}-{'-'.join(map(str, variant[1].values()))}"


@pytest.fixture(scope="module", params=MODEL_VARIANTS, ids=_variant_id)
def exported(request, tmp_path_factory):
    return _export_every_precision(*request.param, tmp_path_factory.mktemp(request.param[0]))


@pytest.fixture(scope="module", params=HEAD_VARIANTS, ids=_variant_id)
def exported_with_head(request, tmp_path_factory):
    return _export_every_precision(*request.param, tmp_path_factory.mktemp(request.param[0]))


def _export_every_precision(kind, fields, out):
    """``out`` with the fp32, fp16, bf16 and INT8 Q/DQ graphs of a tiny ``kind`` model, and its specs."""
    model = tiny_model(kind, **fields)
    export_model(model, out, regions=5, precisions=("fp16", "bf16"))
    specs = graph_specs(model, 5)
    cases = [graph_inputs(graph_modules(model), specs, example_inputs(model, 5, case, seed=i))
             for i, case in enumerate(PARITY_CASES)]
    feeds = {g: [{k: v.numpy() for k, v in case[g].items()} for case in cases] for g in GRAPHS}
    calibration = CalibrationSet(feeds, images=8, captions=15, matching_pairs=0, non_matching_pairs=0, caption_lengths=[1, 9])
    int8 = Quantizer({g: graph_path(out, g, "fp32") for g in GRAPHS}, calibration, CalibrationConfig(), out / "ranges").build(out)
    assert all(path.name.endswith(".int8.onnx") for g, path in int8.items() if g != "text_encoder" or kind != "dual")
    return out, specs


def _build_every_target(out, spec, graph, precision):
    path = graph_path(out, graph, precision)
    if not path.is_file() and precision == "int8":
        pytest.skip(f"{graph} has no matmul to quantize")
    for target in TARGETS:
        engine = build_engine(trt, path, spec, ProfileShapes(), BuildOptions(compute_capability=target))
        assert len(engine) > 1000, (graph, precision, target)


@pytest.mark.parametrize("graph", ["image_encoder", "text_encoder", "pair_scorer"])
def test_fp32_graphs_build_for_each_target(exported, graph):
    out, specs = exported
    _build_every_target(out, specs[graph], graph, "fp32")


@pytest.mark.parametrize("graph", ["image_encoder", "text_encoder", "pair_scorer"])
def test_fp16_graphs_build_for_each_target(exported, graph):
    out, specs = exported
    _build_every_target(out, specs[graph], graph, "fp16")


@pytest.mark.parametrize("graph", ["image_encoder", "text_encoder", "pair_scorer"])
def test_bf16_graphs_build_for_each_target(exported, graph):
    out, specs = exported
    _build_every_target(out, specs[graph], graph, "bf16")


@pytest.mark.parametrize("graph", ["image_encoder", "text_encoder", "pair_scorer"])
def test_int8_qdq_graphs_build_for_each_target(exported, graph):
    out, specs = exported
    _build_every_target(out, specs[graph], graph, "int8")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("graph", ["image_encoder", "text_encoder"])
def test_encoders_with_prefilter_heads_build_for_each_target(exported_with_head, graph, precision):
    """The head's global vectors are one more output of each encoder graph, in every precision."""
    out, specs = exported_with_head
    assert [t.name for t in specs[graph].outputs][-1] in GLOBAL_OUTPUTS
    _build_every_target(out, specs[graph], graph, precision)


def test_unparsable_graph_is_an_export_error(tmp_path):
    node = helper.make_node("Unique", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m"])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "unique.onnx")
    spec = GraphSpec("unique", [TensorSpec("x", "float32", ["n"])], [TensorSpec("y", "float32", ["m"])])
    with pytest.raises(ExportError, match="could not parse unique.onnx"):
        build_engine(trt, tmp_path / "unique.onnx", spec, ProfileShapes({"n": (1, 4, 8)}))


@pytest.mark.filterwarnings("ignore:Use Deprecated in TensorRT-RTX:DeprecationWarning")  # a no-op there, same calls
def test_timing_cache_is_written_and_a_rebuild_from_it_adds_nothing(tmp_path):
    """The second build is given the cache the first wrote: it still builds an engine, and
    the cache it writes back is the same size (no new timings, not truncated or reset).
    Engines are not compared byte for byte: TensorRT-RTX builds of one graph differ in a few
    bytes from run to run. Without a CUDA driver TensorRT-RTX cannot deserialize a timing cache
    ("The timing cache will not be used!") and starts from an empty one, so a speed-up cannot
    be seen here."""
    model = tiny_model("camp")
    export_model(model, tmp_path, regions=5)
    spec = graph_specs(model, 5)["image_encoder"]
    options = BuildOptions(compute_capability="SM89", timing_cache=tmp_path / "timing.cache")
    first = build_engine(trt, tmp_path / "image_encoder.onnx", spec, ProfileShapes(), options)
    written = options.timing_cache.stat().st_size
    assert written > 0 and len(first) > 1000
    second = build_engine(trt, tmp_path / "image_encoder.onnx", spec, ProfileShapes(), options)
    assert len(second) > 1000
    assert options.timing_cache.stat().st_size == written
