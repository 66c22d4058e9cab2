"""``Scorer``: load exported artifacts once, encode galleries once, score in large blocks.

    from xmr.runtime import Scorer

    scorer = Scorer.load("artifacts/imram")                  # backend="auto", precision="fp32"
    images = scorer.encode_images(features)                  # [N, R, img_dim] region features
    hits = scorer.search(["a dog runs on the grass"], images, k=5)

A ``Scorer`` starts no thread: it is the offline scorer (``xmr eval``, calibration and the
benchmarks score through it too, e.g. ``Scorer(TorchBackend.from_model(model, regions))``).
Online serving with dynamic batching is ``BatchedScorer(scorer, config)`` (``batched.py``).
See docs/runtime.md for the scheduling and the guarantees.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from xmr.errors import InputError
from xmr.export.graphs import GLOBAL_OUTPUTS, IMAGE_GLOBAL, LENGTH, split_global
from xmr.progress import progress
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.backends import Backend, Prepared, create_backend
from xmr.runtime.executor import run_plan
from xmr.runtime.gallery import Gallery, ImageGallery, TextGallery, concat
from xmr.runtime.inputs import (
    Tokens, as_features, as_tokens, caption_cap, limit_length, positive_int, tokenize_captions,
)
from xmr.runtime.schedule import Plan, computed_tokens, default_budget, plan_blocks
from xmr.runtime.shortlist import candidate_groups, top_candidates

log = logging.getLogger("xmr.runtime")

ENCODE_BATCH = {"cpu": 128, "cuda": 512}  # items per encoder launch

Captions = Union[Sequence[str], tuple[Any, Any], TextGallery]
Images = Union[np.ndarray, torch.Tensor, ImageGallery]


@dataclass
class SearchResult:
    """Top-k per query, best first: ``indices`` into the gallery and their ``scores``, ``[queries, k]``."""

    indices: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class SearchRequest:
    """A checked search: the encoded query (captions for images, images for captions), the
    gallery, k, and the prefilter's shortlist per query (None: every gallery item)."""

    query: Gallery
    gallery: Gallery
    k: int
    shortlist: int | None = None


@dataclass(frozen=True)
class PairsRequest:
    """Checked ``score_pairs`` input: both galleries and ``[n, 2]`` int64 (image, caption) pairs."""

    images: ImageGallery
    texts: TextGallery
    pairs: np.ndarray


