"""Compression backends: per-head projections, the registry that lists them, and the whole-model compressor.

Importing the package registers the built-in backends (one import each below); a new backend is one file that
calls :func:`~kvlight.compressors.registry.register_backend` plus its line here. The whole-model compressor, which
reads a compression config, is :mod:`kvlight.compressors.compressor` (this package sits below the config: the config
asks the registry for the backends' names).
"""

from kvlight.compressors import kvsplice, pca  # noqa: F401  (each registers its backend)
from kvlight.compressors.base import HeadProjection, IdentityProjection, LayerCodec
from kvlight.compressors.kvsplice import KVSpliceOptions, KVSpliceProjection
from kvlight.compressors.pca import PCAOptions, PCAProjection
from kvlight.compressors.registry import Backend, backend, backend_names, register_backend
from kvlight.compressors.statistics import RunningMoments

__all__ = [
    "Backend",
    "HeadProjection",
    "IdentityProjection",
    "KVSpliceOptions",
    "KVSpliceProjection",
    "LayerCodec",
    "PCAOptions",
    "PCAProjection",
    "RunningMoments",
    "backend",
    "backend_names",
    "register_backend",
]
