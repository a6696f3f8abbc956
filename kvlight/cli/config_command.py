"""``kvlight config uniform``: write a compression config with one rank everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvlight.config import CompressionConfig
from kvlight.errors import KVLightError
from kvlight.files import ensure_writable


def write_uniform_config(args: argparse.Namespace) -> int:
    from kvlight.models import geometry_of

    geometry = geometry_of(args.model)
    if args.rank is None and (args.rank_k is None or args.rank_v is None):
        raise KVLightError("config uniform needs --rank, or both --rank-k and --rank-v")
    config = CompressionConfig.uniform(
        geometry.num_layers,
        geometry.num_kv_heads,
        geometry.head_dim,
        rank=args.rank,
        rank_k=args.rank_k,
        rank_v=args.rank_v,
        algo=args.algo,
        sink_tokens=args.sink_tokens,
        recent_window=args.recent_window,
    )
    config.validate(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    output = Path(args.output)
    ensure_writable(output.parent if str(output.parent) else Path("."))
    config.to_json(output)
    reduction = config.memory_reduction(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    print(
        f"wrote {output}: {geometry.num_layers} layers x {geometry.num_kv_heads} KV heads, latent memory reduction {100 * reduction:.1f}%"
    )
    return 0