class Scorer:
    """Scores (image, caption) pairs with one backend; thread-safe (one launch sequence at a time).

    ``block_budget``: elements of a block's largest intermediate (default: ``schedule.default_budget``:
    2^23 on CPU unless measured otherwise for the backend, a fraction of free memory on a GPU). ``max_length``: the longest caption in tokens
    (see ``load``). ``bucketed=False`` keeps captions in their given order when cutting blocks:
    the baseline that length bucketing is measured against."""

    def __init__(self, backend: Backend, *, block_budget: int | None = None, max_length: int | None = None,
                 truncate: bool = True, bucketed: bool = True) -> None:
        _check_options(block_budget, truncate, bucketed)
        if not isinstance(backend, Backend):
            raise InputError(f"a Scorer needs a Backend (Scorer.load builds one from artifacts), got "
                             f"{type(backend).__name__}")
        self.artifacts = artifacts = backend.artifacts
        self._backend = backend
        self.vocab = artifacts.vocab
        self.truncate, self.bucketed = truncate, bucketed
        self.max_length = caption_cap(max_length, backend.limits.length)
        if block_budget is None:
            block_budget = default_budget(backend.device, backend.name, backend.precision)
        self.block_budget = block_budget
        self._lock = threading.RLock()  # one launch sequence at a time on the backend
        self._counters = {"pairs_scored": 0, "launches": 0, "real_tokens": 0, "computed_tokens": 0}
        image_outputs = [t for t in artifacts.outputs("image_encoder") if t.name not in GLOBAL_OUTPUTS]
        text_outputs = [t for t in artifacts.outputs("text_encoder") if t.name not in GLOBAL_OUTPUTS]
        self._length_axes = {t.name: [i for i, d in enumerate(t.shape) if d == LENGTH] for t in text_outputs}
        self._gallery_tensors = {  # what a gallery for this scorer holds: dtype and dims after the item (and length) axes
            "images": {t.name: (t.dtype, t.shape[1:]) for t in image_outputs},
            "texts": {t.name: (t.dtype, [d for d in t.shape[1:] if d != LENGTH]) for t in text_outputs}}
        heads = [t.shape[1] for t in artifacts.outputs("image_encoder") if t.name == IMAGE_GLOBAL]
        self.prefilter_dim: int | None = heads[0] if heads else None  # the prefilter head's vectors (None: no head)

    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "auto", precision: str = "fp32", device: str | None = None,
             *, threads: int | None = None, block_budget: int | None = None, max_length: int | None = None,
             truncate: bool = True, bucketed: bool = True, verify: bool = True, spin: bool = True) -> Scorer:
        """A scorer over ``xmr export``'s artifacts.

        ``backend``: ``auto`` (the fastest available for ``precision`` on this machine:
        ``backends.auto_candidates``), ``tensorrt``, ``onnxruntime``, ``openvino`` or ``torch``.
        ``precision``: ``fp32``, ``fp16``, ``bf16`` or ``int8``. ``device``: ``cpu``, ``cuda`` or
        ``cuda:N`` (default: a GPU when there is one). ``threads``: ONNX Runtime / OpenVINO CPU
        threads (default: the cores this process may use). ``block_budget``, ``bucketed``: see the class. ``max_length``: the longest caption
        in tokens, ``<start>``/``<end>`` included (default: 128, or the TensorRT profile's longest
        when smaller; at least 3, at most that profile's); longer captions are cut with an
        ``InputWarning`` (refused if ``truncate`` is false); raw text beyond the cap is never
        tokenised. ``verify``: check every file against the manifest's sha256 (False: names are
        still confined to the artifact directory, only the hashing is skipped). ``spin``: ONNX
        Runtime's idle threads spin-wait for work (its default; False when several processes
        share the cores, as ``xmr serve``'s models do)."""
        if not isinstance(spin, bool):
            raise InputError(f"spin must be True or False, got {spin!r}")
        if threads is not None:
            positive_int(threads, "threads")
        if max_length is not None:
            caption_cap(max_length, None)  # its range now; the engines' limit once the backend is known
        _check_options(block_budget, truncate, bucketed)
        artifacts = Artifacts.open(artifact_dir, verify)
        chosen = create_backend(artifacts, backend, precision, device, threads=threads, spin=spin)
        scorer = cls(chosen, block_budget=block_budget, max_length=max_length, truncate=truncate, bucketed=bucketed)
        log.info("xmr runtime: %s %s, %s (asked: backend=%s)", artifacts.kind, artifact_dir, chosen.describe(), backend)
        return scorer

    # -- what was chosen
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def precision(self) -> str:
        return self._backend.precision

    @property
    def device(self) -> str:
        return str(self._backend.device)

    @property
    def emulated(self) -> bool:
        """bf16 on a CPU without bf16 units: bf16 scores, computed slower than fp32."""
        return self._backend.emulated

    def __repr__(self) -> str:
        return f"Scorer({self.artifacts.kind}, {self._backend.describe()})"

    # -- encoding
    def encode_images(self, features: Images, show_progress: bool = False) -> ImageGallery:
        """Region features ``[N, R, img_dim]`` (numpy or torch) -> an image gallery on the backend's device."""
        if isinstance(features, Gallery):
            return self._own(features, ImageGallery, "encode_images")  # type: ignore[return-value]
        array = as_features(features, self.artifacts.regions, self.artifacts.config["img_dim"], single=True)
        launches = [split_global(result) for _, result in
                    self._encode(array, None, torch.arange(array.size(0)), "encode images", show_progress)]
        items = {name: torch.cat([prepared[name] for prepared, _ in launches]) for name in launches[0][0]}
        vectors = torch.cat([v for _, v in launches]) if launches[0][1] is not None else None  # type: ignore[misc]
        return ImageGallery(items, self.artifacts.identity, self.precision, vectors=vectors)

    def encode_texts(self, captions: Captions, show_progress: bool = False) -> TextGallery:
        """Raw captions (tokenised with the model's vocabulary), or ``(ids, lengths)`` -> a caption gallery."""
        if isinstance(captions, Gallery):
            return self._own(captions, TextGallery, "encode_texts")  # type: ignore[return-value]
        tokens = self._tokens(captions)
        order = torch.argsort(tokens.lengths, stable=True)  # launches of similar lengths pad little
        parts = []
        for index, result in self._encode(tokens.ids, tokens.lengths, order, "encode captions", show_progress):
            prepared, vectors = split_global(result)
            part = TextGallery.from_padded(prepared, tokens.lengths[index], self.artifacts.identity, self.precision,
                                           self._length_axes)
            part.vectors = vectors
            parts.append(part)
        packed = concat(parts)  # in launch order: put each caption's offsets (and vectors) back in input order
        offsets = {a: torch.empty_like(o).index_copy_(0, order, o) for a, o in packed.offsets.items()}
        vectors = None if packed.vectors is None else torch.empty_like(packed.vectors).index_copy_(
            0, order.to(packed.vectors.device), packed.vectors)
        return TextGallery(packed.items, packed.identity, packed.precision, tokens.lengths.clone(), packed.meta, offsets,
                           vectors)

    def load_gallery(self, path: str | Path) -> Gallery:
        """A gallery saved with ``gallery.save(path)``, checked against this model, on the backend's device."""
        return self._own(Gallery.load(path), Gallery, "load_gallery")

    def _tokens(self, captions: Captions) -> Tokens:
        if isinstance(captions, tuple) and len(captions) == 2 and not isinstance(captions[0], str):
            tokens = as_tokens(captions[0], captions[1], self.artifacts.config["vocab_size"])
            return limit_length(tokens, self.max_length, self.vocab, self.truncate)
        if self.vocab is None:
            raise InputError("these artifacts carry no vocabulary: pass captions as (ids, lengths)")
        return tokenize_captions(captions, self.vocab, self.max_length, self.truncate)

    def _encode(self, data: torch.Tensor, lengths: torch.Tensor | None, order: torch.Tensor, what: str,
                show: bool) -> Iterator[tuple[torch.Tensor, Prepared]]:
        """(indices, encoder outputs) per launch of ``ENCODE_BATCH`` items taken in ``order``;
        caption launches are cut to their longest caption."""
        device = self._backend.device
        batch = ENCODE_BATCH.get(device.type, ENCODE_BATCH["cpu"])
        limit = self._backend.limits.images if lengths is None else self._backend.limits.captions
        batch = min(batch, limit or batch)
        with self._lock, progress(show) as bar:
            task = bar.add_task(what, total=data.size(0), info="")
            for start in range(0, data.size(0), batch):
                index = order[start : start + batch]
                if lengths is None:
                    yield index, self._backend.encode_images(data[index].to(device))
                else:
                    longest = int(lengths[index].max())
                    yield index, self._backend.encode_texts(data[index, :longest].to(device), lengths[index].to(device))
                bar.advance(task, len(index))

    def _own(self, gallery: object, kind: type[Gallery], role: str) -> Gallery:
        """``gallery`` on the backend's device if it is a ``kind`` this scorer encoded (these
        weights, this precision, this model's encoder outputs) and whole; else an ``InputError``."""
        if not isinstance(gallery, kind):
            wanted = {ImageGallery: "an ImageGallery or region features [n_images, regions, img_dim]",
                      TextGallery: "a TextGallery or captions (strings, or (ids, lengths))"}.get(kind, "a gallery")
            raise InputError(f"{role} needs {wanted}, got {_describe(gallery)}")
        gallery.check(f"this {gallery.kind} gallery")
        if gallery.identity != self.artifacts.identity:
            raise InputError(f"this {gallery.kind} gallery was encoded by other weights (checkpoint sha256 "
                             f"{gallery.identity[:12]}…), not this scorer's ({self.artifacts.identity[:12]}…); re-encode it")
        if gallery.precision != self.precision:
            raise InputError(f"this {gallery.kind} gallery was encoded in {gallery.precision}, this scorer runs "
                             f"{self.precision}; re-encode it with this scorer")
        self._check_tensors(gallery)
        return gallery.to(self._backend.device)

    def _check_tensors(self, gallery: Gallery) -> None:
        """The gallery's tensors are this model's encoder outputs: names, dtype, fixed dims."""
        expected = self._gallery_tensors[gallery.kind]
        model = f"this scorer's {self.artifacts.kind} encoder"
        if set(gallery.items) != set(expected):
            raise InputError(f"this {gallery.kind} gallery holds {sorted(gallery.items)}, {model} makes "
                             f"{sorted(expected)}: it was encoded by another model; re-encode it"[:400])
        for name, tensor in gallery.items.items():
            dtype, dims = expected[name]
            got = list(tensor.shape[1:])
            if (str(tensor.dtype).removeprefix("torch.") != dtype or len(got) != len(dims)
                    or any(isinstance(d, int) and d != g for d, g in zip(dims, got))):
                raise InputError(f"this {gallery.kind} gallery's {name} is {str(tensor.dtype).removeprefix('torch.')} "
                                 f"[n, {', '.join(map(str, got))}], {model} makes {dtype} [n, {', '.join(map(str, dims))}]: "
                                 f"it was encoded by another model; re-encode it")
        if gallery.vectors is not None and gallery.vectors.size(1) != self.prefilter_dim:
            head = f"a {self.prefilter_dim}-d prefilter head" if self.prefilter_dim else "no prefilter head"
            raise InputError(f"this {gallery.kind} gallery holds {gallery.vectors.size(1)}-d prefilter vectors, "
                             f"{model} has {head}: it was encoded by another model; re-encode it")
        if isinstance(gallery, TextGallery):
            if gallery.length_axes != self._length_axes:
                raise InputError(f"this texts gallery's length axes {gallery.length_axes} are not {model}'s "
                                 f"{self._length_axes}: it was encoded by another model; re-encode it"[:400])
            longest = int(gallery.lengths.max())
            if longest > self.max_length:
                raise InputError(f"this texts gallery has captions of {longest} tokens, beyond this scorer's cap "
                                 f"max_length={self.max_length}; load the scorer with a larger max_length= (up to what "
                                 f"its backend takes) or re-encode the captions with this scorer")

    def _gallery(self, value: Any, kind: type[Gallery], role: str) -> Any:
        """``value`` as a ``kind`` gallery of this scorer: checked (``_own``) if it is a gallery, else encoded."""
        if isinstance(value, Gallery):
            return self._own(value, kind, role)
        return self.encode_images(value) if kind is ImageGallery else self.encode_texts(value)

    def _galleries(self, images: Images, texts: Captions, call: str) -> tuple[ImageGallery, TextGallery]:
        return self._gallery(images, ImageGallery, f"{call}: images"), self._gallery(texts, TextGallery, f"{call}: texts")

    # -- scoring
    def plan(self, images: Images, texts: Captions) -> Plan:
        """How ``score`` cuts ``images`` x ``texts`` into launches (``bucketed=False``: captions in
        their given order, the baseline that length bucketing is measured against)."""
        return self._plan(*self._galleries(images, texts, "plan(images, texts)"))

    def _plan(self, images: ImageGallery, texts: TextGallery) -> Plan:
        return plan_blocks(len(images), texts.lengths.numpy(), self.artifacts.regions,
                           self.artifacts.config["embed_size"], self.block_budget, self._backend.limits, self.bucketed)

    def score(self, images: Images, texts: Captions, show_progress: bool = False,
              description: str = "score") -> np.ndarray:
        """float32 scores ``[Ni, Nt]`` of every (image, caption) pair; galleries or raw inputs."""
        return self._score(*self._galleries(images, texts, "score(images, texts)"), show_progress, description)

    def _score(self, image_gallery: ImageGallery, text_gallery: TextGallery, show_progress: bool = False,
               description: str = "score") -> np.ndarray:
        """``score`` of galleries this scorer already checked (``_own``)."""
        plan = self._plan(image_gallery, text_gallery)
        out = np.empty((len(image_gallery), len(text_gallery)), dtype=np.float32)
        with self._lock, progress(show_progress) as bar:
            task = bar.add_task(description, total=plan.launches, info=f"{out.shape[0]}x{out.shape[1]} pairs")
            run_plan(self._backend, image_gallery, text_gallery, plan, out, lambda: bar.advance(task))
            self._counters["pairs_scored"] += out.size
            self._counters["launches"] += plan.launches
            self._counters["real_tokens"] += int(text_gallery.lengths.sum()) * plan.n_images
            self._counters["computed_tokens"] += computed_tokens(plan.groups) * plan.n_images
        return out

    def search(self, query: Images | Captions, gallery: Gallery, k: int = 10,
               shortlist: int | None = None) -> SearchResult:
        """Top-``k`` gallery items per query: captions against an ``ImageGallery`` (text -> image),
        images against a ``TextGallery`` (image -> text), by the cross-attention score.

        ``shortlist=K``: two-stage search. The prefilter head's vectors rank the whole
        gallery, and only each query's ``K`` best are scored by cross-attention (so at most
        ``K`` results; the scores are the model's own, as exhaustive search's up to the float
        rounding of other block shapes, about 1e-6). ``K >= len(gallery)`` is exhaustive search. Needs artifacts with a prefilter
        head (``xmr train`` makes one, ``xmr distill`` adds one) and galleries they encoded."""
        return self.run_search(self.search_request(query, gallery, k, shortlist))

    def search_request(self, query: Images | Captions, gallery: Gallery, k: int,
                       shortlist: int | None = None) -> SearchRequest:
        """``search``'s input checked and its query encoded (an ``InputError`` if anything is wrong)."""
        k = positive_int(k, "k")
        if shortlist is not None:
            shortlist = positive_int(shortlist, "shortlist (gallery items rescored per query)")
            if self.prefilter_dim is None:
                raise InputError(f"shortlist needs a prefilter head, and these {self.artifacts.kind} artifacts have "
                                 f"none; add one with `xmr distill CHECKPOINT` and re-export, or search with "
                                 f"shortlist=None (exhaustive)")
        if isinstance(gallery, ImageGallery):
            encoded = self._gallery(query, TextGallery, "search's query against an ImageGallery")
        elif isinstance(gallery, TextGallery):
            encoded = self._gallery(query, ImageGallery, "search's query against a TextGallery")
        else:
            raise InputError(f"search needs an ImageGallery or TextGallery to search, got {_describe(gallery)}")
        gallery = self._own(gallery, Gallery, "search's gallery")
        if shortlist is not None and (gallery.vectors is None or encoded.vectors is None):
            which = "gallery" if gallery.vectors is None else "query"
            raise InputError(f"shortlist needs prefilter vectors, and this search's {which} has none (encoded by "
                             f"artifacts without a prefilter head); re-encode it with this scorer")
        return SearchRequest(encoded, gallery, k, shortlist)

    def run_search(self, request: SearchRequest) -> SearchResult:
        """The top-k of a checked request (``search_request``): exhaustive, or over each
        query's shortlist (``shortlisted``)."""
        if request.shortlist is not None and request.shortlist < len(request.gallery):
            return top_k_of(*self.shortlisted(request.query, request.gallery, request.shortlist), request.k)
        if isinstance(request.gallery, ImageGallery):
            scores = self._score(request.gallery, request.query).T  # type: ignore[arg-type]  # (queries, images)
        else:
            scores = self._score(request.query, request.gallery)  # type: ignore[arg-type]  # (queries, captions)
        return top_k(scores, request.k)

    def shortlisted(self, query: Gallery, gallery: Gallery, shortlist: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's ``shortlist`` best gallery items by the prefilter (int64 ``[Q, K]``,
        ascending) and their cross-attention scores (float32 ``[Q, K]``), for checked galleries
        with vectors. Queries whose candidates overlap share ``score`` calls
        (``shortlist.candidate_groups``)."""
        candidates = top_candidates(query.vectors, gallery.vectors, shortlist, gallery.index)  # type: ignore[arg-type]
        scores = np.empty(candidates.shape, dtype=np.float32)
        for queries, union in candidate_groups(candidates):
            whole = len(queries) == len(query) and bool((queries == np.arange(len(query))).all())
            asked = query if whole else query.select(queries)  # a lone query is asked as it is
            if isinstance(gallery, ImageGallery):  # text -> image: rows images, columns the query captions
                block = self._score(gallery.select(union), asked).T  # type: ignore[arg-type]
            else:
                block = self._score(asked, gallery.select(union))  # type: ignore[arg-type]
            scores[queries] = np.take_along_axis(block, np.searchsorted(union, candidates[queries]), axis=1)
        return candidates, scores

    def score_pairs(self, images: Images, texts: Captions, pairs: object) -> np.ndarray:
        """Scores of arbitrary ``(image index, caption index)`` pairs, ``[n_pairs]`` float32."""
        return self.run_pairs(self.pairs_request(images, texts, pairs))

    def pairs_request(self, images: Images, texts: Captions, pairs: object) -> PairsRequest:
        """``score_pairs``'s input checked and encoded."""
        image_gallery, text_gallery = self._galleries(images, texts, "score_pairs(images, texts, pairs)")
        return PairsRequest(image_gallery, text_gallery, check_pairs(pairs, len(image_gallery), len(text_gallery)))

    def run_pairs(self, request: PairsRequest) -> np.ndarray:
        """Pairs grouped by caption; captions asking for the same set of images share one
        ``score`` call (that set x those captions), so when every caption asks for the same
        images nothing but the requested pairs is computed."""
        pairs, out = request.pairs, np.empty(len(request.pairs), dtype=np.float32)
        by_caption = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]
        captions, starts = np.unique(by_caption[:, 1], return_index=True)
        by_images: dict[tuple[int, ...], list[int]] = {}
        for caption, wanted in zip(captions.tolist(), np.split(by_caption[:, 0], starts[1:])):
            by_images.setdefault(tuple(np.unique(wanted).tolist()), []).append(caption)
        for wanted, caption_list in by_images.items():
            image_index, caption_index = np.asarray(wanted), np.asarray(caption_list)  # both ascending
            sub = self._score(request.images.select(image_index), request.texts.select(caption_index))  # type: ignore[arg-type]
            mine = np.flatnonzero(np.isin(pairs[:, 1], caption_index))
            out[mine] = sub[np.searchsorted(image_index, pairs[mine, 0]), np.searchsorted(caption_index, pairs[mine, 1])]
        return out

    def close(self) -> None:
        """Release the backend (sessions, engines, the model and its device memory); the scorer
        refuses work afterwards. ``with Scorer.load(...) as scorer:`` closes it on exit."""
        with self._lock:
            self._backend.release()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """Scoring counters: pairs, launches, real and computed caption tokens, padding efficiency."""
        with self._lock:
            counters: dict[str, Any] = dict(self._counters)
        counters["padding_efficiency"] = (counters["real_tokens"] / counters["computed_tokens"]
                                          if counters["computed_tokens"] else 1.0)
        return counters


