"""xmr: fast inference runtime for cross-attention text-image retrieval (CAMP, IMRAM)."""

from xmr.errors import XmrError

__version__ = "0.1.0"
__all__ = ["XmrError", "__version__"]
