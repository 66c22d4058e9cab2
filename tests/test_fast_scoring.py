"""The fast scorer (per-item work hoisted out of the pair grid) equals the straightforward
form, and its analytic FLOP count equals what torch's flop counter measures."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from xmr.data import Vocabulary, load_split
from xmr.models import build_model, make_config
from xmr.models.flops import released_evaluation_flops, scoring_cost
from xmr.train import TrainConfig, train
from conftest import MODEL_VARIANTS, random_batch, tiny_model

# longer runs and other step counts on top of the shared variants
VARIANTS = MODEL_VARIANTS + [("imram", {"steps": 1}), ("imram", {"mode": "text", "steps": 4, "memory_norm": True})]
LENGTHS = torch.tensor([9, 1, 4, 9, 2, 6, 3])  # 1 and the maximum included, unsorted


def embeddings(n_images=5, regions=6, lengths=LENGTHS, dim=16, dtype=torch.float64, seed=0):
    """Image and caption embeddings with exact zeros past each length (as the text encoder gives)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_images, regions, dim, generator=g, dtype=dtype)
    cap = torch.randn(len(lengths), int(lengths.max()), dim, generator=g, dtype=dtype)
    return img, cap * (torch.arange(cap.size(1))[None, :, None] < lengths[:, None, None]), lengths


def both_forms(model, img, cap, lengths):
    with torch.no_grad():
        return model.score(img, cap, lengths), model.score(img, cap, lengths, direct=True)


