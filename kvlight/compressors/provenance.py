"""Which model a compressor was fitted to, and the check that it is served on that model.

A compressor fitted to one model fits the shape of every model of the same geometry (a base model and its instruct
fine-tune, two sizes' siblings), and loaded onto the wrong one it serves garbage without an error. So calibration
records the base model's id and a probe of its K/V projection weights in the compressor's JSON, and the serving
wrapper compares the probe with the model it is given. A probe, not a hash of the weights: the same model loaded in
bfloat16 or float16 instead of float32 has weights that differ by rounding (relative error ~0.3 %), and must pass.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
from torch import nn

from kvlight.errors import ModelMismatchError
from kvlight.models import decoder_blocks

#: weights sampled per layer and kind (K, V) for the probe.
PROBE_SAMPLES = 16
#: largest relative L2 difference of one layer's probe still taken for the same model (bf16 rounding is ~0.3 %).
SAME_MODEL_TOLERANCE = 0.01


def _attention(block: nn.Module) -> nn.Module:
    for name in ("self_attn", "attn", "attention", "self_attention"):
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    return block


def _kv_weights(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's K and V projection weights (any layout: they are only sampled), FSDP2-sharded weights whole.

    Separate ``k_proj``/``v_proj`` (Llama, OPT, ...); GPT-2's ``c_attn`` Conv1D ``[hidden, 3 * hidden]`` (Q | K | V
    column blocks); a fused ``query_key_value`` (GPT-NeoX, Persimmon: its last two thirds of rows); otherwise every
    matrix of the attention module, halved (a fingerprint needs the weights to be the model's, not their meaning).
    """
    attn = _attention(block)
    if isinstance(getattr(attn, "k_proj", None), nn.Module) and isinstance(getattr(attn, "v_proj", None), nn.Module):
        k, v = attn.k_proj.weight, attn.v_proj.weight
    elif isinstance(getattr(attn, "c_attn", None), nn.Module):
        weight = attn.c_attn.weight
        width = weight.shape[1] // 3
        k, v = weight[:, width : 2 * width], weight[:, 2 * width :]
    elif isinstance(getattr(attn, "query_key_value", None), nn.Module):
        weight = attn.query_key_value.weight
        third = weight.shape[0] // 3
        k, v = weight[third : 2 * third], weight[2 * third :]
    else:
        flat = torch.cat([p.detach().reshape(-1) for p in attn.parameters() if p.dim() == 2])
        k, v = flat[: flat.numel() // 2], flat[flat.numel() // 2 :]
    whole = lambda w: (w.full_tensor() if hasattr(w, "full_tensor") else w).detach()  # noqa: E731
    return whole(k), whole(v)


def kv_weight_probe(model: nn.Module) -> list[list[float]]:
    """``[2 * num_layers][PROBE_SAMPLES]``: evenly spaced entries of every layer's K and then V projection weight."""
    probe = []
    for block in decoder_blocks(model):
        for weight in _kv_weights(block):
            flat = weight.reshape(-1)
            index = torch.linspace(0, flat.numel() - 1, PROBE_SAMPLES, device=flat.device).long()
            probe.append([float(x) for x in flat[index].float().cpu()])
    return probe


def probe_fingerprint(probe: list[list[float]]) -> str:
    """A short hex id of a probe, rounded to bfloat16 so a model in another 16/32-bit dtype usually gets the same."""
    rounded = torch.tensor(probe, dtype=torch.float32).to(torch.bfloat16).view(torch.int16)
    return hashlib.sha256(rounded.numpy().tobytes()).hexdigest()[:24]


def base_model_record(model: nn.Module, name: str | None) -> dict:
    """What a compressor's JSON records of the model it was fitted to: ``{"name", "fingerprint", "kv_probe"}``."""
    probe = kv_weight_probe(model)
    return {"name": None if name is None else str(name), "fingerprint": probe_fingerprint(probe), "kv_probe": probe}


def probe_difference(recorded: list[list[float]], probe: list[list[float]]) -> tuple[float, int]:
    """``(largest relative L2 difference, its row)`` between two probes of the same shape."""
    a, b = torch.tensor(recorded, dtype=torch.float64), torch.tensor(probe, dtype=torch.float64)
    relative = (a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)
    row = int(relative.argmax())
    return float(relative[row]), row


def check_base_model(record: dict | None, model: nn.Module, allow_mismatch: bool = False) -> None:
    """Refuse (``allow_mismatch``: warn) serving a compressor recorded as fitted to another model than ``model``.

    ``record`` is the compressor's ``base_model`` (None for compressors saved before it was recorded, or built in
    code: nothing to check).
    """
    if not record or not isinstance(record.get("kv_probe"), list):
        return
    probe = kv_weight_probe(model)
    recorded = record["kv_probe"]
    name = record.get("name") or "an unnamed model"
    if len(recorded) != len(probe) or any(len(row) != PROBE_SAMPLES for row in recorded):
        difference, where = float("inf"), "its layer count"
    else:
        difference, row = probe_difference(recorded, probe)
        if difference <= SAME_MODEL_TOLERANCE:
            return
        where = f"layer {row // 2} {'KV'[row % 2]}"
    message = (
        f"this compressor was fitted to {name} (fingerprint {record.get('fingerprint')}), but the model's K/V "
        f"projection weights differ from it ({where}: {difference:.1%} relative); calibrate a compressor for this "
        "model, or pass allow_model_mismatch=True to serve it anyway"
    )
    if not allow_mismatch:
        raise ModelMismatchError(message)
    warnings.warn(
        f"kvlight: {message.split('; calibrate')[0]}; served anyway (allow_model_mismatch=True)", stacklevel=3
    )
