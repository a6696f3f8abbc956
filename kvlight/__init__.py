"""kvlight: post-hoc KV-cache compression for frozen Hugging Face causal LMs.

Importing kvlight changes nothing in transformers or torch, and loads neither Lightning nor ``datasets``. What a
:class:`CompressedKVModelWrapper` changes on its model, until ``close()`` restores it: one forward pre-hook on the
rotary module (to see the position ids the model really uses) and, with ``fast_decode=True``, the attention
implementation (``kvlight_sdpa`` / ``kvlight_eager``, registered in transformers' ``AttentionInterface``).
"""

from kvlight.compressors.compressor import KVCompressor, KVSpliceCompressor, PCACompressor, load_compressor
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
