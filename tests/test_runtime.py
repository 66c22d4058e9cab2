"""xmr.runtime.Scorer on CPU: parity with the PyTorch model, scheduling, galleries, batching, errors."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from xmr.calibration.calibrate import calibrate_artifacts
from xmr.calibration.config import CalibrationConfig
from xmr.data import SynthConfig, Vocabulary, load_split, write_synthetic
from xmr.errors import ArtifactError, BackendUnavailableError, InputError
from xmr.calibration.fallback import graph_scorer
from xmr.eval import split_scores
from xmr.export.artifacts import export_artifacts
from xmr.export.graphs import GRAPHS
from xmr.models import build_model, make_config
from xmr.models.checkpoint import load_checkpoint, save_checkpoint
from xmr.runtime import (
    BatchedScorer, BatcherClosedError, BatcherConfig, Gallery, ImageGallery, InputWarning, QueueFullError, Scorer,
    TextGallery, TorchBackend,
)
from xmr.cpu import CpuFeatures
from xmr.runtime import backends
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.schedule import Limits, plan_blocks

REGIONS, IMG_DIM = 6, 8
AVX512 = frozenset({"avx2", "fma", "avx512f", "avx512_vnni"})  # CPU flags of an Ice Lake-class Xeon
AMX = AVX512 | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}  # Sapphire Rapids and later


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime_data")
    write_synthetic(out, SynthConfig(n_train=30, n_dev=12, n_test=12, regions=REGIONS, img_dim=IMG_DIM, seed=7))
    return out


def _checkpoint(kind, data, path, seed=0):
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(seed)
    model = build_model(make_config(kind, vocab_size=len(vocab), img_dim=IMG_DIM, embed_size=8, word_dim=8), vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # non-degenerate scores (a tiny model's default init is nearly constant)
    return save_checkpoint(model, path, {"regions": REGIONS})


@pytest.fixture(scope="module", params=["camp", "imram"])
def artifacts(request, data, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    export_artifacts(_checkpoint(request.param, data, root / "model.pt"), root / "artifacts", ("fp32", "fp16"),
                     engine=False)
    return root / "artifacts"


@pytest.fixture(scope="module")
def imram_int8(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("imram_int8")
    export_artifacts(_checkpoint("imram", data, root / "model.pt"), root / "artifacts", ("fp32", "fp16"), engine=False)
    calibrate_artifacts(root / "artifacts", data, CalibrationConfig(images=12, image_batch=6, caption_batch=20,
                                                                    pair_images=4),
                        accuracy_target=0.5, eval_images=12, report_split=None, show_progress=False, engine=False)
    return root / "artifacts"


@pytest.fixture(scope="module")
def test_split(data):
    return load_split(data, "test", Vocabulary.load(data / "vocab.json"))


def reference_scores(artifacts, split):
    """The PyTorch model's own scores of the split (captions tokenised by the data loader)."""
    model = load_checkpoint(artifacts / "checkpoint.pt").eval()
    ids, lengths = split.caption_batch(range(split.n_captions))
    with torch.no_grad():
        return model.similarity(split.image_batch(range(split.n_images)), ids, lengths).numpy()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_fp32_scores_match_the_pytorch_model_on_every_cpu_backend(artifacts, test_split, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    with Scorer.load(artifacts, backend=backend, device="cpu") as scorer:
        assert (scorer.backend, scorer.precision, scorer.device) == (backend, "fp32", "cpu")
        scores = scorer.score(test_split.features, test_split.captions)
    expected = reference_scores(artifacts, test_split)
    assert scores.shape == expected.shape == (12, 60)
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)


def test_auto_takes_the_cpu_backend_its_features_call_fastest_and_says_so(artifacts, caplog, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("auto prefers GPU backends on this machine")
    pytest.importorskip("openvino")
    for flags, expected in ((AMX, "openvino"), (AVX512, "onnxruntime")):
        monkeypatch.setattr(backends, "cpu_features", lambda flags=flags: CpuFeatures("test CPU", flags, 2600.0))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="xmr.runtime"), Scorer.load(artifacts) as scorer:
            assert (scorer.backend, scorer.device) == (expected, "cpu")
        assert f"{expected} fp32 (cpu" in caplog.text


def test_fp16_graphs_stay_within_the_export_tolerance(artifacts, test_split):
    manifest = json.loads((artifacts / "manifest.json").read_text())
    tolerance = manifest["graphs"]["pair_scorer"]["files"]["fp16"]["tolerance"]
    with Scorer.load(artifacts, backend="onnxruntime", precision="fp16") as scorer:
        scores = scorer.score(test_split.features, test_split.captions)
    error = np.abs(scores - reference_scores(artifacts, test_split))
    assert 0 < error.max() <= tolerance


