"""kvlight: post-hoc KV-cache compression for frozen Hugging Face causal LMs.

Importing kvlight changes nothing in transformers or torch: the only hook it ever installs is the
position-observing pre-hook of a :class:`CompressedKVModelWrapper` (removed by ``close()``).
"""

from kvlight.compressors import KVCompressor, KVSpliceCompressor, PCACompressor, load_compressor
from kvlight.config import CompressionConfig
from kvlight.errors import KVLightError
from kvlight.serving.wrapper import CompressedKVModelWrapper

__all__ = [
    "CompressedKVModelWrapper",
    "CompressionConfig",
    "KVCompressor",
    "KVLightError",
    "KVSpliceCompressor",
    "PCACompressor",
    "load_compressor",
]
__version__ = "0.1.0"
