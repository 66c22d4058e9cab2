"""Two-stage retrieval: prefilter heads (trained, distilled, exported), shortlist search and its evaluation."""

import json

import numpy as np
import pytest
import torch

from xmr.data import SynthConfig, Vocabulary, load_split, write_synthetic
from xmr.errors import CheckpointError, ConfigError, InputError
from xmr.eval import evaluate, model_scorer
from xmr.eval.shortlist import evaluate_shortlist
from xmr.export.artifacts import export_artifacts
from xmr.export.graphs import IMAGE_GLOBAL, TEXT_GLOBAL
from xmr.models import build_model, load_checkpoint, make_config
from xmr.models.checkpoint import save_checkpoint
from xmr.runtime import BatchedScorer, BatcherConfig, Scorer
from xmr.paths import file_sha256
from xmr.runtime.gallery import Gallery, _digest
from xmr.runtime.shortlist import UNION_FACTOR, candidate_groups, top_candidates
from xmr.train import TrainConfig
from xmr.train.defaults import distill_checkpoint
from xmr.train.distill import DistillConfig, with_new_heads
from xmr.train.trainer import train

REGIONS, IMG_DIM, HEAD = 5, 12, 4
CPU_BACKENDS = [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("openvino", "fp32"),
                ("openvino", "bf16")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shortlist_data")
    write_synthetic(out, SynthConfig(n_train=40, n_dev=12, n_test=16, regions=REGIONS, img_dim=IMG_DIM, seed=5))
    return out


def _checkpoint(kind, data, path, global_dim=HEAD, seed=0, noisy=True, embed_size=8):
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(seed)
    model = build_model(make_config(kind, vocab_size=len(vocab), img_dim=IMG_DIM, embed_size=embed_size,
                                    word_dim=embed_size, global_dim=global_dim), vocab)
    with torch.no_grad():
        for p in model.parameters() if noisy else ():
            p.normal_(0, 0.3)  # non-degenerate scores (a tiny model's default init is nearly constant)
    return save_checkpoint(model, path, {"regions": REGIONS})


@pytest.fixture(scope="module", params=["camp", "imram"])
def artifacts(request, data, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"{request.param}_head")
    precisions = ("fp32", "fp16", "bf16") if _has_openvino() else ("fp32", "fp16")
    export_artifacts(_checkpoint(request.param, data, root / "model.pt"), root / "artifacts", precisions, engine=False)
    return root / "artifacts"


@pytest.fixture(scope="module")
def headless(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("headless")
    export_artifacts(_checkpoint("imram", data, root / "model.pt", global_dim=0), root / "artifacts", ("fp32",),
                     engine=False)
    return root / "artifacts"


@pytest.fixture(scope="module")
def test_split(data):
    return load_split(data, "test", Vocabulary.load(data / "vocab.json"))


def _has_openvino():
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _load(artifacts, backend, precision):
    if backend == "openvino" and not _has_openvino():
        pytest.skip("openvino is not installed")
    return Scorer.load(artifacts, backend=backend, precision=precision, device="cpu")


def test_encoders_export_the_heads_vectors_and_the_manifest_records_them(artifacts, test_split):
    scorer = Scorer.load(artifacts, backend="onnxruntime", device="cpu")
    manifest = scorer.artifacts.manifest
    assert manifest["config"]["global_dim"] == HEAD
    assert [t["shape"] for t in manifest["graphs"]["image_encoder"]["outputs"] if t["name"] == IMAGE_GLOBAL] == \
        [["n_images", HEAD]]
    assert [t["shape"] for t in manifest["graphs"]["text_encoder"]["outputs"] if t["name"] == TEXT_GLOBAL] == \
        [["n_captions", HEAD]]
    assert not {IMAGE_GLOBAL, TEXT_GLOBAL} & {t["name"] for t in manifest["graphs"]["pair_scorer"]["inputs"]}
    model = load_checkpoint(artifacts / "checkpoint.pt")
    images = scorer.encode_images(test_split.features)
    texts = scorer.encode_texts(test_split.captions)
    ids, lengths = test_split.caption_batch(range(test_split.n_captions))
    with torch.no_grad():
        expected_images = model.global_images(model.encode_images(torch.from_numpy(np.array(test_split.features))))
        expected_texts = model.global_texts(model.encode_texts(ids, lengths), lengths)
    torch.testing.assert_close(images.vectors, expected_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(texts.vectors, expected_texts, atol=1e-5, rtol=0)  # in the captions' own order
    assert torch.allclose(images.vectors.norm(dim=1), torch.ones(len(images)), atol=1e-5)


@pytest.mark.parametrize("backend,precision", CPU_BACKENDS)
def test_a_shortlist_as_large_as_the_gallery_is_exhaustive_search_exactly(artifacts, test_split, backend, precision):
    with _load(artifacts, backend, precision) as scorer:
        images = scorer.encode_images(test_split.features)
        texts = scorer.encode_texts(test_split.captions)
        for query, gallery in ((test_split.captions[:9], images), (test_split.features[:5], texts)):
            exhaustive = scorer.search(query, gallery, k=7)
            for k in (len(gallery), len(gallery) + 1, 10**6):
                shortlisted = scorer.search(query, gallery, k=7, shortlist=k)
                np.testing.assert_array_equal(shortlisted.indices, exhaustive.indices)
                np.testing.assert_array_equal(shortlisted.scores, exhaustive.scores)


@pytest.mark.parametrize("backend,precision", [("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32")])
def test_a_shortlist_returns_the_exact_scores_of_the_prefilters_best_items(artifacts, test_split, backend, precision):
    with _load(artifacts, backend, precision) as scorer:
        images = scorer.encode_images(test_split.features)
        texts = scorer.encode_texts(test_split.captions)
        full = scorer.score(images, texts)
        for query, gallery, matrix, vectors in ((texts, images, full.T, texts.vectors @ images.vectors.T),
                                                (images, texts, full, images.vectors @ texts.vectors.T)):
            for k, shortlist in ((3, 5), (10, 4), (1, 1)):
                result = scorer.search(query, gallery, k=k, shortlist=shortlist)
                assert result.indices.shape == (len(query), min(k, shortlist))
                similarities = vectors.numpy()
                kth = np.sort(similarities, axis=1)[:, -shortlist]  # equal vectors (equal captions) tie
                for row, indices in enumerate(result.indices):
                    assert (similarities[row, indices] >= kth[row] - 1e-6).all()  # only the prefilter's shortlist
                    best = np.flatnonzero(similarities[row] >= kth[row] - 1e-6)
                    assert result.scores[row, 0] == pytest.approx(matrix[row, best].max(), abs=1e-5) or \
                        len(best) > shortlist  # the shortlist's best by cross-attention (unless ties widen it)
                np.testing.assert_allclose(result.scores, np.take_along_axis(matrix, result.indices, 1), atol=1e-5)
                assert (np.diff(result.scores, axis=1) <= 0).all()


def test_bad_shortlists_and_missing_heads_are_one_line_errors(artifacts, headless, test_split):
    scorer = Scorer.load(artifacts, backend="onnxruntime", device="cpu")
    images = scorer.encode_images(test_split.features)
    for bad in (0, -3, 1.5, True, "8", float("nan")):
        with pytest.raises(InputError, match="shortlist") as error:
            scorer.search(test_split.captions[:2], images, shortlist=bad)
        assert "\n" not in str(error.value)
    plain = Scorer.load(headless, backend="onnxruntime", device="cpu")
    plain_images = plain.encode_images(test_split.features)
    assert plain_images.vectors is None and plain.prefilter_dim is None
    assert plain.search(test_split.captions[:2], plain_images, k=3).indices.shape == (2, 3)  # exhaustive still works
    with pytest.raises(InputError, match="xmr distill"):
        plain.search(test_split.captions[:2], plain_images, shortlist=4)
    images.vectors = None  # a gallery without vectors (saved by an older xmr) searches exhaustively only
    assert scorer.search(test_split.captions[:2], images, k=3).indices.shape == (2, 3)
    with pytest.raises(InputError, match="gallery has none"):
        scorer.search(test_split.captions[:2], images, shortlist=4)


def test_galleries_save_and_load_with_and_without_their_vectors(artifacts, headless, test_split, tmp_path):
    scorer = Scorer.load(artifacts, backend="onnxruntime", device="cpu")
    for gallery, name in ((scorer.encode_images(test_split.features), "images"),
                          (scorer.encode_texts(test_split.captions), "texts")):
        gallery.save(tmp_path / name)
        loaded = scorer.load_gallery(tmp_path / name)
        assert torch.equal(loaded.vectors, gallery.vectors)
        picked = loaded.select([3, 1])
        assert torch.equal(picked.vectors, gallery.vectors[[3, 1]])
    query = test_split.captions[:4]
    saved = scorer.search(query, scorer.load_gallery(tmp_path / "images"), k=3, shortlist=6)
    fresh = scorer.search(query, scorer.encode_images(test_split.features), k=3, shortlist=6)
    np.testing.assert_array_equal(saved.indices, fresh.indices)
    plain = Scorer.load(headless, backend="onnxruntime", device="cpu")
    plain.encode_images(test_split.features).save(tmp_path / "plain")
    assert plain.load_gallery(tmp_path / "plain").vectors is None
    broken = Gallery.load(tmp_path / "images")
    broken.vectors = broken.vectors[:, :2].contiguous()
    broken.save(tmp_path / "narrow")
    with pytest.raises(InputError, match="2-d prefilter vectors"):
        scorer.load_gallery(tmp_path / "narrow")
    vectors = np.load(tmp_path / "images" / "vectors.npy")
    vectors[0, 0] = np.nan
    np.save(tmp_path / "images" / "vectors.npy", vectors)
    with pytest.raises(InputError, match="vectors.npy"):  # its sha256 no longer matches
        Gallery.load(tmp_path / "images")


def test_batched_searches_with_different_shortlists_each_get_their_own(artifacts, test_split):
    scorer = Scorer.load(artifacts, backend="onnxruntime", device="cpu")
    images = scorer.encode_images(test_split.features)
    asks = [(test_split.captions[i : i + 2], shortlist) for i, shortlist in enumerate([2, None, 5, 2, 16, 3, None])]
    with BatchedScorer(scorer, BatcherConfig(max_batch=64, max_queue_delay_ms=50)) as front:
        futures = [front.submit(query, images, k=4, shortlist=shortlist) for query, shortlist in asks]
        results = [f.result(timeout=60) for f in futures]
    for (query, shortlist), result in zip(asks, results):
        alone = scorer.search(query, images, k=4, shortlist=shortlist)
        np.testing.assert_array_equal(result.indices, alone.indices)
        np.testing.assert_allclose(result.scores, alone.scores, atol=1e-6)
        assert result.indices.shape[1] == min(4, shortlist or 4)


def test_candidate_groups_cover_every_query_once_within_the_union_bound():
    rng = np.random.default_rng(0)
    vectors = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(300, 8))).float(), dim=1)
    queries = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(50, 8))).float(), dim=1)
    k = 12
    candidates = top_candidates(queries, vectors, k)
    np.testing.assert_array_equal(candidates, np.sort(torch.topk(queries @ vectors.T, k).indices.numpy(), axis=1))
    import xmr.runtime.shortlist as shortlist
    budget = shortlist.SIMILARITY_BUDGET
    try:
        shortlist.SIMILARITY_BUDGET = 50 * 20  # blocks of 20 gallery rows: the running top-k across blocks
        np.testing.assert_array_equal(top_candidates(queries, vectors, k), candidates)
    finally:
        shortlist.SIMILARITY_BUDGET = budget
    groups = candidate_groups(candidates)
    assert sorted(np.concatenate([q for q, _ in groups]).tolist()) == list(range(50))
    for members, union in groups:
        assert len(members) == 1 or len(union) <= UNION_FACTOR * k
        assert set(candidates[members].ravel()) == set(union)


