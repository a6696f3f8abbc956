"""Compressed caches on disk: :meth:`~kvlight.serving.cache.CompressedCache.save` and :meth:`~kvlight.serving.wrapper.CompressedKVModelWrapper.load_cache`.

A saved cache is **one safetensors file**: its tensors are exactly what the cache stores for its ``length`` tokens
(exact sinks and recent window, row sinks, latent codes / scales / zero points / exact channels, positions), with no
buffer slack, and the safetensors header's ``__metadata__["kvlight"]`` is the small JSON that describes them: the
format name and version, the compressor's fingerprint (:meth:`~kvlight.compressors.compressor.KVCompressor.fingerprint`), its geometry, the cache
settings, per layer its scalars (``length``, ``decode_steps``, dtypes, the kind of each latent store), per tensor its
dtype, shape and coding, and a sha256 of the tensor bytes. One file, because one ``os.replace`` makes it appear whole
or not at all (two files could be seen half-updated); any safetensors reader lists its tensors and metadata.

With ``entropy="zstd"`` every tensor is stored as a uint8 blob compressed with ``zstandard`` (level
:data:`ZSTD_LEVEL`) after a lossless reordering of its bytes, chosen per tensor as the smallest of: as stored; the
last two axes swapped (each channel's values one run); byte planes; both (:data:`CODINGS`). What loads is
bit-identical to what was saved. Codes are close to incompressible (a cache's latents are decorrelated and quantized
near their entropy): on the embedded default at 2048 tokens zstd saves about 12 % of the file, most of it from the
exact bf16 tokens, scales and positions.

:func:`load_cache` refuses with one line (:class:`CacheFileError`, a :class:`~kvlight.errors.KVLightError`) a
truncated or damaged file, a file that is not a kvlight cache, another format version, another geometry, another
compressor (fingerprint), other cache settings, and tensors of the wrong shape or dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from pathlib import Path

import torch

from kvlight.errors import GeometryMismatchError, KVLightError
from kvlight.files import atomic_write_bytes

FORMAT = "kvlight-compressed-cache"
VERSION = 1
METADATA_KEY = "kvlight"
ENTROPY_CODINGS = (None, "zstd")
#: zstd level: 3 (zstd's default); on the embedded default's caches 9 saves 0.1 % more at 3x the time, 19 1.7 % at 80x.
ZSTD_LEVEL = 3

_DTYPES = {
    str(dtype): dtype
    for dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.uint8,
        torch.int32,
        torch.int64,
    )
}


class CacheFileError(KVLightError):
    """A saved compressed cache cannot be loaded: damaged, foreign, or saved for another model or compressor."""


# ---------------------------------------------------------------------------------------------------- save
def save_cache(cache, path, entropy: str | None = None) -> None:
    """Write ``cache`` (a :class:`~kvlight.serving.cache.CompressedCache`) to ``path`` atomically (see the module
    docstring for the format); ``entropy="zstd"`` adds lossless entropy coding (``pip install 'kvlight[disk]'``)."""
    if entropy not in ENTROPY_CODINGS:
        raise ValueError(f"entropy must be one of {ENTROPY_CODINGS}, got {entropy!r}")
    compressor = _zstd_compressor() if entropy == "zstd" else None
    layers, tensors = [], {}
    for index, layer in enumerate(cache.layers):
        scalars, state = _export_layer(layer)
        layers.append(scalars)
        tensors.update({f"layers.{index}.{name}": t for name, t in state.items()})
    positions = cache.position_log.positions
    if positions is not None:
        tensors["positions"] = positions.to(torch.int32)
    tables = cache.position_log.tables  # dynamic rope: the (cos, sin) each token arrived with, not recomputable
    if tables is not None:
        tensors["rope_tables.cos"], tensors["rope_tables.sin"] = tables
    entries, stored = {}, {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        entries[name] = {"dtype": str(tensor.dtype), "shape": list(tensor.shape)}
        if compressor is None:
            stored[name] = tensor
        else:
            coding, blob = _smallest_coding(tensor, compressor)
            entries[name]["coding"] = coding
            stored[name] = blob
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": cache.compressor.fingerprint(),
        "geometry": _geometry(cache.compressor),
        "settings": _settings(cache.settings),
        "entropy": entropy,
        "layers": layers,
        "tensors": entries,
        "sha256": _digest(stored),
    }
    from safetensors.torch import save

    atomic_write_bytes(
        Path(path), save(stored, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True, separators=(",", ":"))})
    )


def _export_layer(layer) -> tuple[dict, dict[str, torch.Tensor]]:
    """One layer's scalars (JSON) and stored tensors ``{name: tensor}`` (the ``length`` tokens only)."""
    if not layer.is_initialized:
        return {"initialized": False}, {}
    scalars = {
        "initialized": True,
        "length": layer.length,
        "decode_steps": layer.decode_steps,
        "dtype": str(layer.dtype),
        "store_dtype": str(layer.store_dtype),
        "compressed": layer.num_compressed,
        "row_sinks": layer.row_sink_slot is not None,
        "stores": {kind: _store_kind(store) for kind, store in (("k", layer.latent_k), ("v", layer.latent_v))},
    }
    return scalars, layer.export_state()


