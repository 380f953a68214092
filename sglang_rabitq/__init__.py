"""RaBitQCache: sparse decode attention for SGLang from 1-bit rotated key codes and top-p selection."""

from sglang_rabitq.config import RaBitQConfig

__version__ = "0.1.0"
SUPPORTED_SGLANG = "0.5.17"

__all__ = ["RaBitQConfig", "SUPPORTED_SGLANG", "__version__"]
