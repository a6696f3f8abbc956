"""Native kernels of the decode path: attention over packed mixed-width codes, read where they lie.

The torch code of the decode path unpacks every stored code into a float operand each step (a gather, shifts,
masks and a copy per field: half of a step's time) before its matmuls read it, layers whose keys are coded before
RoPE also write the rebuilt keys out and read them back, and the two dozen small torch operations of a step cost more
than the arithmetic at batch 1. :func:`attend` (``packed.c``) does one layer's decode step in one call: it reads the
packed bytes once and multiplies as it goes (keys coded after RoPE scored in latent space, keys coded before RoPE
rebuilt and rotated in registers, values mixed in latent space and decoded once per query), the exact tokens, the
soft-capping, the mask and the softmax included. It computes in float32 what the torch code computes.

Built on first use with the machine's C compiler (``$CC``, else ``cc`` or ``gcc``; ``-O3 -march=native -fopenmp``)
into ``$KVLIGHT_CACHE/kernels`` (default ``~/.cache/kvlight/kernels``), one file per source, compiler and CPU, written
atomically; later processes load it with ctypes in milliseconds. They run on the OpenMP runtime torch itself loaded
(the same ``libgomp.so.1``), with torch's thread count. Where no library can be built or loaded (no compiler, a
platform without OpenMP), or for tensors off the CPU, :func:`library` is None and the decode path keeps its torch code;
``KVLIGHT_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("packed.c")
#: the widest head and the most stored channels per head :func:`scores_rope` rebuilds (packed.c's DIM_MAX, RANK_MAX).
DIM_MAX = 256
#: latent rows packed.c projects a query into at a time (PROJ_TILE): ``KindOperands.weight_t`` is padded to it.
PROJ_TILE = 64
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=fast")

_I64, _I32, _PTR, _F32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_float


class _PackedKind(ctypes.Structure):
    """packed.c's ``packed_kind``: one kind's codes, their slot table and the affine decoder."""

    _fields_ = [
        ("codes", _PTR), ("batch_stride", _I64), ("column_stride", _I64),
        ("byte_lo", _PTR), ("bit_lo", _PTR), ("mask_lo", _PTR),
        ("byte_hi", _PTR), ("bit_hi", _PTR), ("mask_hi", _PTR), ("shift_hi", _PTR),
        ("exact_col", _PTR), ("exact", _PTR), ("exact_batch_stride", _I64), ("exact_col_stride", _I64),
        ("exact_dtype", _I32), ("r_max", _I32), ("weight", _PTR), ("weight_t", _PTR), ("bias", _PTR),
    ]  # fmt: skip


class _ExactTokens(ctypes.Structure):
    """packed.c's ``exact_tokens``: keys and values ``[B, H, n, D]``, float32 (0) or bfloat16 (1)."""

    _fields_ = [("keys", _PTR), ("values", _PTR), ("tokens", _I64), ("dtype", _I32)]


class _RopeTables(ctypes.Structure):
    """packed.c's ``rope_tables`` (``pairs`` 0: keys not rotated)."""

    _fields_ = [
        ("pairs", _I32), ("first", _PTR), ("second", _PTR), ("cos", _PTR), ("sin", _PTR), ("row_stride", _I64),
        ("entries", _I64), ("block", _I32), ("lead", _I32),
    ]  # fmt: skip


_REF = ctypes.POINTER
_SIGNATURES = {
    "kvl_attend": (
        [
            _I32,
            _I32,
            _I32,
            _I32,
            _PTR,
            _REF(_ExactTokens),
            _REF(_ExactTokens),
            _REF(_PackedKind),
            _REF(_RopeTables),
            _REF(_PackedKind),
            _I64,
            _PTR,
            _I64,
            _F32,
            _PTR,
            _PTR,
            _I32,
        ],  # fmt: skip
        None,
    ),
    "kvl_max_threads": ([], _I32),
}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What a ``-march=native`` build depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


