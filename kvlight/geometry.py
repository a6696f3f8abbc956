"""The KV geometry of a causal LM: what a compressor must agree with, read from the model's config."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from kvlight.errors import ModelLoadError

#: model_type -> family. Llama family: separate k_proj/v_proj, RoPE, grouped-query attention.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}


@dataclass(frozen=True)
class KVGeometry:
    """What a KV compressor must agree with: the shape of every layer's K and V.

    Keys and values reach the cache as ``[batch, num_kv_heads, seq, head_dim]`` in each of ``num_layers``.
    """

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KVGeometry:
        return cls(**{k: data[k] for k in ("model_type", "num_layers", "num_kv_heads", "head_dim", "rope")})


def kv_geometry(model: nn.Module) -> KVGeometry:
    """The KV geometry of a loaded model; unsupported architectures raise :class:`ModelLoadError`."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type {model_type!r} is not supported; kvlight supports {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    if SUPPORTED_MODEL_TYPES[model_type] == "gpt2":
        heads = config.n_head
        return KVGeometry(model_type, config.n_layer, heads, config.n_embd // heads, rope=False)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return KVGeometry(model_type, config.num_hidden_layers, kv_heads, head_dim, rope=True)
