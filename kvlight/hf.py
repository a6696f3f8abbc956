"""Every name that depends on the transformers version (tested: 5.20-5.23; see pyproject.toml).

What moves between releases lives here and nowhere else: the keyword a model takes its cache under (``past_key_values``
up to 5.23, ``cache`` from 5.24), the cache base classes kvlight's caches subclass, how a custom attention function and
its mask function are registered, how a model's attention implementation is read and switched, the eager attention
function of a modeling file, how a rotary module is called for ``(cos, sin)``, and how a model computes its logits at
some positions only.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

__all__ = [
    "CACHE_KWARG",
    "Cache",
    "DynamicCache",
    "DynamicLayer",
    "attention_implementation",
    "cache_kwargs",
    "default_cache",
    "default_cache_windows",
    "dynamic_cache",
    "gguf_architectures",
    "gguf_model_type",
    "logits_at",
    "original_attention",
    "pipeline_for",
    "quantized_cache",
    "register_attention",
    "rope_layers",
    "rotary_call_layer_type",
    "rotary_cos_sin",
    "rotary_cos_sin_of",
    "rotary_dynamic_any",
    "rotary_function",
    "rotary_is_dynamic",
    "rotary_layer_types",
    "set_attention",
]

#: keyword under which a model's forward takes a cache, for the pinned transformers range.
CACHE_KWARG = "past_key_values"


def cache_kwargs(cache: Cache | None) -> dict:
    """``{CACHE_KWARG: cache, 'use_cache': ...}`` for ``model(...)`` / ``model.generate(...)``."""
    return {CACHE_KWARG: cache, "use_cache": cache is not None}


def logits_at(model: nn.Module, positions: torch.Tensor | None, **inputs) -> torch.Tensor:
    """``model(**inputs).logits`` at ``positions`` only: ``[B, P, V]`` for a 1-D ``positions [P]`` (None: every
    position, ``[B, T, V]``).

    Why: the vocabulary projection and a softmax over it cost as much as the layers below them at a few thousand
    tokens on a small model. A causal LM whose forward takes ``logits_to_keep`` (transformers >= 4.50) projects only the
    kept positions; another computes every logit and the kept ones are taken from them (same values).
    """
    if positions is None:
        return model(**inputs).logits
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(**inputs, logits_to_keep=positions).logits
    return model(**inputs).logits[:, positions]


def dynamic_cache() -> DynamicCache:
    """A plain uncompressed cache, the reference everything is compared against."""
    return DynamicCache()


def default_cache(config) -> DynamicCache:
    """The cache transformers gives this model when none is passed, ``DynamicCache(config=config)``: sliding layers
    keep their window only (``DynamicSlidingWindowLayer``)."""
    return DynamicCache(config=config)


def quantized_cache(config, backend: str = "quanto", nbits: int = 4, group_size: int = 64, residual: int = 16):
    """transformers' ``QuantizedCache``: K/V quantized to ``nbits`` by ``backend`` (``quanto`` needs optimum-quanto,
    ``hqq`` needs hqq) in groups of ``group_size``, the last ``residual`` tokens kept exact; the baseline the
    benchmarks and ``kvlight eval`` compare against."""
    from transformers.cache_utils import QuantizedCache

    return QuantizedCache(
        backend=backend, config=config, nbits=nbits, q_group_size=group_size, residual_length=residual
    )


def attention_implementation(model: nn.Module) -> str:
    """The attention implementation a model runs (``sdpa``, ``eager``, ...)."""
    return getattr(model.config, "_attn_implementation", None) or "eager"


def set_attention(model: nn.Module, name: str) -> None:
    """Switch a model to the attention implementation registered as ``name``."""
    model.set_attn_implementation(name)


def register_attention(name: str, forward, mask_of: str) -> None:
    """Register an attention function as ``name``, with the mask function of implementation ``mask_of`` (without a
    mask function of its own transformers would silently drop the mask)."""
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_of])


def original_attention(name: str, module: nn.Module):
    """The attention function of implementation ``name`` for ``module`` (each modeling file has its own eager one)."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def rotary_cos_sin(rotary: nn.Module, probe, position_ids):
    """``(cos, sin)`` of a model's rotary module for ``position_ids`` (``probe`` gives their dtype and device)."""
    return rotary(probe, position_ids=position_ids)


def rotary_function(rotary: nn.Module):
    """The ``apply_rotary_pos_emb(q, k, cos, sin)`` of the modeling file that defines ``rotary`` (None if it has none):
    it knows the file's layout (half-split or interleaved) and partial rotary."""
    return getattr(sys.modules[type(rotary).__module__], "apply_rotary_pos_emb", None)


