"""``kvlight config uniform``: write a compression config with one rank everywhere.

    kvlight config uniform --rank-k 16 --rank-v 32 --compressor pca -o cfg.json

Its rank and exact-token flags name :class:`~kvlight.calibration.options.CompressionOptions` fields (kvlight.cli.flags);
what only this command has is :class:`UniformConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvlight.calibration.options import CompressionOptions
from kvlight.cli.flags import Flag, OneLineParser, add_flags, build, flags, parse, to_arguments
from kvlight.compressors.registry import backend_names
from kvlight.config import RECOMMENDED, CompressionConfig
from kvlight.errors import ConfigError, KVLightError, OutputError
from kvlight.files import ensure_writable
from kvlight.models import geometry_of


@dataclass(frozen=True)
class UniformConfig:
    """What only ``kvlight config uniform`` has.

    Args:
        output: where to write the JSON.
        model: the model whose geometry the config is for (None: the embedded default).
        compressor: the backend every head names.
    """

    output: str | None = None
    model: str | None = None
    compressor: str = "kvsplice"


#: the subcommands of ``kvlight config`` and what each does.
SUBCOMMANDS = {"uniform": "one rank for every layer and KV head: kvlight config uniform --rank 32 -o cfg.json"}
FLAGS = (
    flags(("--model", "uniform.model"))
    + (
        Flag("--output", ("uniform.output",), short="-o", metavar="PATH"),
        Flag("--compressor", ("uniform.compressor",), choices=backend_names),
        Flag("--algo", ("uniform.compressor",), alias_of="--compressor"),
    )
    + flags(
        ("--rank", "compression.rank"),
        ("--rank-k", "compression.rank_k"),
        ("--rank-v", "compression.rank_v"),
        ("--sink-tokens", "compression.sink_tokens"),
        ("--recent-window", "compression.recent_window"),
        group="budget",
    )
)


def source_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, prog="kvlight config uniform")
    parser.add_dataclass_arguments(CompressionOptions, "compression")
    parser.add_dataclass_arguments(UniformConfig, "uniform")
    return parser


def main(argv: list[str]) -> int:
    """``kvlight config uniform ...`` (the only config subcommand); ``kvlight config --help`` lists them."""
    if argv and argv[0] in ("-h", "--help"):
        print("usage: kvlight config {" + ",".join(SUBCOMMANDS) + "} ...\n\nWrite a compression config.\n")
        for name, text in SUBCOMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        got = f"unknown subcommand {argv[0]!r}" if argv else "a subcommand is missing"
        raise KVLightError(f"kvlight config: {got}; the one there is: kvlight config uniform --rank 32 -o cfg.json")
    source = source_parser()
    cli = OneLineParser(prog="kvlight config uniform", description="one rank for every layer and KV head")
    add_flags(cli, FLAGS, source)
    config = parse(source, to_arguments(cli.parse_args(argv[1:]), FLAGS), FLAGS)
    uniform = build(UniformConfig, config.uniform, FLAGS, "uniform")
    compression = build(CompressionOptions, config.compression, FLAGS, "compression")
    if uniform.output is None:
        raise KVLightError("config uniform needs -o/--output: where to write the JSON")
    if uniform.compressor not in backend_names():
        known = ", ".join(backend_names())
        raise ConfigError(f"--compressor {uniform.compressor!r} is not a known backend (known: {known})")
    return write_uniform_config(uniform, compression)


def write_uniform_config(uniform: UniformConfig, compression: CompressionOptions) -> int:
    geometry = geometry_of(uniform.model)
    if compression.rank is None and (compression.rank_k is None or compression.rank_v is None):
        raise KVLightError("config uniform needs --rank, or both --rank-k and --rank-v")
    config = CompressionConfig.uniform(
        geometry.num_layers,
        geometry.num_kv_heads,
        geometry.head_dim,
        rank=compression.rank,
        rank_k=compression.rank_k,
        rank_v=compression.rank_v,
        algo=uniform.compressor,
        # Unless told otherwise, the recommended exact tokens (4 sinks, no recent window), as calibrate uses.
        sink_tokens=RECOMMENDED["sink_tokens"] if compression.sink_tokens is None else compression.sink_tokens,
        recent_window=RECOMMENDED["recent_window"] if compression.recent_window is None else compression.recent_window,
    )
    config.validate(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    output = Path(uniform.output)
    if output.is_dir():
        raise OutputError(f"-o {str(output)!r} is a directory; pass a file name such as {str(output / 'cfg.json')!r}")
    ensure_writable(output.parent if str(output.parent) else Path("."))
    config.to_json(output)
    reduction = config.memory_reduction(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    print(
        f"wrote {output}: {geometry.num_layers} layers x {geometry.num_kv_heads} KV heads, "
        f"latent memory reduction {100 * reduction:.1f}%"
    )
    return 0
