"""The runtime against untrusted files and careless callers: every case is one clear error.

Artifact directories and saved galleries may come from someone else: file names stay inside
their directory, every file is checked against its sha256, headers against their digest,
structures against what the scorer's graphs make. Every bad argument to the public API is an
``XmrError`` of one line naming the value, never a numpy/torch traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from xmr.data import SynthConfig, Vocabulary, load_split, write_synthetic
from xmr.data.tokenize import tokenize
from xmr.errors import ArtifactError, BackendUnavailableError, InputError, OutputError, XmrError
from xmr.export.artifacts import export_artifacts
from xmr.models import build_model, make_config
from xmr.models.checkpoint import save_checkpoint
from xmr.runtime import (
    BatchedScorer, BatcherConfig, Gallery, ImageGallery, InputWarning, OnnxRuntimeBackend, Scorer, TextGallery,
)
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.gallery import GALLERY, _digest
from xmr.runtime.inputs import DEFAULT_MAX_LENGTH, caption_cap

REGIONS, IMG_DIM = 6, 8
NO_GPU = not torch.cuda.is_available()


def _checkpoint(kind: str, data: Path, path: Path, seed: int = 0) -> Path:
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(seed)
    model = build_model(make_config(kind, vocab_size=len(vocab), img_dim=IMG_DIM, embed_size=8, word_dim=8), vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return save_checkpoint(model, path, {"regions": REGIONS})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Data, an IMRAM and a CAMP artifact directory side by side (fp32 only, no engines)."""
    root = tmp_path_factory.mktemp("hardening")
    write_synthetic(root / "data", SynthConfig(n_train=30, n_dev=12, n_test=12, regions=REGIONS, img_dim=IMG_DIM, seed=7))
    for kind in ("imram", "camp"):
        export_artifacts(_checkpoint(kind, root / "data", root / f"{kind}.pt"), root / kind, ("fp32",), engine=False)
    return root


@pytest.fixture(scope="module")
def split(root):
    return load_split(root / "data", "test", Vocabulary.load(root / "data" / "vocab.json"))


@pytest.fixture(scope="module")
def scorer(root):
    with Scorer.load(root / "imram", backend="onnxruntime", device="cpu") as scorer:
        yield scorer


@pytest.fixture(scope="module")
def galleries(scorer, split):
    return scorer.encode_images(np.asarray(split.features[:4])), scorer.encode_texts(split.captions[:6])


@pytest.fixture(scope="module")
def camp(root):
    """CAMP: caption tensors with one length axis and a word x word one (packed Σ L and Σ L²)."""
    with Scorer.load(root / "camp", backend="onnxruntime", device="cpu") as camp:
        yield camp


@pytest.fixture(scope="module")
def camp_galleries(camp, split):
    return camp.encode_images(np.asarray(split.features[:4])), camp.encode_texts(split.captions[:6])


def one_line_error(call: Callable[[], object], kind: type[Exception], fragment: str) -> str:
    """Run ``call``; it must raise ``kind`` (an ``XmrError``) with one line containing ``fragment``."""
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert isinstance(caught.value, XmrError), f"{type(caught.value).__name__} is not an XmrError: {message}"
    assert "\n" not in message, f"message is not one line: {message!r}"
    assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- artifact directories: confined names, sha256 required and checked, structure


@pytest.fixture
def copy(root, tmp_path) -> Path:
    """A fresh copy of the IMRAM artifacts beside a second one (``../other``)."""
    shutil.copytree(root / "imram", tmp_path / "artifacts")
    shutil.copytree(root / "camp", tmp_path / "other")
    return tmp_path / "artifacts"


class Replace(Exception):
    """Raised by an edit to write ``args[0]`` instead of the edited manifest or header."""


