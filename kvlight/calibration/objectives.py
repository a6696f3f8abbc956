"""What calibration minimises: the objectives, and the config a fit starts from."""

from __future__ import annotations

from kvlight.analysis.bit_allocation import check_bits_target, uniform_bits
from kvlight.config import RECOMMENDED, CompressionConfig
from kvlight.errors import ConfigError

#: "mse": keys fitted by plain reconstruction error; "query": by the error attention scores see (KVSplice heads start
#: from kvlight.compressors.weighting's closed form and train on the weighted loss; query moments from the capture).
KEY_OBJECTIVES = ("mse", "query")

#: "mse": values fitted by plain reconstruction error; "output": by the error after the output projection (KVSplice
#: heads start from the closed form with weighting.output_weight of the model's o_proj, and train on that loss).
VALUE_OBJECTIVES = ("mse", "output")

#: what the Adam epochs after the statistics epoch minimise: "reconstruction" (the captured K/V rows, weighted as
#: key_objective / value_objective say) or "kl" (end to end: kvlight.distill, on the calibration windows).
OBJECTIVES = ("reconstruction", "kl")


def resolve_config(
    compression_config: str | dict | None,
    geometry,
    rank: int | None = None,
    rank_k: int | None = None,
    rank_v: int | None = None,
    sink_tokens: int | None = None,
    recent_window: int | None = None,
    latent_bits: int | str | None = None,
    quant_group_size: int | None = None,
    target_memory_reduction: float | None = None,
) -> CompressionConfig:
    """The config file/dict, a uniform one from the ranks, or a placeholder for widths allocated at a target.

    With ``target_memory_reduction`` (or with nothing at all: :data:`~kvlight.config.RECOMMENDED`'s target, 4 sinks,
    no recent window) the result is uniform widths at that target: the placeholder :class:`KVCalibrationModule`
    replaces with the sensitivity-allocated widths at the start of ``fit``. ``sink_tokens``, ``recent_window``,
    ``latent_bits`` and ``quant_group_size`` override what the config says when given.
    """
    shape = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    by_rank = rank is not None or rank_k is not None or rank_v is not None
    if target_memory_reduction is not None and (compression_config is not None or by_rank):
        raise ConfigError(
            "--target-memory-reduction allocates a width per principal direction; it does not combine with a "
            "compression config or ranks (give one or the other)"
        )
    if compression_config is None and not by_rank:
        target = RECOMMENDED["target_memory_reduction"] if target_memory_reduction is None else target_memory_reduction
        target = check_bits_target(target, geometry)
        sinks, recent = RECOMMENDED["sink_tokens"], RECOMMENDED["recent_window"]
        config = uniform_bits(geometry, target).to_config("pca", sink_tokens=sinks, recent_window=recent)
    elif compression_config is None:
        rank_k = rank_k if rank_k is not None else (rank if rank is not None else rank_v)
        rank_v = rank_v if rank_v is not None else (rank if rank is not None else rank_k)
        config = CompressionConfig.uniform(*shape, rank_k=rank_k, rank_v=rank_v)
    elif isinstance(compression_config, dict):
        config = CompressionConfig.from_dict(compression_config)
    else:
        config = CompressionConfig.from_json(compression_config)
    overrides = {
        "sink_tokens": sink_tokens,
        "recent_window": recent_window,
        "latent_bits": latent_bits,
        "quant_group_size": quant_group_size,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if config.uses_widths("k") and config.uses_widths("v") and {"latent_bits", "quant_group_size"} & set(overrides):
        raise ConfigError(
            "--latent-bits / --quant-group-size set how rank latents are stored, but every direction here has its "
            "own width (the default allocates them): pass --rank/--rank-k/--rank-v or a rank config to use them"
        )
    if overrides:  # through from_dict, so overridden values are checked like the config's own
        data = config.to_dict()
        config = CompressionConfig.from_dict({**data, "global": {**data["global"], **overrides}})
    return config.validate(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
