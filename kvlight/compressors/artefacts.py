"""A compressor on disk: safetensors weights plus a JSON naming its config, geometry and backend options.

:meth:`KVCompressor.save_pretrained <kvlight.compressors.compressor.KVCompressor.save_pretrained>` writes them
(each atomically) through :func:`write_files`; :func:`kvlight.compressors.compressor.load_compressor` reads them back
through :func:`read_description` and :func:`read_weights`, which refuse with one line anything that is not what was
written: a malformed description, an unreadable file, NaN or inf weights, weights whose sha256 is not the one the
description records (a flipped byte would otherwise load silently, and a kill between the two renames would pair
new weights with an old description).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kvlight.compressors.registry import backend
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError, KVLightError
from kvlight.files import atomic_write_bytes, atomic_write_text
from kvlight.geometry import KVGeometry

WEIGHTS_NAME = "compressor.safetensors"
CONFIG_NAME = "compressor_config.json"
FORMAT = "kvlight-compressor/1"


def write_files(directory: Path, state: dict[str, torch.Tensor], description: dict) -> None:
    """``compressor.safetensors`` (``state``) and ``compressor_config.json`` (``description`` and the weights'
    sha256), each atomically and with the umask's mode, like every other file kvlight writes."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    blob = save(state, metadata={"format": "pt"})
    atomic_write_bytes(Path(directory) / WEIGHTS_NAME, blob)
    described = {**description, "format": FORMAT, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(described, indent=2) + "\n")


def read_description(directory: Path) -> tuple[CompressionConfig, KVGeometry | None, dict]:
    """``(config, fitted geometry or None, backend options)`` from ``compressor_config.json``."""
    where = Path(directory) / CONFIG_NAME
    try:
        described = json.loads(where.read_text())
    except OSError as exc:
        raise KVLightError(f"cannot read {where}: {exc.strerror or exc}; is this a compressor directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KVLightError(f"{where} is not valid JSON: {exc}") from None
    except ValueError:  # json's refusal of an integer over sys.get_int_max_str_digits() digits
        raise KVLightError(f"{where} holds an integer too long to be a compressor value") from None
    except RecursionError:
        raise KVLightError(f"{where} is nested too deeply to be a compressor description") from None
    if not isinstance(described, dict) or described.get("format") != FORMAT:
        raise KVLightError(f"{where} is not a kvlight compressor description")
    config = CompressionConfig.from_dict(described.get("compression_config"))
    saved = described.get("geometry")
    return config, (_saved_geometry(saved, where) if saved is not None else None), _saved_options(described, where)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``compressor.safetensors``; NaN or inf in any is an error (it would poison every generation),
    and so are bytes whose sha256 is not the description's (files written before it was recorded have none)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    where = Path(directory) / WEIGHTS_NAME
    try:
        blob = where.read_bytes()
        state = load(blob)
    except (OSError, SafetensorError) as exc:
        raise KVLightError(f"cannot read {where}: {getattr(exc, 'strerror', None) or exc}") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise KVLightError(f"{where}: {name} holds NaN or inf; calibrate the compressor again")
    recorded = _recorded_sha256(Path(directory) / CONFIG_NAME)
    if recorded is not None and hashlib.sha256(blob).hexdigest() != recorded:
        raise KVLightError(
            f"{where} does not match the sha256 recorded in {CONFIG_NAME} (damaged or modified since it was saved); "
            "restore the compressor directory or calibrate again"
        )
    return state


def read_base_model(directory: Path) -> dict | None:
    """The ``base_model`` record of the description (kvlight.compressors.provenance), None where it has none."""
    where = Path(directory) / CONFIG_NAME
    try:
        record = json.loads(where.read_text()).get("base_model")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    if record is None:
        return None
    probe = record.get("kv_probe") if isinstance(record, dict) else None
    rows_ok = isinstance(probe, list) and all(
        isinstance(row, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row)
        for row in probe
    )
    if not rows_ok or not isinstance(record.get("name"), (str, type(None))):
        raise KVLightError(f"{where}: malformed base_model (needs name and kv_probe, a list of lists of numbers)")
    return record


def _recorded_sha256(where: Path) -> str | None:
    """``weights_sha256`` of the description (read_description has validated the file), or None if absent."""
    try:
        recorded = json.loads(where.read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    if recorded is not None and not (isinstance(recorded, str) and len(recorded) == 64):
        raise KVLightError(f"{where}: weights_sha256 must be 64 hex digits, got {str(recorded)[:80]!r}")
    return recorded


def _saved_geometry(saved: object, where: Path) -> KVGeometry:
    """The geometry a compressor file names, checked field by field (a hand-edited file may hold anything)."""
    fields = {"num_layers": int, "num_kv_heads": int, "head_dim": int, "model_type": str, "rope": bool}
    if not isinstance(saved, dict) or set(fields) - set(saved):
        raise KVLightError(f"{where}: malformed geometry (needs {', '.join(fields)})")
    for name, kind in fields.items():
        value = saved[name]
        wrong_type = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if wrong_type or (kind is int and value < 1):
            raise KVLightError(f"{where}: malformed geometry: {name} = {value!r}")
    return KVGeometry.from_dict(saved)


def _saved_options(described: dict, where: Path) -> dict:
    """Backend options as saved (``options``), or from the two KVSplice keys that files of kvlight 0.1 hold."""
    if "latent_affine" in described and not isinstance(described["latent_affine"], bool):
        raise KVLightError(f"{where}: latent_affine must be true or false, got {described['latent_affine']!r}")
    if "options" in described:
        options = described["options"]
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise KVLightError(f"{where}: options must map backend names to their settings")
        for name, settings in options.items():
            try:
                backend(name).make_options(settings)
            except ConfigError as exc:
                raise KVLightError(f"{where}: {exc}") from None
        return options
    latent_affine = described.get("latent_affine", True)
    if not isinstance(latent_affine, bool):
        raise KVLightError(f"{where}: latent_affine must be true or false, got {latent_affine!r}")
    init = described.get("init", "pca") if described.get("init") in ("pca", "random") else "pca"
    return {"kvsplice": {"latent_affine": latent_affine, "init": init}}