def _edit_manifest(directory: Path, edit: Callable[[dict], object]) -> None:
    """Apply ``edit`` (its return value is ignored) to the manifest in place."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    try:
        edit(manifest)
    except Replace as replace:
        manifest = replace.args[0]
    path.write_text(json.dumps(manifest))


def replace_with(value: object) -> Callable[[dict], None]:
    def edit(_: dict) -> None:
        raise Replace(value)
    return edit


def _pair_scorer(manifest: dict) -> dict:
    return manifest["graphs"]["pair_scorer"]["files"]["fp32"]


def _artifact_cases(copy: Path) -> list[tuple[str, Callable[[], None], type[Exception], str]]:
    other = copy.parent / "other"

    def manifest_case(edit: Callable[[dict], object], **load) -> Callable[[], None]:
        def run() -> None:
            _edit_manifest(copy, edit)
            Scorer.load(copy, **load)
        return run

    def vocab_outside(manifest: dict) -> None:
        manifest["vocab"] = {"file": "../../../../etc/passwd", "sha256": sha256(Path("/etc/passwd"))}

    def relative_other(manifest: dict) -> None:
        _pair_scorer(manifest).update(file="../other/pair_scorer.onnx", sha256=sha256(other / "pair_scorer.onnx"))

    def absolute_other(manifest: dict) -> None:
        _pair_scorer(manifest).update(file=str(other / "pair_scorer.onnx"), sha256=sha256(other / "pair_scorer.onnx"))

    def symlinked() -> None:
        (copy / "pair_scorer.onnx").unlink()
        (copy / "pair_scorer.onnx").symlink_to(other / "pair_scorer.onnx")
        _edit_manifest(copy, lambda m: _pair_scorer(m).update(sha256=sha256(other / "pair_scorer.onnx")))
        Scorer.load(copy)

    def bit_flipped() -> None:
        data = bytearray((copy / "pair_scorer.onnx").read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / "pair_scorer.onnx").write_bytes(bytes(data))
        Scorer.load(copy)

    def garbage_unverified() -> None:
        (copy / "pair_scorer.onnx").write_bytes(b"not an onnx graph")
        Scorer.load(copy, verify=False)

    def no_checkpoint(manifest: dict) -> None:
        del manifest["checkpoint"]
        del manifest["source_checkpoint"]["path"]

    def torch_without_checkpoint_entry() -> None:
        opened = Artifacts.open(copy)
        del opened.manifest["checkpoint"]
        opened.checkpoint()

    def engine_entry(entry: object) -> Callable[[], None]:
        def run() -> None:
            opened = Artifacts.open(copy)
            opened.manifest["engines"] = {"built": True, "files": {"pair_scorer": {"fp16": entry}}}
            opened.engine("pair_scorer", "fp16")
        return run

    def bigger_vocab() -> None:
        vocab = json.loads((copy / "vocab.json").read_text())
        for i in range(200):
            vocab["word2idx"][f"extra{i}"] = len(vocab["word2idx"])
        vocab["idx2word"] = {str(i): w for w, i in vocab["word2idx"].items()}
        vocab["idx"] = len(vocab["word2idx"])
        (copy / "vocab.json").write_text(json.dumps(vocab))
        _edit_manifest(copy, lambda m: m["vocab"].update(sha256=sha256(copy / "vocab.json")))
        Scorer.load(copy)

    return [
        ("vocabulary outside the directory", manifest_case(vocab_outside), ArtifactError, "not a plain file name"),
        ("graph of another artifact directory (../other)", manifest_case(relative_other), ArtifactError,
         "'../other/pair_scorer.onnx' is not a plain file name"),
        ("graph by absolute path", manifest_case(absolute_other), ArtifactError, "is not a plain file name"),
        ("… also with verify=False", manifest_case(relative_other, verify=False), ArtifactError, "not a plain file name"),
        ("graph entry without sha256", manifest_case(lambda m: _pair_scorer(m).pop("sha256")), ArtifactError,
         "has no sha256"),
        ("graph entry that is a bare name", manifest_case(
            lambda m: m["graphs"]["pair_scorer"]["files"].update(fp32="pair_scorer.onnx")), ArtifactError, "fp32"),
        ("graph file that is a symbolic link", symlinked, ArtifactError, "is a symbolic link"),
        ("bit-flipped graph", bit_flipped, ArtifactError, "does not match the sha256"),
        ("damaged graph with verify=False", garbage_unverified, ArtifactError, "onnxruntime cannot load"),
        ("graph file that is a FIFO (would block hashing)", lambda: (
            (copy / "pair_scorer.onnx").unlink(), os.mkfifo(copy / "pair_scorer.onnx"), Scorer.load(copy)),
         ArtifactError, "not a regular file"),
        ("… and with verify=False", lambda: (
            (copy / "pair_scorer.onnx").unlink(), os.mkfifo(copy / "pair_scorer.onnx"), Scorer.load(copy, verify=False)),
         ArtifactError, "not a regular file"),
        ("graph listed but missing", lambda: ((copy / "text_encoder.onnx").unlink(), Scorer.load(copy)),
         ArtifactError, "text_encoder.onnx is listed in"),
        ("manifest not JSON", lambda: ((copy / "manifest.json").write_text("{nope"), Scorer.load(copy)),
         ArtifactError, "JSON"),
        ("manifest not an object", manifest_case(replace_with([1, 2])), ArtifactError, "manifest"),
        ("manifest without graphs", manifest_case(lambda m: m.pop("graphs")), ArtifactError, "'graphs'"),
        ("manifest without regions", manifest_case(lambda m: m.pop("regions")), ArtifactError, "'regions'"),
        ("manifest without config", manifest_case(lambda m: m.pop("config")), ArtifactError, "'config'"),
        ("manifest without model", manifest_case(lambda m: m.pop("model")), ArtifactError, "'model'"),
        ("regions as a string", manifest_case(lambda m: m.update(regions="6")), ArtifactError, "'regions'"),
        ("regions edited (graphs take 6)", manifest_case(lambda m: m.update(regions=7)), ArtifactError, "regions"),
        ("config without img_dim", manifest_case(lambda m: m["config"].pop("img_dim")), ArtifactError, "'img_dim'"),
        ("graphs without pair_scorer", manifest_case(lambda m: m["graphs"].pop("pair_scorer")), ArtifactError,
         "'pair_scorer'"),
        ("graph outputs not a list", manifest_case(lambda m: m["graphs"]["image_encoder"].update(outputs={})),
         ArtifactError, "'outputs'"),
        ("no source checkpoint sha256", manifest_case(lambda m: m["source_checkpoint"].pop("sha256")), ArtifactError,
         "'sha256'"),
        ("no checkpoint entry (older export)", manifest_case(no_checkpoint, backend="torch"), ArtifactError,
         "checkpoint"),
        ("… Artifacts.checkpoint() never reads source_checkpoint.path", torch_without_checkpoint_entry, ArtifactError,
         "re-export"),
        ("checkpoint outside the directory", manifest_case(
            lambda m: m["checkpoint"].update(file="../other/checkpoint.pt"), backend="torch"), ArtifactError,
         "not a plain file name"),
        ("engine entry without sha256", engine_entry("pair_scorer.fp16.engine"), ArtifactError, "sha256"),
        ("engine outside the directory", engine_entry({"file": "../other/x.engine", "sha256": "0" * 64}),
         ArtifactError, "not a plain file name"),
        ("vocabulary larger than the model's embedding", bigger_vocab, ArtifactError, "words but the model embeds"),
        ("artifact path None", lambda: Scorer.load(None), ArtifactError, "path"),
    ]


ARTIFACT_CASES = [c[0] for c in _artifact_cases(Path("/nonexistent"))]


@pytest.mark.parametrize("case", ARTIFACT_CASES)
def test_untrusted_artifact_directories_are_refused(case, copy):
    description, call, kind, fragment = next(c for c in _artifact_cases(copy) if c[0] == case)
    one_line_error(call, kind, fragment)


def test_a_graph_of_another_model_is_never_loaded(copy, monkeypatch):
    """Even with the right sha256, an entry pointing into another artifact directory (or
    anywhere else) is refused before any file is opened."""
    opened: list[str] = []
    real_open = Path.open

    def spy(self, *args, **kwargs):
        opened.append(str(self))
        return real_open(self, *args, **kwargs)

    other = copy.parent / "other" / "pair_scorer.onnx"
    _edit_manifest(copy, lambda m: _pair_scorer(m).update(file=f"../other/{other.name}", sha256=sha256(other)))
    monkeypatch.setattr(Path, "open", spy)
    with pytest.raises(ArtifactError):
        Scorer.load(copy)
    assert not any(p.startswith(str(other.parent)) for p in opened)


# -- saved galleries: header digest, sha256 per file, structure


@pytest.fixture
def saved(camp_galleries, tmp_path) -> tuple[Path, Path]:
    images, texts = camp_galleries
    return images.save(tmp_path / "images"), texts.save(tmp_path / "texts")


def _header(path: Path) -> dict:
    return json.loads((path / GALLERY).read_text())


def _write_header(path: Path, header: dict, redigest: bool = True) -> None:
    if redigest:
        header["digest"] = _digest(header)
    (path / GALLERY).write_text(json.dumps(header))


def _rewrite_tensor(path: Path, name: str, array: np.ndarray, rehash: bool = True) -> None:
    """Replace tensor ``name`` and (``rehash``) update its sha256 and the digest: a consistent forgery."""
    np.save(path / f"{name}.npy", array, allow_pickle=True)
    if rehash:
        header = _header(path)
        header["tensors"][name]["sha256"] = sha256(path / f"{name}.npy")
        _write_header(path, header)


def _rewrite_bytes(path: Path, name: str, data: bytes) -> None:
    (path / f"{name}.npy").write_bytes(data)
    header = _header(path)
    header["tensors"][name]["sha256"] = sha256(path / f"{name}.npy")
    _write_header(path, header)


def _gallery_cases(images: Path, texts: Path, scorer: Scorer) -> list[tuple[str, Callable[[], object], type, str]]:
    def header_edit(path: Path, edit: Callable[[dict], object], redigest: bool = True) -> Callable[[], object]:
        def run() -> object:
            header = _header(path)
            try:
                edit(header)
            except Replace as replace:
                header = replace.args[0]
            _write_header(path, header, redigest)
            return Gallery.load(path)
        return run

    def then_load(path: Path, action: Callable[[], object], **load) -> Callable[[], object]:
        return lambda: (action(), Gallery.load(path, **load))

    lengths = np.load(texts / "lengths.npy")
    offsets = np.load(texts / "offsets_1.npy")
    regions = np.load(images / "image_regions.npy")

    def truncate(path: Path, name: str) -> None:
        file = path / f"{name}.npy"
        file.write_bytes(file.read_bytes()[:-7])

    def rename_tensor(header: dict) -> None:
        header["tensors"]["../x"] = header["tensors"].pop("image_regions")

    def symlink_header() -> None:
        (images / "elsewhere.json").write_text((images / GALLERY).read_text())
        (images / GALLERY).unlink()
        (images / GALLERY).symlink_to(images / "elsewhere.json")

    def symlink_tensor() -> None:
        shutil.copy(images / "image_regions.npy", images / "real.npy")
        (images / "image_regions.npy").unlink()
        (images / "image_regions.npy").symlink_to(images / "real.npy")

    longer = lengths.copy()
    longer[0] += 1
    swapped = lengths.copy()
    swapped[[0, -1]] = swapped[[-1, 0]]
    shifted = offsets.copy()
    shifted[0] += 1
    squares = np.load(texts / "offsets_2.npy")
    squares[[0, 1]] = squares[[1, 0]]

    return [
        ("header not JSON", lambda: ((images / GALLERY).write_text("{"), Gallery.load(images)), InputError, "JSON"),
        ("header not an object", header_edit(images, replace_with([1]), redigest=False), InputError, "JSON object"),
        ("unknown format", header_edit(images, lambda h: h.update(format="other")), InputError, "not an xmr gallery"),
        ("format version 1 (no sha256s)", header_edit(images, lambda h: h.update(format_version=1)), InputError,
         "version 1"),
        ("unknown kind", header_edit(images, lambda h: h.update(kind="videos")), InputError, "unknown gallery kind"),
        ("kind flipped images -> texts", header_edit(images, lambda h: h.update(kind="texts")), InputError,
         "not an texts tensor"),
        ("count as a string", header_edit(images, lambda h: h.update(count="4")), InputError, "'count'"),
        ("count edited", header_edit(images, lambda h: h.update(count=5)), InputError, "its header says 5"),
        ("identity edited (digest not updated)", header_edit(images, lambda h: h.update(identity="0" * 64),
                                                             redigest=False), InputError, "changed after it was saved"),
        ("precision edited (digest not updated)", header_edit(images, lambda h: h.update(precision="fp16"),
                                                              redigest=False), InputError, "changed after"),
        ("no digest", header_edit(images, lambda h: h.pop("digest"), redigest=False), InputError, "'digest'"),
        ("tensor name ../x", header_edit(images, rename_tensor), InputError, "'../x' is not a plain file name"),
        ("tensor stored under another name", header_edit(
            images, lambda h: h["tensors"]["image_regions"].update(file="image_cross.npy")), InputError,
         "must be stored as image_regions.npy"),
        ("tensor without sha256", header_edit(images, lambda h: h["tensors"]["image_regions"].pop("sha256")),
         InputError, "has no sha256"),
        ("truncated .npy", then_load(images, lambda: truncate(images, "image_regions")), InputError,
         "does not match the sha256"),
        ("truncated .npy, verify=False", then_load(images, lambda: truncate(images, "image_regions"), verify=False),
         InputError, "truncated or damaged"),
        ("missing tensor file", then_load(images, lambda: (images / "image_cross.npy").unlink()), InputError,
         "missing"),
        ("tensor file is a FIFO, verify=False", then_load(images, lambda: (
            (images / "image_cross.npy").unlink(), os.mkfifo(images / "image_cross.npy")), verify=False), InputError,
         "not a regular file"),
        ("header is a symbolic link", then_load(images, symlink_header), InputError, "symbolic link"),
        ("tensor file is a symbolic link", then_load(images, symlink_tensor), InputError, "symbolic link"),
        ("a zip file as .npy (hash updated)", then_load(images, lambda: _rewrite_bytes(
            images, "image_regions", b"PK\x03\x04 a zip archive, not an array")), InputError, "not a readable .npy"),
        ("float64 tensor (hash updated)", then_load(images, lambda: _rewrite_tensor(
            images, "image_regions", regions.astype(np.float64))), InputError, "holds float64"),
        ("object (pickle) tensor (hash updated)", then_load(images, lambda: _rewrite_tensor(
            images, "image_regions", np.array([object()] * 4))), InputError, "holds object"),
        ("NaN in a tensor (hash updated)", then_load(images, lambda: _rewrite_tensor(
            images, "image_regions", np.where(regions > 0, np.nan, regions).astype(np.float32))), InputError,
         "holds NaN or Inf"),
        ("header nested 100,000 deep", lambda: ((images / GALLERY).write_text("[" * 100_000), Gallery.load(images)),
         InputError, "not valid JSON"),
        ("header of 20 MB", lambda: ((images / GALLERY).write_text(" " * (20 << 20) + "{}"), Gallery.load(images)),
         InputError, "not a gallery header"),
        ("image tensors of different counts", then_load(images, lambda: _rewrite_tensor(
            images, "image_regions", regions[:3])), InputError, "different numbers of images"),
        ("lengths.npy tampered", then_load(texts, lambda: _rewrite_tensor(texts, "lengths", longer, rehash=False)),
         InputError, "does not match the sha256"),
        ("lengths.npy tampered, verify=False", then_load(
            texts, lambda: _rewrite_tensor(texts, "lengths", longer, rehash=False), verify=False), InputError,
         "packed entries (Σ lengths)"),
        ("lengths swapped (hash updated)", then_load(texts, lambda: _rewrite_tensor(texts, "lengths", swapped)),
         InputError, "offsets_1 are not the cumulative sums"),
        ("lengths 0 (hash updated)", then_load(texts, lambda: _rewrite_tensor(texts, "lengths", lengths * 0)),
         InputError, "caption lengths must be in [1,"),
        ("lengths int32 (hash updated)", then_load(texts, lambda: _rewrite_tensor(
            texts, "lengths", lengths.astype(np.int32))), InputError, "holds int32"),
        ("offsets mismatch (hash updated)", then_load(texts, lambda: _rewrite_tensor(texts, "offsets_1", shifted)),
         InputError, "offsets_1 are not the cumulative sums"),
        ("word x word offsets swapped (hash updated)", then_load(texts, lambda: _rewrite_tensor(
            texts, "offsets_2", squares)), InputError, "offsets_2 are not the cumulative sums"),
        ("word x word tensor cut (hash updated)", then_load(texts, lambda: _rewrite_tensor(
            texts, "text_self_scores", np.load(texts / "text_self_scores.npy")[:-1])), InputError, "(Σ lengths²)"),
        ("offsets missing from the header", header_edit(texts, lambda h: h["tensors"].pop("offsets_1")), InputError,
         "offsets"),
        ("length_axes edited", header_edit(texts, lambda h: h["meta"].update(length_axes={})), InputError,
         "length_axes"),
        ("no such directory", lambda: Gallery.load(images.parent / "nowhere"), InputError, "not a saved gallery"),
        ("path None", lambda: Gallery.load(None), InputError, "directory path"),
        ("a texts gallery as images", lambda: scorer.score(Gallery.load(texts), Gallery.load(texts)), InputError,
         "got a TextGallery"),
    ]


@pytest.fixture
def gallery_cases(saved, camp):
    return {c[0]: c for c in _gallery_cases(*saved, camp)}


GALLERY_CASE_NAMES = [
    "header not JSON", "header not an object", "unknown format", "format version 1 (no sha256s)", "unknown kind",
    "kind flipped images -> texts", "count as a string", "count edited", "identity edited (digest not updated)",
    "precision edited (digest not updated)", "no digest", "tensor name ../x", "tensor stored under another name",
    "tensor without sha256", "truncated .npy", "truncated .npy, verify=False", "missing tensor file",
    "tensor file is a FIFO, verify=False", "header is a symbolic link", "tensor file is a symbolic link", "a zip file as .npy (hash updated)", "float64 tensor (hash updated)",
    "object (pickle) tensor (hash updated)", "NaN in a tensor (hash updated)", "header nested 100,000 deep",
    "header of 20 MB", "image tensors of different counts", "lengths.npy tampered",
    "lengths.npy tampered, verify=False", "lengths swapped (hash updated)", "lengths 0 (hash updated)",
    "lengths int32 (hash updated)", "offsets mismatch (hash updated)", "word x word offsets swapped (hash updated)",
    "word x word tensor cut (hash updated)", "offsets missing from the header",
    "length_axes edited", "no such directory", "path None", "a texts gallery as images",
]


@pytest.mark.parametrize("case", GALLERY_CASE_NAMES)
def test_untrusted_galleries_are_refused(case, gallery_cases):
    assert set(gallery_cases) == set(GALLERY_CASE_NAMES)
    _, call, kind, fragment = gallery_cases[case]
    one_line_error(call, kind, fragment)


def test_a_saved_gallery_loads_back_identical_and_checked(saved, camp_galleries, camp):
    for path, original in zip(saved, camp_galleries):
        loaded = camp.load_gallery(path)
        assert type(loaded) is type(original) and len(loaded) == len(original)
        for name, tensor in original.items.items():
            assert torch.equal(loaded.items[name], tensor)
        header = _header(path)
        assert header["format_version"] == 2 and header["digest"] == _digest(header)
        assert all(len(entry["sha256"]) == 64 for entry in header["tensors"].values())


def test_a_gallery_of_another_model_with_a_forged_identity_is_refused(root, split, scorer, tmp_path):
    with Scorer.load(root / "camp") as camp:
        camp_images = camp.encode_images(np.asarray(split.features[:3]))
        camp_texts = camp.encode_texts(split.captions[:3])
    for gallery, name in ((camp_images, "images"), (camp_texts, "texts")):
        path = gallery.save(tmp_path / name)
        header = _header(path)
        header["identity"] = scorer.artifacts.identity  # re-digested: a deliberate forgery, not an accident
        _write_header(path, header)
        one_line_error(lambda: scorer.load_gallery(path), InputError, "encoded by another model")
        forged = type(gallery)(gallery.items, scorer.artifacts.identity, "fp32", gallery.lengths, dict(gallery.meta),
                               gallery.offsets)
        one_line_error(lambda: scorer.search(split.captions[:1] if name == "images" else split.features[:1], forged),
                       InputError, "encoded by another model")


# -- Gallery.save never deletes what is not a gallery


def test_save_never_replaces_a_directory_of_user_files(galleries, tmp_path):
    images, _ = galleries
    userdata = tmp_path / "userdata"
    userdata.mkdir()
    (userdata / "thesis.tex").write_text("years of work")
    one_line_error(lambda: images.save(userdata), OutputError, "non-empty directory that xmr did not write")
    assert (userdata / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["userdata"]  # nothing staged left behind
    images.save(userdata, overwrite=True)  # asked for explicitly: written beside the user's file
    assert (userdata / GALLERY).is_file() and (userdata / "thesis.tex").read_text() == "years of work"


def test_save_refuses_the_working_directory_and_its_parents(galleries, tmp_path, monkeypatch):
    images, _ = galleries
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    for target in (".", "", str(work), "..", str(tmp_path), "/"):
        one_line_error(lambda: images.save(target, overwrite=True), OutputError, "working directory")
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_save_replaces_a_gallery_or_an_empty_directory_and_refuses_a_file(galleries, tmp_path):
    images, texts = galleries
    target = images.save(tmp_path / "g")
    first = _header(target)["digest"]
    texts.save(target)  # a gallery is replaced by another
    assert _header(target)["kind"] == "texts" and _header(target)["digest"] != first
    assert isinstance(Gallery.load(target), TextGallery)
    (tmp_path / "empty").mkdir()
    assert isinstance(Gallery.load(images.save(tmp_path / "empty")), ImageGallery)
    (tmp_path / "file").write_text("x")
    one_line_error(lambda: images.save(tmp_path / "file"), OutputError, "is a file")
    assert (tmp_path / "file").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if "xmr-new" in p.name]


def test_a_reloaded_gallery_can_be_saved_over_itself(saved, camp, split):
    images, _ = saved
    loaded = Gallery.load(images)  # memory-mapped from the files being replaced
    expected = camp.score(loaded, split.captions[:3])
    loaded.save(images)
    np.testing.assert_array_equal(camp.score(Gallery.load(images), split.captions[:3]), expected)


# -- the public API: every bad argument is one clear error


def _api_cases(scorer: Scorer, front: BatchedScorer, images: ImageGallery, texts: TextGallery, features: np.ndarray,
               artifacts: Path):
    captions = ["a dog on the grass", "two cats"]
    ids, lengths = np.array([[1, 5, 2], [1, 6, 2]]), np.array([3, 3])
    load = lambda **kw: (lambda: Scorer.load(artifacts, **kw))  # noqa: E731
    cases = [
        # galleries of the wrong kind in the wrong place
        ("score(images, images)", lambda: scorer.score(images, images), InputError, "texts needs a TextGallery"),
        ("score(texts, texts)", lambda: scorer.score(texts, texts), InputError, "images needs an ImageGallery"),
        ("score(texts, images)", lambda: scorer.score(texts, images), InputError, "got a TextGallery"),
        ("search(ImageGallery, ImageGallery)", lambda: scorer.search(images, images), InputError,
         "got an ImageGallery"),
        ("search(TextGallery, TextGallery)", lambda: scorer.search(texts, texts), InputError, "got a TextGallery"),
        ("search against a string", lambda: scorer.search(captions, "gallery"), InputError,
         "ImageGallery or TextGallery"),
        ("score_pairs with galleries swapped", lambda: scorer.score_pairs(texts, images, [[0, 0]]), InputError,
         "got a TextGallery"),
        ("encode_images(TextGallery)", lambda: scorer.encode_images(texts), InputError, "got a TextGallery"),
        ("encode_texts(ImageGallery)", lambda: scorer.encode_texts(images), InputError, "got an ImageGallery"),
        ("submit(ImageGallery, ImageGallery)", lambda: front.submit(images, images), InputError, "got an ImageGallery"),
        ("plan(texts, images)", lambda: scorer.plan(texts, images),
         InputError, "got a TextGallery"),
        # features
        ("object-dtype features", lambda: scorer.encode_images(features.astype(object)), InputError, "got object"),
        ("ragged list features", lambda: scorer.encode_images([[1.0], [1.0, 2.0]]), InputError, "got list"),
        ("list of floats as features", lambda: scorer.encode_images(features.tolist()), InputError, "np.asarray"),
        ("bool features", lambda: scorer.encode_images(features > 0), InputError, "got bool"),
        ("complex features", lambda: scorer.encode_images(features.astype(np.complex64)), InputError, "complex64"),
        ("int features", lambda: scorer.encode_images(features.astype(np.int64)), InputError, "got int64"),
        ("float128 features", lambda: scorer.encode_images(features.astype(np.longdouble)), InputError,
         "floating point"),
        ("0-d array features", lambda: scorer.encode_images(np.array(1.0)), InputError, "got shape []"),
        ("numpy scalar features", lambda: scorer.encode_images(np.float32(1.0)), InputError, "got float32"),
        ("string array features", lambda: scorer.encode_images(np.array([["a"]])), InputError, "<U1"),
        ("torch bool features", lambda: scorer.encode_images(torch.ones(1, REGIONS, IMG_DIM, dtype=torch.bool)),
         InputError, "torch.bool"),
        ("torch complex features", lambda: scorer.encode_images(torch.ones(1, REGIONS, IMG_DIM, dtype=torch.cfloat)),
         InputError, "torch.complex64"),
        ("sparse features", lambda: scorer.encode_images(torch.ones(1, REGIONS, IMG_DIM).to_sparse()), InputError,
         "dense"),
        ("meta-device features", lambda: scorer.encode_images(torch.ones(1, REGIONS, IMG_DIM, device="meta")),
         InputError, "dense tensor with data"),
        ("float64 beyond float32's range", lambda: scorer.encode_images(np.full((1, REGIONS, IMG_DIM), 1e300)),
         InputError, "NaN or Inf"),
        ("no images", lambda: scorer.encode_images(features[:0]), InputError, "no images"),
        ("features as captions", lambda: scorer.score(images, features), InputError, "1-D array of strings"),
        # captions
        ("one string", lambda: scorer.encode_texts("a dog"), InputError, "wrap a single caption in a list"),
        ("bytes captions", lambda: scorer.encode_texts(b"a dog"), InputError, "decode"),
        ("a bytes caption in a list", lambda: scorer.encode_texts([b"a dog"]), InputError, "caption 0 is a bytes"),
        ("None captions", lambda: scorer.encode_texts(None), InputError, "got NoneType"),
        ("an int as captions", lambda: scorer.encode_texts(7), InputError, "got int"),
        ("a dict as captions", lambda: scorer.encode_texts({"a dog": 1}), InputError, "got dict"),
        ("a generator as captions", lambda: scorer.encode_texts(c for c in captions), InputError, "got generator"),
        ("a tensor as captions", lambda: scorer.encode_texts(torch.tensor(ids)), InputError, "got Tensor"),
        ("None inside captions", lambda: scorer.encode_texts(["a dog", None]), InputError, "caption 1 is a NoneType"),
        ("2-D numpy string array", lambda: scorer.encode_texts(np.array([captions])), InputError, "1-D array"),
        ("empty caption", lambda: scorer.encode_texts(["a dog", " \t "]), InputError, "caption 1 is empty"),
        ("no captions", lambda: scorer.encode_texts([]), InputError, "no captions"),
        # (ids, lengths)
        ("float ids", lambda: scorer.encode_texts((ids.astype(float), lengths)), InputError, "must be integers"),
        ("bool ids", lambda: scorer.encode_texts((ids > 0, lengths)), InputError, "got bool"),
        ("object ids", lambda: scorer.encode_texts((ids.astype(object), lengths)), InputError, "got object"),
        ("string ids", lambda: scorer.encode_texts((np.array([["a"]]), [1])), InputError, "must be integers"),
        ("None ids", lambda: scorer.encode_texts((None, None)), InputError, "must be integers"),
        ("ragged ids", lambda: scorer.encode_texts(([[1, 5, 2], [1, 2]], [3, 2])), InputError, "ragged"),
        ("float lengths", lambda: scorer.encode_texts((ids, lengths.astype(float))), InputError, "must be integers"),
        ("bool lengths", lambda: scorer.encode_texts((ids, lengths > 0)), InputError, "got bool"),
        ("negative lengths", lambda: scorer.encode_texts((ids, [-1, 3])), InputError, "lengths must be in [1, 3]"),
        ("zero length", lambda: scorer.encode_texts((ids, [0, 3])), InputError, "lengths must be in [1, 3]"),
        ("lengths beyond the ids' width", lambda: scorer.encode_texts((ids, [4, 3])), InputError,
         "lengths must be in [1, 3]"),
        ("mismatched counts", lambda: scorer.encode_texts((ids, [3])), InputError, "one per caption"),
        ("3-D ids", lambda: scorer.encode_texts((ids[None], lengths)), InputError, "ids must be [N_captions"),
        ("ids beyond the vocabulary", lambda: scorer.encode_texts((ids * 1000, lengths)), InputError,
         "token ids must be in"),
        ("ids beyond int64", lambda: scorer.encode_texts((np.array([[2**63]], dtype=np.uint64), [1])), InputError,
         "beyond int64"),
        ("torch float ids", lambda: scorer.encode_texts((torch.ones(1, 3), torch.tensor([3]))), InputError,
         "must be integers"),
        ("no rows of ids", lambda: scorer.encode_texts((ids[:0], lengths[:0])), InputError, "no captions"),
        # options
        *[(f"max_length={v!r}", load(max_length=v), InputError, "max_length") for v in (0, -1, 2, 2.5, "10", True)],
        *[(f"block_budget={v!r}", load(block_budget=v), InputError, "block_budget") for v in (0, -5, 1.5)],
        *[(f"threads={v!r}", load(threads=v), InputError, "threads") for v in (0, -1, "2")],
        ("Scorer(...) with max_length=0", lambda: Scorer(OnnxRuntimeBackend(Artifacts.open(artifacts), "fp32"),
                                                         max_length=0), InputError, "max_length"),
        ("Scorer of a path", lambda: Scorer(artifacts), InputError, "needs a Backend"),
        ("truncate='no'", load(truncate="no"), InputError, "truncate"),
        ("bucketed='yes'", load(bucketed="yes"), InputError, "bucketed"),
        ("BatchedScorer config 'fast'", lambda: BatchedScorer(scorer, "fast"), InputError, "BatcherConfig"),
        ("batcher max_batch='8'", lambda: BatchedScorer(scorer, BatcherConfig(max_batch="8")), InputError, "max_batch"),
        ("front config set to a dict", lambda: setattr(front, "config", {"max_batch": 8}), InputError,
         "BatcherConfig"),
        ("front config with max_queue=0", lambda: setattr(front, "config", BatcherConfig(max_queue=0)),
         InputError, "max_queue"),
        ("verify='yes'", load(verify="yes"), InputError, "verify"),
        ("unknown backend", load(backend="jax"), InputError, "unknown backend 'jax'; choose from auto"),
        ("backend None", load(backend=None), InputError, "unknown backend None"),
        ("unknown precision", load(precision="fp8"), InputError, "unknown precision 'fp8'"),
        *[(f"device={v!r}", load(device=v), InputError, "choose from cpu, cuda, cuda:N")
          for v in ("gpu", "cuda:x", "mps", "CPU", 0)],
        ("tensorrt on the CPU", load(backend="tensorrt", device="cpu"), BackendUnavailableError, "CUDA GPUs only"),
        # k, pairs, indices
        *[(f"k={v!r}", lambda v=v: scorer.search(captions, images, k=v), InputError, "k must be a positive integer")
          for v in (True, 2.0, 0, -1, None, "3")],
        ("submit with k=0", lambda: front.submit(captions, images, k=0), InputError, "k must be"),
        ("float pairs", lambda: scorer.score_pairs(images, texts, [[0.5, 1.0]]), InputError, "integer"),
        ("negative pair", lambda: scorer.score_pairs(images, texts, [[-1, 0]]), InputError, "out of range"),
        ("pair beyond the gallery", lambda: scorer.score_pairs(images, texts, [[0, 99]]), InputError, "out of range"),
        ("ragged pairs", lambda: scorer.score_pairs(images, texts, [[0, 1], [0]]), InputError, "ragged"),
        ("bool pairs", lambda: scorer.score_pairs(images, texts, [[True, False]]), InputError, "integer"),
        ("pairs None", lambda: scorer.score_pairs(images, texts, None), InputError, "integer"),
        ("no pairs", lambda: scorer.score_pairs(images, texts, np.zeros((0, 2), int)), InputError, "no pairs"),
        ("submit_pairs out of range", lambda: front.submit_pairs(images, texts, [[9, 9]]), InputError,
         "out of range"),
        ("select([])", lambda: images.select([]), InputError, "at least one item"),
        ("select out of range", lambda: texts.select([99]), InputError, "out of range"),
        ("select floats", lambda: texts.select([0.5]), InputError, "integers"),
        ("load_gallery of a file", lambda: scorer.load_gallery(artifacts / "manifest.json"), InputError,
         "not a saved gallery"),
    ]
    if NO_GPU:
        cases += [(f"device={d!r} without a GPU ({b})", load(backend=b, device=d), BackendUnavailableError,
                   "no CUDA GPU is available")
                  for b in ("auto", "onnxruntime", "torch", "tensorrt") for d in ("cuda", "cuda:1")]
    return cases


@pytest.fixture(scope="module")
def api_cases(scorer, galleries, split, root):
    with BatchedScorer(scorer) as front:
        yield _api_cases(scorer, front, *galleries, np.asarray(split.features[:2]), root / "imram")


def test_every_bad_api_argument_is_one_clear_error(api_cases):
    failures = []
    for description, call, kind, fragment in api_cases:
        try:
            one_line_error(call, kind, fragment)
        except BaseException as e:  # noqa: BLE001 - collect them all, then report
            failures.append(f"{description}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    assert not failures, f"{len(failures)} of {len(api_cases)} cases:\n" + "\n".join(failures)
    assert len(api_cases) >= 100, len(api_cases)


def test_valid_odd_inputs_still_work(scorer, galleries, split):
    images, texts = galleries
    features = np.asarray(split.features[:2], dtype=np.float32)
    expected = scorer.score(features, split.captions[:2])
    np.testing.assert_allclose(scorer.score(features.astype(">f4"), split.captions[:2]), expected, atol=1e-6)
    np.testing.assert_allclose(scorer.score(features.astype(np.float16).astype(np.float32), split.captions[:2]),
                               scorer.score(features.astype(np.float16), split.captions[:2]), atol=1e-6)
    np.testing.assert_allclose(scorer.score(features, np.array(split.captions[:2])), expected, atol=1e-6)
    np.testing.assert_allclose(scorer.score(features, tuple(split.captions[:2])), expected, atol=1e-6)
    plan = scorer.plan(features, split.captions[:2])  # raw inputs are encoded for the plan too
    assert plan.n_images == 2
    assert scorer.search(split.captions[:1], images, k=np.int64(2)).indices.shape == (1, 2)


# -- device messages


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present")
def test_cuda_without_a_gpu_says_so_for_auto_and_named_backends(root):
    for backend in ("auto", "onnxruntime", "torch"):
        message = one_line_error(lambda: Scorer.load(root / "imram", backend=backend, device="cuda"),
                                 BackendUnavailableError, "no CUDA GPU is available here")
        assert "none tried" not in message and "use device cpu" in message


# -- the default caption-length cap


def test_every_backend_caps_captions_by_default(root):
    words = " ".join(["dog"] * 20_000)
    for backend in ("onnxruntime", "torch"):
        with Scorer.load(root / "imram", backend=backend) as scorer:
            assert scorer.max_length == DEFAULT_MAX_LENGTH
            start = time.perf_counter()
            with pytest.warns(InputWarning, match=rf"caption\(s\) \[1\] truncated to {DEFAULT_MAX_LENGTH} tokens.*"
                                                  r"max_length="):
                texts = scorer.encode_texts(["a dog", words])
            assert time.perf_counter() - start < 5  # was 10.7 s and 2 GB without a cap
            assert texts.lengths.tolist() == [4, DEFAULT_MAX_LENGTH]
        with Scorer.load(root / "imram", backend=backend, truncate=False) as scorer:
            message = one_line_error(lambda: scorer.encode_texts([words]), InputError,
                                     f"more than {DEFAULT_MAX_LENGTH} tokens")
            assert "max_length=" in message


def test_the_cap_keeps_exactly_the_tokens_a_full_tokenisation_keeps(scorer):
    """Raw text beyond the cap is not tokenised; the tokens kept are those of the whole text."""
    rng = np.random.default_rng(0)
    words = list(scorer.vocab.word2idx)[4:] + ["Mr.", "U.S.", "\"quoted\"", "end.", "it's", "(x)", "--"]
    for _ in range(20):
        caption = " ".join(rng.choice(words, size=int(rng.integers(100, 400))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputWarning)
            got = scorer.encode_texts([caption]).lengths
            tokens = scorer._tokens([caption])
        full = scorer.vocab.encode(tokenize(caption))
        expected = [*full[: scorer.max_length - 1], full[-1]] if len(full) > scorer.max_length else full
        assert tokens.ids[0, : int(tokens.lengths[0])].tolist() == expected
        assert int(got[0]) == len(expected)


def test_the_cap_is_adjustable_and_never_beyond_the_engines(root):
    long_caption = " ".join(["dog"] * 300)
    with Scorer.load(root / "imram", max_length=400) as scorer:
        with warnings.catch_warnings():
            warnings.simplefilter("error", InputWarning)
            assert scorer.encode_texts([long_caption]).lengths.tolist() == [302]
    with Scorer.load(root / "imram", max_length=10) as scorer, pytest.warns(InputWarning, match="truncated to 10"):
        assert scorer.encode_texts((np.ones((1, 50), dtype=np.int64), [50])).lengths.tolist() == [10]
    assert caption_cap(None, None) == DEFAULT_MAX_LENGTH
    assert caption_cap(None, 64) == 64 and caption_cap(None, 500) == DEFAULT_MAX_LENGTH
    one_line_error(lambda: caption_cap(100, 64), InputError, "TensorRT engines take (64 tokens")


def test_a_caption_gallery_beyond_the_scorers_cap_is_refused(root, scorer, split):
    long_caption = " ".join(["dog"] * 200)
    with Scorer.load(root / "imram", max_length=300) as wide:
        texts = wide.encode_texts([long_caption, "a dog"])
    one_line_error(lambda: scorer.search(np.asarray(split.features[:1]), texts), InputError,
                   f"beyond this scorer's cap max_length={DEFAULT_MAX_LENGTH}")


def test_bad_input_messages_name_the_bad_value(scorer, galleries):
    images, _ = galleries
    assert "got 2.5" in one_line_error(lambda: scorer.search(["a dog"], images, k=2.5), InputError, "k")
    assert "'gpu'" in one_line_error(lambda: Scorer.load(scorer.artifacts.directory, device="gpu"), InputError, "device")


def test_loading_a_checked_gallery_stays_fast(scorer, tmp_path):
    """verify=True hashes (and NaN-checks) every file once: a 32 MB gallery loads in well under
    a second or two (about 1-2 s per GB)."""
    rows = max(1, (32 << 20) // (4 * sum(int(np.prod(d)) for _, d in scorer._gallery_tensors["images"].values())))
    items = {name: torch.zeros(rows, *dims) for name, (_, dims) in scorer._gallery_tensors["images"].items()}
    path = ImageGallery(items, scorer.artifacts.identity, "fp32").save(tmp_path / "big")
    start = time.perf_counter()
    assert len(scorer.load_gallery(path)) == rows
    assert time.perf_counter() - start < 10
    assert os.path.getsize(path / "image_regions.npy") > 1 << 20


def test_a_malformed_engine_profile_is_an_artifact_error(copy):
    from xmr.runtime.backends.tensorrt_backend import profile_limits

    opened = Artifacts.open(copy)
    assert profile_limits(opened).length == opened.manifest["profile"]["length"][2]
    for bad in ({"length": [1, 8]}, {"length": "64"}, {"n_images": [1, 0, -3]}):
        opened.manifest["profile"] = bad
        one_line_error(lambda: profile_limits(opened), ArtifactError, "[min, opt, max]")
