"""Shared case tables and helpers of the core-pipeline tests (fixtures are in conftest.py)."""

from __future__ import annotations

import torch

from kvlight.compressors.registry import backend_names

#: Architectures of the tiny models (conftest.tiny_model_paths) and the compression backends.
ARCHS = ("llama", "gpt2")
BACKENDS = backend_names()  # the registry: every registered backend is in the matrix
#: The shared table: architecture x backend.
ARCH_BACKEND = [(arch, algo) for arch in ARCHS for algo in BACKENDS]
#: head_dim of both tiny models.
HEAD_DIM = 16


def chunked_logits(model, input_ids: torch.Tensor, cache, chunk: int, attention_mask=None) -> torch.Tensor:
    """Feed ``input_ids`` through ``model`` ``chunk`` tokens at a time into ``cache``; logits of every position."""
    out = []
    for start in range(0, input_ids.shape[1], chunk):
        mask = None if attention_mask is None else attention_mask[:, : start + chunk]
        result = model(
            input_ids=input_ids[:, start : start + chunk], attention_mask=mask, past_key_values=cache, use_cache=True
        )
        out.append(result.logits)
    return torch.cat(out, dim=1)


def held_tensors(obj, seen: set[int] | None = None, depth: int = 0) -> list[torch.Tensor]:
    """Every distinct tensor reachable from ``obj``'s attributes, lists, dicts and dataclass fields."""
    seen = set() if seen is None else seen
    found: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            found.append(obj)
        return found
    if depth > 4 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return found
    seen.add(id(obj))
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        children = []
    for child in children:
        found.extend(held_tensors(child, seen, depth + 1))
    return found


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def one_error_line(stderr: str) -> str:
    """The single line a failed command must print; fails the test on a traceback or extra lines."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("kvlight: error:"), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


#: Mixed widths over a head_dim-16 head: every width of kvlight.widths.WIDTHS, decreasing with the variance rank.
MIXED_WIDTHS = (16, 8, 6, 5, 4, 4, 3, 3, 2, 2, 2, 1, 1, 0, 0, 0)


def mixed_widths(layer: int, head: int) -> tuple[list[int], list[int]]:
    """``(bits_k, bits_v)`` of one head: :data:`MIXED_WIDTHS`, shifted per head so heads and K/V differ (keys get a
    dropped direction inside their basis, so rank truncation and widths interact)."""
    shift = (layer + head) % 3
    keys = list(MIXED_WIDTHS[shift:]) + [0] * shift
    keys[2], keys[3] = 0, keys[2]  # a dropped direction before stored ones
    values = [min(16, w + 1) if w and w not in (6, 8) else w for w in MIXED_WIDTHS]
    return keys, values


def tiny_calibrate_args(model: str, output, *extra: str) -> list[str]:
    return [
        "calibrate",
        "--model",
        model,
        "--calibration-samples",
        "4",
        "--eval-samples",
        "2",
        "--seq-len",
        "32",
        "--accelerator",
        "cpu",
        "--output-dir",
        str(output),
        *extra,
    ]