def test_int8_runs_the_calibrated_graphs_with_the_error_the_report_recorded(imram_int8, data):
    manifest = json.loads((imram_int8 / "manifest.json").read_text())
    dev = load_split(data, "dev", Vocabulary.load(data / "vocab.json"))
    with Scorer.load(imram_int8, precision="int8") as scorer:
        int8 = scorer.score(dev.features, dev.captions)
    with Scorer.load(imram_int8, precision="fp32") as scorer:
        fp32 = scorer.score(dev.features, dev.captions)
    graphs = {g: imram_int8 / manifest["graphs"][g]["files"]["int8"]["file"] for g in GRAPHS}
    from_files = split_scores(graph_scorer(Artifacts.open(imram_int8), graphs, "int8"), dev)
    np.testing.assert_allclose(int8, from_files, atol=1e-5, rtol=0)
    recorded = manifest["int8"]["evaluation"]["chosen"]["mean_abs_score_error"]
    assert np.abs(int8.astype(np.float64) - fp32).mean() == pytest.approx(recorded, rel=1e-3)


def test_unavailable_backends_say_why(artifacts):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailableError, match="fp16 needs a CUDA GPU"):
        Scorer.load(artifacts, backend="torch", precision="fp16")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed|no CUDA GPU"):
        Scorer.load(artifacts, backend="tensorrt", precision="fp16")
    with pytest.raises(BackendUnavailableError, match="onnxruntime on device 'cuda': no CUDA GPU"):
        Scorer.load(artifacts, backend="onnxruntime", device="cuda")
    with pytest.raises(ArtifactError, match="no int8 .* run `xmr calibrate`"):
        Scorer.load(artifacts, precision="int8")
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        Scorer.load(artifacts, backend="jax")


# -- scheduling


def test_buckets_pad_less_than_unbucketed_blocks_and_respect_the_limits():
    lengths = np.random.default_rng(0).integers(3, 40, 500)
    kwargs = dict(n_images=100, lengths=lengths, regions=36, dim=64, budget=1 << 20, limits=Limits(images=16, captions=64))
    bucketed, plain = plan_blocks(**kwargs), plan_blocks(**kwargs, bucketed=False)
    assert bucketed.padding_efficiency(lengths) > 0.9 > plain.padding_efficiency(lengths)
    assert sorted(np.concatenate([g.index for g in bucketed.groups]).tolist()) == list(range(500))
    assert bucketed.image_block <= 16 and all(len(g.index) <= 64 for g in bucketed.groups)
    for g in bucketed.groups:
        assert g.length == lengths[g.index].max()
        assert bucketed.image_block * len(g.index) * (36 + g.length) * 2 * 64 <= 1 << 20 or len(g.index) == 1
    short_first = [len(g.index) for g in bucketed.groups]
    assert short_first[0] >= short_first[-1]  # short captions get wider blocks


def test_results_do_not_depend_on_caption_order_or_block_size(artifacts, test_split):
    with Scorer.load(artifacts) as scorer:
        images, texts = scorer.encode_images(test_split.features), scorer.encode_texts(test_split.captions)
        whole = scorer.score(images, texts)
        permutation = np.random.default_rng(1).permutation(len(test_split.captions))
        shuffled = scorer.score(images, [test_split.captions[i] for i in permutation])
    with Scorer.load(artifacts, block_budget=1) as tiny:  # one pair per launch
        assert tiny.plan(images, texts).launches == 12 * 60
        tiny_blocks = tiny.score(images, texts)
        stats = tiny.stats()
    np.testing.assert_allclose(shuffled, whole[:, permutation], atol=1e-5, rtol=0)
    np.testing.assert_allclose(tiny_blocks, whole, atol=1e-5, rtol=0)
    assert stats["pairs_scored"] == 12 * 60 and stats["launches"] == 12 * 60 and stats["padding_efficiency"] == 1.0


# -- search, pairs, galleries


