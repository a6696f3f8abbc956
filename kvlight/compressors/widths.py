"""The widths a latent direction may take: bits per element of one principal direction of one head.

0 drops the direction (it decodes as its calibration centre: rank truncation is the special case), 1-8 store a
static integer code (kvlight.serving.widths packs them), 16 keeps it exactly in the K/V dtype.
"""

from __future__ import annotations

#: widths a latent direction may take (bits per element); 0: dropped, 16: exact in the K/V dtype.
WIDTHS = (0, 1, 2, 3, 4, 5, 6, 8, 16)
EXACT = 16
#: the widths stored as integer codes.
CODED_WIDTHS = tuple(w for w in WIDTHS if 0 < w < EXACT)


def check_widths(widths, where: str, length: int | None = None) -> tuple[int, ...]:
    """``widths`` as a tuple of ints from :data:`WIDTHS`; raises ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(widths, (list, tuple)) or not widths:
        raise ValueError(f"{where} must be a list of widths, one per head dimension")
    if length is not None and len(widths) != length:
        raise ValueError(f"{where} has {len(widths)} widths but the head dimension is {length}")
    for width in widths:
        if isinstance(width, bool) or not isinstance(width, int) or width not in WIDTHS:
            raise ValueError(f"{where} holds width {width!r}; each must be one of {', '.join(map(str, WIDTHS))}")
    return tuple(int(w) for w in widths)


def stored_rank(widths) -> int:
    """Latent channels a head must encode: up to its last stored direction (trailing 0 widths are never encoded)."""
    last = max((i for i, w in enumerate(widths) if w > 0), default=0)
    return last + 1
