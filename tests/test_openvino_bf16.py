"""The CPU's matrix units: which CPU backend ``auto`` takes, the OpenVINO backend, and bf16.

Choices are tested with the CPU's features injected, so they hold on any CPU; bf16 scores are
tested on this one (emulated where it has no bf16 units: the same numbers, only slower).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from xmr.calibration.accuracy import accuracy, mean_rank_agreement
from xmr.cpu import CpuFeatures, _cpuinfo
from xmr.data import SynthConfig, Vocabulary, load_split, write_synthetic
from xmr.errors import BackendUnavailableError, InputError
from xmr.eval import split_scores
from xmr.export.artifacts import export_artifacts
from xmr.export.manifest import OPENVINO_CACHE
from xmr.models import build_model, make_config
from xmr.models.checkpoint import save_checkpoint
from xmr.runtime import Scorer
from xmr.runtime.backends import auto_candidates, base, cpu_candidates, openvino_backend
from xmr.runtime.artifacts import Artifacts
from xmr.train import TrainConfig, train

openvino = pytest.importorskip("openvino")

AVX2 = frozenset({"avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512_vnni"}  # Ice Lake-class Xeon
AVX512_BF16 = AVX512 | {"avx512_bf16"}  # Cooper Lake
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}  # Sapphire Rapids and later
REGIONS, IMG_DIM = 6, 8


def features(flags: frozenset[str]) -> CpuFeatures:
    return CpuFeatures("test CPU", flags, 2600.0)


# -- the CPU's units and the choice they decide


@pytest.mark.parametrize("flags, units", [
    (AMX, ("AVX-512", "AMX-BF16", "AMX-INT8")), (AVX512_BF16, ("AVX-512", "AVX-512 BF16", "AVX-512 VNNI")),
    (AVX512, ("AVX-512", None, "AVX-512 VNNI")), (AVX2 | {"avx_vnni"}, ("AVX2", None, "AVX-VNNI")),
    (frozenset(), (None, None, None))])
def test_matrix_units_are_read_from_the_flags(flags, units):
    cpu = features(flags)
    assert (cpu.fp32_units, cpu.bf16_units, cpu.int8_units) == units


def test_cpuinfo_gives_the_first_processors_entries(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon A\nflags\t\t: fpu avx2 amx_tile\n\n"
                    "processor\t: 1\nmodel name\t: Xeon B\nflags\t\t: fpu\n")
    assert _cpuinfo(info) == {"processor": "0", "model name": "Xeon A", "flags": "fpu avx2 amx_tile"}
    assert _cpuinfo(tmp_path / "missing") == {}


@pytest.mark.parametrize("flags, fp32_order, bf16_order", [
    (AMX, ["openvino", "onnxruntime", "torch"], ["openvino", "torch"]),
    (AVX512_BF16, ["onnxruntime", "openvino", "torch"], ["openvino", "torch"]),
    (AVX2, ["onnxruntime", "openvino", "torch"], ["openvino", "torch"])])  # bf16 emulated: the same scores
def test_cpu_backends_are_ordered_by_the_units_the_cpu_has(flags, fp32_order, bf16_order):
    assert cpu_candidates("fp32", features(flags)) == fp32_order
    assert cpu_candidates("bf16", features(flags)) == bf16_order
    assert cpu_candidates("fp16", features(flags)) == cpu_candidates("int8", features(flags)) == ["onnxruntime"]


def test_auto_on_a_gpu_machine_still_lists_the_cpu_backends_last(artifacts, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_candidates(Artifacts.open(artifacts), "bf16", None, features(AMX)) == ["openvino", "torch"]
    assert auto_candidates(Artifacts.open(artifacts), "fp32", "cpu", features(AVX2))[0] == "onnxruntime"


# -- the OpenVINO backend


def _checkpoint(kind: str, data: Path, path: Path) -> Path:
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = build_model(make_config(kind, vocab_size=len(vocab), img_dim=IMG_DIM, embed_size=8, word_dim=8), vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # non-degenerate scores
    return save_checkpoint(model, path, {"regions": REGIONS})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bf16_data")
    write_synthetic(out, SynthConfig(n_train=30, n_dev=12, n_test=12, regions=REGIONS, img_dim=IMG_DIM, seed=7))
    return out


@pytest.fixture(scope="module")
def artifacts(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bf16_imram")
    export_artifacts(_checkpoint("imram", data, root / "model.pt"), root / "artifacts", ("fp32",), engine=False)
    return root / "artifacts"


@pytest.fixture(scope="module")
def split(data):
    return load_split(data, "test", Vocabulary.load(data / "vocab.json"))


def test_bf16_scores_are_bf16s_not_fp32s_and_stay_close(artifacts, split):
    """Both bf16 backends really compute in bf16 (their scores differ from fp32's) and stay
    within bf16's error of the fp32 scores (random weights, std 0.3: larger than trained ones)."""
    with Scorer.load(artifacts, backend="torch") as scorer:
        fp32 = scorer.score(split.features, split.captions)
    for backend in ("openvino", "torch"):
        with Scorer.load(artifacts, backend=backend, precision="bf16") as scorer:
            assert (scorer.backend, scorer.precision, scorer.device) == (backend, "bf16", "cpu")
            error = np.abs(scorer.score(split.features, split.captions) - fp32).max()
        assert 1e-5 < error < 0.1, (backend, error)


def test_a_gallery_is_scored_only_in_the_precision_that_encoded_it(artifacts, split):
    with Scorer.load(artifacts, backend="openvino", precision="bf16") as bf16, \
            Scorer.load(artifacts, backend="openvino") as fp32:
        images = bf16.encode_images(split.features)
        with pytest.raises(InputError, match="encoded in bf16, this scorer runs fp32"):
            fp32.score(images, split.captions)
        with pytest.raises(InputError, match="encoded in fp32, this scorer runs bf16"):
            bf16.score(fp32.encode_images(split.features), split.captions)
        assert bf16.score(images, split.captions).shape == (12, 60)


def test_bf16_without_bf16_units_warns_that_it_is_emulated(artifacts, caplog, monkeypatch):
    for flags, emulated in ((AVX512, True), (AMX, False)):
        monkeypatch.setattr(base, "cpu_features", lambda flags=flags: features(flags))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="xmr.runtime"):
            for backend in ("openvino", "torch"):
                with Scorer.load(artifacts, backend=backend, precision="bf16") as scorer:
                    assert scorer.emulated == ("bf16 emulated" in str(scorer)) == emulated
        assert ("bf16 is emulated" in caplog.text) == emulated


