"""Read a GGUF file's architecture from its header, before anything else of the file is parsed.

transformers reads a GGUF's config by parsing the whole file (every tensor's description, the tokenizer's 256k
strings); for a model kvlight refuses that cost minutes for nothing. The GGUF header is: magic ``GGUF``, a uint32
version, uint64 tensor and key-value counts, then key-value pairs (uint64-length UTF-8 key, uint32 value type,
value); ``general.architecture`` is by convention the first key, and this reader stops at it.
"""

from __future__ import annotations

import struct
from pathlib import Path

from kvlight.errors import ModelLoadError

MAGIC = b"GGUF"
#: GGUF value types -> struct format of the scalar types (8: string, 9: array are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
#: keys read before giving up on finding the architecture (files written by llama.cpp put it first).
MAX_KEYS = 64


class _Reader:
    def __init__(self, handle, where: Path) -> None:
        self.handle, self.where = handle, where

    def take(self, size: int) -> bytes:
        data = self.handle.read(size)
        if len(data) != size:
            raise ModelLoadError(f"{self.where} is truncated: its GGUF header ends early; download it again")
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("Q")
        if length > 1 << 20:
            raise ModelLoadError(f"{self.where}: a GGUF header string of {length} bytes; the file is damaged")
        return self.take(length).decode("utf-8", errors="replace")

    def skip_value(self, kind: int) -> None:
        if kind in _SCALARS:
            self.take(struct.calcsize(_SCALARS[kind]))
        elif kind == _STRING:
            self.string()
        elif kind == _ARRAY:
            inner, count = self.unpack("I"), self.unpack("Q")
            if inner in _SCALARS:
                self.handle.seek(struct.calcsize(_SCALARS[inner]) * count, 1)
            else:
                for _ in range(count):
                    self.skip_value(inner)
        else:
            raise ModelLoadError(f"{self.where}: unknown GGUF value type {kind}; the file is damaged or too new")


def gguf_architecture(path: str | Path) -> str:
    """The ``general.architecture`` of a GGUF file (``llama``, ``gemma3``, ...), read from its first bytes.

    Raises :class:`ModelLoadError` with one line for a file that is not GGUF, is truncated, or names none.
    """
    where = Path(path)
    try:
        handle = where.open("rb")
    except OSError as exc:
        raise ModelLoadError(f"cannot read {where}: {exc.strerror or exc}") from None
    with handle:
        reader = _Reader(handle, where)
        if handle.read(4) != MAGIC:
            raise ModelLoadError(f"{where} is not a GGUF file (no GGUF magic at its start)")
        reader.unpack("I")  # version
        reader.unpack("Q")  # tensor count
        keys = reader.unpack("Q")
        for _ in range(min(keys, MAX_KEYS)):
            key, kind = reader.string(), reader.unpack("I")
            if key == "general.architecture" and kind == _STRING:
                return reader.string()
            reader.skip_value(kind)
    raise ModelLoadError(f"{where}: its GGUF header names no general.architecture; the file is damaged")


def gguf_tensor_count(path: str | Path) -> int:
    """How many tensors a GGUF file's header declares (0: a header without a model in it)."""
    where = Path(path)
    try:
        with where.open("rb") as handle:
            reader = _Reader(handle, where)
            if handle.read(4) != MAGIC:
                raise ModelLoadError(f"{where} is not a GGUF file (no GGUF magic at its start)")
            reader.unpack("I")  # version
            return reader.unpack("Q")
    except OSError as exc:
        raise ModelLoadError(f"cannot read {where}: {exc.strerror or exc}") from None
