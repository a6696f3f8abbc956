"""Reading a compression config's JSON fields: each check raises a one-line ConfigError naming the key."""

from __future__ import annotations

import math
from typing import Any

from kvlight.compressors.registry import backend_names
from kvlight.compressors.widths import check_widths
from kvlight.errors import ConfigError

#: keys a head entry may hold.
HEAD_KEYS = {"enabled", "rank", "rank_k", "rank_v", "algo", "d_k", "d_v", "bits_k", "bits_v"}


# ---------------------------------------------------------------------- parsing helpers
def number(section: dict, key: str, default: float) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"global.{key} must be a finite number, got {value!r}")
    return float(value)


def optional_int(section: dict, key: str, minimum: int) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"global.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def known_algo(value: Any, where: str) -> str:
    known = backend_names()
    if value not in known:
        raise ConfigError(f"{where} = {value!r} is not a known algo (known: {', '.join(known)})")
    return value


def parse_head_key(key: Any) -> tuple[int, int]:
    parts = str(key).split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f'per_layer_head key {key!r} must look like "layer/head", e.g. "0/1"')
    return int(parts[0]), int(parts[1])


def parse_head_entry(key: str, entry: Any) -> dict[str, Any]:
    where = f'per_layer_head["{key}"]'
    if not isinstance(entry, dict):
        raise ConfigError(f'{where} must be a JSON object like {{"rank": 32}}')
    bad = set(entry) - HEAD_KEYS
    if bad:
        raise ConfigError(f"unknown key {where}.{sorted(bad)[0]} (known: {', '.join(sorted(HEAD_KEYS))})")
    out: dict[str, Any] = {}
    if "enabled" in entry:
        if not isinstance(entry["enabled"], bool):
            raise ConfigError(f"{where}.enabled must be true or false, got {entry['enabled']!r}")
        out["enabled"] = entry["enabled"]
    if "algo" in entry:
        out["algo"] = known_algo(entry["algo"], f"{where}.algo")
    for kind in "kv":
        name = f"bits_{kind}"
        if name not in entry:
            continue
        try:
            out[name] = list(check_widths(entry[name], f"{where}.{name}"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        clash = [key for key in ("rank", f"rank_{kind}") if key in entry]
        if clash:
            raise ConfigError(
                f"{where} has both {name} and {clash[0]}: widths replace the rank (a width of 0 drops a direction); "
                f"use rank_{'v' if kind == 'k' else 'k'} for the other kind"
            )
    for name in ("rank", "rank_k", "rank_v", "d_k", "d_v"):
        if name in entry:
            value = entry[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}.{name} must be a positive integer, got {value!r}")
            out[name] = value
    return out
