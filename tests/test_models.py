"""The vectorised models against per-pair references, padding, shapes and checkpoints."""

import pytest
import torch

from xmr.errors import CheckpointError, ConfigError, ShapeError
from xmr.models import build_model, load_checkpoint, make_config, save_checkpoint
from xmr.models.base import ITEMS, LENGTH, REGIONS
from xmr.models.config import IMRAM_MODES
from xmr.models.reference import reference_scores
from xmr.models.registry import MODELS
from conftest import MODEL_VARIANTS, random_batch, tiny_model


def test_every_registered_model_is_covered():
    missing = set(MODELS) - {kind for kind, _ in MODEL_VARIANTS}
    assert not missing, f"Missing models: {missing}"
    missing_modes = set(IMRAM_MODES) - {fields.get("mode") for kind, fields in MODEL_VARIANTS if kind == "imram"}
    assert not missing_modes, f"Missing IMRAM modes: {missing_modes}"


@pytest.mark.parametrize("kind, fields", MODEL_VARIANTS)
@pytest.mark.parametrize("embed_size", [16, 10])
def test_prepared_spec_is_what_prepare_returns(kind, fields, embed_size):
    """Names, order and every shape of ``prepare_*`` as ``prepared_spec`` declares them, for
    sizes that differ on every axis (so an axis declared fixed that varies fails, and back)."""
    torch.manual_seed(0)
    model = build_model(make_config(kind, vocab_size=50, word_dim=8, embed_size=embed_size, img_dim=12, **fields))
    spec = model.prepared_spec()
    for n_images, regions, n_captions, length in [(2, 3, 5, 7), (4, 9, 1, 11), (1, 1, 3, 1)]:
        with torch.no_grad():
            images = model.prepare_images(torch.randn(n_images, regions, embed_size))
            texts = model.prepare_texts(torch.randn(n_captions, length, embed_size), torch.full((n_captions,), length))
        assert list(images) == [t.name for t in spec.images]
        assert [n for n in texts if n != "lengths"] == [t.name for t in spec.texts] and "lengths" in texts
        for t in spec.images:  # an image's tensors never have a caption length, nor a caption's regions
            assert images[t.name].shape == tuple({ITEMS: n_images, REGIONS: regions}.get(a, a) for a in t.axes), t
        for t in spec.texts:
            assert texts[t.name].shape == tuple({ITEMS: n_captions, LENGTH: length}.get(a, a) for a in t.axes), t


@pytest.mark.parametrize("kind, fields", MODEL_VARIANTS)
def test_vectorised_scores_equal_per_pair_reference_float64(kind, fields):
    model = tiny_model(kind, torch.float64, **fields)
    features, ids, lengths = random_batch(dtype=torch.float64)
    with torch.no_grad():
        img, cap = model.encode_images(features), model.encode_texts(ids, lengths)
        fast = model.score(img, cap, lengths)
    ref = reference_scores(model, img, cap, lengths)
    assert fast.shape == (3, 4)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind, fields", MODEL_VARIANTS)
def test_padding_never_changes_a_score(kind, fields):
    model = tiny_model(kind, **fields)
    features, ids, lengths = random_batch()
    wide = torch.cat([ids, torch.randint(4, 50, (ids.size(0), 5))], dim=1)  # junk beyond each length
    with torch.no_grad():
        narrow_scores = model.similarity(features, ids, lengths)
        wide_scores = model.similarity(features, wide, lengths)
    torch.testing.assert_close(narrow_scores, wide_scores, rtol=0, atol=1e-6)


def test_text_encoder_runs_each_caption_on_its_own_length():
    model = tiny_model("imram")
    _, ids, lengths = random_batch()
    with torch.no_grad():
        batch = model.encode_texts(ids, lengths)
        for row, n in enumerate(lengths.tolist()):
            alone = model.encode_texts(ids[row : row + 1, :n], lengths[row : row + 1])
            torch.testing.assert_close(batch[row, :n], alone[0], rtol=0, atol=1e-6)
            assert batch[row, n:].eq(0).all()


def test_scores_are_rows_images_columns_captions():
    model = tiny_model("camp")
    features, ids, lengths = random_batch()
    with torch.no_grad():
        full = model.similarity(features, ids, lengths)
        one = model.similarity(features[2:3], ids[1:2, : lengths[1]], lengths[1:2])
    torch.testing.assert_close(full[2, 1], one[0, 0])


@pytest.mark.parametrize("call, message", [
    (lambda m: m.encode_images(torch.zeros(2, 5)), r"features must be \[N_images, regions, 12\]"),
    (lambda m: m.encode_images(torch.zeros(2, 5, 7)), r"features must be \[N_images, regions, 12\]"),
    (lambda m: m.encode_texts(torch.ones(2, 3, dtype=torch.long), torch.tensor([3])), "one per caption"),
    (lambda m: m.encode_texts(torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 4])), r"lengths must be in \[1, 3\]"),
    (lambda m: m.encode_texts(torch.full((1, 3), 99), torch.tensor([3])), r"token ids must be in \[0, 50\)"),
    (lambda m: m.encode_texts(torch.ones(1, 3), torch.tensor([3])), "ids must be integers"),
    (lambda m: m.score(torch.zeros(2, 5, 16), torch.zeros(3, 4, 8), torch.tensor([1, 2, 3])), "caption embeddings"),
])
def test_bad_inputs_raise_shape_errors(call, message):
    with pytest.raises(ShapeError, match=message):
        call(tiny_model("imram"))


def test_invalid_configs_are_refused():
    with pytest.raises(ConfigError, match="mode"):
        make_config("imram", mode="both")
    with pytest.raises(ConfigError, match="unknown model"):
        make_config("scan")
    with pytest.raises(ConfigError, match="unknown fields"):
        make_config("camp", heads=3)


@pytest.mark.parametrize("kind, fields", MODEL_VARIANTS[:2])
def test_checkpoint_round_trip(tmp_path, kind, fields):
    from xmr.data import Vocabulary

    model = tiny_model(kind, **fields)
    model.vocab = Vocabulary.from_words([f"w{i}" for i in range(46)])
    path = save_checkpoint(model, tmp_path / "m.pt", {"epoch": 3})
    loaded = load_checkpoint(path)
    assert loaded.config == model.config and loaded.vocab == model.vocab
    assert loaded.checkpoint_metadata == {"epoch": 3} and len(loaded.checkpoint_sha256) == 64
    features, ids, lengths = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.similarity(features, ids, lengths), model.similarity(features, ids, lengths))


def test_loading_a_foreign_file_says_what_to_do(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="import-checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("kind, fields", MODEL_VARIANTS)
def test_training_gradients_are_finite_with_padded_captions(kind, fields):
    model = tiny_model(kind, **fields).train()
    features, ids, lengths = random_batch(n_images=4)  # captions of lengths 7, 1, 3, 5: padding everywhere
    model.loss(model.similarity(features, ids, lengths)).backward()
    unused = {"text": "memory_i2t.", "image": "memory_t2i."}.get(fields.get("mode"), "-")
    for name, p in model.named_parameters():
        assert (p.grad is None) == name.startswith(unused), name
        assert p.grad is None or torch.isfinite(p.grad).all(), name
