"""Every file xmr reads may come from someone else: each bad input is one ``XmrError`` with a
one-line message naming the value or file, and every write is atomic.

``CASES`` is the table: (case, call(tmp_path), error type, substring of the message).
"""

from __future__ import annotations

import json
import math
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import xmr.config
from xmr.config import config_from_dict, save_json
from xmr.data import SynthConfig, Vocabulary, find_vocab, load_split, tokenize, write_synthetic
from xmr.data import synth as synth_module
from xmr.data import vocab as vocab_module
from xmr.errors import (BackendUnavailableError, CheckpointError, ConfigError, DataError, MissingFileError,
                        OutputError, ShapeError, TrainingError, VocabError, XmrError)
from xmr.eval import evaluate, recall_report
from xmr.models import ImramConfig, build_model, load_checkpoint, make_config, save_checkpoint
from xmr.models.config import CampConfig
from xmr.train import TrainConfig, train
from conftest import tiny_model

VOCAB = Vocabulary.from_words(["dog", "cat"])
CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------ helpers building bad inputs

def split_dir(tmp: Path, feats: np.ndarray | None = None, captions: str | None = None, split: str = "train") -> Path:
    """A data directory with one split (2 images x 1 caption unless told)."""
    np.save(tmp / f"{split}_ims.npy", np.zeros((2, 3, 4), np.float32) if feats is None else feats)
    (tmp / f"{split}_caps.txt").write_text("a dog\na cat\n" if captions is None else captions, encoding="utf-8")
    return tmp


def load(tmp: Path, split: str = "train"):
    return load_split(tmp, split, VOCAB)


def with_npy_bytes(tmp: Path, data: bytes | None = None, cut: int | None = None) -> Path:
    """The train features replaced by ``data``, or by a valid file cut to ``cut`` bytes."""
    split_dir(tmp)
    path = tmp / "train_ims.npy"
    path.write_bytes(data if data is not None else path.read_bytes()[:cut])
    return tmp


