"""Stop a fit whose compressor holds NaN, inf or runaway weights, naming the first head that does.

A learning rate too large for the data, or statistics of too few rows, can fill weights with NaN (or with values
around 1e28 that overflow the moment attention multiplies them) without any error: validation would then print a
NaN perplexity and the run would save those weights. The fit checks after the statistics pass and after each
optimizer step, so no checkpoint or output is written from them.
"""

from __future__ import annotations

import torch

from kvlight.errors import KVLightError

KIND_NAMES = {"k": "K", "v": "V"}
#: No fitted weight comes near this: bases are orthonormal and means, scales and shifts are of K/V magnitude
#: (below 1e4 in every model measured). Beyond it, products with K/V overflow float32 within a layer or two.
RUNAWAY = 1e12


class DivergedError(KVLightError):
    """The fitted compressor holds NaN, inf or runaway weights (the fit diverged or had too little data)."""


def _bad(tensors) -> bool:
    tensors = [t for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return False
    # One device synchronisation for all of them (the check runs after every optimizer step).
    return not bool(torch.stack([(t.isfinite() & (t.abs() <= RUNAWAY)).all() for t in tensors]).all())


def first_bad_head(compressor: torch.nn.Module) -> str | None:
    """``"layer L K head H"`` of the first head with a NaN, inf or runaway parameter or buffer (None: all sound)."""
    if not _bad([*compressor.parameters(), *compressor.buffers()]):
        return None
    for layer, codecs in enumerate(getattr(compressor, "layers", [])):
        for kind, codec in codecs.items():
            for head, projection in enumerate(codec.heads):
                if _bad([*projection.parameters(), *projection.buffers()]):
                    return f"layer {layer} {KIND_NAMES.get(kind, kind)} head {head}"
    return "a compressor tensor outside the heads"


def check_finite(compressor: torch.nn.Module, when: str, advice: str) -> None:
    """Raise :class:`DivergedError` naming the first (layer, K or V, KV head) whose weights are unusable."""
    where = first_bad_head(compressor)
    if where is not None:
        raise DivergedError(
            f"the fit diverged: {where} holds NaN/inf or weights beyond {RUNAWAY:g} {when}; {advice} "
            "(stopped before saving it)"
        )
