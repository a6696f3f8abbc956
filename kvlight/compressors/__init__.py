"""Compression backends. A new backend is one file defining a :class:`HeadProjection` plus one line here."""

from kvlight.compressors.base import HeadProjection, IdentityProjection, LayerCodec
from kvlight.compressors.kvsplice import KVSpliceProjection
from kvlight.compressors.pca import PCAProjection
from kvlight.compressors.statistics import RunningMoments

#: algo name (as written in the compression config) -> projection class.
PROJECTIONS: dict[str, type[HeadProjection]] = {
    PCAProjection.algo: PCAProjection,
    KVSpliceProjection.algo: KVSpliceProjection,
}

from kvlight.compressors.compressor import KVCompressor, KVSpliceCompressor, PCACompressor, load_compressor

__all__ = [
    "PROJECTIONS",
    "HeadProjection",
    "IdentityProjection",
    "KVCompressor",
    "KVSpliceCompressor",
    "KVSpliceProjection",
    "LayerCodec",
    "PCACompressor",
    "PCAProjection",
    "RunningMoments",
    "load_compressor",
]