def test_search_both_ways_returns_the_best_k_of_the_full_matrix(artifacts, test_split):
    with Scorer.load(artifacts) as scorer:
        images, texts = scorer.encode_images(test_split.features), scorer.encode_texts(test_split.captions)
        full = scorer.score(images, texts)
        to_images = scorer.search(test_split.captions[:3], images, k=4)
        to_captions = scorer.search(test_split.features[:2], texts, k=7)
        one_image = scorer.search(test_split.features[5], texts, k=100)
    np.testing.assert_array_equal(to_images.indices, np.argsort(-full[:, :3].T, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(to_images.scores, np.sort(full[:, :3].T, axis=1)[:, ::-1][:, :4], atol=1e-6)
    np.testing.assert_array_equal(to_captions.indices, np.argsort(-full[:2], axis=1, kind="stable")[:, :7])
    assert one_image.indices.shape == (1, 60)  # k beyond the gallery: all of it, ranked


def test_score_pairs_equals_the_matrix_entries(artifacts, test_split):
    rng = np.random.default_rng(2)
    pairs = np.stack([rng.integers(0, 12, 300), rng.integers(0, 60, 300)], axis=1)
    pairs[:20] = pairs[0]  # repeats
    with Scorer.load(artifacts) as scorer:
        images, texts = scorer.encode_images(test_split.features), scorer.encode_texts(test_split.captions)
        full = scorer.score(images, texts)
        got = scorer.score_pairs(images, texts, pairs)
        with pytest.raises(InputError, match=r"pair 1 \[12, 0\] is out of range: 12 images, 60 captions"):
            scorer.score_pairs(images, texts, [[0, 0], [12, 0]])
        with pytest.raises(InputError, match="integer"):
            scorer.score_pairs(images, texts, [[0.5, 1.0]])
    np.testing.assert_allclose(got, full[pairs[:, 0], pairs[:, 1]], atol=1e-5, rtol=0)


def test_galleries_save_and_load_memory_mapped_and_refuse_other_models(artifacts, data, test_split, tmp_path):
    with Scorer.load(artifacts) as scorer:
        images, texts = scorer.encode_images(test_split.features), scorer.encode_texts(test_split.captions)
        expected = scorer.score(images, texts)
        images.save(tmp_path / "images")
        texts.save(tmp_path / "texts")
        loaded_images, loaded_texts = scorer.load_gallery(tmp_path / "images"), scorer.load_gallery(tmp_path / "texts")
        assert isinstance(loaded_images, ImageGallery) and isinstance(loaded_texts, TextGallery)
        np.testing.assert_array_equal(scorer.score(loaded_images, loaded_texts), expected)
    reloaded = Gallery.load(tmp_path / "images")
    maps = Path("/proc/self/maps")
    if maps.is_file():  # Linux: the tensors are views of the mapped files, not copies
        assert str(tmp_path / "images" / "image_regions.npy") in maps.read_text()
    assert len(reloaded) == 12
    other = tmp_path / "other"
    export_artifacts(_checkpoint("imram", data, tmp_path / "other.pt", seed=9), other, ("fp32", "fp16"), engine=False)
    with Scorer.load(other) as scorer:
        with pytest.raises(InputError, match="encoded by other weights"):
            scorer.score(loaded_images, test_split.captions)
    with Scorer.load(artifacts, precision="fp16") as scorer:
        with pytest.raises(InputError, match="encoded in fp32, this scorer runs fp16"):
            scorer.search(test_split.captions[:1], loaded_images)


# -- bad input


def test_bad_input_is_named_before_any_work(artifacts, test_split):
    features = np.asarray(test_split.features[:2], dtype=np.float32)
    with Scorer.load(artifacts) as scorer:
        with pytest.raises(InputError, match=f"dimension 5 but the model expects {IMG_DIM}"):
            scorer.encode_images(features[..., :5])
        with pytest.raises(InputError, match=f"4 regions but the model was exported for {REGIONS}"):
            scorer.encode_images(features[:, :4])
        broken = features.copy()
        broken[1, 2, 3] = np.nan
        with pytest.raises(InputError, match=r"NaN or Inf \(1 values, in image\(s\) \[1\]\)"):
            scorer.encode_images(broken)
        with pytest.raises(InputError, match="caption 1 is empty"):
            scorer.encode_texts(["a dog", "  "])
        with pytest.raises(InputError, match="no captions"):
            scorer.encode_texts([])
        with pytest.raises(InputError, match="list of strings"):
            scorer.encode_texts("a dog")
        with pytest.raises(InputError, match="token ids must be in"):
            scorer.encode_texts((np.array([[1, 9999, 2]]), np.array([3])))
        with pytest.warns(InputWarning, match=r"2 word\(s\) not in the model's vocabulary scored as <unk>: qwzx, zzyzx"):
            unknown = scorer.encode_texts(["zzyzx qwzx"])
        assert unknown.lengths.tolist() == [4]
        with pytest.raises(InputError, match="k must be a positive integer"):
            scorer.search(["a dog"], scorer.encode_images(features), k=0)


def test_long_captions_are_truncated_with_a_warning_or_refused(artifacts):
    long_caption = " ".join(["dog"] * 30)
    with Scorer.load(artifacts, max_length=10) as scorer:
        with pytest.warns(InputWarning, match=r"caption\(s\) \[1\] truncated to 10 tokens"):
            texts = scorer.encode_texts(["a dog", long_caption])
        assert texts.lengths.tolist() == [4, 10]
    with Scorer.load(artifacts, max_length=10, truncate=False) as scorer:
        with pytest.raises(InputError, match=r"caption\(s\) \[1\] have more than 10 tokens"):
            scorer.encode_texts(["a dog", long_caption])


def test_broken_artifacts_are_refused_with_the_reason(artifacts, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(artifacts, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / manifest["graphs"]["pair_scorer"]["files"]["fp32"]["file"]).write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        Scorer.load(copy)
    (copy / manifest["graphs"]["pair_scorer"]["files"]["fp32"]["file"]).unlink()
    with pytest.raises(ArtifactError, match="pair_scorer.onnx is listed in .* but missing"):
        Scorer.load(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="re-export"):
        Scorer.load(copy)
    with pytest.raises(ArtifactError, match="not found"):
        Scorer.load(tmp_path / "nowhere")


# -- online serving


def test_submit_from_many_threads_gives_each_caller_its_own_results(artifacts, test_split):
    config = BatcherConfig(max_batch=16, max_queue_delay_ms=20, max_queue=1000)
    with Scorer.load(artifacts) as scorer, BatchedScorer(scorer, config) as front:
        images = scorer.encode_images(test_split.features)
        expected = {i: scorer.search([c], images, k=3) for i, c in enumerate(test_split.captions[:24])}
        futures, lock = {}, threading.Lock()

        def client(indices):
            for i in indices:
                future = front.submit([test_split.captions[i]], images, k=3)
                with lock:
                    futures[i] = future

        threads = [threading.Thread(target=client, args=(range(t, 24, 6),)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = {i: f.result(timeout=60) for i, f in futures.items()}
        texts = scorer.encode_texts(test_split.captions)
        pairs = front.submit_pairs(images, texts, [[0, 5], [3, 7]]).result(timeout=60)
        expected_pairs = scorer.score(images, texts)[[0, 3], [5, 7]]
        stats = front.stats()["batcher"]
    for i, result in results.items():
        np.testing.assert_array_equal(result.indices, expected[i].indices)
        np.testing.assert_allclose(result.scores, expected[i].scores, atol=1e-5)
    np.testing.assert_allclose(pairs, expected_pairs, atol=1e-5, rtol=0)
    assert stats.requests == 25 and stats.batches <= 25 and stats.failed == 0


def test_bad_requests_fail_alone_and_close_drains_then_refuses(artifacts, test_split):
    with Scorer.load(artifacts) as scorer:
        front = BatchedScorer(scorer)
        images = scorer.encode_images(test_split.features)
        with pytest.raises(InputError, match="caption 0 is empty"):
            front.submit([""], images)
        good = [front.submit([c], images, k=2) for c in test_split.captions[:5]]
        front.close()
        assert all(f.done() and f.result().indices.shape == (1, 2) for f in good)
        with pytest.raises(BatcherClosedError):
            front.submit(["a dog"], images)


def test_a_full_queue_rejects_at_once(artifacts, test_split):
    config = BatcherConfig(max_batch=1, max_queue_delay_ms=0, max_queue=2)
    release = threading.Event()

    class SlowScorer(Scorer):  # each batch waits until the test lets it run
        def run_search(self, request):
            release.wait(30)
            return super().run_search(request)

    with SlowScorer.load(artifacts) as scorer, BatchedScorer(scorer, config) as front:
        images = scorer.encode_images(test_split.features)
        futures, rejected = [], 0
        for _ in range(10):
            try:
                futures.append(front.submit(["a dog"], images))
            except QueueFullError:
                rejected += 1
        release.set()
        assert rejected >= 1 and len(futures) <= 3
        assert all(f.result(timeout=60).indices.shape == (1, 10) for f in futures)


def test_search_async_awaits_the_batched_result(artifacts, test_split):
    with Scorer.load(artifacts) as scorer, BatchedScorer(scorer) as front:
        images = scorer.encode_images(test_split.features)
        expected = scorer.search(test_split.captions[:2], images, k=3)

        async def main():
            return await asyncio.gather(*(front.search_async([c], images, k=3) for c in test_split.captions[:2]))

        results = asyncio.run(main())
    np.testing.assert_array_equal(np.concatenate([r.indices for r in results]), expected.indices)


# -- GPU (skipped without one)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_cuda_streams_match_the_cpu_scores(artifacts, test_split, precision):
    with Scorer.load(artifacts, backend="torch", device="cpu") as cpu:
        expected = cpu.score(test_split.features, test_split.captions)
    with Scorer.load(artifacts, backend="torch", precision=precision, device="cuda", block_budget=20_000) as gpu:
        # many blocks: both streams in use
        assert gpu.plan(gpu.encode_images(test_split.features), gpu.encode_texts(test_split.captions)).launches > 4
        scores = gpu.score(test_split.features, test_split.captions)
    np.testing.assert_allclose(scores, expected, atol=1e-4 if precision == "fp32" else 2e-2, rtol=0)


def test_tensorrt_engines_built_for_another_gpu_or_version_are_refused(artifacts, monkeypatch):
    """The checks run before any engine is deserialized, so they are testable without a GPU."""
    from types import SimpleNamespace

    from xmr.runtime.artifacts import Artifacts
    from xmr.runtime.backends.tensorrt_backend import engines_problem

    opened = Artifacts.open(artifacts)
    trt = SimpleNamespace(__version__="10.9.0")
    assert "TensorRT is not installed" in engines_problem(opened, "fp16", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    assert "no TensorRT engines (not requested)" in engines_problem(opened, "fp16", trt)
    files = {g: {"fp16": f"{g}.fp16.engine"} for g in GRAPHS}
    built = {"built": True, "files": files, "tensorrt": "10.9.0", "gpu": "NVIDIA A100", "compute_capability": "8.0"}
    opened.manifest["engines"] = built
    assert "built for NVIDIA A100 (compute capability 8.0), this GPU is NVIDIA H100 (9.0)" in engines_problem(opened, "fp16", trt)
    assert "no int8 engine for image_encoder, text_encoder, pair_scorer" in engines_problem(opened, "int8", trt)
    opened.manifest["engines"] = {**built, "compute_capability": "9.0", "tensorrt": "10.3.0"}
    assert "built with TensorRT 10.3.0, this is 10.9.0" in engines_problem(opened, "fp16", trt)
    opened.manifest["engines"] = {**built, "compute_capability": "9.0"}
    assert engines_problem(opened, "fp16", trt) is None


def test_the_stream_pipeline_writes_every_block_where_it_belongs(artifacts, test_split, monkeypatch):
    """The GPU path's bookkeeping (slots, events, draining into the output) run on CPU with
    stand-ins for CUDA streams and events; on a GPU the real ones are used (test above)."""
    import contextlib

    from xmr.runtime import executor

    class Stream:
        cuda_stream = 0

        def wait_stream(self, other):
            pass

    class Event:
        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    backend = TorchBackend(Artifacts.open(artifacts), "fp32", "cpu")
    with Scorer(backend, block_budget=20_000) as scorer:
        images, texts = scorer.encode_images(test_split.features), scorer.encode_texts(test_split.captions)
        expected = scorer.score(images, texts)
        plan = scorer.plan(images, texts)
        assert plan.launches > 2 * executor.STREAMS
        out = np.full(expected.shape, np.nan, dtype=np.float32)
        executor._run_streams(backend, images, texts, plan, out, lambda: None)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_caption_galleries_store_only_real_tokens_and_unpack_to_the_encoders_output(artifacts, test_split):
    with Scorer.load(artifacts, backend="torch") as scorer:
        texts = scorer.encode_texts(test_split.captions)
        model = load_checkpoint(artifacts / "checkpoint.pt")
        ids, lengths = test_split.caption_batch(range(12))
        with torch.no_grad():
            expected = model.prepare_texts(model.encode_texts(ids, lengths), lengths)
    assert torch.equal(texts.lengths, test_split.caption_batch(range(60))[1])
    for name, flat in texts.items.items():
        axes = len(texts.length_axes[name])
        assert flat.size(0) == int((texts.lengths ** axes).sum())  # no padding stored
    index = torch.arange(12)
    block = texts.block(index, int(lengths.max()) + 3, torch.device("cpu"))  # three columns of extra padding
    for name, tensor in block.items():
        reference = expected[name.removeprefix("text_")]
        valid = [slice(None)] + [slice(0, reference.size(1))] * len(texts.length_axes[name])
        torch.testing.assert_close(tensor[tuple(valid)], reference * _mask(lengths, reference, texts.length_axes[name]))
        beyond = tensor.clone()
        beyond[tuple(valid)] = 0
        assert not beyond.any()  # zeros beyond


def _mask(lengths, reference, axes):
    real = torch.arange(reference.size(1))[None, :] < lengths[:, None]
    mask = real if len(axes) == 1 else real[:, :, None] & real[:, None, :]
    return mask.view(*mask.shape, *[1] * (reference.dim() - mask.dim())).to(reference.dtype)