def _store_kind(store) -> str:
    """How a latent store holds its latents: ``plain``, ``group-<bits>`` or ``widths``."""
    if store.quantizer is None:
        return "plain"
    return "widths" if store.widths else f"group-{store.quantizer.bits}"


def _geometry(compressor) -> dict:
    geometry = compressor.geometry
    return {f.name: getattr(geometry, f.name) for f in dataclasses.fields(geometry)}


def _settings(settings) -> dict:
    """The resolved :class:`~kvlight.serving.layer.LayerSettings` as JSON values (dtypes as their names)."""
    out = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        out[field.name] = str(value) if isinstance(value, torch.dtype) else value
    return out


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (as written), in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- entropy coding
def _zstd():
    try:
        import zstandard
    except ImportError:
        raise CacheFileError("entropy='zstd' needs the zstandard package: pip install 'kvlight[disk]'") from None
    return zstandard


def _zstd_compressor():
    return _zstd().ZstdCompressor(level=ZSTD_LEVEL)


#: reorderings of a tensor's bytes before zstd: ``T`` the last two axes swapped (for ``[B, T, C]`` latents and
#: ``[B, H, T, D]`` exact tokens, every channel's values become one run, so zstd's per-block Huffman tables see few
#: channels' distributions instead of all mixed), ``S`` byte planes (the high bytes of 16-bit floats, sign and
#: exponent, are nearly constant). Measured on the embedded default at 2048 tokens: unpacking codes to one per byte
#: never won (a packed byte's joint distribution codes at least as well), levels above 3 gain under 0.2 %.
CODINGS = ("", "T", "S", "TS")


def _reordered(tensor: torch.Tensor, coding: str) -> bytes:
    """The bytes of ``tensor`` reordered by ``coding`` (see :data:`CODINGS`)."""
    if "T" in coding:
        tensor = tensor.transpose(-1, -2)
    data = tensor.contiguous().reshape(-1).view(torch.uint8)
    if "S" in coding:
        data = data.view(-1, tensor.element_size()).t()
    return data.contiguous().numpy().tobytes()


