"""The compression config: the upstream design's JSON schema in and out, validation, per-head specs.

Schema (the upstream design's, with optional additions marked +)::

    {
      "global": {
        "target_memory_reduction": 0.5,   # rank of unlisted heads = round(d_head * (1 - target))
        "d_head": 64,
        "algo_default": "kvsplice",       # "pca" or "kvsplice"
        "num_layers": 30,                 # + model geometry, so a compressor can be built from the file alone
        "num_kv_heads": 3,                # +
        "sink_tokens": 0,                 # + first positions kept exact
        "recent_window": 0,               # + newest positions kept exact
        "latent_bits": null,              # + store latents as int8/int4/int2 codes (8, 4, 2) or "fp8"
        "quant_group_size": 32,           # + latent channels sharing one scale and zero point
        "key_rope_block": 1               # + keys coded relative to the RoPE of blocks of this many tokens; or a list
      },
      "per_layer_head": {
        "0/0": {"enabled": true, "rank": 32, "algo": "kvsplice", "d_k": 64, "d_v": 64},
        "0/1": {"rank_k": 16, "rank_v": 48},  # + separate key and value ranks
        "0/2": {"bits_k": [8, 6, 4, ..., 0], "bits_v": [...]}  # + a width per principal direction (head_dim each)
      }
    }

Heads not listed take the global default. ``bits_k`` / ``bits_v`` give every latent direction of the head's
basis its own width (:data:`kvlight.compressors.widths.WIDTHS`: 0 drops it, 16 keeps it in the K/V dtype, 1-8 store a static
integer code; see :mod:`kvlight.serving.widths`); they replace the rank (a direction of width 0 is truncated) and
``latent_bits`` for that kind. A config either gives ``bits_k`` to every enabled head or to none (``bits_v`` alike).
``key_rope_block`` says how a RoPE model's keys are coded: each key rotated back by the RoPE angle of the first token
of its block of that many tokens (blocks counted from the first token of the sequence). 1 codes the keys before
rotation (``k_proj``'s output): the best quality per byte, but a decode step must rebuild and rotate every stored key.
A block of ``B > 1`` tokens leaves each key rotated by its distance to the block's start (under ``B`` positions, the
same in every block, so one basis serves any context length), and a decode step scores the keys in latent space,
``(A^T R(-theta_block) q) . z``, rotating and projecting each query once per block. A list gives one per layer.
Models without RoPE code the keys attention reads whatever it says.
Every problem is a :class:`ConfigError` whose one-line message names the offending key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlight.compressors.widths import EXACT, stored_rank
from kvlight.config.fields import known_algo, number, optional_int, parse_head_entry, parse_head_key
from kvlight.errors import ConfigError
from kvlight.files import atomic_write_text

_GLOBAL_KEYS = {
    "target_memory_reduction",
    "d_head",
    "algo_default",
    "num_layers",
    "num_kv_heads",
    "sink_tokens",
    "recent_window",
    "latent_bits",
    "quant_group_size",
    "key_rope_block",
}


#: The default when no config, rank or target is given: the configuration bench/frontier.py and bench/decode.py found
#: both good and fast at <= 25 % of an fp16 cache (issues 11 and 29). A width per principal direction of a basis in
#: which each head's Fisher is white (kvlight.analysis.whitening, "fisher-white", served by KVSplice heads), allocated
#: within 24 % of an fp16 cache's bytes at long context (3.84 bits per element), the first 4 tokens exact, no exact
#: recent window, and a RoPE model's keys coded relative to the rotation of blocks of 16 tokens, so that decode scores
#: them in latent space instead of rebuilding and rotating every stored key. A backend that cannot serve a whitened
#: basis (PCA) gets the best weighting in the principal basis, "fisher-joint"; so does ``kvlight analyze``, whose
#: configs name principal directions. The allocation needs the model: it runs at the start of fit
#: (kvlight.calibration.module).
RECOMMENDED = {
    "target_memory_reduction": 0.76,
    "sink_tokens": 4,
    "recent_window": 0,
    "bits_weighting": "fisher-white",
    "principal_bits_weighting": "fisher-joint",
    "key_rope_block": 16,
}
#: Values ``global.latent_bits`` may take (None: latents in the K/V dtype).
LATENT_BITS = (None, 2, 4, 8, "fp8")


@dataclass(frozen=True)
class HeadSpec:
    """How one KV head of one layer is compressed. ``enabled=False`` stores it exactly.

    ``bits_k`` / ``bits_v``: a width per latent direction (``head_dim`` of them) or None; with widths, ``rank_k`` /
    ``rank_v`` are the directions that must be encoded (up to the last one of non-zero width).
    """

    enabled: bool
    algo: str
    rank_k: int
    rank_v: int
    bits_k: tuple[int, ...] | None = None
    bits_v: tuple[int, ...] | None = None

    def bits(self, kind: str) -> tuple[int, ...] | None:
        """The widths of ``kind`` ("k" or "v"), or None."""
        return self.bits_k if kind == "k" else self.bits_v


@dataclass
class CompressionConfig:
    """Per-layer, per-KV-head compression settings (see the module docstring for the JSON schema)."""

    target_memory_reduction: float = 0.5
    d_head: int | None = None
    algo_default: str = "kvsplice"
    num_layers: int | None = None
    num_kv_heads: int | None = None
    sink_tokens: int = 0
    recent_window: int = 0
    latent_bits: int | str | None = None
    quant_group_size: int = 32
    key_rope_block: int | list[int] = 1
    per_layer_head: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Any) -> CompressionConfig:
        """Parse the JSON structure; checks types and keys, not the fit to a model (see :meth:`validate`)."""
        if not isinstance(data, dict):
            raise ConfigError("compression config must be a JSON object with 'global' and 'per_layer_head'")
        unknown = set(data) - {"global", "per_layer_head"}
        if unknown:
            raise ConfigError(f"unknown top-level key {sorted(unknown)[0]!r} in compression config")
        glob = data.get("global", {})
        if not isinstance(glob, dict):
            raise ConfigError("'global' must be a JSON object")
        bad = set(glob) - _GLOBAL_KEYS
        if bad:
            raise ConfigError(f"unknown key global.{sorted(bad)[0]} (known: {', '.join(sorted(_GLOBAL_KEYS))})")
        cfg = cls(
            target_memory_reduction=number(glob, "target_memory_reduction", 0.5),
            d_head=optional_int(glob, "d_head", minimum=1),
            algo_default=known_algo(glob.get("algo_default", "kvsplice"), "global.algo_default"),
            num_layers=optional_int(glob, "num_layers", minimum=1),
            num_kv_heads=optional_int(glob, "num_kv_heads", minimum=1),
            sink_tokens=optional_int(glob, "sink_tokens", minimum=0) or 0,
            recent_window=optional_int(glob, "recent_window", minimum=0) or 0,
            latent_bits=glob.get("latent_bits"),
            quant_group_size=optional_int(glob, "quant_group_size", minimum=1) or 32,
            key_rope_block=_rope_block(glob.get("key_rope_block", 1)),
        )
        if cfg.latent_bits not in LATENT_BITS or isinstance(cfg.latent_bits, bool):
            raise ConfigError(f'global.latent_bits = {cfg.latent_bits!r} must be one of 8, 4, 2, "fp8" or null')
        if not 0.0 <= cfg.target_memory_reduction < 1.0:
            raise ConfigError(
                f"global.target_memory_reduction = {cfg.target_memory_reduction} must be in [0, 1) "
                "(0.5 keeps half the cache)"
            )
        heads = data.get("per_layer_head", {})
        if not isinstance(heads, dict):
            raise ConfigError("'per_layer_head' must be a JSON object keyed \"layer/head\"")
        for key, entry in heads.items():
            cfg.per_layer_head[parse_head_key(key)] = parse_head_entry(key, entry)
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CompressionConfig:
        """Read a config file; unreadable or malformed JSON is a one-line :class:`ConfigError`."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read compression config {str(path)!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"compression config {str(path)!r} is not UTF-8 text (expected JSON)") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"compression config {str(path)!r} is not valid JSON: {exc}") from None
        except ValueError:  # an integer beyond Python's 4300-digit conversion limit: no field takes one
            raise ConfigError(
                f"compression config {str(path)!r} holds an integer too long to be a config value"
            ) from None
        except RecursionError:  # nesting deeper than Python's parser allows: not a config anyone wrote
            raise ConfigError(f"compression config {str(path)!r} is nested too deeply to be a config") from None
        return cls.from_dict(data)

    @classmethod
    def uniform(  # the three geometry numbers, then the fields of the one head spec every head gets (keywords)
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rank: int | None = None,
        rank_k: int | None = None,
        rank_v: int | None = None,
        algo: str = "kvsplice",
        sink_tokens: int = 0,
        recent_window: int = 0,
        latent_bits: int | str | None = None,
        list_heads: bool = True,
    ) -> CompressionConfig:
        """One rank for every head (``rank`` or separate ``rank_k``/``rank_v``), listed head by head."""
        rank_k = rank_k if rank_k is not None else rank
        rank_v = rank_v if rank_v is not None else rank
        if rank_k is None or rank_v is None:
            raise ConfigError("uniform config needs --rank (or both --rank-k and --rank-v)")
        reduction = 1.0 - (rank_k + rank_v) / (2 * head_dim)
        cfg = cls(
            target_memory_reduction=round(max(reduction, 0.0), 6),
            d_head=head_dim,
            algo_default=known_algo(algo, "algo"),
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            sink_tokens=sink_tokens,
            recent_window=recent_window,
            latent_bits=latent_bits,
        )
        if list_heads:
            for layer in range(num_layers):
                for head in range(num_kv_heads):
                    cfg.per_layer_head[(layer, head)] = {
                        "enabled": True,
                        "algo": cfg.algo_default,
                        "rank_k": rank_k,
                        "rank_v": rank_v,
                    }
        return cfg

    @classmethod
    def full_rank_int4(
        cls, num_layers: int, num_kv_heads: int, head_dim: int, algo: str = "kvsplice"
    ) -> CompressionConfig:
        """The default before per-direction widths (kept as a baseline that needs no sensitivity pass).

        Keys and values keep every direction: the PCA basis decorrelates and whitens each head before
        int4 storage with per-token scales (groups of 64 channels), and the first 4 tokens (attention sinks) and
        the newest 16 stay exact. Measured on the embedded default, chunked (bf16, an AVX512-BF16 CPU): +1.40 %
        perplexity at 28.8 % of an fp16 cache with 2048-token windows, +1.0 to +2.1 % at 30.9 % with 512.
        The default now is :data:`RECOMMENDED`: a width per principal direction, allocated by the model's Fisher.
        """
        config = cls.uniform(
            num_layers,
            num_kv_heads,
            head_dim,
            rank_k=head_dim,
            rank_v=head_dim,
            algo=algo,
            sink_tokens=4,
            recent_window=16,
            latent_bits=4,
        )
        config.quant_group_size = 64
        return config

    # ------------------------------------------------------------------ queries
    def rope_blocks(self, num_layers: int | None = None) -> tuple[int, ...]:
        """Per layer, the ``key_rope_block`` its keys are coded with (``num_layers`` default: the config's own)."""
        count = self.num_layers if num_layers is None else num_layers
        if isinstance(self.key_rope_block, int):
            if count is None:
                raise ConfigError("global.num_layers is missing: write it or pass the model's number of layers")
            return (self.key_rope_block,) * count
        if count is not None and len(self.key_rope_block) != count:
            raise ConfigError(
                f"global.key_rope_block lists {len(self.key_rope_block)} layers but the model has {count}"
            )
        return tuple(self.key_rope_block)

    def default_rank(self, head_dim: int) -> int:
        """Rank of heads not listed: ``round(d_head * (1 - target_memory_reduction))``, at least 1."""
        return max(1, min(head_dim, int(round(head_dim * (1.0 - self.target_memory_reduction)))))

    def head(self, layer: int, head: int, head_dim: int | None = None) -> HeadSpec:
        """The resolved spec of one head: its listed entry, else the global default."""
        head_dim = head_dim or self.d_head
        if head_dim is None:
            raise ConfigError("global.d_head is missing: write it or build the compressor with the model's geometry")
        entry = self.per_layer_head.get((layer, head), {})
        default = self.default_rank(head_dim)
        rank = entry.get("rank", default)
        bits_k, bits_v = entry.get("bits_k"), entry.get("bits_v")
        return HeadSpec(
            enabled=bool(entry.get("enabled", True)),
            algo=entry.get("algo", self.algo_default),
            rank_k=stored_rank(bits_k) if bits_k is not None else int(entry.get("rank_k", rank)),
            rank_v=stored_rank(bits_v) if bits_v is not None else int(entry.get("rank_v", rank)),
            bits_k=None if bits_k is None else tuple(bits_k),
            bits_v=None if bits_v is None else tuple(bits_v),
        )

    def uses_widths(self, kind: str) -> bool:
        """True when the heads of ``kind`` ("k" or "v") carry per-direction widths."""
        return any(entry.get(f"bits_{kind}") is not None for entry in self.per_layer_head.values())

    def heads(self, num_layers: int, num_kv_heads: int, head_dim: int) -> Iterator[tuple[int, int, HeadSpec]]:
        """Every (layer, head, spec) of a model of this geometry."""
        for layer in range(num_layers):
            for head in range(num_kv_heads):
                yield layer, head, self.head(layer, head, head_dim)

    def with_algo(self, algo: str) -> CompressionConfig:
        """A copy in which every head uses ``algo`` (what ``--compressor`` means)."""
        algo = known_algo(algo, "--compressor")
        copy = CompressionConfig.from_dict(self.to_dict())
        copy.algo_default = algo
        for entry in copy.per_layer_head.values():
            entry["algo"] = algo
        return copy

    def memory_reduction(self, num_layers: int, num_kv_heads: int, head_dim: int) -> float:
        """Fraction of K/V numbers saved by the latents, ignoring exact sink/recent tokens and storage dtype.

        A direction with a width counts as ``width / 16`` of a number, so for width configs this is the saving
        against an fp16 cache at long context (packing padding aside).
        """
        kept = 0.0
        for _, _, spec in self.heads(num_layers, num_kv_heads, head_dim):
            if not spec.enabled:
                kept += 2 * head_dim
                continue
            for kind, rank in (("k", spec.rank_k), ("v", spec.rank_v)):
                bits = spec.bits(kind)
                kept += rank if bits is None else sum(bits) / EXACT
        return 1.0 - kept / (2 * head_dim * num_layers * num_kv_heads)

    # ------------------------------------------------------------------ validation and output
    def validate(self, num_layers: int, num_kv_heads: int, head_dim: int) -> CompressionConfig:
        """Check the config against a model's geometry and fill in the geometry fields; returns ``self``."""
        if self.d_head is not None and self.d_head != head_dim:
            raise ConfigError(f"global.d_head = {self.d_head} but the model's head_dim is {head_dim}")
        if self.num_layers is not None and self.num_layers != num_layers:
            raise ConfigError(f"global.num_layers = {self.num_layers} but the model has {num_layers} layers")
        if self.num_kv_heads is not None and self.num_kv_heads != num_kv_heads:
            raise ConfigError(f"global.num_kv_heads = {self.num_kv_heads} but the model has {num_kv_heads} KV heads")
        for (layer, head), entry in self.per_layer_head.items():
            key = f'per_layer_head["{layer}/{head}"]'
            if layer >= num_layers:
                raise ConfigError(f"{key}: layer {layer} is out of range (the model has layers 0..{num_layers - 1})")
            if head >= num_kv_heads:
                raise ConfigError(f"{key}: KV head {head} is out of range (the model has heads 0..{num_kv_heads - 1})")
            for dim_key in ("d_k", "d_v"):
                if dim_key in entry and entry[dim_key] != head_dim:
                    raise ConfigError(f"{key}.{dim_key} = {entry[dim_key]} but the model's head_dim is {head_dim}")
            for rank_key in ("rank", "rank_k", "rank_v"):
                if rank_key in entry and not 1 <= entry[rank_key] <= head_dim:
                    raise ConfigError(f"{key}.{rank_key} = {entry[rank_key]} is outside 1..{head_dim} (the head_dim)")
            for kind in "kv":
                bits = entry.get(f"bits_{kind}")
                if bits is not None and len(bits) != head_dim:
                    raise ConfigError(
                        f"{key}.bits_{kind} has {len(bits)} widths but the model's head_dim is {head_dim} "
                        "(one width per principal direction)"
                    )
        self.rope_blocks(num_layers)  # one entry per layer when listed
        for kind in "kv":  # widths and ranks do not mix within K (or within V): every enabled head has widths or none
            if not self.uses_widths(kind):
                continue
            for layer, head, spec in self.heads(num_layers, num_kv_heads, head_dim):
                if spec.enabled and spec.bits(kind) is None:
                    raise ConfigError(
                        f'per_layer_head["{layer}/{head}"] lacks bits_{kind} while other heads have it: give every '
                        f"enabled head bits_{kind} (kvlight analyze --strategy bits writes them all) or none"
                    )
        self.d_head, self.num_layers, self.num_kv_heads = head_dim, num_layers, num_kv_heads
        return self

    def to_dict(self) -> dict[str, Any]:
        """The JSON structure (seed schema plus the optional keys)."""
        glob: dict[str, Any] = {
            "target_memory_reduction": self.target_memory_reduction,
            "d_head": self.d_head,
            "algo_default": self.algo_default,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "sink_tokens": self.sink_tokens,
            "recent_window": self.recent_window,
            "latent_bits": self.latent_bits,
            "quant_group_size": self.quant_group_size if self.latent_bits is not None else None,
            "key_rope_block": None if self.key_rope_block == 1 else _compact(self.key_rope_block),
        }
        glob = {k: v for k, v in glob.items() if v is not None}
        heads = {}
        for (layer, head), entry in sorted(self.per_layer_head.items()):
            out = dict(entry)
            if self.d_head is not None:
                out.setdefault("d_k", self.d_head)
                out.setdefault("d_v", self.d_head)
            if "rank" not in out and out.get("rank_k") is not None and out.get("rank_k") == out.get("rank_v"):
                out["rank"] = out.pop("rank_k")  # the upstream design's single `rank` when K and V agree
                del out["rank_v"]
            heads[f"{layer}/{head}"] = out
        return {"global": glob, "per_layer_head": heads}

    def to_json_text(self) -> str:
        """The JSON text: indented, one line per head (so widths lists stay readable)."""
        data = self.to_dict()
        heads = ",\n".join(
            f"    {json.dumps(key)}: {json.dumps(entry, separators=(', ', ': '))}"
            for key, entry in data["per_layer_head"].items()
        )
        glob = json.dumps(data["global"], indent=2).replace("\n", "\n  ")
        body = f"\n{heads}\n  " if heads else ""
        return f'{{\n  "global": {glob},\n  "per_layer_head": {{{body}}}\n}}\n'

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the config atomically (a temp file renamed into place)."""
        atomic_write_text(Path(path), self.to_json_text())


def key_rope_block_of(blocks: Sequence[int]) -> int | list[int]:
    """``global.key_rope_block`` for per-layer blocks: one number where every layer agrees."""
    return _compact(list(blocks) or [1])


def _rope_block(value: Any) -> int | list[int]:
    """``global.key_rope_block`` checked: a whole number of tokens >= 1, or a list of those (one per layer)."""
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 20  # noqa: E731
    if ok(value):
        return value
    if isinstance(value, list) and value and all(ok(v) for v in value):
        return _compact(list(value))
    raise ConfigError(
        f"global.key_rope_block = {value!r} must be a whole number of tokens >= 1 (1: keys before RoPE), or a list "
        "of those with one per layer"
    )


def _compact(value: int | list[int]) -> int | list[int]:
    """One number where every layer agrees."""
    if isinstance(value, list) and len(set(value)) == 1:
        return value[0]
    return value
