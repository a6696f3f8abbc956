"""What calibration minimises, and the config a fit starts from.

:func:`resolve_config` turns :class:`~kvlight.calibration.options.CompressionOptions` into the compression config
(a file, uniform ranks, or widths at a target); :func:`check_objectives` refuses objectives the backends cannot
serve; :func:`key_weights` / :func:`value_weights` build the closed-form weights of the "query" and "output"
objectives; :func:`reconstruction_loss` is the loss of the reconstruction epochs (width codecs through their codes).
"""

from __future__ import annotations

import torch

from kvlight.analysis.bit_allocation import WHITENED, check_bits_target, uniform_bits
from kvlight.analysis.queries import score_weights
from kvlight.calibration.options import CompressionOptions, ObjectiveOptions
from kvlight.compressors.registry import backend
from kvlight.compressors.weighting import output_weights
from kvlight.config import RECOMMENDED, CompressionConfig
from kvlight.errors import ConfigError, KVLightError
from kvlight.geometry import KVGeometry
from kvlight.models import output_projections
from kvlight.serving.widths import direction_quantizers


def resolve_config(options: CompressionOptions, geometry: KVGeometry) -> CompressionConfig:
    """The config file/dict, a uniform one from the ranks, or a provisional one for widths allocated at a target.

    With no config and no rank the result is uniform widths at ``target_memory_reduction`` (default
    :data:`~kvlight.config.RECOMMENDED`'s, 4 sinks, no recent window): the provisional config the allocation at the start of
    ``fit`` replaces (kvlight.calibration.callbacks.AllocateWidths). Ranks keep those exact tokens too, and a kind
    without a rank (``rank_k`` alone) keeps every direction. ``sink_tokens``, ``recent_window``,
    ``latent_bits`` and ``quant_group_size`` override what the config says when given.
    """
    shape = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    if options.target_memory_reduction is not None and not options.allocates:
        raise ConfigError(
            "--target-memory-reduction allocates a width per principal direction; it does not combine with a "
            "compression config or ranks (give one or the other)"
        )
    if options.allocates:
        target = options.target_memory_reduction
        target = check_bits_target(RECOMMENDED["target_memory_reduction"] if target is None else target, geometry)
        sinks, recent = RECOMMENDED["sink_tokens"], RECOMMENDED["recent_window"]
        block = RECOMMENDED["key_rope_block"]
        config = uniform_bits(geometry, target, block).to_config("pca", sink_tokens=sinks, recent_window=recent)
    elif options.config is None:
        # A rank changes only what it names: --rank-k alone leaves the values at full rank, and the exact tokens
        # stay the recommended ones (a bare rank used to drop the sinks and copy rank_k onto the values).
        rank, rank_k, rank_v = options.rank, options.rank_k, options.rank_v
        rank_k = rank_k if rank_k is not None else (rank if rank is not None else geometry.head_dim)
        rank_v = rank_v if rank_v is not None else (rank if rank is not None else geometry.head_dim)
        sinks, recent = RECOMMENDED["sink_tokens"], RECOMMENDED["recent_window"]
        config = CompressionConfig.uniform(
            *shape, rank_k=rank_k, rank_v=rank_v, sink_tokens=sinks, recent_window=recent
        )
        config.key_rope_block = RECOMMENDED["key_rope_block"]
    elif isinstance(options.config, dict):
        config = CompressionConfig.from_dict(options.config)
    else:
        config = CompressionConfig.from_json(options.config)
    overrides = {
        "sink_tokens": options.sink_tokens,
        "recent_window": options.recent_window,
        "latent_bits": options.latent_bits,
        "quant_group_size": options.quant_group_size,
        "key_rope_block": options.key_rope_block,
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
    return config.validate(*shape)


def check_objectives(compressor, objective: ObjectiveOptions, trains: bool | None = None) -> None:
    """Refuse objectives the compressor's backends cannot serve, with one line naming the option.

    ``trains``: whether the fit will have trainable heads (None: the compressor's own say). A pending
    "fisher-white" allocation installs KVSplice heads over a provisional PCA config, so its provisional compressor
    alone would refuse ``objective kl``.
    """
    weighted = {"k": objective.key_objective == "query", "v": objective.value_objective == "output"}
    for kind, name in (("k", "key_objective query"), ("v", "value_objective output")):
        algos = {head.algo for layer in compressor.layers for head in layer[kind].heads} - {"none"}
        if weighted[kind] and any(not backend(algo).weighted_objectives for algo in algos):
            raise ConfigError(
                f"{name} needs KVSplice {'key' if kind == 'k' else 'value'} heads (separate encoder and "
                "decoder): use --compressor kvsplice"
            )
    if objective.objective == "kl" and not (compressor.trainable if trains is None else trains):
        raise ConfigError("objective kl trains KVSplice heads and this config has none: use --compressor kvsplice")


def check_whitened(compression: CompressionOptions, objective: ObjectiveOptions) -> None:
    """A "fisher-white" allocation is served by KVSplice heads fitted and trained with the Fisher as their weight:
    refuse another backend, or key/value objectives that would replace that weight."""
    if not (compression.allocates and compression.weighting in WHITENED):
        return
    if compression.compressor is not None and not backend(compression.compressor).weighted_objectives:
        raise ConfigError(
            f"bits_weighting {compression.weighting} widths index a Fisher-whitened basis that only KVSplice "
            f"heads serve, not {compression.compressor}: use --compressor kvsplice (or leave it out)"
        )
    if objective.key_objective != "mse" or objective.value_objective != "mse":
        raise ConfigError(
            f"bits_weighting {compression.weighting} weighs key and value errors by the model's Fisher; it does "
            "not combine with --key-objective query or --value-objective output (leave them at mse)"
        )


def key_weights(query_moments: dict, model: torch.nn.Module, window: int, reduce=None) -> torch.Tensor:
    """``[L, H, D, D]`` score weights from a capture's query moments (``{"sums", "count"}``), RoPE averaged over
    distances up to ``window``; ``reduce`` sums a tensor over processes (the strategy's). Keys coded relative to the
    RoPE of their block (``key_rope_block`` > 1) meet queries rotated by the distance to the block's start, which the
    same average stands in for."""
    reduce = reduce or (lambda t: t)
    sums, count = reduce(query_moments["sums"]), reduce(torch.tensor(float(query_moments["count"])))
    return score_weights(model, (sums / count).cpu().double(), window)  # the model's own rotary layout and scale


def value_weights(model: torch.nn.Module, geometry: KVGeometry) -> torch.Tensor:
    """``[L, H, D, D]`` value weights from each block's attention output projection (weighting.output_weight)."""
    try:
        projections = output_projections(model)
    except KVLightError as exc:
        raise ConfigError(f"value_objective output: {exc}; use value_objective mse") from None
    return output_weights(projections, geometry.num_kv_heads, geometry.head_dim)


def reconstruction_loss(compressor, keys: torch.Tensor, values: torch.Tensor, key_w=None, value_w=None) -> torch.Tensor:
    """The reconstruction epochs' loss on captured rows ``[N, L, H, D]``: width codecs train through their static
    codes (rounded in the forward, straight-through gradient), the others on plain reconstruction."""
    quantizers = direction_quantizers(compressor, keys.dtype)
    return compressor.reconstruction_loss(keys, values, key_w, value_w, quantizers)