def test_backends_that_cannot_run_a_precision_say_why(artifacts, monkeypatch):
    cases = [("onnxruntime", "bf16", None, "onnxruntime has no bf16 kernels"),
             ("openvino", "int8", None, "openvino runs fp32 and bf16, not int8"),
             ("openvino", "fp16", None, "openvino runs fp32 and bf16, not fp16")]
    if not torch.cuda.is_available():
        cases.append(("openvino", "fp32", "cuda", "openvino on device 'cuda': no CUDA GPU"))
    for backend, precision, device, message in cases:
        with pytest.raises(BackendUnavailableError, match=message):
            Scorer.load(artifacts, backend=backend, precision=precision, device=device)
    assert "CPU here, not cuda" in openvino_backend.openvino_problem("fp32", "cuda")
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # not installed
    with pytest.raises(BackendUnavailableError, match=r"openvino is not installed \(pip install openvino\)"):
        Scorer.load(artifacts, backend="openvino")


def test_compiled_models_are_cached_in_the_artifacts_and_reused_by_either_precision(data, tmp_path):
    """OpenVINO keys its cache by the graph only and applies the precision when loading: a
    bf16 load from the entry an fp32 load wrote still computes bf16, and the reverse fp32."""
    export_artifacts(_checkpoint("camp", data, tmp_path / "camp.pt"), tmp_path / "camp", ("fp32",), engine=False)
    features, captions = np.ones((2, REGIONS, IMG_DIM), np.float32), ["a red car .", "a dog ."]
    with Scorer.load(tmp_path / "camp", backend="torch") as scorer:
        reference = scorer.score(features, captions)
    loads = []
    for precision in ("fp32", "bf16", "fp32"):
        with Scorer.load(tmp_path / "camp", backend="openvino", precision=precision) as scorer:
            loads.append((scorer._backend.from_cache, np.abs(scorer.score(features, captions) - reference).max()))
    assert [list(cached.values()) for cached, _ in loads] == [[False, False], [True, True], [True, True]]
    assert loads[0][1] < 1e-5 and loads[2][1] < 1e-5 and loads[1][1] > 1e-5, loads
    assert len(list((tmp_path / "camp" / OPENVINO_CACHE).iterdir())) == 2  # image encoder, pair scorer


