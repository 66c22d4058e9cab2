"""The batched scoring runtime: ``from xmr.runtime import Scorer`` (docs/runtime.md)."""

from xmr.runtime.batcher import BatcherClosedError, BatcherConfig, QueueFullError
from xmr.runtime.gallery import Gallery, ImageGallery, TextGallery
from xmr.runtime.inputs import InputWarning
from xmr.runtime.scorer import Scorer, SearchResult

__all__ = ["BatcherClosedError", "BatcherConfig", "Gallery", "ImageGallery", "InputWarning", "QueueFullError",
           "Scorer", "SearchResult", "TextGallery"]