def test_shortlist_evaluation_equals_exhaustive_when_k_covers_the_split(data, tmp_path):
    model = load_checkpoint(_checkpoint("imram", data, tmp_path / "m.pt"))
    split = load_split(data, "test", model.vocab)
    exhaustive = evaluate(model, split, show_progress=False).report
    scorer = model_scorer(model, split)
    whole = evaluate_shortlist(scorer, split, split.n_captions)
    assert whole.report == exhaustive
    small = evaluate_shortlist(scorer, split, 3)
    assert small.pairs_scored <= UNION_FACTOR * 3 * (split.n_images + split.n_captions)
    assert small.exhaustive_pairs == split.n_images * split.n_captions
    assert 0 <= small.prefilter_recall["t2i"] <= 1 and small.prefilter.rsum <= 600


def test_training_a_head_leaves_the_cross_attention_weights_exactly_as_without(data, tmp_path):
    vocab = Vocabulary.load(data / "vocab.json")
    train_split = load_split(data, "train", vocab)
    weights = {}
    for dim in (0, HEAD):
        torch.manual_seed(0)
        model = build_model(make_config("imram", vocab_size=len(vocab), img_dim=IMG_DIM, embed_size=8, word_dim=8,
                                        global_dim=dim), vocab)
        train(model, train_split, None, TrainConfig(epochs=1, batch_size=16, max_steps=6, prefilter_epochs=0),
              tmp_path / f"run{dim}", show_progress=False)
        weights[dim] = {k: v for k, v in model.state_dict().items() if not k.startswith("prefilter.")}
    assert weights[0].keys() == weights[HEAD].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[HEAD][name]), name