class _Marker:
    """Unpickling this creates ``path``: proof that a loader ran pickled code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def pickled_features(tmp: Path) -> Path:
    split_dir(tmp)
    np.save(tmp / "train_ims.npy", np.array([[[_Marker(tmp / "UNPICKLED")]]], dtype=object), allow_pickle=True)
    return tmp


def raw_pickle(tmp: Path) -> Path:
    split_dir(tmp)
    (tmp / "train_ims.npy").write_bytes(pickle.dumps(_Marker(tmp / "UNPICKLED")))
    return tmp


def npz_archive(tmp: Path) -> Path:
    split_dir(tmp)
    with open(tmp / "train_ims.npy", "wb") as f:
        np.savez(f, a=np.zeros((2, 3, 4), np.float32))
    return tmp


def with_bad_value(value: float, image: int, split: str = "train") -> np.ndarray:
    feats = np.zeros((4, 3, 4), np.float32)
    feats[image, 1, 2] = value
    return feats


def vocab_file(tmp: Path, content: str | bytes) -> Path:
    path = tmp / "vocab.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def vocab_json(word2idx: object, **extra: object) -> str:
    return json.dumps({"word2idx": word2idx, **extra})


SPECIAL = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}


def with_checkpoint(tmp: Path, edit=None) -> Path:
    """A tiny IMRAM checkpoint whose saved dict went through ``edit``."""
    model = tiny_model("imram")
    path = save_checkpoint(model, tmp / "m.pt")
    if edit is not None:
        blob = torch.load(path, weights_only=True)
        edit(blob)
        torch.save(blob, path)
    return path


def nan_weight(blob: dict) -> None:
    blob["state_dict"]["img_enc.fc.weight"][0, 0] = float("nan")


def cut_state(blob: dict) -> None:
    blob["state_dict"].pop(sorted(blob["state_dict"])[0])


def synthetic(tmp: Path) -> Path:
    out = tmp / "synth"
    write_synthetic(out, SynthConfig(n_train=8, n_dev=4, n_test=4, regions=4, img_dim=6, seed=1))
    return out


def small_run(tmp: Path, *, model_img_dim: int = 6, dev_img_dim: int | None = None, batch_size: int = 8,
              out: Path | None = None, loss_nan: bool = False):
    """Train an IMRAM for 1 step on a tiny synthetic set, breaking one thing."""
    data = synthetic(tmp)
    vocab = Vocabulary.load(data / "vocab.json")
    train_split, dev_split = load_split(data, "train", vocab), load_split(data, "dev", vocab)
    if dev_img_dim is not None:
        other = tmp / "other"
        write_synthetic(other, SynthConfig(n_train=4, n_dev=4, n_test=4, regions=4, img_dim=dev_img_dim))
        dev_split = load_split(other, "dev", vocab)
    torch.manual_seed(0)
    model = build_model(make_config("imram", vocab_size=len(vocab), img_dim=model_img_dim, embed_size=8, word_dim=8), vocab)
    if loss_nan:
        model.loss = lambda scores, hardest=True: scores.sum() * float("nan")
    return train(model, train_split, dev_split, TrainConfig(epochs=1, batch_size=batch_size, max_steps=1),
                 out or tmp / "run", show_progress=False)


def foreign_run_dir(tmp: Path) -> None:
    out = tmp / "run"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    small_run(tmp, out=out)


def eval_on(tmp: Path, img_dim: int = 6, vocab_size: int | None = None) -> None:
    data = synthetic(tmp)
    vocab = Vocabulary.load(data / "vocab.json")
    model = build_model(make_config("dual", vocab_size=vocab_size or len(vocab), img_dim=img_dim, embed_size=8,
                                    word_dim=8))
    evaluate(model, load_split(data, "test", vocab), show_progress=False)


def scores_with(value: float) -> np.ndarray:
    scores = np.random.default_rng(0).standard_normal((4, 20)).astype(np.float32)
    scores[2, 7] = value
    return scores


def little_memory(monkeypatch):
    monkeypatch.setattr(xmr.config, "available_memory_bytes", lambda: 1 << 20)


def no_disk(tmp: Path, monkeypatch) -> None:
    monkeypatch.setattr(synth_module.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    write_synthetic(tmp / "synth", SynthConfig(n_train=4, n_dev=2, n_test=2, img_dim=8))


def without_cuda(*case):
    """A case that only holds on a machine without CUDA."""
    return pytest.param(*case, id=case[0], marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA"))


NAN, INF = float("nan"), float("inf")

CASES = [
    # --- feature files (.npy)
    ("empty npy", lambda t: load(with_npy_bytes(t, b"")), DataError, "empty file (0 bytes)"),
    ("truncated npy header", lambda t: load(with_npy_bytes(t, cut=40)), DataError, "not a readable .npy array"),
    ("truncated npy data", lambda t: load(with_npy_bytes(t, cut=140)), DataError, "truncated: shape (2, 3, 4)"),
    ("text, not npy", lambda t: load(with_npy_bytes(t, b"hello")), DataError, "not a .npy file"),
    ("pickled object array", lambda t: load(pickled_features(t)), DataError, "floating point"),
    ("raw pickle", lambda t: load(raw_pickle(t)), DataError, "not a .npy file"),
    ("npz archive", lambda t: load(npz_archive(t)), DataError, ".npz archive"),
    ("2-d features", lambda t: load(split_dir(t, np.zeros((2, 4), np.float32))), DataError, "got shape (2, 4)"),
    ("4-d features", lambda t: load(split_dir(t, np.zeros((2, 3, 4, 1), np.float32))), DataError, "[N_images, regions"),
    ("int features", lambda t: load(split_dir(t, np.zeros((2, 3, 4), np.int32))), DataError, "got int32"),
    ("bool features", lambda t: load(split_dir(t, np.zeros((2, 3, 4), bool))), DataError, "got bool"),
    ("complex features", lambda t: load(split_dir(t, np.zeros((2, 3, 4), np.complex64))), DataError, "got complex64"),
    ("structured features", lambda t: load(split_dir(t, np.zeros((2, 3, 4), [("a", "f4")]))), DataError, "floating point"),
    ("0 images", lambda t: load(split_dir(t, np.zeros((0, 3, 4), np.float32))), DataError, "no images"),
    ("0 regions", lambda t: load(split_dir(t, np.zeros((2, 0, 4), np.float32))), DataError, "no regions"),
    ("0 img_dim", lambda t: load(split_dir(t, np.zeros((2, 3, 0), np.float32))), DataError, "no feature dimensions"),
    ("features are a directory", lambda t: ((t / "train_ims.npy").mkdir(), load(t)), DataError, "is a directory"),
    ("NaN feature", lambda t: load(split_dir(t, with_bad_value(NAN, 3), "a\nb\nc\nd\n")), DataError,
     "train_ims.npy: image 3 has NaN or Inf"),
    ("Inf feature", lambda t: load(split_dir(t, with_bad_value(-INF, 0), "a\nb\nc\nd\n")), DataError, "image 0 has NaN"),
    ("NaN in the test split", lambda t: load(split_dir(t, with_bad_value(NAN, 1), "a\nb\nc\nd\n", "test"), "test"),
     DataError, "test_ims.npy: image 1"),
    # --- caption files
    ("empty captions", lambda t: load(split_dir(t, captions="")), DataError, "no captions (empty file)"),
    ("blank captions", lambda t: load(split_dir(t, captions="\n \n")), DataError, "no captions"),
    ("captions not a multiple", lambda t: load(split_dir(t, captions="a\nb\nc\n")), DataError, "3 captions for 2 images"),
    ("captions a directory", lambda t: (split_dir(t), (t / "train_caps.txt").unlink(), (t / "train_caps.txt").mkdir(),
                                        load(t)), DataError, "train_caps.txt is a directory"),
    ("captions not UTF-8", lambda t: (split_dir(t), (t / "train_caps.txt").write_bytes(b"a d\xffg\na cat\n"), load(t)),
     DataError, "train_caps.txt is not UTF-8"),
    ("captions missing", lambda t: (split_dir(t), (t / "train_caps.txt").unlink(), load(t)), MissingFileError,
     "captions file not found"),
    ("caption not a string", lambda t: tokenize(3), DataError, "must be a string, got int"),
    # --- data directory
    ("data dir is a file", lambda t: load_split(split_dir(t) / "train_ims.npy", "train", VOCAB), DataError,
     "is a file, not a directory"),
    ("data dir missing", lambda t: load_split(t / "nowhere", "train", VOCAB), MissingFileError, "nowhere"),
    ("unknown split", lambda t: load_split(t, "val", VOCAB), DataError, "unknown split 'val'"),
    ("find_vocab without one", lambda t: find_vocab(t), MissingFileError, "no vocabulary in"),
    ("find_vocab on a file", lambda t: find_vocab(split_dir(t) / "train_caps.txt"), DataError, "is a file"),
    # --- vocabularies
    ("vocab not UTF-8", lambda t: Vocabulary.load(vocab_file(t, b'{"word2idx": {"\xff": 0}}')), VocabError,
     "vocab.json is not UTF-8"),
    ("vocab a list", lambda t: Vocabulary.load(vocab_file(t, "[1, 2]")), VocabError, "got a JSON list"),
    ("vocab without word2idx", lambda t: Vocabulary.load(vocab_file(t, '{"idx": 3}')), VocabError, "without 'word2idx'"),
    ("word2idx a list", lambda t: Vocabulary.load(vocab_file(t, vocab_json(["<pad>"]))), VocabError, "got a list"),
    ("id a string", lambda t: Vocabulary.load(vocab_file(t, vocab_json({**SPECIAL, "dog": "4"}))), VocabError,
     "id of 'dog' must be an integer, got '4'"),
    ("id a float", lambda t: Vocabulary.load(vocab_file(t, vocab_json({**SPECIAL, "dog": 4.5}))), VocabError,
     "must be an integer, got 4.5"),
    ("huge id", lambda t: Vocabulary.load(vocab_file(t, vocab_json({**SPECIAL, "dog": 10**30}))), VocabError,
     f"id {10**30} of 'dog' is outside 0..4"),
    ("negative id", lambda t: Vocabulary.load(vocab_file(t, vocab_json({**SPECIAL, "dog": -1}))), VocabError,
     "id -1 of 'dog' is outside"),
    ("repeated id", lambda t: Vocabulary.load(vocab_file(t, vocab_json({**SPECIAL, "dog": 3}))), VocabError,
     "given to both '<unk>' and 'dog'"),
    ("vocab nested too deep", lambda t: Vocabulary.load(vocab_file(t, "[" * 100000)), VocabError, "not valid JSON"),
    ("vocab too large", lambda t, mp: (mp.setattr(vocab_module, "MAX_FILE_BYTES", 10),
                                       Vocabulary.load(vocab_file(t, vocab_json(SPECIAL)))), VocabError,
     "is 64 bytes, more than the 10 a vocabulary file can be"),
    ("vocab a directory", lambda t: Vocabulary.load(t), VocabError, "is a directory, not a file"),
    ("vocab missing", lambda t: Vocabulary.load(t / "v.json"), MissingFileError, "vocabulary file not found"),
    # --- synthetic data options
    ("synth noise NaN", lambda t: SynthConfig(noise=NAN), ConfigError, "noise must be a finite number (>= 0), got nan"),
    ("synth noise Inf", lambda t: SynthConfig(noise=INF), ConfigError, "noise must be a finite number"),
    ("synth noise < 0", lambda t: SynthConfig(noise=-0.1), ConfigError, "noise must be >= 0"),
    ("synth scale Inf", lambda t: SynthConfig(scale=INF), ConfigError, "scale must be a finite number (> 0)"),
    ("synth scale 0", lambda t: SynthConfig(scale=0.0), ConfigError, "scale must be > 0, got 0"),
    ("synth regions 0", lambda t: SynthConfig(regions=0), ConfigError, "regions must be an integer >= 1, got 0"),
    ("synth regions < objects", lambda t: SynthConfig(regions=2), ConfigError, "regions (2) must be >= objects (3)"),
    ("synth img_dim 0", lambda t: SynthConfig(img_dim=0), ConfigError, "img_dim must be an integer >= 1"),
    ("synth objects 0", lambda t: SynthConfig(objects=0), ConfigError, "objects must be an integer >= 1 and <= 12"),
    ("synth objects 13", lambda t: SynthConfig(objects=13, regions=20), ConfigError, "<= 12, got 13"),
    ("synth objects a string", lambda t: SynthConfig(objects="3"), ConfigError, "objects must be an integer, got '3'"),
    ("synth n_train < 0", lambda t: SynthConfig(n_train=-4), ConfigError, "n_train must be an integer >= 2"),
    ("synth n_dev odd", lambda t: SynthConfig(n_dev=3), ConfigError, "n_dev must be an even integer"),
    ("synth captions_per_image 0", lambda t: SynthConfig(captions_per_image=0), ConfigError, "captions_per_image"),
    ("synth clutter_types 0", lambda t: SynthConfig(clutter_types=0), ConfigError, "clutter_types"),
    ("synth seed < 0", lambda t: SynthConfig(seed=-1), ConfigError, "seed must be an integer >= 0"),
    ("synth n_train 10**12", lambda t: SynthConfig(n_train=10**12), ConfigError,
     "the largest split (1000000000000 images x 12 regions x 128 floats) would take about 6.0 PiB of memory"),
    ("synth beyond the cap", lambda t, mp: (mp.setattr(xmr.config, "available_memory_bytes", lambda: 1 << 60),
                                            SynthConfig(n_train=10**12)), ConfigError,
     "5.7 PiB of disk, more than the 1.0 TiB a synthetic dataset may take"),
    ("synth regions 100000", lambda t: SynthConfig(regions=100000, img_dim=2048), ConfigError, "TiB"),
    ("synth beyond memory", lambda t, mp: (little_memory(mp), SynthConfig()), ConfigError,
     "the largest split (2000 images x 12 regions x 128 floats) would take about 13.0 MiB of memory but only 1.0 MiB"),
    ("synth beyond disk", no_disk, OutputError, "No space left on"),
    # --- model configs
    ("embed_size 10**7", lambda t: make_config("imram", embed_size=10**7), ConfigError, "PiB of memory but only"),
    ("embed_size 0", lambda t: make_config("camp", embed_size=0), ConfigError, "CampConfig: embed_size must be"),
    ("vocab_size < 0", lambda t: make_config("dual", vocab_size=-1), ConfigError, "vocab_size must be an integer >= 1"),
    ("word_dim a float", lambda t: make_config("imram", word_dim=1.5), ConfigError, "word_dim must be an integer, got 1.5"),
    ("img_dim a bool", lambda t: ImramConfig(img_dim=True), ConfigError, "img_dim must be an integer, got True"),
    ("lambda_softmax 0", lambda t: make_config("imram", lambda_softmax=0), ConfigError, "lambda_softmax must be > 0"),
    ("lambda_softmax NaN", lambda t: make_config("imram", lambda_softmax=NAN), ConfigError, "finite number (> 0)"),
    ("margin < 0", lambda t: make_config("imram", margin=-0.1), ConfigError, "margin must be >= 0, got -0.1"),
    ("margin Inf", lambda t: make_config("dual", margin=INF), ConfigError, "margin must be a finite number"),
    ("num_heads 0", lambda t: make_config("camp", num_heads=0), ConfigError, "num_heads must be an integer >= 1"),
    ("num_heads 10**12", lambda t: CampConfig(num_heads=10**12), ConfigError, "of memory"),
    ("steps 0", lambda t: make_config("imram", steps=0), ConfigError, "steps must be an integer >= 1 and <= 100"),
    ("mode", lambda t: make_config("imram", mode="both"), ConfigError, "mode must be one of text, image, full"),
    ("img_norm not a bool", lambda t: make_config("imram", img_norm="yes"), ConfigError, "img_norm must be true or false"),
    ("config not a dict", lambda t: config_from_dict(ImramConfig, [1, 2]), ConfigError, "must be a JSON object"),
    # --- training options
    ("batch_size 1", lambda t: TrainConfig(batch_size=1), ConfigError, "batch_size must be an integer >= 2, got 1"),
    ("epochs 0", lambda t: TrainConfig(epochs=0), ConfigError, "epochs must be an integer >= 1"),
    ("lr 0", lambda t: TrainConfig(learning_rate=0.0), ConfigError, "learning_rate must be > 0"),
    ("lr NaN", lambda t: TrainConfig(learning_rate=NAN), ConfigError, "learning_rate must be a finite number"),
    ("grad_clip < 0", lambda t: TrainConfig(grad_clip=-1.0), ConfigError, "grad_clip must be >= 0"),
    ("grad_clip Inf", lambda t: TrainConfig(grad_clip=INF), ConfigError, "grad_clip must be a finite number"),
    ("lr_decay 0", lambda t: TrainConfig(lr_decay=0.0), ConfigError, "lr_decay must be > 0 and <= 1, got 0"),
    ("lr_decay 1.5", lambda t: TrainConfig(lr_decay=1.5), ConfigError, "lr_decay must be > 0 and <= 1, got 1.5"),
    ("lr_update 0", lambda t: TrainConfig(lr_update=0), ConfigError, "lr_update must be an integer >= 1"),
    ("warmup_epochs < 0", lambda t: TrainConfig(warmup_epochs=-1), ConfigError, "warmup_epochs must be an integer >= 0"),
    ("max_steps < 0", lambda t: TrainConfig(max_steps=-1), ConfigError, "max_steps must be an integer >= 0"),
    ("train seed < 0", lambda t: TrainConfig(seed=-1), ConfigError, "seed must be an integer >= 0"),
    ("device gpu", lambda t: TrainConfig(device="gpu"), ConfigError, "unknown device 'gpu'; choose from cpu, cuda, cuda:N"),
    ("device cpu:1", lambda t: TrainConfig(device="cpu:1"), ConfigError, "unknown device"),
    without_cuda("device cuda without CUDA", lambda t: TrainConfig(device="cuda"), BackendUnavailableError,
                 "no CUDA GPU is available"),
    ("device cuda:99", lambda t: TrainConfig(device="cuda:99"), BackendUnavailableError,
     "no CUDA GPU is available" if not CUDA else "CUDA device(s), numbered from 0"),
    # --- checkpoints
    ("NaN weight", lambda t: load_checkpoint(with_checkpoint(t, nan_weight)), CheckpointError,
     "weight 'img_enc.fc.weight' holds 1 NaN or Inf values"),
    ("checkpoint missing a tensor", lambda t: load_checkpoint(with_checkpoint(t, cut_state)), CheckpointError,
     "checkpoint does not match its config (Error(s) in loading state_dict"),
    ("checkpoint config a list", lambda t: load_checkpoint(with_checkpoint(t, lambda b: b.update(config=[1]))),
     CheckpointError, "must be a JSON object of fields"),
    ("checkpoint state_dict a list", lambda t: load_checkpoint(with_checkpoint(t, lambda b: b.update(state_dict=[1]))),
     CheckpointError, "'state_dict' must be a mapping of tensors"),
    ("checkpoint a directory", lambda t: load_checkpoint(t), CheckpointError, "is a directory, not a file"),
    ("checkpoint missing", lambda t: load_checkpoint(t / "m.pt"), MissingFileError, "checkpoint not found"),
    without_cuda("eval --device cuda without CUDA", lambda t: load_checkpoint(with_checkpoint(t), map_location="cuda"),
                 BackendUnavailableError, "no CUDA GPU is available"),
    ("checkpoint device tpu", lambda t: load_checkpoint(with_checkpoint(t), map_location="tpu"), ConfigError,
     "unknown device"),
    # --- training runs
    ("train into a file", lambda t: ((t / "run").write_text("x"), small_run(t)), OutputError, "is a file, not a directory"),
    ("train into a foreign directory", foreign_run_dir, OutputError, "non-empty directory that xmr did not write"),
    ("loss diverges", lambda t: small_run(t, loss_nan=True), TrainingError,
     "training diverged at step 1 (epoch 1, lr 0.001): loss is nan; lower --lr"),
    ("batch larger than the split", lambda t: small_run(t, batch_size=64), TrainingError,
     "40 captions, fewer than batch_size 64"),
    ("dev features of another shape", lambda t: small_run(t, dev_img_dim=5), DataError,
     "dev_caps.txt: features are [N, 4, 5] but the train split"),
    ("model img_dim differs from the data", lambda t: small_run(t, model_img_dim=7), DataError,
     "train_caps.txt: features are [N, 4, 6] but the imram model needs [N, R, 7]"),
    # --- evaluation
    ("recall of NaN scores", lambda t: recall_report(scores_with(NAN), 5), ShapeError,
     "scores contain NaN or Inf (1 of 80 pairs; first: image 2, caption 7 = nan)"),
    ("recall of Inf scores", lambda t: recall_report(scores_with(INF), 5), ShapeError, "scores contain NaN or Inf"),
    ("eval with another img_dim", lambda t: eval_on(t, img_dim=9), DataError, "but the dual model needs [N, R, 9]"),
    ("eval with a larger vocabulary", lambda t: eval_on(t, vocab_size=10), VocabError, "but the dual model embeds only 10"),
]


def _call(call, tmp_path, monkeypatch):
    return call(tmp_path, monkeypatch) if call.__code__.co_argcount == 2 else call(tmp_path)


@pytest.mark.parametrize("case, call, error, message",
                         [pytest.param(*c, id=c[0]) if type(c) is tuple else c for c in CASES])
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, case, call, error, message):
    with pytest.raises(error) as info:
        _call(call, tmp_path, monkeypatch)
    text = str(info.value)
    assert isinstance(info.value, XmrError), type(info.value)
    assert message in text, text
    assert "\n" not in text, text
    assert not (tmp_path / "UNPICKLED").exists()  # no loader ever ran pickled code


# ------------------------------------------------------------------ what is accepted


def test_float16_features_and_crlf_captions_load(tmp_path):
    split = load(split_dir(tmp_path, np.ones((2, 3, 4), np.float16), "a dog\r\na cat\r\n"))
    assert split.captions == ["a dog", "a cat"] and split.image_batch([1]).dtype == torch.float32


def test_a_caption_holding_a_unicode_line_separator_stays_one_caption(tmp_path):
    split = load(split_dir(tmp_path, captions="a dog\u2028running\na cat\n"))
    assert split.n_captions == 2


def test_the_finite_scan_reads_chunks_of_the_memory_map(tmp_path, monkeypatch):
    from xmr.data import precomp

    monkeypatch.setattr(precomp, "FINITE_CHUNK_BYTES", 3 * 4 * 4 * 2)  # two images per chunk
    feats = with_bad_value(NAN, 3)
    with pytest.raises(DataError, match=r"image 3 has NaN or Inf features \(1 non-finite values in images 2\.\.3\)"):
        load(split_dir(tmp_path, feats, "a\nb\nc\nd\n"))


def test_a_checkpoint_on_cpu_still_loads_with_an_explicit_device(tmp_path):
    model = load_checkpoint(with_checkpoint(tmp_path), map_location="cpu")
    assert next(model.parameters()).device.type == "cpu"


# ------------------------------------------------------------------ writes


def _siblings(path: Path) -> list[Path]:
    return [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.xmr-")]


def test_write_synthetic_replaces_its_own_dataset_but_not_a_foreign_directory(tmp_path):
    cfg = SynthConfig(n_train=4, n_dev=2, n_test=2, img_dim=8)
    out = tmp_path / "synth"
    write_synthetic(out, cfg)
    write_synthetic(out, SynthConfig(n_train=6, n_dev=2, n_test=2, img_dim=8))  # ours: replaced
    assert np.load(out / "train_ims.npy").shape[0] == 6
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="non-empty directory that xmr did not write"):
        write_synthetic(users, cfg)
    assert (users / "notes.txt").read_text() == "mine"
    (out / "synth_config.json").write_text(json.dumps({"version": 99}))  # not of this format: foreign
    with pytest.raises(OutputError, match="--overwrite"):
        write_synthetic(out, cfg)
    write_synthetic(users, cfg, overwrite=True)  # written beside the user's file, which stays
    assert (users / "notes.txt").read_text() == "mine" and (users / "vocab.json").is_file()
    with pytest.raises(OutputError, match="is a file, not a directory"):
        write_synthetic(users / "vocab.json", cfg)


def test_ctrl_c_during_write_synthetic_leaves_the_old_dataset(tmp_path, monkeypatch):
    out = tmp_path / "synth"
    write_synthetic(out, SynthConfig(n_train=4, n_dev=2, n_test=2, img_dim=8))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = synth_module.generate_split, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synth_module, "generate_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(out, SynthConfig(n_train=8, n_dev=2, n_test=2, img_dim=8))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == []
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(tmp_path / "fresh", SynthConfig(n_train=8, n_dev=2, n_test=2, img_dim=8))
    assert not (tmp_path / "fresh").exists() and _siblings(tmp_path / "fresh") == []


def _failing_write(monkeypatch, module, name):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, fail)


def test_checkpoint_vocab_and_json_writes_are_atomic(tmp_path, monkeypatch):
    import xmr.outputs

    checkpoint = with_checkpoint(tmp_path)
    vocab_path, json_path = tmp_path / "v.json", tmp_path / "x.json"
    VOCAB.save(vocab_path)
    save_json({"a": 1}, json_path)
    before = {p: p.read_bytes() for p in (checkpoint, vocab_path, json_path)}

    def half_then_interrupt(path, *args, **kwargs):  # a kill (Ctrl-C) in the middle of writing the file
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", half_then_interrupt)
    monkeypatch.setattr(Path, "write_text", half_then_interrupt)
    for write in (lambda: save_checkpoint(tiny_model("imram"), checkpoint), lambda: VOCAB.save(vocab_path),
                  lambda: save_json({"b": 2}, json_path)):
        with pytest.raises(KeyboardInterrupt):
            write()
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in before} == before
    assert all(_siblings(p) == [] for p in before)
    assert xmr.outputs.leftovers(checkpoint) == []


def test_training_writes_its_log_first_and_may_rerun_into_its_own_directory(tmp_path):
    log = small_run(tmp_path)
    run = tmp_path / "run"
    assert json.loads((run / "train_log.json").read_text())["epochs"] == log["epochs"]
    load_checkpoint(run / "checkpoint.pt")
    again = tmp_path / "again"
    again.mkdir()
    small_run(again, out=run)  # train_log.json says a run wrote the directory: replaced
    assert math.isfinite(json.loads((run / "train_log.json").read_text())["best_dev_rsum"])


def test_output_checks_recognise_what_xmr_wrote(tmp_path):
    from xmr.eval.evaluate import EVAL_FORMAT, is_eval_json
    from xmr.models.checkpoint import is_checkpoint_file
    from xmr.train import is_run_directory

    checkpoint = with_checkpoint(tmp_path)
    (tmp_path / "other.pt").write_bytes(b"not torch")
    assert is_checkpoint_file(checkpoint) and not is_checkpoint_file(tmp_path / "other.pt")
    save_json({"format": EVAL_FORMAT, "metrics": {}}, tmp_path / "m.json")
    save_json({"something": "else"}, tmp_path / "x.json")
    assert is_eval_json(tmp_path / "m.json") and not is_eval_json(tmp_path / "x.json")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"someone's")
    assert not is_run_directory(tmp_path / "run")
    save_json({"train_config": {}, "epochs": []}, tmp_path / "run" / "train_log.json")
    assert is_run_directory(tmp_path / "run")
