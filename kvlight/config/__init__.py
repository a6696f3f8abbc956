"""The compression config: what a compressor stores for every layer and KV head (kvlight.config.compression), its
JSON fields and their checks (kvlight.config.fields), and the recommended default."""

from kvlight.config.compression import LATENT_BITS, RECOMMENDED, CompressionConfig, HeadSpec

__all__ = ["LATENT_BITS", "RECOMMENDED", "CompressionConfig", "HeadSpec"]