def test_an_unwritable_artifact_directory_loads_without_a_cache(data, tmp_path, monkeypatch):
    export_artifacts(_checkpoint("camp", data, tmp_path / "camp.pt"), tmp_path / "camp", ("fp32",), engine=False)
    monkeypatch.setattr(openvino_backend.os, "access", lambda path, mode: False)  # as for a read-only directory
    with Scorer.load(tmp_path / "camp", backend="openvino") as scorer:
        assert scorer.score(np.ones((1, REGIONS, IMG_DIM), np.float32), ["a dog ."]).shape == (1, 1)
    assert not (tmp_path / "camp" / OPENVINO_CACHE).exists()


# -- bf16 on trained models: what the precision costs in recall


TRAINED_SIZES = {"imram": 32, "camp": 64}  # D: CAMP learns too little at 32 in four epochs on 400 images


@pytest.fixture(scope="module", params=["imram", "camp"])
def trained(request, tmp_path_factory):
    """A small model trained on the synthetic data (its scores separate the right captions as
    a real model's do), exported; and its test split: 200 images, so one image's R@K changing
    moves rsum by 0.5."""
    out = tmp_path_factory.mktemp(f"trained_{request.param}")
    write_synthetic(out / "data", SynthConfig(n_train=400, n_dev=20, n_test=200, regions=6, img_dim=32, seed=1))
    vocab = Vocabulary.load(out / "data" / "vocab.json")
    splits = {s: load_split(out / "data", s, vocab) for s in ("train", "dev", "test")}
    torch.manual_seed(0)
    dim = TRAINED_SIZES[request.param]
    model = build_model(make_config(request.param, vocab_size=len(vocab), img_dim=32, embed_size=dim, word_dim=dim),
                        vocab)
    train(model, splits["train"], splits["dev"], TrainConfig(epochs=4, batch_size=32, warmup_epochs=2, lr_update=2),
          out / "run", show_progress=False)
    checkpoint = save_checkpoint(model, out / "model.pt", {"regions": 6})
    export_artifacts(checkpoint, out / "artifacts", ("fp32",), engine=False)
    return out / "artifacts", splits["test"]


def _bf16_against_fp32(artifacts: Path, split, backend: str) -> dict[str, float]:
    with Scorer.load(artifacts, backend="torch") as scorer:
        reference = split_scores(scorer, split)
    with Scorer.load(artifacts, backend=backend, precision="bf16") as scorer:
        metrics = accuracy(split_scores(scorer, split), reference, split.per_image)
    assert metrics["rsum"] - metrics["delta_rsum"] > 150, "the model did not learn (chance: rsum ~16): the test proves nothing"
    assert metrics["max_abs_score_error"] > 0, "bf16 computed exactly fp32's scores"
    return metrics


@pytest.mark.slow
def test_openvino_bf16_keeps_the_recall_and_the_ranking_of_fp32(trained):
    """|Δ rsum| <= 0.5 on the README's trained models (500 test images: docs/benchmarks.md);
    here, on 200 images and a less separated small model, at most two images' R@K may change."""
    metrics = _bf16_against_fp32(*trained, "openvino")
    assert abs(metrics["delta_rsum"]) <= 1.0, metrics
    assert mean_rank_agreement(metrics) >= 0.999, metrics


@pytest.mark.slow
def test_torch_bf16_ranks_within_its_documented_agreement(trained):
    """PyTorch's bf16 casts the whole model but the text encoder: measured rank agreement
    0.9978-0.9995 on these models (docs/runtime.md), below OpenVINO's."""
    metrics = _bf16_against_fp32(*trained, "torch")
    assert abs(metrics["delta_rsum"]) <= 5, metrics
    assert mean_rank_agreement(metrics) >= 0.995, metrics
