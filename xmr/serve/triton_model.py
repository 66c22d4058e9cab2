"""xmr's model inside Triton's Python backend: a ``Scorer`` and a gallery per model instance.

Triton's dynamic batcher hands ``execute`` the requests of one batch. Each request is checked
and encoded on its own (``Scorer.search_request`` / ``pairs_request``: a bad caption, a
``k`` below 1 or features of the wrong shape become that request's error response, and the
others are served); the good ones run as one launch sequence (``runtime.batched.run_batch``,
what ``BatchedScorer.submit`` runs). Only Triton's Python-backend stub imports this module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from xmr.data.precomp import load_features, read_captions
from xmr.errors import InputError, XmrError, first_line
from xmr.runtime import Scorer
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.batched import run_batch
from xmr.runtime.gallery import concat, is_gallery
from xmr.runtime.scorer import PairsRequest
from xmr.serve.graph_repository import BLS_BACKEND
from xmr.serve.repository import SCORE_PAIRS, SEARCH_IMAGE, SEARCH_TEXT

log = logging.getLogger("xmr.serve")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        here = Path(args["model_repository"])  # this model's directory: relative paths start there
        self.task = parameters["task"]
        self.k = int(parameters["k"])
        self.shortlist = int(parameters["shortlist"]) if parameters["shortlist"] else None
        self.scorer = _scorer(here / parameters["artifacts"], parameters)
        self.gallery, self.pending = None, None  # pending: features or captions to encode at the first request
        if self.task in (SEARCH_TEXT, SEARCH_IMAGE):
            source = here / parameters["gallery"]
            if parameters["backend"] == BLS_BACKEND and not is_gallery(source):
                self.pending = source  # BLS calls (the encoders) are allowed only in execute
            else:
                self.gallery = self._gallery(source)

    def _gallery(self, source: Path) -> Any:
        """The model's gallery: loaded if ``source`` is a saved one, else encoded from features or captions."""
        if is_gallery(source):
            return self.scorer.load_gallery(source)
        if self.task == SEARCH_TEXT:
            return self.scorer.encode_images(load_features(source))
        return self.scorer.encode_texts(read_captions(source))

    def execute(self, requests: list[Any]) -> list[Any]:
        if self.pending is not None:
            try:
                self.gallery, self.pending = self._gallery(self.pending), None
            except Exception as e:  # noqa: BLE001 - every request of the batch says why; the next batch retries
                log.exception("encoding the gallery %s failed", self.pending)
                return [_error(e) for _ in requests]
        checked: dict[int, Any] = {}
        responses: list[Any] = [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                checked[i] = self._checked(request)
            except XmrError as e:
                responses[i] = _error(e)
        if checked:
            for i, result in zip(checked, self._run(list(checked.values()))):
                responses[i] = _error(result) if isinstance(result, Exception) else result
        return responses

    def _checked(self, request: Any) -> Any:
        """A request's input as a checked, encoded scorer request."""
        if self.task == SEARCH_TEXT:
            return self.scorer.search_request(_captions(request), self.gallery, self._k(request), self.shortlist)
        features = _tensor(request, "features")
        if self.task == SEARCH_IMAGE:
            return self.scorer.search_request(features, self.gallery, self._k(request), self.shortlist)
        captions = _captions(request)
        if len(captions) != len(features):
            raise InputError(f"score_pairs needs one caption per image, got {len(features)} images and "
                             f"{len(captions)} captions")
        return self.scorer.pairs_request(features, captions, np.stack([np.arange(len(captions))] * 2, axis=1))

    def _k(self, request: Any) -> int:
        k = _tensor(request, "k", required=False)
        if k is None:
            return self.k
        if len(np.unique(k)) != 1:
            raise InputError(f"a request's rows must ask for one k, got {sorted(set(k.ravel().tolist()))[:5]}")
        return int(k.ravel()[0])

    def _run(self, requests: list[Any]) -> list[Any]:
        """Responses (or exceptions) of checked requests: one launch sequence, and if that
        fails, each request alone, so only a request that fails by itself fails."""
        try:
            return self._respond(requests, self._results(requests))
        except Exception:  # noqa: BLE001 - retried one by one below
            log.exception("a batch of %d requests failed; retrying them one by one", len(requests))
        out = []
        for request in requests:
            try:
                out.extend(self._respond([request], self._results([request])))
            except Exception as e:  # noqa: BLE001 - that request's error response
                out.append(e)
        return out

    def _results(self, requests: list[Any]) -> list[Any]:
        if self.task != SCORE_PAIRS:
            return run_batch(self.scorer, requests)
        merged = PairsRequest(concat([r.images for r in requests]), concat([r.texts for r in requests]),
                              np.concatenate([r.pairs + offset for r, offset in zip(requests, _offsets(requests))]))
        scores = self.scorer.run_pairs(merged)
        return np.split(scores, np.cumsum([len(r.pairs) for r in requests])[:-1])

    def _respond(self, requests: list[Any], results: list[Any]) -> list[Any]:
        if self.task == SCORE_PAIRS:
            return [pb_utils.InferenceResponse([pb_utils.Tensor("score", scores.reshape(-1, 1).astype(np.float32))])
                    for scores in results]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("indices", result.indices.astype(np.int64)),
                                            pb_utils.Tensor("scores", result.scores.astype(np.float32))])
                for result in results]

    def finalize(self) -> None:
        self.scorer.close()


def _scorer(artifacts: Path, parameters: dict[str, str]) -> Scorer:
    """The model's scorer: over the graph models of this server (backend ``triton``, a
    repository from ``xmr triton-repo``) or a backend of this process (``xmr serve``)."""
    budget = int(parameters["block_budget"]) if parameters.get("block_budget") else None
    if parameters["backend"] == BLS_BACKEND:
        from xmr.serve.bls_backend import TritonGraphBackend

        backend = TritonGraphBackend(Artifacts.open(artifacts), parameters["precision"], parameters["graphs"])
        return Scorer(backend, block_budget=budget)
    return Scorer.load(artifacts, backend=parameters["backend"], precision=parameters["precision"],
                       device=parameters["device"] or None, block_budget=budget, spin=False,  # processes share cores
                       threads=int(parameters["threads"]) if parameters["threads"] else None)


def _offsets(requests: list[PairsRequest]) -> list[int]:
    """Where each request's images and captions start in the merged galleries (one per pair)."""
    return np.concatenate([[0], np.cumsum([len(r.pairs) for r in requests])[:-1]]).tolist()


def _tensor(request: Any, name: str, required: bool = True) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise InputError(f"the request has no input {name!r}")
        return None
    return tensor.as_numpy()


def _captions(request: Any) -> list[str]:
    """A request's ``text`` rows as strings (UTF-8)."""
    rows = _tensor(request, "text").reshape(-1)  # type: ignore[union-attr]
    try:
        return [row.decode("utf-8") if isinstance(row, bytes) else str(row) for row in rows]
    except UnicodeDecodeError as e:
        raise InputError(f"a caption is not UTF-8 text ({first_line(e)[:120]})") from e


def _error(error: BaseException) -> Any:
    message = first_line(error) if isinstance(error, XmrError) else f"{type(error).__name__}: {first_line(error)}"
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message[:500]))
