"""The native decode kernel (kvlight.serving.kernels.attend) against the attention it replaces, on random codes.

The reference unpacks the same codes with the torch code (HeadLayout.operand), decodes them with the same affine
decoders, rotates keys coded before RoPE with RotaryLayout, and runs softcap, mask and softmax in float32. Cases cover
every width up to 8, several batch rows, token counts that are not a multiple of the kernel's blocks, more queries
per KV head than one tile, exact tokens in float32 and bfloat16, masks per row and shared, and one and two threads.
"""

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from kvlight.serving import kernels
from kvlight.serving.positions import RotaryLayout
from kvlight.serving.widths import DirectionQuantizer, PackedCodes, head_layout

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="the native kernels cannot be built here")


@dataclass(frozen=True)
class Case:
    batch: int
    tokens: int
    heads: int
    rank: int
    groups: int
    dim: int
    threads: int = 1
    sinks: int = 0
    recent: int = 0
    exact_dtype: torch.dtype = torch.float32
    rope: str | None = None  # None: keys not rotated; "half-split" or "interleaved" pairs
    block: int = 1  # keys coded before RoPE (1) or relative to RoPE blocks of this many slots
    lead: int = 0  # the first compressed token's place in its block
    mask: str | None = None  # None, "shared" [1, N] or "rows" [B, N]
    softcap: float | None = None

    def __str__(self) -> str:
        return "-".join(
            f"{name}{value}" for name, value in vars(self).items() if value not in (None, 0, torch.float32)
        ).replace("torch.", "")


CASES = [
    Case(1, 1, 1, 4, 1, 8),
    Case(2, 37, 2, 16, 3, 16, sinks=2, recent=3, mask="rows"),
    Case(3, 130, 3, 24, 5, 32, threads=2, recent=5, exact_dtype=torch.bfloat16, softcap=20.0),
    Case(1, 200, 3, 64, 3, 64, threads=2, sinks=4, mask="shared"),
    Case(4, 65, 1, 8, 9, 16, threads=2, sinks=1, recent=1),
    Case(1, 37, 2, 16, 3, 16, sinks=2, recent=3, rope="half-split"),
    Case(2, 130, 2, 32, 5, 32, threads=2, sinks=4, recent=2, rope="interleaved", mask="rows", softcap=30.0),
    Case(3, 200, 3, 64, 3, 64, threads=2, sinks=4, recent=7, exact_dtype=torch.bfloat16, rope="half-split"),
    Case(1, 37, 2, 16, 3, 16, sinks=4, rope="half-split", block=16, lead=4),
    Case(2, 130, 2, 32, 5, 32, threads=2, recent=2, rope="interleaved", block=16, lead=15, mask="rows"),
    Case(3, 200, 3, 64, 3, 64, threads=2, sinks=4, rope="half-split", block=100, lead=4, exact_dtype=torch.bfloat16),
    Case(2, 64, 1, 8, 2, 8, rope="half-split", block=4),
]


def _codes(case: Case, seed: int, exact: torch.dtype | None = torch.float32):
    """Packed codes of random latents of every width (16, kept exactly in ``exact``, unless None), held token-minor
    like LatentStore's buffers, their per-head layout, and a random affine decoder over them."""
    generator = torch.Generator().manual_seed(seed)
    channels = case.heads * case.rank
    choices = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8] + ([16] if exact is not None else []))
    widths = choices[torch.randint(0, len(choices), (channels,), generator=generator)]
    widths[0] = 3  # at least one two-field code
    if exact is not None:
        widths[-1] = 16  # at least one exact channel
    quantizer = DirectionQuantizer(
        widths, torch.rand(channels, generator=generator) + 0.5, torch.zeros(channels), exact or torch.float32
    )
    packed = quantizer.quantize(torch.randn(case.batch, case.tokens, channels, generator=generator) * 4 + 6)
    token_minor = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in packed.tensors()]
    layout = head_layout(quantizer, [case.rank] * case.heads)
    r_max = layout.channel.shape[1]
    weight = torch.randn(case.heads, r_max, case.dim, generator=generator) / r_max**0.5
    bias = torch.randn(case.heads, case.dim, generator=generator)
    decoded = layout.operand(PackedCodes(*token_minor), torch.float32) @ weight + bias[:, None, :]
    table = kernels.SlotTable.of(layout.table, layout.exact_slots)
    operands = kernels.KindOperands(table, weight.contiguous(), bias.contiguous())
    return tuple(token_minor), operands, decoded  # decoded: [B, H, T, D], what the codes stand for