@pytest.mark.slow
def test_distill_improves_the_prefilter_over_the_untrained_head_and_keeps_the_model(tmp_path):
    data = tmp_path / "data"
    write_synthetic(data, SynthConfig(n_train=200, n_dev=40, n_test=4, regions=REGIONS, img_dim=IMG_DIM, seed=6))
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = build_model(make_config("imram", vocab_size=len(vocab), img_dim=IMG_DIM, embed_size=16, word_dim=16), vocab)
    config = TrainConfig(epochs=6, batch_size=32, lr_update=4, warmup_epochs=3, prefilter_epochs=0)
    train(model, load_split(data, "train", vocab), None, config, tmp_path / "run", show_progress=False)  # a teacher
    source = tmp_path / "plain.pt"
    (tmp_path / "run" / "checkpoint.pt").rename(source)
    with pytest.raises(CheckpointError, match="being distilled"):
        distill_checkpoint(source, data, out=tmp_path / "." / "plain.pt", show_progress=False)
    run = distill_checkpoint(source, data, config=DistillConfig(global_dim=16, epochs=8, batch_size=16,
                                                                 teacher_items=8), show_progress=False)
    assert run.checkpoint == tmp_path / "plain.prefilter.pt"
    before, after = run.log["before"], run.log["dev"]  # recall@1, 8, 32, 128 both ways on 40 dev images
    assert after["t2i@8"] > before["t2i@8"] + 20 and after["i2t@8"] > before["i2t@8"] + 20, (before, after)
    original, distilled = load_checkpoint(source), load_checkpoint(run.checkpoint)
    assert distilled.config.global_dim == 16 and original.prefilter is None
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, distilled.state_dict()[name]), name
    assert distilled.checkpoint_metadata["distilled_from"]["sha256"] == original.checkpoint_sha256
    with pytest.raises(ConfigError, match="dual encoder"):
        with_new_heads(build_model(make_config("dual", vocab_size=10, img_dim=4, embed_size=4, word_dim=4)), 4)


