"""The scoring runtime: ``from xmr.runtime import Scorer`` (offline) and ``BatchedScorer`` (online,
dynamic batching); backends from artifacts, graph files or an in-memory model (docs/runtime.md)."""

from xmr.runtime.backends import OnnxRuntimeBackend, TorchBackend
from xmr.runtime.batched import BatchedScorer
from xmr.runtime.batcher import BatcherClosedError, BatcherConfig, QueueFullError
from xmr.runtime.gallery import Gallery, ImageGallery, TextGallery
from xmr.runtime.inputs import InputWarning
from xmr.runtime.scorer import Scorer, SearchResult

__all__ = ["BatchedScorer", "BatcherClosedError", "BatcherConfig", "Gallery", "ImageGallery", "InputWarning",
           "OnnxRuntimeBackend", "QueueFullError", "Scorer", "SearchResult", "TextGallery", "TorchBackend"]
