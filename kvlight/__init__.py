"""kvlight: post-hoc KV-cache compression for frozen Hugging Face causal LMs.

``kvlight.compress(model, compressor_or_path)`` and ``kvlight.from_pretrained(model, path_or_repo_id)`` serve a model
with a compressed KV cache, the compressor given as an object, the directory ``save_pretrained`` wrote or a Hugging
Face Hub repo id; ``with kvlight.compress(...) as wrapped:`` restores the model on exit.

Importing kvlight changes nothing in transformers or torch, and loads neither Lightning nor ``datasets``. What a
:class:`~kvlight.serving.wrapper.CompressedKVModelWrapper` changes on its model, until ``close()`` restores it: one
forward pre-hook on the rotary module (to see the position ids the model really uses) and, with ``fast_decode=True``,
the attention implementation (``kvlight_sdpa`` / ``kvlight_eager``, registered in transformers' ``AttentionInterface``).
"""

from kvlight.errors import KVLightError

#: The public names and the module each comes from, imported on first use (PEP 562): `kvlight --help` and every
#: command's argument errors then answer in a fraction of a second instead of first importing torch and transformers.
_LAZY = {
    "CompressedKVModelWrapper": "kvlight.serving.wrapper",
    "CompressionConfig": "kvlight.config",
    "KVCompressor": "kvlight.compressors.compressor",
    "KVSpliceCompressor": "kvlight.compressors.compressor",
    "PCACompressor": "kvlight.compressors.compressor",
    "compress": "kvlight.serving.wrapper",
    "from_pretrained": "kvlight.serving.wrapper",
    "load_compressor": "kvlight.compressors.compressor",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kvlight' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CompressedKVModelWrapper",
    "CompressionConfig",
    "KVCompressor",
    "KVLightError",
    "KVSpliceCompressor",
    "PCACompressor",
    "compress",
    "from_pretrained",
    "load_compressor",
]
__version__ = "0.1.0"