@pytest.mark.parametrize("case", CASES, ids=str)
def test_attend_equals_the_unpacked_attention(case, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: case.threads)
    generator = torch.Generator().manual_seed(1)
    shape = lambda n: (case.batch, case.heads, n, case.dim)  # noqa: E731
    sink = tuple(torch.randn(shape(case.sinks), generator=generator).to(case.exact_dtype) for _ in "kv")
    recent = tuple(torch.randn(shape(case.recent), generator=generator).to(case.exact_dtype) for _ in "kv")
    codes_k, keys, decoded_k = _codes(case, 2, case.exact_dtype)
    codes_v, values, decoded_v = _codes(case, 3, case.exact_dtype)
    q = torch.randn(case.batch, case.heads, case.groups, case.dim, generator=generator) / case.dim**0.5
    rope = None
    if case.rope is not None:
        rotary = RotaryLayout(case.dim, case.dim - 8 if case.dim > 8 else case.dim, case.rope == "interleaved", ())
        entries = case.tokens if case.block == 1 else (case.lead + case.tokens - 1) // case.block + 1
        angles = torch.rand(case.batch, 1, entries, rotary.rotary_dim // 2, generator=generator) * 6
        scale = 1.0 if case.block == 1 else 1.25  # a rope scaling (YaRN's attention factor) is in both tables
        cos, sin = angles.cos() * scale, angles.sin() * scale
        per_token = (case.lead + torch.arange(case.tokens)) // case.block  # each token's table entry
        decoded_k = rotary.rotate(decoded_k, cos[:, :, per_token], sin[:, :, per_token])
        # pair-major [B, P, E] for keys rebuilt per token, entry-major [B, E, P] for queries turned per block
        tables = [(t.transpose(-1, -2) if case.block == 1 else t).flatten(0, 1).contiguous() for t in (cos, sin)]
        rope = kernels.Rope(rotary.pair_channels, *tables, block=case.block, lead=case.lead)
    total = case.sinks + case.tokens + case.recent
    mask = None
    if case.mask is not None:
        rows = case.batch if case.mask == "rows" else 1
        mask = torch.zeros(rows, total)
        mask[torch.rand(rows, total, generator=generator) < 0.2] = float("-inf")
        mask[:, -1] = 0.0  # the newest token always attends
    scratch = torch.empty(
        kernels.scratch_floats(
            case.batch, case.heads, case.groups, total, keys.weight.shape[1], values.weight.shape[1], case.threads
        )
    )
    out = kernels.attend(q, sink, recent, codes_k, keys, codes_v, values, mask, case.softcap, scratch, rope)

    all_k = torch.cat([sink[0].float(), decoded_k, recent[0].float()], dim=2)
    all_v = torch.cat([sink[1].float(), decoded_v, recent[1].float()], dim=2)
    scores = q @ all_k.transpose(-1, -2)
    if case.softcap is not None:
        scores = torch.tanh(scores / case.softcap) * case.softcap
    if mask is not None:
        scores = scores + mask[:, None, None, :]
    expected = torch.softmax(scores, dim=-1) @ all_v
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # A decode step reuses the kernel's view of the codes it built last time; other codes (a fresh buffer, fewer
    # tokens) get their own, and the result follows them, never the cached pointers.
    again = kernels.attend(q, sink, recent, codes_k, keys, codes_v, values, mask, case.softcap, scratch, rope)
    assert torch.equal(again, out)
    if case.rope is None:
        doubled = tuple(t.clone() for t in codes_k)  # the same codes in another buffer, laid out alike
        assert doubled[0].data_ptr() != codes_k[0].data_ptr()
        torch.testing.assert_close(
            kernels.attend(q, sink, recent, doubled, keys, codes_v, values, mask, case.softcap, scratch), out
        )
        fewer = case.tokens // 2
        if fewer and mask is None:
            short = [tuple(t[:, :fewer] for t in codes) for codes in (codes_k, codes_v)]
            k_all = torch.cat([sink[0].float(), decoded_k[:, :, :fewer], recent[0].float()], dim=2)
            v_all = torch.cat([sink[1].float(), decoded_v[:, :, :fewer], recent[1].float()], dim=2)
            scores = q @ k_all.transpose(-1, -2)
            if case.softcap is not None:
                scores = torch.tanh(scores / case.softcap) * case.softcap
            expected_short = torch.softmax(scores, dim=-1) @ v_all
            got = kernels.attend(q, sink, recent, short[0], keys, short[1], values, None, case.softcap, scratch)
            torch.testing.assert_close(got, expected_short, rtol=1e-4, atol=1e-4)
    if case.rope is not None:  # one table row serves every batch row when the positions agree
        shared = kernels.Rope(rope.pairs, rope.cos[:1].contiguous(), rope.sin[:1].contiguous(), case.block, case.lead)
        again = kernels.attend(q, sink, recent, codes_k, keys, codes_v, values, mask, case.softcap, scratch, shared)
        assert torch.equal(again[:1], out[:1])


def test_kernels_run_on_torchs_openmp_runtime():
    """One OpenMP runtime in the process (torch's libgomp), whose thread limit follows torch.set_num_threads."""
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert kernels.library().kvl_max_threads() == count
    finally:
        torch.set_num_threads(threads)
    # kvlight loads no runtime of its own: a fresh process with torch and the kernels maps one libgomp (this pytest
    # process may map others: scikit-learn, which the harness extra pulls in, ships its own).
    probe = (
        "import json, torch; from kvlight.serving import kernels; assert kernels.library() is not None; "
        "print(json.dumps(sorted({line.split()[-1] for line in open('/proc/self/maps') if 'libgomp' in line})))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    runtimes = json.loads(result.stdout)
    assert len(runtimes) == 1, runtimes


def test_bad_operands_are_refused_before_the_kernel_runs():
    case = Case(1, 20, 2, 8, 3, 16)
    codes, operands, _ = _codes(case, 0)
    packed = codes
    q = torch.randn(1, 2, 3, 16)
    empty = (torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16))
    scratch = torch.empty(kernels.scratch_floats(1, 2, 3, 20, 8, 8, torch.get_num_threads()))
    call = lambda **change: kernels.attend(  # noqa: E731
        **{
            "q": q,
            "sink": empty,
            "recent": empty,
            "codes_k": codes,
            "keys": operands,
            "codes_v": codes,
            "values": operands,
            "mask": None,
            "softcap": None,
            "scratch": scratch,
            **change,
        }  # fmt: skip
    )
    torch.testing.assert_close(call(), call())  # the baseline call works
    with pytest.raises(ValueError, match="token-minor"):
        call(codes_k=(packed[0].contiguous(), packed[1]))
    with pytest.raises(ValueError, match="exact channels"):
        call(codes_k=(packed[0], packed[1].half()))
    with pytest.raises(ValueError, match="float32"):
        call(q=q.double())
    with pytest.raises(ValueError, match="scratch"):
        call(scratch=scratch[:10])
    with pytest.raises(ValueError, match="mask"):
        call(mask=torch.zeros(1, 19))
    with pytest.raises(ValueError, match="exact tokens"):
        call(sink=(empty[0].half(), empty[1].half()))


def test_the_library_is_built_once_and_reused(tmp_path, monkeypatch):
    """A fresh cache directory gets one library file, written whole; a second build finds it."""
    monkeypatch.setenv("KVLIGHT_CACHE", str(tmp_path))
    compiler = kernels._compiler()
    first = kernels._build(compiler)
    stamp = first.stat().st_mtime_ns
    assert kernels._build(compiler) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "kernels").iterdir() if not p.name.startswith(".")] == [first.name]


def test_no_compiler_or_kvlight_kernels_0_leaves_the_torch_code(monkeypatch):
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
        assert not kernels.enabled_for(torch.zeros(1))
    finally:
        kernels.library.cache_clear()
    monkeypatch.undo()
    monkeypatch.setenv("KVLIGHT_KERNELS", "0")
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
    finally:
        monkeypatch.undo()
        kernels.library.cache_clear()
    assert kernels.library() is not None