def _cache_dir() -> Path:
    root = os.environ.get("KVLIGHT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "kvlight") / "kernels"


def _build(compiler: str) -> Path:
    """The compiled library for this source, compiler and CPU: built once (under a lock), then reused."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), _cpu_signature().encode(), " ".join(FLAGS).encode()):
        digest.update(part)
    directory = _cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"packed-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    with open(directory / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():  # another process built it while this one waited
            return target
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, timeout=300
            )
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if "error" in line] or ["the compiler failed"]
                raise OSError(errors[0].strip())
            os.replace(built, target)  # atomic: a reader sees the whole library or none
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels, built and loaded on first call; None where they cannot be (see the module docstring)."""
    if os.environ.get("KVLIGHT_KERNELS", "1") == "0" or platform.system() != "Linux":
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("kvlight: no C compiler found; the decode path uses its torch code")
        return None
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("kvlight: the decode kernels could not be built (%s); the decode path uses its torch code", exc)
        return None
    for name, (argtypes, restype) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def enabled_for(tensor: torch.Tensor) -> bool:
    """Whether the kernels serve ``tensor``'s device (the CPU) and could be loaded."""
    return tensor.device.type == "cpu" and library() is not None


@dataclass(frozen=True)
class SlotTable:
    """An :class:`~kvlight.serving.widths.UnpackTable` as the kernels read it: for each of ``S`` slots, the byte
    column, bit and mask of its low field and of its high field (mask 0: no such field), and the column of the
    exact channels the slot reads instead (-1: none), contiguous on the CPU."""

    byte_lo: torch.Tensor  # int32 [S]
    bit_lo: torch.Tensor  # uint8 [S]
    mask_lo: torch.Tensor  # uint8 [S]
    byte_hi: torch.Tensor  # int32 [S]
    bit_hi: torch.Tensor  # uint8 [S]
    mask_hi: torch.Tensor  # uint8 [S]
    shift_hi: torch.Tensor  # uint8 [S]
    exact_col: torch.Tensor  # int32 [S]

    @classmethod
    def of(cls, table, exact_slots: torch.Tensor | None = None) -> SlotTable:
        """From an UnpackTable (``byte_lo [S]``, ``bit_lo/mask_lo [S, 1]``, ``hi`` or None) and the slot of each exact
        channel (``exact_slots [n_exact]``, HeadLayout's: channel ``e`` of the exact tensor is read into that slot)."""
        slots = table.byte_lo.numel()
        as_bytes = lambda t: t.reshape(-1).to(device="cpu", dtype=torch.uint8).contiguous()  # noqa: E731
        as_columns = lambda t: t.reshape(-1).to(device="cpu", dtype=torch.int32).contiguous()  # noqa: E731
        if table.hi is None:
            zeros = torch.zeros(slots, dtype=torch.uint8)
            hi = (torch.zeros(slots, dtype=torch.int32), zeros, zeros.clone(), zeros.clone())
        else:
            byte, bit, mask, shift = table.hi
            hi = (as_columns(byte), as_bytes(bit), as_bytes(mask), as_bytes(shift))
        exact_col = torch.full((slots,), -1, dtype=torch.int32)
        if exact_slots is not None and exact_slots.numel():
            exact_col[exact_slots.cpu()] = torch.arange(exact_slots.numel(), dtype=torch.int32)
        return cls(as_columns(table.byte_lo), as_bytes(table.bit_lo), as_bytes(table.mask_lo), *hi, exact_col)

    @property
    def slots(self) -> int:
        return self.byte_lo.numel()

    @functools.cached_property
    def exact_count(self) -> int:
        """Exact channels the slots read."""
        return int((self.exact_col >= 0).sum())

    def tensors(self) -> list[torch.Tensor]:
        """In packed.c's ``packed_kind`` order."""
        return [
            self.byte_lo, self.bit_lo, self.mask_lo, self.byte_hi, self.bit_hi, self.mask_hi, self.shift_hi,
            self.exact_col,
        ]  # fmt: skip

    @functools.cached_property
    def pointers(self) -> tuple[int, ...]:
        """The tables' addresses, read once: the tables never change after :meth:`of`."""
        return tuple(t.data_ptr() for t in self.tensors())


@dataclass(frozen=True)
class KindOperands:
    """What :func:`attend` reads of one kind (K or V) of one layer besides its codes: the slot table of the per-head
    layout and the affine decoder over the codes, ``weight [H, r_max, D]`` and ``bias [H, D]`` float32 contiguous
    (kvlight.serving.attention.width_decoder: steps, offsets and dropped channels folded in); ``weight_t`` is
    ``weight`` transposed, ``[H, D, r_pad]`` with rows zero-padded to a multiple of 64 (the layout that projects a
    query into latent space without reductions)."""

    table: SlotTable
    weight: torch.Tensor
    bias: torch.Tensor
    weight_t: torch.Tensor = None  # type: ignore[assignment]
    #: the last ``packed_kind`` :func:`_kind` built and its key (a decode step reuses it).
    last_kind: tuple | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        heads, r_max, _ = self.weight.shape
        if self.table.slots != heads * r_max:
            raise ValueError(f"the slot table has {self.table.slots} slots, the decoder {heads} x {r_max}")
        for tensor in (self.weight, self.bias):
            if tensor.dtype != torch.float32 or not tensor.is_contiguous():
                raise ValueError("decoder weights and biases must be float32 and contiguous")
        if self.weight_t is None:
            pad = (-self.weight.shape[1]) % PROJ_TILE
            padded = torch.nn.functional.pad(self.weight.transpose(1, 2), (0, pad)).contiguous()
            object.__setattr__(self, "weight_t", padded)

    @functools.cached_property
    def template(self) -> _PackedKind:
        """``packed_kind`` with everything but the codes filled in: operands are checked and addressed once, a decode
        step only copies this and points it at the codes (checked in :func:`_kind`)."""
        return _PackedKind(
            None, 0, 0, *self.table.pointers, None, 0, 0, 0, self.weight.shape[1],
            self.weight.data_ptr(), self.weight_t.data_ptr(), self.bias.data_ptr(),
        )  # fmt: skip


@dataclass(frozen=True)
class Rope:
    """How :func:`attend` turns the keys of a layer whose keys are coded relative to RoPE (kvlight.config's
    ``key_rope_block``): ``pairs`` the channels ``(first, second)`` int32 ``[P]`` each rotary pair turns, ``cos``/``sin``
    float32 pair tables, contiguous, ``R`` rows (1 for every batch row, or ``B``). ``block`` 1: keys coded before RoPE,
    one entry per compressed token, tables pair-major ``[R, P, E]``, each key rebuilt and rotated; ``block`` > 1: keys
    coded relative to the RoPE of their block of that many slots, one entry per block the compressed tokens touch
    (token ``i`` in block ``(lead + i) // block``), tables entry-major ``[R, E, P]``, each query rotated back and
    projected once per block."""

    pairs: tuple[torch.Tensor, torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    block: int
    lead: int = 0


def _kind(codes: torch.Tensor, exact: torch.Tensor, operands: KindOperands) -> _PackedKind:
    """``packed_kind`` of ``operands`` pointed at ``codes`` / ``exact``: checked and built on the first call for those
    buffers (their addresses, shapes, strides and dtype), then reused: a cache layer's buffers stay put between
    flushes, so a decode step pays for neither the checks nor the struct."""
    key = (codes.data_ptr(), codes.shape, codes.stride(), codes.dtype)
    key += (exact.data_ptr(), exact.shape, exact.stride(), exact.dtype)
    cached = operands.last_kind
    if cached is not None and cached[0] == key:
        return cached[1]
    if codes.dtype != torch.uint8 or codes.dim() != 3 or (codes.shape[1] > 1 and codes.stride(1) != 1):
        raise ValueError(f"packed codes must be uint8 [B, T, n_bytes] held token-minor, got {tuple(codes.shape)}")
    if exact.shape[:2] != codes.shape[:2] or (exact.shape[2] and exact.shape[1] > 1 and exact.stride(1) != 1):
        raise ValueError(f"exact channels must be [B, T, n_exact] held token-minor, got {tuple(exact.shape)}")
    if exact.shape[2] and exact.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"exact channels must be float32 or bfloat16, got {exact.dtype}")
    if operands.table.exact_count != exact.shape[2]:
        raise ValueError(f"the slot table reads {operands.table.exact_count} exact channels, not {exact.shape[2]}")
    kind = _PackedKind.from_buffer_copy(operands.template)
    kind.codes, kind.batch_stride, kind.column_stride = codes.data_ptr(), codes.stride(0), codes.stride(2)
    kind.exact, kind.exact_batch_stride, kind.exact_col_stride = exact.data_ptr(), exact.stride(0), exact.stride(2)
    kind.exact_dtype = int(exact.dtype == torch.bfloat16)
    # The struct is a function of the key alone (addresses, strides, dtype), so a buffer freed and another made at
    # the same address with the same shape gets the same, correct struct.
    object.__setattr__(operands, "last_kind", (key, kind))
    return kind


def _exact(keys: torch.Tensor, values: torch.Tensor) -> _ExactTokens:
    if keys.dtype not in (torch.float32, torch.bfloat16) or values.dtype != keys.dtype:
        raise ValueError(f"exact tokens must be float32 or bfloat16, got {keys.dtype}")
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("exact tokens must be contiguous [B, H, n, D]")
    return _ExactTokens(keys.data_ptr(), values.data_ptr(), keys.shape[2], int(keys.dtype == torch.bfloat16))


def attend(
    q: torch.Tensor,
    sink: tuple[torch.Tensor, torch.Tensor],
    recent: tuple[torch.Tensor, torch.Tensor],
    codes_k: tuple[torch.Tensor, torch.Tensor],
    keys: KindOperands,
    codes_v: tuple[torch.Tensor, torch.Tensor],
    values: KindOperands,
    mask: torch.Tensor | None,
    softcap: float | None,
    scratch: torch.Tensor,
    rope: Rope | None = None,
) -> torch.Tensor:
    """One decode step's attention over a compressed layer: ``q [B, H, G, D]`` -> ``[B, H, G, D]``, float32.

    ``q`` float32 contiguous, already scaled; ``sink`` / ``recent`` the exact tokens' keys and values ``[B, H, n, D]``
    (float32 or bfloat16, contiguous); ``codes_k`` / ``codes_v`` the compressed tokens' packed codes ``[B, T, n_bytes]``
    and exact channels ``[B, T, n_exact]`` (float32 or bfloat16), both held token-minor (LatentStore's buffers,
    :class:`~kvlight.serving.widths.PackedCodes`), decoded by ``keys`` / ``values``; ``mask`` additive float32
    ``[B|1, N]`` over every token (sinks, compressed, recent) or None; ``softcap`` Gemma 2's logit soft-capping or
    None; ``scratch`` a float32 buffer of at least :func:`scratch_floats` elements. ``rope``: how keys coded relative
    to RoPE turn (:class:`Rope`); None: keys not rotated (no RoPE), scored in latent space as they are.
    """
    batch, heads, groups, dim = q.shape
    if q.dtype != torch.float32 or not q.is_contiguous():
        raise ValueError("the queries must be float32 and contiguous")
    tokens = codes_k[0].shape[1]
    if codes_v[0].shape[1] != tokens or tokens < 1:
        raise ValueError(f"{tokens} key codes but {codes_v[0].shape[1]} value codes")
    sink_tokens, recent_tokens = _exact(*sink), _exact(*recent)
    total = sink[0].shape[2] + tokens + recent[0].shape[2]
    threads = torch.get_num_threads()
    need = scratch_floats(batch, heads, groups, total, keys.weight.shape[1], values.weight.shape[1], threads)
    if scratch.dtype != torch.float32 or not scratch.is_contiguous() or scratch.numel() < need:
        raise ValueError(f"scratch must hold {need} float32")
    rope_tables = _RopeTables(0, None, None, None, None, 0, 0, 1, 0)
    if rope is not None:
        (first, second), cos, sin = rope.pairs, rope.cos, rope.sin
        entries = tokens if rope.block == 1 else (rope.lead + tokens - 1) // rope.block + 1
        if not 0 <= rope.lead < rope.block:
            raise ValueError(f"lead {rope.lead} must lie in its block of {rope.block}")
        shape = (first.numel(), entries) if rope.block == 1 else (entries, first.numel())
        if cos.shape != sin.shape or cos.shape[1:] != shape or cos.shape[0] not in (1, batch):
            raise ValueError(f"rotation tables {tuple(cos.shape)} do not cover {first.numel()} pairs x {entries}")
        if not takes_heads(dim, rope.block):
            raise ValueError(
                f"keys coded relative to RoPE need heads of at most {DIM_MAX} channels (a multiple of 8 for block 1)"
            )
        for tensor in (cos, sin):
            if tensor.dtype != torch.float32 or not tensor.is_contiguous():
                raise ValueError("rotation tables must be float32 and contiguous")
        stride = 0 if cos.shape[0] == 1 else cos.stride(0)
        rope_tables = _RopeTables(
            first.numel(), first.data_ptr(), second.data_ptr(), cos.data_ptr(), sin.data_ptr(), stride, entries,
            rope.block, rope.lead,
        )  # fmt: skip
    mask_pointer, mask_stride = None, 0
    if mask is not None:
        if mask.dtype != torch.float32 or mask.shape[-1] != total or mask.stride(-1) != 1 or mask.dim() != 2:
            raise ValueError(f"mask must be float32 [B|1, {total}] with contiguous rows")
        mask_pointer, mask_stride = mask.data_ptr(), (0 if mask.shape[0] == 1 else mask.stride(0))
    out = torch.empty(batch, heads, groups, dim, dtype=torch.float32)
    library().kvl_attend(
        batch, heads, groups, dim, q.data_ptr(), ctypes.byref(sink_tokens), ctypes.byref(recent_tokens),
        ctypes.byref(_kind(*codes_k, keys)), ctypes.byref(rope_tables), ctypes.byref(_kind(*codes_v, values)), tokens,
        mask_pointer, mask_stride, float(softcap or 0.0), scratch.data_ptr(), out.data_ptr(), threads,
    )  # fmt: skip
    return out


def takes_heads(dim: int, block: int) -> bool:
    """Whether :func:`attend` takes heads of ``dim`` channels with keys coded in RoPE blocks of ``block`` (0: keys
    not rotated; 1: rebuilt in tiles of 8 channels, so a multiple of 8): at most :data:`DIM_MAX`."""
    if block == 0:
        return True
    return dim <= DIM_MAX and (block > 1 or dim % 8 == 0)


def scratch_floats(batch: int, heads: int, groups: int, total: int, r_max_k: int, r_max_v: int, threads: int) -> int:
    """Float32 elements of scratch :func:`attend` needs, as packed.c lays it out: the score rows ``[B, H, G, N]``,
    the latent queries and their biases, the weights' compressed share, and the values' partial sums of at most two
    token chunks per thread."""
    rows = batch * heads * groups
    return rows * total + rows * (r_max_k + 2) + 2 * threads * rows * r_max_v
