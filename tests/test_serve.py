"""``xmr serve``: the Scorer behind Triton Inference Server, end to end over HTTP and gRPC."""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import alive, descendants, export_small_imram, invoke

from xmr.errors import InputError
from xmr.runtime import Scorer
from xmr.serve.repository import SCORE_PAIRS, SEARCH_IMAGE, SEARCH_TEXT, ServeConfig, model_config, \
    read_model_config, write_repository
from xmr.serve.server import ServeError, wait_ready

http = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")
from tritonclient.utils import InferenceServerException  # noqa: E402

REGIONS, IMG_DIM = 5, 12
READY_TIMEOUT_S = 240
MAX_QUEUE = 2
INSTANCES = 2  # per model: searches are answered by whichever instance takes the batch


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Artifacts of a small IMRAM with a prefilter head, the test split, its features and captions as files."""
    root = tmp_path_factory.mktemp("serve")
    split = export_small_imram(root, n_test=12, seed=3, regions=REGIONS, img_dim=IMG_DIM)
    return {"root": root, "split": split}


@pytest.fixture(scope="module")
def served(exported):
    """An `xmr serve` subprocess on free ports over ``exported``, and the same scorer in-process."""
    root, split = exported["root"], exported["split"]
    ports = free_ports(3)
    command = [sys.executable, "-m", "xmr.cli", "serve", "--artifacts", str(root / "artifacts"),
               "--images", str(root / "images.npy"), "--captions", str(root / "captions.txt"),
               "--backend", "onnxruntime", "--instances", str(INSTANCES), "--threads", "1", "--k", "4", "--max-batch", "4",
               "--max-queue", str(MAX_QUEUE), "--max-queue-delay-us", "20000",
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    log = (root / "serve.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"127.0.0.1:{ports[0]}"
    try:
        try:
            wait_ready(f"http://{url}", READY_TIMEOUT_S, lambda: process.poll() is None)
        except ServeError as e:
            pytest.fail(f"{e}; xmr serve exited {process.returncode}: {(root / 'serve.log').read_text()[-3000:]}")
        scorer = Scorer.load(root / "artifacts", backend="onnxruntime", threads=1, device="cpu")
        yield {"process": process, "http": url, "grpc": f"127.0.0.1:{ports[1]}", "split": split, "scorer": scorer,
               "images": scorer.encode_images(split.features), "texts": scorer.encode_texts(split.captions),
               "log": root / "serve.log"}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def _text(module, captions):
    tensor = module.InferInput("text", [len(captions), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[c.encode()] for c in captions], dtype=object))
    return tensor


def _features(module, features, dtype="FP32"):
    tensor = module.InferInput("features", list(features.shape), dtype)
    tensor.set_data_from_numpy(features)
    return tensor


def _k(module, k, rows=1):
    tensor = module.InferInput("k", [rows, 1], "INT32")
    tensor.set_data_from_numpy(np.full((rows, 1), k, dtype=np.int32))
    return tensor


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_searches_and_pair_scores_over_the_server_equal_the_in_process_scorer(served, protocol):
    module = {"http": http, "grpc": grpc}[protocol]
    scorer, split = served["scorer"], served["split"]
    client = module.InferenceServerClient(served[protocol])
    try:
        for captions, k in ((split.captions[:1], None), (split.captions[3:6], 7), (split.captions[10:11], 1)):
            inputs = [_text(module, captions)] + ([] if k is None else [_k(module, k, len(captions))])
            result = client.infer(SEARCH_TEXT, inputs)
            expected = scorer.search(captions, served["images"], k=k or 4)
            np.testing.assert_array_equal(result.as_numpy("indices"), expected.indices)
            np.testing.assert_array_equal(result.as_numpy("scores"), expected.scores)
        features = np.asarray(split.features[2:4], dtype=np.float32)
        result = client.infer(SEARCH_IMAGE, [_features(module, features), _k(module, 5, 2)])
        expected = scorer.search(features, served["texts"], k=5)
        np.testing.assert_array_equal(result.as_numpy("indices"), expected.indices)
        np.testing.assert_array_equal(result.as_numpy("scores"), expected.scores)
        captions = [split.captions[0], split.captions[9]]
        result = client.infer(SCORE_PAIRS, [_features(module, features), _text(module, captions)])
        pairs = scorer.score_pairs(features, captions, [(0, 0), (1, 1)])
        np.testing.assert_array_equal(result.as_numpy("score")[:, 0], pairs)
    finally:
        client.close()


def test_bad_requests_get_error_responses_and_the_server_keeps_serving(served):
    split = served["split"]
    client = http.InferenceServerClient(served["http"])
    features = np.asarray(split.features[:1], dtype=np.float32)
    bad = {
        "wrong dtype": (SEARCH_IMAGE, [_features(http, features.astype(np.float64), "FP64")], "FP64|data-type|datatype"),
        "wrong shape": (SEARCH_IMAGE, [_features(http, np.zeros((1, REGIONS + 1, IMG_DIM), np.float32))],
                        "shape|dims"),
        "empty caption": (SEARCH_TEXT, [_text(http, [""])], "empty"),
        "k = 0": (SEARCH_TEXT, [_text(http, ["a dog ."]), _k(http, 0)], "k must be a positive integer"),
        "k < 0": (SEARCH_TEXT, [_text(http, ["a dog ."]), _k(http, -2)], "k must be a positive integer"),
        "no text": (SCORE_PAIRS, [_features(http, features)], "text"),
    }
    try:
        for name, (model, inputs, message) in bad.items():
            with pytest.raises(InferenceServerException, match=message):
                client.infer(model, inputs)
            result = client.infer(SEARCH_TEXT, [_text(http, split.captions[:1])])  # still serving
            assert result.as_numpy("indices").shape == (1, 4), name
    finally:
        client.close()


def test_a_burst_beyond_the_queue_is_rejected_and_every_accepted_request_is_right(served):
    split, scorer = served["split"], served["scorer"]
    asks = [split.captions[i % len(split.captions)] for i in range(48)]
    expected = scorer.search(asks, served["images"], k=4)

    def ask(i):
        client = http.InferenceServerClient(served["http"], connection_timeout=60, network_timeout=60)
        try:
            result = client.infer(SEARCH_TEXT, [_text(http, [asks[i]])])
            return result.as_numpy("indices")[0], result.as_numpy("scores")[0]
        except InferenceServerException as e:
            return str(e)
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        outcomes = list(pool.map(ask, range(len(asks))))
    rejected = [o for o in outcomes if isinstance(o, str)]
    assert rejected and all("queue" in o for o in rejected), rejected[:3]
    accepted = [(i, o) for i, o in enumerate(outcomes) if not isinstance(o, str)]
    assert accepted
    for i, (indices, scores) in accepted:  # batched with others: the same items, scores within float rounding
        np.testing.assert_array_equal(indices, expected.indices[i])
        np.testing.assert_allclose(scores, expected.scores[i], atol=1e-5)


def test_serve_bench_target_drives_the_server_beside_in_process_submit(served):
    from xmr.benchmark.online_bench import Workload
    from xmr.benchmark.remote_bench import RemoteConfig, Target, run_remote
    from xmr.runtime import BatchedScorer, BatcherConfig

    split, scorer = served["split"], served["scorer"]
    config = RemoteConfig(f"http://{served['http']}", seconds=0.4, k=3, clients=(1, 2), load_fractions=(0.5,), senders=4)
    target = Target(config.target, config.timeout_s)
    fronts = []

    def in_process(name):
        fronts.append(BatchedScorer(scorer, BatcherConfig(4, 20.0, MAX_QUEUE)))
        if name == "text->image":
            return fronts[-1], Workload(name, served["images"], [[c] for c in split.captions])
        return fronts[-1], Workload(name, served["texts"], [f[None] for f in np.asarray(split.features)])

    try:
        assert target.batching(SEARCH_TEXT) == (4, 20.0, MAX_QUEUE)
        report = run_remote(target, {"text->image": list(split.captions),
                                     "image->text": list(np.asarray(split.features))}, config, in_process)
    finally:
        for front in fronts:
            front.close()
        target.release()
    settings = [(r["workload"], r["mode"]) for r in report["remote"]]
    assert settings == [(w, m) for w in ("text->image", "image->text") for m in ("closed", "closed", "open")]
    assert [(r["workload"], r["mode"]) for r in report["in_process"]] == settings
    assert all(r["completed"] > 0 and r["p50_ms"] > 0 for r in report["remote"] + report["in_process"])
    with pytest.raises(InputError, match="--target must be"):
        RemoteConfig("ftp://127.0.0.1:1")


def test_sigterm_stops_the_server_with_status_0_and_leaves_no_process(served):
    process = served["process"]
    below = descendants(process.pid)
    assert below, "xmr serve runs tritonserver and its model stubs as child processes"
    stubs = [pid for pid in below if b"triton_python_backend_stub" in _cmdline(pid)]
    assert len(stubs) == 3 * INSTANCES, "a stub process per instance of each of the three models"
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, served["log"].read_text()[-3000:]
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in below) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in below if alive(pid)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_every_config_pbtxt_is_a_triton_model_config(tmp_path):
    config = ServeConfig(artifacts=str(tmp_path), images=str(tmp_path / "images.npy"),
                         captions=str(tmp_path / "captions.txt"), max_batch=8, max_queue=3, max_queue_delay_us=500)
    root = write_repository(tmp_path / "repo", config, REGIONS, IMG_DIM)
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted([SEARCH_TEXT, SEARCH_IMAGE, SCORE_PAIRS])
    for name in names:
        parsed = read_model_config(root / name / "config.pbtxt")
        assert parsed.name == name and parsed.backend == "python" and parsed.max_batch_size == 8
        assert parsed.dynamic_batching.default_queue_policy.max_queue_size == 3
        assert parsed.dynamic_batching.max_queue_delay_microseconds == 500
        assert (root / name / "1" / "model.py").is_file()
        assert [(g.kind, g.count) for g in parsed.instance_group] == [(parsed.instance_group[0].KIND_CPU, 1)]
    features = [i for i in read_model_config(root / SEARCH_IMAGE / "config.pbtxt").input if i.name == "features"]
    assert list(features[0].dims) == [REGIONS, IMG_DIM]


def test_instances_split_the_cores_unless_threads_are_given(tmp_path, monkeypatch):
    monkeypatch.setattr("xmr.cpu.available_cores", lambda: 8)
    for instances, threads, expected in ((1, None, "8"), (3, None, "2"), (16, None, "1"), (3, 5, "5")):
        config = ServeConfig(artifacts=str(tmp_path), images=str(tmp_path / "images.npy"), instances=instances,
                             threads=threads)
        parsed = model_config(SEARCH_TEXT, config, REGIONS, IMG_DIM, gpu=False)
        assert parsed.instance_group[0].count == instances
        assert parsed.parameters["threads"].string_value == expected
    from xmr.cli import serve_command, triton_repo_command

    for command in (serve_command, triton_repo_command):  # the commands' default is the library's
        assert inspect.signature(command).parameters["instances"].default.default == ServeConfig.instances


def test_serve_refuses_bad_options_in_one_line_before_starting(tmp_path):
    for args, message in ((["--images", str(tmp_path / "missing.npy")], "not a .npy file"),
                          (["--images", str(tmp_path), "--k", "0"], "k must be a positive integer"),
                          (["--images", str(tmp_path), "--instances", "0"], "instances must be a positive integer"),
                          (["--images", str(tmp_path), "--http-port", "9000", "--grpc-port", "9000"], "must differ")):
        result = subprocess.run([sys.executable, "-m", "xmr.cli", "serve", "--artifacts", str(tmp_path), *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    with pytest.raises(InputError):
        ServeConfig(artifacts="a", images="b", max_queue_delay_us=-1).validate()


GRAPH_STANDIN = '''"""A graph model as a Python-backend model: its model.onnx in ONNX Runtime (the test's
stand-in for Triton's onnxruntime backend, which PyTriton's bundled server lacks)."""
import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            arrays = self.session.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in zip(self.outputs, arrays)]))
        return responses
'''


def _graph_repository(exported, out, *args):
    root = exported["root"]
    result = invoke("triton-repo", "--artifacts", root / "artifacts", "--out", out, "--images", root / "images.npy",
                    "--captions", root / "captions.txt", "--k", 4, "--max-batch", 4, *args)
    assert result.exit_code == 0, result.output
    return out


def test_triton_repo_writes_graph_models_from_the_manifest_and_bls_front_models(exported, tmp_path):
    from xmr.paths import file_sha256
    from xmr.runtime.artifacts import Artifacts
    from xmr.serve.graph_repository import GRAPH_MODELS, RECORD

    artifacts = Artifacts.open(exported["root"] / "artifacts")
    repo = _graph_repository(exported, tmp_path / "repo")
    assert sorted(p.name for p in repo.iterdir()) == sorted([*GRAPH_MODELS.values(), SEARCH_TEXT, SEARCH_IMAGE,
                                                             SCORE_PAIRS, RECORD])
    for graph, name in GRAPH_MODELS.items():
        parsed = read_model_config(repo / name / "config.pbtxt")
        assert (parsed.name, parsed.platform, parsed.max_batch_size) == (name, "onnxruntime_onnx", 0)
        spec = artifacts.manifest["graphs"][graph]
        for side, tensors in (("inputs", parsed.input), ("outputs", parsed.output)):
            assert [(t.name, list(t.dims)) for t in tensors] == \
                [(t["name"], [d if isinstance(d, int) else -1 for d in t["shape"]]) for t in spec[side]]
        assert file_sha256(repo / name / "1" / "model.onnx") == spec["files"]["fp32"]["sha256"]
    for name in (SEARCH_TEXT, SEARCH_IMAGE, SCORE_PAIRS):
        parsed = read_model_config(repo / name / "config.pbtxt")
        assert parsed.backend == "python" and parsed.max_batch_size == 4 and parsed.HasField("dynamic_batching")
        parameters = {k: v.string_value for k, v in parsed.parameters.items()}
        assert (parameters["backend"], parameters["artifacts"], parameters["graphs"]) == \
            ("triton", "artifacts", "onnxruntime_onnx")
        assert not Path(parameters["gallery"]).is_absolute()  # the repository can be copied anywhere
        assert (repo / name / "artifacts" / "manifest.json").is_file()
    assert (repo / SEARCH_TEXT / "gallery" / "images.npy").is_file()
    assert json.loads((repo / RECORD).read_text())["graphs"] == "onnxruntime_onnx"
    _graph_repository(exported, repo, "--k", 5)  # its own repository: replaced
    assert read_model_config(repo / SEARCH_TEXT / "config.pbtxt").parameters["k"].string_value == "5"


def test_triton_repo_serves_engines_as_tensorrt_plan_models_on_gpus(exported, tmp_path):
    import shutil

    from xmr.paths import file_sha256
    from xmr.runtime.artifacts import Artifacts
    from xmr.serve.graph_repository import GRAPH_MODELS, plan_budget

    artifacts_dir = tmp_path / "artifacts"
    shutil.copytree(exported["root"] / "artifacts", artifacts_dir)
    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    files = {}
    for graph in GRAPH_MODELS:
        (artifacts_dir / f"{graph}.fp32.plan").write_bytes(f"an engine of {graph}".encode())
        files[graph] = {"fp32": {"file": f"{graph}.fp32.plan", "sha256": file_sha256(artifacts_dir / f"{graph}.fp32.plan")}}
    manifest["engines"] = {"built": True, "files": files, "tensorrt": "10.0", "gpu": "a GPU", "compute_capability": "9.0"}
    (artifacts_dir / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("triton-repo", "--artifacts", artifacts_dir, "--out", tmp_path / "repo")
    assert result.exit_code == 0, result.output
    for graph, name in GRAPH_MODELS.items():
        parsed = read_model_config(tmp_path / "repo" / name / "config.pbtxt")
        assert parsed.platform == "tensorrt_plan" and parsed.instance_group[0].kind == parsed.instance_group[0].KIND_GPU
        assert (tmp_path / "repo" / name / "1" / "model.plan").read_bytes() == f"an engine of {graph}".encode()
    budget = read_model_config(tmp_path / "repo" / SCORE_PAIRS / "config.pbtxt").parameters["block_budget"].string_value
    assert int(budget) == plan_budget(Artifacts.open(artifacts_dir))
    assert not (tmp_path / "repo" / SEARCH_TEXT).exists()  # no --images: no image search
    result = invoke("triton-repo", "--artifacts", artifacts_dir, "--out", tmp_path / "repo2", "--precision", "fp16")
    assert result.exit_code != 0 and "no fp16 image_encoder" in result.output and not (tmp_path / "repo2").exists()


def test_triton_repo_refuses_bad_input_in_one_line(exported, tmp_path):
    artifacts = exported["root"] / "artifacts"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    for args, message in ((["--out", tmp_path / "r", "--precision", "fp99"], "unknown precision 'fp99'"),
                          (["--out", tmp_path / "theirs"], "non-empty directory that xmr did not write"),
                          (["--out", tmp_path / "r", "--images", tmp_path / "none.npy"], "not a .npy file"),
                          (["--out", tmp_path / "r", "--max-batch", 0], "max-batch must be a positive integer")):
        result = invoke("triton-repo", "--artifacts", artifacts, *args)
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine" and not (tmp_path / "r").exists()


def test_the_bls_front_models_of_a_triton_repo_serve_the_in_process_scorers_results(exported, tmp_path):
    from google.protobuf import text_format

    from xmr.serve.graph_repository import GRAPH_MODELS
    from xmr.serve.server import running_server

    repo = _graph_repository(exported, tmp_path / "repo")
    for name in GRAPH_MODELS.values():  # the bundled server has only the Python backend: stand-ins run model.onnx
        parsed = read_model_config(repo / name / "config.pbtxt")
        parsed.platform, parsed.backend = "", "python"
        (repo / name / "config.pbtxt").write_text(text_format.MessageToString(parsed))
        (repo / name / "1" / "model.py").write_text(GRAPH_STANDIN)
    split, root = exported["split"], exported["root"]
    scorer = Scorer.load(root / "artifacts", backend="onnxruntime", threads=1, device="cpu")
    images, texts = scorer.encode_images(split.features), scorer.encode_texts(split.captions)
    ports = free_ports(3)
    config = ServeConfig(artifacts=str(root / "artifacts"), http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])
    with running_server(config, ready_timeout_s=READY_TIMEOUT_S, repository=repo, log_file=tmp_path / "triton.log"):
        client = http.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        try:
            for captions in (split.captions[:1], split.captions[3:6]):
                result = client.infer(SEARCH_TEXT, [_text(http, captions)])
                expected = scorer.search(captions, images, k=4)
                np.testing.assert_array_equal(result.as_numpy("indices"), expected.indices)
                np.testing.assert_array_equal(result.as_numpy("scores"), expected.scores)
            features = np.asarray(split.features[2:4], dtype=np.float32)
            result = client.infer(SEARCH_IMAGE, [_features(http, features), _k(http, 5, 2)])
            expected = scorer.search(features, texts, k=5)
            np.testing.assert_array_equal(result.as_numpy("indices"), expected.indices)
            np.testing.assert_array_equal(result.as_numpy("scores"), expected.scores)
            captions = [split.captions[0], split.captions[9]]
            result = client.infer(SCORE_PAIRS, [_features(http, features), _text(http, captions)])
            np.testing.assert_array_equal(result.as_numpy("score")[:, 0],
                                          scorer.score_pairs(features, captions, [(0, 0), (1, 1)]))
            with pytest.raises(InferenceServerException, match="empty"):
                client.infer(SEARCH_TEXT, [_text(http, [""])])
        finally:
            client.close()


def test_a_model_that_fails_to_load_stops_the_start_at_once_with_a_serve_error(exported, tmp_path):
    from xmr.serve.server import running_server

    repo = _graph_repository(exported, tmp_path / "repo")
    (repo / SCORE_PAIRS / "artifacts" / "manifest.json").write_text("{not json")
    ports = free_ports(3)
    config = ServeConfig(artifacts="", http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])
    started = time.monotonic()
    with pytest.raises(ServeError, match="stopped while loading"):
        with running_server(config, ready_timeout_s=READY_TIMEOUT_S, repository=repo, log_file=tmp_path / "log"):
            pass
    assert time.monotonic() - started < 60  # not PyTriton's 120 s wait
    assert "manifest.json is not valid JSON" in (tmp_path / "log").read_text()
    assert json.loads((exported["root"] / "artifacts" / "manifest.json").read_text())  # a copy was broken, not the artifacts


def test_scorers_of_served_models_do_not_spin_and_score_the_same(exported):
    artifacts, split = exported["root"] / "artifacts", exported["split"]
    quiet = Scorer.load(artifacts, backend="onnxruntime", device="cpu", spin=False)
    entries = {s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
               for s in quiet._backend.sessions.values()}
    assert entries == {"0"}
    spinning = Scorer.load(artifacts, backend="onnxruntime", device="cpu")
    np.testing.assert_array_equal(quiet.score(split.features, split.captions),
                                  spinning.score(split.features, split.captions))
    with pytest.raises(InputError, match="spin must be True or False"):
        Scorer.load(artifacts, backend="onnxruntime", spin="no")