def _clustered_vectors(n, dim=16, clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, dim))
    return torch.nn.functional.normalize(torch.from_numpy(points).float(), dim=1)


def test_a_prefilter_index_finds_most_of_the_exact_shortlist_and_all_of_it_probing_every_list():
    pytest.importorskip("faiss")
    from xmr.runtime.shortlist import PrefilterIndex

    vectors, queries = _clustered_vectors(4000), _clustered_vectors(50, seed=1)
    exact = top_candidates(queries, vectors, 32)
    index = PrefilterIndex.train(vectors)
    assert index.lists == 4000 // 39 and index.probes == 4000 // 39 // 8  # 4 sqrt(N) lists, at most N / 39; an eighth probed
    found = top_candidates(queries, vectors, 32, index)
    assert found.shape == exact.shape and (np.diff(found, axis=1) > 0).all()
    overlap = np.mean([len(np.intersect1d(a, b)) / 32 for a, b in zip(found, exact)])
    assert overlap > 0.9
    everything = PrefilterIndex(index.centroids, index.assignment, index.lists)
    np.testing.assert_array_equal(top_candidates(queries, vectors, 32, everything), exact)
    narrow = PrefilterIndex(index.centroids, index.assignment, 1)  # one list holds fewer than 500 items: searched exactly instead
    np.testing.assert_array_equal(top_candidates(queries, vectors, 500, narrow), top_candidates(queries, vectors, 500))
    for lists in (0, 4001, 2.5):
        with pytest.raises(InputError, match="lists"):
            PrefilterIndex.train(vectors, lists=lists)