def rotary_is_dynamic(rotary: nn.Module) -> bool:
    """True when ``rotary``'s frequencies change with the sequence length (transformers' ``dynamic_rope_update``:
    ``dynamic`` NTK and ``longrope``), so a position's ``(cos, sin)`` depends on when its token arrived."""
    rope_type = getattr(rotary, "rope_type", "default")
    return isinstance(rope_type, str) and ("dynamic" in rope_type or rope_type == "longrope")


def rope_layers(blocks) -> list[bool]:
    """Per decoder block, whether its attention rotates keys (SmolLM3's NoPE layers set ``self_attn.use_rope``)."""
    return [bool(getattr(getattr(block, "self_attn", None), "use_rope", True)) for block in blocks]


#: GGUF architectures transformers renames on load (modeling_gguf_pytorch_utils.load_gguf_checkpoint), then the text
#: model types its config becomes (``gemma3`` loads as ``gemma3_text``).
_GGUF_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
#: keys of transformers' GGUF config mapping that are sections, not architectures.
_GGUF_SECTIONS = {"general", "tokenizer"}


def gguf_architectures() -> list[str]:
    """The GGUF ``general.architecture`` values transformers can load (``GGUF_SUPPORTED_ARCHITECTURES``, sections
    such as ``general`` left out), sorted."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _GGUF_SECTIONS)


def gguf_model_type(architecture: str) -> str | None:
    """The transformers ``model_type`` a GGUF of ``general.architecture`` ``architecture`` loads as, or None when
    transformers cannot load that architecture from GGUF."""
    supported = set(gguf_architectures())
    renamed = _GGUF_RENAMES.get(architecture, architecture)
    if architecture not in supported and renamed not in supported:
        return None
    return _GGUF_MODEL_TYPES.get(renamed, renamed)


def default_cache_windows(config) -> list[int | None]:
    """Per decoder layer, the tokens transformers' default cache (``DynamicCache(config=config)``) keeps a window of:
    the ``sliding_window`` of a layer it gives a ``DynamicSlidingWindowLayer`` (which holds the last
    ``sliding_window - 1`` tokens between forwards), None for a layer that keeps every token."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(config)
    except (ImportError, AttributeError):  # older releases: layer_types / sliding_window, as their DynamicCache read
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * (
            config.num_hidden_layers
        )
        return [window if kind == "sliding_attention" else None for kind in types]
    return [
        layer_kwargs.get("sliding_window") if kind == "sliding_attention" else None
        for kind, layer_kwargs in zip(types, kwargs, strict=True)
    ]


def rotary_layer_types(rotary: nn.Module, config) -> list[str] | None:
    """Per decoder layer, the ``layer_type`` a rotary module that takes one (Gemma 3: one module, a rope base per
    layer type) is called with for that layer (``config.layer_types``); None for a rotary module without the argument."""
    import inspect

    try:
        takes = "layer_type" in inspect.signature(rotary.forward).parameters
    except (TypeError, ValueError):
        takes = False
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(config, "layer_types", None)
    return list(types) if takes and types else None


def rotary_cos_sin_of(rotary: nn.Module, probe, position_ids, layer_type: str | None):
    """``(cos, sin)`` of a model's rotary module for ``position_ids`` and, for a module that takes one (see
    :func:`rotary_layer_types`), the ``layer_type`` of the layer they rotate (Gemma 3 calls it positionally)."""
    if layer_type is None:
        return rotary_cos_sin(rotary, probe, position_ids)
    return rotary(probe, position_ids, layer_type)


def rotary_call_layer_type(args: tuple, kwargs: dict) -> str | None:
    """The ``layer_type`` a call of a rotary module passed (third positional argument or keyword), or None."""
    return kwargs.get("layer_type", args[2] if len(args) > 2 else None)


def rotary_dynamic_any(rotary: nn.Module) -> bool:
    """:func:`rotary_is_dynamic` for a module whose ``rope_type`` is one per layer type (a dict): any of them."""
    rope_type = getattr(rotary, "rope_type", "default")
    if isinstance(rope_type, dict):
        return any(isinstance(t, str) and ("dynamic" in t or t == "longrope") for t in rope_type.values())
    return rotary_is_dynamic(rotary)


def pipeline_for(model: nn.Module, task: str, **kwargs):
    """``transformers.pipeline(task, model=model, **kwargs)`` for a model-like object that is not a
    ``PreTrainedModel`` subclass (kvlight's wrapper), without the error transformers logs for a class name missing from
    its task mapping: the check is by name only, and the pipeline runs the object's ``generate``/``forward``."""
    import logging

    from transformers import pipeline

    checker = logging.getLogger("transformers.pipelines.base")
    level = checker.level
    checker.setLevel(logging.CRITICAL)
    try:
        return pipeline(task, model=model, **kwargs)
    finally:
        checker.setLevel(level)