def _restored(data: bytes, dtype: torch.dtype, shape: list[int], coding: str) -> torch.Tensor:
    """The tensor ``[*shape]`` of ``dtype`` back from the bytes :func:`_reordered` gave for ``coding``."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    if "S" in coding:
        raw = raw.view(torch.empty((), dtype=dtype).element_size(), -1).t().contiguous()
    tensor = raw.reshape(-1).view(dtype)
    if "T" in coding:
        return tensor.reshape(shape[:-2] + [shape[-1], shape[-2]]).transpose(-1, -2).contiguous()
    return tensor.reshape(shape)


def _smallest_coding(tensor: torch.Tensor, compressor) -> tuple[str, torch.Tensor]:
    """The coding of ``tensor`` whose zstd frame is smallest, and that frame as a uint8 tensor."""
    candidates = []
    for coding in CODINGS:
        if ("T" in coding and tensor.dim() < 2) or ("S" in coding and tensor.element_size() == 1):
            continue
        frame = compressor.compress(_reordered(tensor, coding))
        candidates.append((len(frame), coding, frame))
    _, coding, frame = min(candidates, key=lambda c: c[0])
    return coding, torch.frombuffer(bytearray(frame), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------------- load
def load_cache(path, cache):
    """Fill ``cache`` (a fresh, empty :class:`~kvlight.serving.cache.CompressedCache` bound to the model) with what
    :func:`save_cache` wrote to ``path``, on the compressor's device, and return it; refuse with one line
    (:class:`CacheFileError`) anything it cannot restore exactly."""
    path = Path(path)
    metadata, stored = _read(path)
    _check_identity(path, metadata, cache)
    _check_tensor_list(path, metadata, stored)
    device = _device(cache.compressor)
    batch = _batch(path, metadata)
    for layer, scalars in zip(cache.layers, metadata["layers"]):
        if scalars.get("initialized"):
            _init_layer(path, layer, scalars, cache.compressor.geometry, batch, device)
    tensors = {name: _decoded(path, name, metadata, stored[name]) for name in stored}
    for index, (layer, scalars) in enumerate(zip(cache.layers, metadata["layers"])):
        if not scalars.get("initialized"):
            continue
        prefix = f"layers.{index}."
        state = {name[len(prefix) :]: t.to(device) for name, t in tensors.items() if name.startswith(prefix)}
        _import_layer(path, layer, scalars, state)
    _restore_positions(path, cache, tensors.get("positions"), metadata, device)
    _restore_tables(path, cache, tensors.get("rope_tables.cos"), tensors.get("rope_tables.sin"), device)
    return cache


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The kvlight metadata and the tensors as written (uint8 blobs when entropy-coded) of ``path``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CacheFileError(f"cannot read saved cache {str(path)!r}: {exc.strerror or exc}") from None
    header = _safetensors_header(path, data)
    raw = header.get("__metadata__", {}).get(METADATA_KEY) if isinstance(header.get("__metadata__"), dict) else None
    if raw is None:
        raise CacheFileError(f"{str(path)!r} is a safetensors file but not a kvlight cache (no kvlight metadata)")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError:
        raise CacheFileError(f"{str(path)!r}: its kvlight metadata is not valid JSON") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise CacheFileError(f"{str(path)!r} is not a kvlight compressed cache (format {found!r})")
    if metadata.get("version") != VERSION:
        raise CacheFileError(
            f"{str(path)!r} has cache format version {metadata.get('version')!r}; this kvlight reads version {VERSION}"
        )
    from safetensors.torch import load

    try:
        stored = load(data)
    except Exception as exc:  # the header parsed and the sizes add up; anything else is damage
        raise CacheFileError(f"{str(path)!r} is damaged: {exc}") from None
    if _digest(stored) != metadata.get("sha256"):
        raise CacheFileError(f"{str(path)!r} is damaged: its tensors do not match the sha256 it was saved with")
    return metadata, stored


def _safetensors_header(path: Path, data: bytes) -> dict:
    """The safetensors header of ``data``, checked to describe exactly ``len(data)`` bytes (a truncated file fails)."""
    name = str(path)
    if len(data) < 8:
        raise CacheFileError(f"{name!r} is not a kvlight cache: {len(data)} bytes, too short for a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise CacheFileError(f"{name!r} is truncated or not a kvlight cache: its header claims {size} bytes")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CacheFileError(f"{name!r} is not a kvlight cache (no safetensors header)") from None
    if not isinstance(header, dict):
        raise CacheFileError(f"{name!r} is not a kvlight cache (no safetensors header)")
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise CacheFileError(f"{name!r} is not a kvlight cache (not a safetensors header)") from None
    expected = 8 + size + max(ends, default=0)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "damaged (trailing bytes)"
        raise CacheFileError(f"{name!r} is {state}: {len(data)} bytes, its header describes {expected}")
    return header


def _check_identity(path: Path, metadata: dict, cache) -> None:
    """Same geometry, same compressor (fingerprint), same settings, same number of layers."""
    name = str(path)
    geometry = _geometry(cache.compressor)
    if metadata.get("geometry") != geometry:
        raise GeometryMismatchError(
            f"{name!r} was saved for geometry {metadata.get('geometry')}; this model's is {geometry}"
        )
    fingerprint = cache.compressor.fingerprint()
    if metadata.get("fingerprint") != fingerprint:
        raise CacheFileError(
            f"{name!r} was saved with another compressor (fingerprint {str(metadata.get('fingerprint'))[:12]}..., "
            f"this wrapper's is {fingerprint[:12]}...): load it with the compressor that made it"
        )
    settings = _settings(cache.settings)
    if metadata.get("settings") != settings:
        differ = sorted(k for k in settings if metadata.get("settings", {}).get(k) != settings[k])
        raise CacheFileError(
            f"{name!r} was saved with other cache settings ({', '.join(differ)}): "
            f"saved { ({k: metadata['settings'].get(k) for k in differ}) }, this cache has { ({k: settings[k] for k in differ}) }"
        )
    if not isinstance(metadata.get("layers"), list) or len(metadata["layers"]) != len(cache.layers):
        raise CacheFileError(f"{name!r}: its layer list does not match the {len(cache.layers)} layers of this model")
    if metadata.get("entropy") not in ENTROPY_CODINGS:
        raise CacheFileError(f"{name!r}: unknown entropy coding {metadata.get('entropy')!r}")


def _check_tensor_list(path: Path, metadata: dict, stored: dict) -> None:
    entries = metadata.get("tensors")
    if not isinstance(entries, dict) or set(entries) != set(stored):
        raise CacheFileError(f"{str(path)!r}: its tensors do not match the list in its metadata")
    for name, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
            raise CacheFileError(f"{str(path)!r}: tensor {name!r} has an unsupported dtype in its metadata")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise CacheFileError(f"{str(path)!r} has bad shapes: tensor {name!r} has shape {shape!r} in its metadata")


def _device(compressor) -> torch.device:
    for tensor in compressor.state_dict().values():
        return tensor.device
    return torch.device("cpu")


def _batch(path: Path, metadata: dict) -> int:
    """Rows of the saved cache (every stored tensor's first dimension)."""
    # Rotation tables may hold one row for the whole batch (every row at the same positions).
    shapes = [
        e["shape"] for name, e in metadata["tensors"].items() if e["shape"] and not name.startswith("rope_tables.")
    ]
    if not shapes:
        return 0
    batches = {shape[0] for shape in shapes}
    if len(batches) != 1:
        raise CacheFileError(f"{str(path)!r} has bad shapes: tensors of different batch sizes {sorted(batches)}")
    return batches.pop()


def _init_layer(path: Path, layer, scalars: dict, geometry, batch: int, device: torch.device) -> None:
    """Run the layer's lazy initialization with empty K/V of the saved dtype, as its first update would."""
    dtype = _DTYPES.get(scalars.get("dtype"))
    if dtype is None:
        raise CacheFileError(f"{str(path)!r}: layer {layer.layer_idx} has unsupported dtype {scalars.get('dtype')!r}")
    empty = torch.zeros(batch, geometry.num_kv_heads, 0, geometry.head_dim, dtype=dtype, device=device)
    layer.lazy_initialization(empty, empty.clone())
    kinds = {kind: _store_kind(store) for kind, store in (("k", layer.latent_k), ("v", layer.latent_v))}
    if scalars.get("stores") != kinds or scalars.get("store_dtype") != str(layer.store_dtype):
        raise CacheFileError(
            f"{str(path)!r}: layer {layer.layer_idx} stores {scalars.get('stores')} in {scalars.get('store_dtype')}, "
            f"this cache {kinds} in {layer.store_dtype}"
        )


def _decoded(path: Path, name: str, metadata: dict, stored: torch.Tensor) -> torch.Tensor:
    """The tensor ``name`` as the cache held it (entropy coding undone)."""
    entry = metadata["tensors"][name]
    shape, dtype = list(entry["shape"]), _DTYPES[entry["dtype"]]
    if metadata["entropy"] is None:
        if list(stored.shape) != shape or stored.dtype != dtype:
            raise CacheFileError(f"{str(path)!r} has bad shapes: tensor {name!r} does not match its metadata")
        return stored
    coding = entry.get("coding")
    if coding not in CODINGS:
        raise CacheFileError(f"{str(path)!r}: tensor {name!r} has unknown coding {coding!r}")
    zstandard = _zstd()
    try:
        data = zstandard.ZstdDecompressor().decompress(stored.numpy().tobytes())
    except zstandard.ZstdError as exc:
        raise CacheFileError(f"{str(path)!r}: tensor {name!r} cannot be decompressed: {exc}") from None
    needed = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(data) != needed:
        raise CacheFileError(
            f"{str(path)!r} has bad shapes: tensor {name!r} holds {len(data)} bytes, {shape} needs {needed}"
        )
    return _restored(data, dtype, shape, coding)


def _import_layer(path: Path, layer, scalars: dict, state: dict[str, torch.Tensor]) -> None:
    try:
        layer.import_state(state, int(scalars["length"]), int(scalars["decode_steps"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheFileError(f"{str(path)!r} has bad shapes: layer {layer.layer_idx}: {exc}") from None


def _restore_positions(path: Path, cache, positions: torch.Tensor | None, metadata: dict, device) -> None:
    """Positions ``[B, N]`` of a RoPE model's cache (none for learned positions)."""
    rope = cache.tracker is not None
    length = cache.get_seq_length()
    if rope and length and (positions is None or positions.dim() != 2 or positions.shape[1] != length):
        got = None if positions is None else list(positions.shape)
        raise CacheFileError(f"{str(path)!r} has bad shapes: positions {got}, expected [batch, {length}]")
    if positions is not None and positions.dtype != torch.int32:
        raise CacheFileError(f"{str(path)!r} has bad shapes: positions are {positions.dtype}, expected torch.int32")
    cache.position_log.restore(positions.to(device) if rope and positions is not None else None)


def _restore_tables(path: Path, cache, cos: torch.Tensor | None, sin: torch.Tensor | None, device) -> None:
    """The arrival rotation tables ``(cos, sin) [B|1, N, D_rot/2]`` of a dynamic-rope cache (none otherwise)."""
    log = cache.position_log
    dynamic = log.tracker is not None and log.tracker.dynamic
    if (
        (cos is None) != (sin is None)
        or (cos is not None and not dynamic)
        or (dynamic and cos is None and log.positions is not None)
    ):
        raise CacheFileError(
            f"{str(path)!r} does not match this model's rope: rotation tables {'present' if cos is not None else 'absent'} "
            f"for a {'dynamic' if dynamic else 'static'} rope; load it with the model it was saved from"
        )
    if cos is None:
        return
    length = 0 if log.positions is None else log.positions.shape[1]
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1] != length:
        raise CacheFileError(
            f"{str(path)!r} has bad shapes: rotation tables {list(cos.shape)}, expected [batch, {length}, pairs]"
        )
    log.restore(log.positions, (cos.to(device), sin.to(device)))
