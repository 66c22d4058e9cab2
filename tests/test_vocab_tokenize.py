import json

import pytest

from xmr.data import Vocabulary, encode_captions, tokenize
from xmr.errors import VocabError
from conftest import shared_vocab_path


@pytest.mark.parametrize("name, size", [("f30k", 8481), ("coco", 11353), ("f8k", 3159)])
def test_real_vocabularies_load(name, size):
    vocab = Vocabulary.load(shared_vocab_path(name))
    assert len(vocab) == size
    assert [vocab(t) for t in ("<pad>", "<start>", "<end>", "<unk>")] == [0, 1, 2, 3]


# ids read off the released Flickr30K / COCO vocabularies
REAL_CAPTIONS = [
    ("Two young guys with shaggy hair look at their hands while hanging out in the yard.",
     [1, 5362, 1623, 4843, 1026, 4356, 6278, 3476, 1055, 6583, 3781, 4205, 11, 8154, 4551, 2488, 6029, 348, 2],
     [1, 7410, 6174, 4483, 354, 9947, 2046, 6817, 3145, 8349, 6912, 9631, 6, 2648, 4374, 3664, 1960, 114, 2]),
    ("A man in an orange hat starring at something.",
     [1, 3256, 4845, 4551, 1053, 8127, 416, 455, 1055, 8088, 348, 2],
     [1, 9566, 7235, 4374, 3142, 5563, 145, 160, 3145, 5547, 114, 2]),
    ("A little girl isn't climbing into a wooden playhouse, she's on the steps!",
     [1, 3256, 4929, 4892, 4546, 5083, 5116, 1546, 3256, 30, 132, 4313, 7085, 515, 1692, 2488, 431, 5402, 2],
     [1, 9566, 7264, 10107, 4368, 4580, 7326, 3018, 9566, 13, 3, 9935, 4195, 5826, 851, 3664, 2934, 7423, 2]),
]


@pytest.mark.parametrize("caption, f30k_ids, coco_ids", REAL_CAPTIONS)
def test_real_captions_tokenize_to_released_ids(caption, f30k_ids, coco_ids):
    assert Vocabulary.load(shared_vocab_path("f30k")).encode(tokenize(caption)) == f30k_ids
    assert Vocabulary.load(shared_vocab_path("coco")).encode(tokenize(caption)) == coco_ids


def test_tokenize_like_word_tokenize():
    assert tokenize("A girl isn't here, she's OUT.") == ["a", "girl", "is", "n't", "here", ",", "she", "'s", "out", "."]
    # two sentences: each sentence's final period is split off, as Punkt + Treebank do
    assert tokenize("A dog runs. A cat sits.") == ["a", "dog", "runs", ".", "a", "cat", "sits", "."]


def test_unknown_words_map_to_unk(f30k_vocab):
    assert f30k_vocab.encode(tokenize("zxqv dog")) == [1, 3, f30k_vocab("dog"), 2]


def test_encode_captions_pads_with_zero(f30k_vocab):
    ids, lengths = encode_captions(["a dog .", "a red car beside a white dog ."], f30k_vocab)
    assert lengths.tolist() == [5, 10]
    assert ids.shape == (2, 10) and ids[0, 5:].eq(0).all()


def test_bad_vocabularies_are_refused(tmp_path):
    bad = tmp_path / "v.json"
    bad.write_text(json.dumps({"word2idx": {"<start>": 0, "<pad>": 1, "<end>": 2, "<unk>": 3}}))
    with pytest.raises(VocabError, match="<pad>"):
        Vocabulary.load(bad)
    bad.write_text("{not json")
    with pytest.raises(VocabError, match="not valid JSON"):
        Vocabulary.load(bad)
    with pytest.raises(FileNotFoundError):
        Vocabulary.load(tmp_path / "missing.json")
