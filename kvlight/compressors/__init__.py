"""Compression backends: per-head projections, the registry that lists them, and the whole-model compressor.

Importing the package registers the built-in backends (one import each below); a new backend is one file that
calls :func:`~kvlight.compressors.registry.register_backend` plus its line here. The compressor itself
(:class:`KVCompressor`, which reads a compression config) is loaded on first use, so that the config module can ask
the registry for the backends' names without a cycle.
"""

from kvlight.compressors import kvsplice, pca  # noqa: F401  (each registers its backend)
from kvlight.compressors.base import HeadProjection, IdentityProjection, LayerCodec
from kvlight.compressors.kvsplice import KVSpliceOptions, KVSpliceProjection
from kvlight.compressors.pca import PCAOptions, PCAProjection
from kvlight.compressors.registry import Backend, backend, backend_names, register_backend
from kvlight.compressors.statistics import RunningMoments

_COMPRESSOR = ("KVCompressor", "KVSpliceCompressor", "PCACompressor", "load_compressor")


def __getattr__(name: str):
    if name in _COMPRESSOR:
        from kvlight.compressors import compressor

        return getattr(compressor, name)
    raise AttributeError(f"module 'kvlight.compressors' has no attribute {name!r}")


__all__ = [
    "Backend",
    "HeadProjection",
    "IdentityProjection",
    "KVCompressor",
    "KVSpliceCompressor",
    "KVSpliceOptions",
    "KVSpliceProjection",
    "LayerCodec",
    "PCACompressor",
    "PCAOptions",
    "PCAProjection",
    "RunningMoments",
    "backend",
    "backend_names",
    "load_compressor",
    "register_backend",
]
