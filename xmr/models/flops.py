"""Analytic matmul cost of pair scoring, per pair and per item.

Counts what ``torch.utils.flop_counter`` counts: 2 FLOPs per multiply-add of every matrix
product (``mm``/``bmm``/``addmm``); element-wise work (softmax, norms, activations) is not
included. Three forms:

- ``authors``: the released evaluation code, as measured with torch's flop counter on that
  code: IMRAM runs every memory unit on the concatenation ``[q; a]`` and updates once more
  after the last step; CAMP pads every caption to ``RELEASED_TEXT_POSITIONS`` (50) positions
  and runs all of its maps on the cross-attended features per pair.
- ``direct``: ``model.score(..., direct=True)``, the equations on the pair grid (the
  per-item projections of CAMP's inputs done once, the unused last IMRAM update dropped).
- ``fast``: ``model.score``: per-item work in ``prepare_images``/``prepare_texts``, only
  truly per-pair work on the pair grid.
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass

from xmr.errors import ConfigError
from xmr.models.camp import RELEASED_IMAGES_PER_CALL, RELEASED_TEXT_POSITIONS
from xmr.models.config import CampConfig, DualEncoderConfig, ImramConfig, ModelConfig

FORMS = ("authors", "direct", "fast")


@dataclass(frozen=True)
class ScoringCost:
    """Matmul FLOPs of scoring: on the pair grid; once per image / caption (``prepare_*``);
    and per image / caption in every block it is scored in (the Gram matrices)."""

    per_pair: int
    per_image: int = 0
    per_caption: int = 0
    per_image_in_block: int = 0
    per_caption_in_block: int = 0

    def total(self, n_images: int, n_captions: int) -> int:
        """All of it, for one block of ``n_images`` x ``n_captions``."""
        return self.block(n_images, n_captions) + n_images * self.per_image + n_captions * self.per_caption

    def block(self, n_images: int, n_captions: int) -> int:
        """The pair stage (``score_prepared``) of one block."""
        return n_images * n_captions * self.per_pair + n_images * self.per_image_in_block + n_captions * self.per_caption_in_block

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def swapped(self) -> ScoringCost:
        """The same cost with the roles of images and captions exchanged."""
        return ScoringCost(self.per_pair, self.per_caption, self.per_image, self.per_caption_in_block, self.per_image_in_block)

    def __add__(self, other: ScoringCost) -> ScoringCost:
        return ScoringCost(*(a + b for a, b in zip(astuple(self), astuple(other))))


def _imram_direction(form: str, queries: int, contexts: int, dim: int, steps: int) -> ScoringCost:
    """One IMRAM direction: ``queries`` tokens of one item (counted as the image) attend the
    ``contexts`` tokens of the other (counted as the caption) for ``steps`` steps."""
    q, c, d, k = queries, contexts, dim, steps
    attention = 2 * q * c * d  # query @ contextᵀ
    if form == "fast":
        per_pair = (attention * k  # scores at every step
                    + 2 * q * c * c * k  # α (C Cᵀ) for |α C|
                    + 2 * q * c * 2 * d * (k - 1)  # α (W_a C + b) for each update
                    + 2 * q * d * 2 * d * max(k - 2, 0))  # W_q q from the second update on
        return ScoringCost(per_pair, per_image=2 * q * d * 2 * d, per_caption=2 * c * d * 2 * d,
                           per_caption_in_block=2 * c * c * d)
    updates = k if form == "authors" else k - 1
    memory = 2 * (2 * q * 2 * d * d)  # linear and gate on [q; a]
    return ScoringCost(2 * attention * k + memory * updates)


def imram_cost(config: ImramConfig, regions: int, length: int, form: str) -> ScoringCost:
    d, k = config.embed_size, config.steps
    cost = ScoringCost(0)
    if config.mode in ("text", "full"):  # words (caption) attend regions (image)
        cost = cost + _imram_direction(form, length, regions, d, k).swapped()
    if config.mode in ("image", "full"):  # regions attend words
        cost = cost + _imram_direction(form, regions, length, d, k)
    return cost


def _camp_head(config: CampConfig, regions: int, length: int, heads_pooled_separately: bool) -> int:
    """Summary-attention pooling of both sides and the output MLP (per pair)."""
    d, h, n = config.embed_size, config.num_heads, regions + length
    pooling = 2 * n * d * (h if heads_pooled_separately else 1)
    return 2 * n * d * d + 2 * n * d * h + pooling + 2 * (2 * d) * d + 2 * d


def camp_cost(config: CampConfig, regions: int, length: int, form: str) -> ScoringCost:
    d, r = config.embed_size, regions
    if form == "fast":
        n = length
        per_pair = 10 * n * r * d + 8 * n * r * (n + r) + _camp_head(config, r, n, False)
        per_token = 12 * d * d  # cross: 2 products; self-attention: 2 projections; the two fc halves
        return ScoringCost(per_pair, per_image=r * (per_token + 2 * r * d), per_caption=n * (per_token + 2 * n * d),
                           per_image_in_block=2 * r * r * d, per_caption_in_block=2 * n * n * d)
    n = max(length, RELEASED_TEXT_POSITIONS) if form == "authors" else length
    cross = 8 * n * r * d  # two cross attentions: logits and values
    self_attention = 4 * (r * r + n * n) * d + 4 * (r + n) * d * d  # logits, values; its q/k projections
    fusion = 4 * (r + n) * d * d  # fc_1 / fc_2 on [v; f]
    per_pair = cross + self_attention + fusion + _camp_head(config, r, n, True)
    inputs = 4 * d * d  # the query/key projections of each token
    return ScoringCost(per_pair, per_image=inputs * r, per_caption=inputs * n)


def scoring_cost(config: ModelConfig, regions: int, length: int, form: str = "fast") -> ScoringCost:
    """Matmul FLOPs of scoring captions of ``length`` tokens against images of ``regions`` regions."""
    if form not in FORMS:
        raise ConfigError(f"form must be one of {FORMS}, got {form!r}")
    if isinstance(config, ImramConfig):
        return imram_cost(config, regions, length, form)
    if isinstance(config, CampConfig):
        return camp_cost(config, regions, length, form)
    if isinstance(config, DualEncoderConfig):  # the cosine of two pooled vectors
        return ScoringCost(2 * config.embed_size)
    raise ConfigError(f"no cost model for {type(config).__name__}")


def released_evaluation_flops(config: ModelConfig, regions: int, length: int, n_images: int, n_captions: int) -> int:
    """Matmul FLOPs of ``model.score_authors_style`` on ``n_images`` x ``n_captions`` captions of
    ``length`` tokens: the released evaluation's loop. CAMP's projects the captions again for
    every group of ``RELEASED_IMAGES_PER_CALL`` images; IMRAM's has no per-item work."""
    cost = scoring_cost(config, regions, length, "authors")
    if isinstance(config, CampConfig):
        groups = -(-n_images // RELEASED_IMAGES_PER_CALL)
        return n_images * n_captions * cost.per_pair + n_images * cost.per_image + groups * n_captions * cost.per_caption
    return cost.total(n_images, n_captions)


def encoder_flops(config: ModelConfig, regions: int, length: int) -> dict[str, int]:
    """Matmul FLOPs of the encoders, per item: the image encoder's projection of ``regions``
    features, and the bi-GRU over a caption of ``length`` tokens (3 gates, input and hidden
    products, both directions); the ``prepare_*`` precomputations are ``ScoringCost.per_*``."""
    d = config.embed_size
    gru = 2 * length * 3 * 2 * (config.word_dim * d + d * d)
    return {"image": 2 * regions * config.img_dim * d, "caption": gru}