def top_k(scores: np.ndarray, k: int) -> SearchResult:
    """Best ``k`` columns of each row, best first (ties: lower index first)."""
    return top_k_of(np.broadcast_to(np.arange(scores.shape[1]), scores.shape), scores, k)


def top_k_of(indices: np.ndarray, scores: np.ndarray, k: int) -> SearchResult:
    """Best ``k`` of each row's ``indices`` (ascending) by ``scores``, best first (ties: lower index first)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return SearchResult(np.take_along_axis(indices, order, axis=1), np.take_along_axis(scores, order, axis=1))


def check_pairs(pairs: object, n_images: int, n_captions: int) -> np.ndarray:
    try:
        array = np.asarray(pairs)
    except ValueError as e:  # ragged nested lists
        raise InputError("pairs must be integer (image, caption) index pairs [n, 2], got ragged rows") from e
    if array.ndim != 2 or array.shape[1] != 2 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"pairs must be integer (image, caption) index pairs [n, 2], got {array.dtype} {list(array.shape)}")
    if len(array) == 0:
        raise InputError("no pairs given")
    bad_images = (array[:, 0] < 0) | (array[:, 0] >= n_images)
    bad_captions = (array[:, 1] < 0) | (array[:, 1] >= n_captions)
    if bad_images.any() or bad_captions.any():
        first = int(np.flatnonzero(bad_images | bad_captions)[0])
        raise InputError(f"pair {first} {array[first].tolist()} is out of range: {n_images} images, {n_captions} captions")
    return array.astype(np.int64)


def _describe(value: object) -> str:
    described = {TextGallery: "a TextGallery (encoded captions)", ImageGallery: "an ImageGallery (encoded images)"}
    return described.get(type(value), type(value).__name__)


def _check_options(block_budget: object, truncate: object, bucketed: object) -> None:
    if block_budget is not None:
        positive_int(block_budget, "block_budget (floats of a block's largest intermediate)")
    for name, value in (("truncate", truncate), ("bucketed", bucketed)):
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}"[:200])