@pytest.mark.parametrize("kind, fields", VARIANTS)
def test_fast_equals_direct_float64(kind, fields):
    model = tiny_model(kind, torch.float64, **fields)
    fast, direct = both_forms(model, *embeddings())
    assert fast.shape == (5, 7)
    torch.testing.assert_close(fast, direct, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind, fields", VARIANTS)
def test_fast_float32_within_1e4_of_float64(kind, fields):
    """Released-like shapes (36 regions, captions up to 20 tokens) with the models' own init."""
    torch.manual_seed(0)
    model = build_model(make_config(kind, vocab_size=50, word_dim=8, embed_size=64, img_dim=12, **fields)).eval()
    img, cap, lengths = embeddings(6, 36, torch.tensor([20, 1, 13, 7, 16, 20, 11, 2]), dim=64)
    _, reference = both_forms(model.double(), img, cap, lengths)
    fast32, _ = both_forms(model.float(), img.float(), cap.float(), lengths)
    torch.testing.assert_close(fast32.double(), reference, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def trained(tiny_synth, tmp_path_factory):
    """CAMP and IMRAM after a short real training run, with the test split encoded."""
    vocab = Vocabulary.load(tiny_synth / "vocab.json")
    splits = {s: load_split(tiny_synth, s, vocab) for s in ("train", "test")}
    models = {}
    for kind in ("camp", "imram"):
        torch.manual_seed(0)
        model = build_model(make_config(kind, vocab_size=len(vocab), img_dim=splits["train"].img_dim,
                                        embed_size=16, word_dim=16), vocab)
        train(model, splits["train"], None, TrainConfig(epochs=2, batch_size=16, warmup_epochs=1),
              tmp_path_factory.mktemp(kind), show_progress=False)
        models[kind] = model.eval()
    test = splits["test"]
    features = test.image_batch(range(test.n_images))
    ids, lengths = test.caption_batch(range(test.n_captions))
    return models, features, ids, lengths


@pytest.mark.parametrize("kind, mode", [("camp", None), ("imram", "full"), ("imram", "text"), ("imram", "image")])
def test_fast_equals_direct_on_trained_weights(trained, kind, mode):
    models, features, ids, lengths = trained
    model = models[kind]
    if mode is not None:
        model.config.mode = mode
    try:
        for dtype, tolerance in ((torch.float64, dict(rtol=1e-6, atol=0)), (torch.float32, dict(rtol=0, atol=1e-4))):
            model.to(dtype)
            with torch.no_grad():
                img, cap = model.encode_images(features.to(dtype)), model.encode_texts(ids, lengths)
            assert len(set(lengths.tolist())) > 3
            fast, direct = both_forms(model, img, cap, lengths)
            torch.testing.assert_close(fast, direct, **tolerance)
    finally:
        model.float()
        if mode is not None:
            model.config.mode = "full"


@pytest.mark.parametrize("kind, fields", VARIANTS)
def test_fast_form_gradients_equal_direct(kind, fields):
    """Training runs through the fast form: its gradients are the direct form's."""
    model = tiny_model(kind, torch.float64, **fields)
    features, ids, lengths = random_batch(n_images=4, dtype=torch.float64)
    grads = []
    for direct in (False, True):
        model.zero_grad()
        img, cap = model.encode_images(features), model.encode_texts(ids, lengths)
        model.loss(model.score(img, cap, lengths, direct=direct)).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for fast, direct in zip(*grads):
        torch.testing.assert_close(fast, direct, rtol=1e-6, atol=1e-12)


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind, fields", VARIANTS)
def test_analytic_flops_equal_flop_counter(kind, fields):
    model = tiny_model(kind, **fields)
    n_images, n_captions, regions, length = 3, 4, 5, 7
    img, cap, lengths = embeddings(n_images, regions, torch.full((n_captions,), length), dtype=torch.float32)
    fast, direct = (scoring_cost(model.config, regions, length, form) for form in ("fast", "direct"))
    images, texts = model.prepare_images(img), model.prepare_texts(cap, lengths)

    assert counted_flops(lambda: model.prepare_images(img)) == n_images * fast.per_image
    assert counted_flops(lambda: model.prepare_texts(cap, lengths)) == n_captions * fast.per_caption
    assert counted_flops(lambda: model.score_prepared(images, texts)) == fast.block(n_images, n_captions)
    assert counted_flops(lambda: model.score(img, cap, lengths, direct=True)) == direct.total(n_images, n_captions)


@pytest.mark.parametrize("kind, fields", VARIANTS)
def test_authors_style_baseline_scores_and_flops(kind, fields):
    """The speed baseline computes the same scores with the released code's FLOPs (measured
    on that code with the same counter: IMRAM 24·R·L·D + 24·(L+R)·D² in full mode, CAMP at
    50 caption positions)."""
    model = tiny_model(kind, torch.float64, **fields)
    img, cap, lengths = embeddings(7, 5, torch.full((3,), 6))
    with torch.no_grad():
        torch.testing.assert_close(model.score_authors_style(img, cap, lengths), model.score(img, cap, lengths),
                                   rtol=1e-6, atol=0)
    expected = released_evaluation_flops(model.config, 5, 6, 7, 3)
    assert counted_flops(lambda: model.score_authors_style(img, cap, lengths)) == expected


# matmul FLOPs per pair counted by torch.utils.flop_counter on the released evaluation code
# (IMRAM evaluation.shard_xattn, CAMP evaluation.i2t's per-pair part), D = 1024, R = 36
RELEASED_CODE_FLOPS = {
    ("imram", "text"): (307_298_304, 358_514_688, 409_731_072),
    ("imram", "image"): (911_278_080, 912_162_816, 913_047_552),
    ("imram", "full"): (1_218_576_384, 1_270_677_504, 1_322_778_624),
    ("camp", None): (937_674_752, 937_674_752, 937_674_752),  # 50 caption positions whatever the length
}


@pytest.mark.parametrize("kind, mode", list(RELEASED_CODE_FLOPS))
def test_authors_form_counts_what_the_released_code_does(kind, mode):
    config = make_config(kind, **({"mode": mode} if mode else {}))
    counts = tuple(scoring_cost(config, 36, length, "authors").per_pair for length in (12, 14, 16))
    assert counts == RELEASED_CODE_FLOPS[(kind, mode)]