def test_a_gallery_saves_and_loads_its_prefilter_index_and_search_uses_it(artifacts, headless, test_split, tmp_path):
    pytest.importorskip("faiss")
    scorer = Scorer.load(artifacts, backend="onnxruntime", device="cpu")
    images = scorer.encode_images(test_split.features)
    query = test_split.captions[:6]
    indexed = images.with_index(lists=2, probes=1)
    assert indexed.index.lists == 2 and images.index is None  # a new gallery; the old one unchanged
    one_list = scorer.search(query, indexed, k=3, shortlist=4)
    exact = scorer.search(query, images, k=3, shortlist=4)
    assert one_list.indices.shape == exact.indices.shape
    indexed.save(tmp_path / "indexed")
    loaded = scorer.load_gallery(tmp_path / "indexed")
    assert loaded.index.probes == 1 and torch.equal(loaded.index.centroids, indexed.index.centroids)
    again = scorer.search(query, loaded, k=3, shortlist=4)
    np.testing.assert_array_equal(again.indices, one_list.indices)
    np.testing.assert_array_equal(again.scores, one_list.scores)
    loaded.index.probes = 2  # every list: the exact shortlist
    np.testing.assert_array_equal(scorer.search(query, loaded, k=3, shortlist=4).indices, exact.indices)
    assert loaded.select([0, 2]).index is None  # an index belongs to the items it was trained on
    assignment = indexed.index.assignment.numpy()
    for edit, tensors, message in (({"probes": 3}, {}, "probes must be an integer from 1 to 2"),
                                   ({"kind": "hnsw"}, {}, "a prefilter index is an"),
                                   ({}, {"assignment": assignment + 2}, "assigns items to lists 2 to"),
                                   ({}, {"assignment": assignment[:-1]}, r"assignment must be int64 \[16\]")):
        damaged = tmp_path / f"damaged_{len(message)}"
        indexed.save(damaged)
        header = json.loads((damaged / "gallery.json").read_text())
        header["index"].update(edit)
        for name, value in tensors.items():
            np.save(damaged / f"{name}.npy", value)
            header["tensors"][name]["sha256"] = file_sha256(damaged / f"{name}.npy")
        header["digest"] = _digest(header)  # a consistent header that says something wrong
        (damaged / "gallery.json").write_text(json.dumps(header))
        with pytest.raises(InputError, match=message) as error:
            Gallery.load(damaged)
        assert "\n" not in str(error.value)
    header = json.loads((tmp_path / "indexed" / "gallery.json").read_text())
    header["index"]["probes"] = 2  # edited without its digest
    (tmp_path / "indexed" / "gallery.json").write_text(json.dumps(header))
    with pytest.raises(InputError, match="changed after it was saved"):
        Gallery.load(tmp_path / "indexed")
    plain = Scorer.load(headless, backend="onnxruntime", device="cpu").encode_images(test_split.features)
    with pytest.raises(InputError, match="has none"):
        plain.with_index()
