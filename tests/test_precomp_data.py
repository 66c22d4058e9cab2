import numpy as np
import pytest

from xmr.data import SynthConfig, Vocabulary, load_split, write_synthetic
from xmr.data.synth import COLORS, NOUNS, synthetic_words
from xmr.errors import DataError


def test_split_is_memory_mapped_and_aligned(tiny_synth):
    vocab = Vocabulary.load(tiny_synth / "vocab.json")
    split = load_split(tiny_synth, "train", vocab)
    assert isinstance(split.features, np.memmap)
    assert (split.n_images, split.regions, split.img_dim) == (40, 6, 16)
    assert split.n_captions == 200 and split.per_image == 5 and split.image_of_caption(7) == 1
    ids, lengths = split.caption_batch([0, 1])
    assert ids[0, 0] == 1 and ids[0, lengths[0] - 1] == 2


def _write(tmp_path, feats, captions, name="train_ims.npy"):
    np.save(tmp_path / name, feats)
    (tmp_path / "train_caps.txt").write_text(captions)
    return tmp_path


def test_feat_suffix_and_one_caption_per_image(tmp_path):
    vocab = Vocabulary.from_words(["dog"])
    _write(tmp_path, np.zeros((2, 3, 4), np.float32), "a dog\nanother dog\n", name="train_feat.npy")
    split = load_split(tmp_path, "train", vocab)
    assert split.per_image == 1 and split.n_images == 2


@pytest.mark.parametrize("feats, captions, message", [
    (np.zeros((2, 4), np.float32), "a\nb\n", "must be \\[N_images, regions, img_dim\\]"),
    (np.zeros((2, 3, 4), np.float32), "a\nb\nc\n", "3 captions for 2 images"),
    (np.zeros((2, 3, 4), np.int64), "a\nb\n", "floating point"),
    (np.zeros((2, 3, 4), np.float32), "a\n\nb\n", "empty caption line"),
])
def test_malformed_splits_are_refused_clearly(tmp_path, feats, captions, message):
    _write(tmp_path, feats, captions)
    with pytest.raises(DataError, match=message):
        load_split(tmp_path, "train", Vocabulary.from_words([]))


def test_missing_files_and_splits(tmp_path):
    vocab = Vocabulary.from_words([])
    with pytest.raises(FileNotFoundError, match="train_ims.npy or train_feat.npy"):
        load_split(tmp_path, "train", vocab)
    with pytest.raises(DataError, match="unknown split"):
        load_split(tmp_path, "val", vocab)


def test_synthetic_is_deterministic(tmp_path):
    cfg = SynthConfig(n_train=4, n_dev=2, n_test=2, img_dim=8, seed=5)
    a, b = write_synthetic(tmp_path / "a", cfg), write_synthetic(tmp_path / "b", cfg)
    for name in ("train_ims.npy", "train_caps.txt", "test_ims.npy", "vocab.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_synthetic_words_are_flickr30k_words(f30k_vocab):
    missing = [w for w in synthetic_words() if w not in f30k_vocab.word2idx]
    assert not missing


def test_synthetic_twins_differ_only_in_binding(tmp_path):
    """Twin images hold the same nouns and colours, bound differently: cross-attention is needed."""
    cfg = SynthConfig(n_train=2, n_dev=2, n_test=2, objects=3, regions=3, img_dim=64, noise=0.0)
    out = write_synthetic(tmp_path, cfg)
    captions = (out / "train_caps.txt").read_text().splitlines()
    feats = np.load(out / "train_ims.npy")

    def pairs(caps):
        found = set()
        for c in caps:
            words = c.split()
            found.update((a, b) for a, b in zip(words, words[1:]) if a in COLORS and b in NOUNS)
        return found

    first, second = pairs(captions[:5]), pairs(captions[5:])
    assert {n for _, n in first} <= {n for _, n in first | second}
    assert first.isdisjoint(second)  # the same noun never has the same colour in both twins
    # without noise or clutter, pooled regions are identical while the regions themselves differ
    np.testing.assert_allclose(feats[0].sum(0), feats[1].sum(0), atol=1e-4)
    distances = np.linalg.norm(feats[0][:, None] - feats[1][None], axis=-1)
    assert distances.min() > 0.1


def test_synthetic_can_use_the_real_vocabulary(tmp_path, f30k_vocab):
    out = write_synthetic(tmp_path, SynthConfig(n_train=2, n_dev=2, n_test=2), f30k_vocab)
    assert len(Vocabulary.load(out / "vocab.json")) == 8481
