"""Compressed caches on disk (kvlight.serving.persist): ``cache.save(path)`` then ``wrapped.load_cache(path)``.

What must hold: the loaded cache stores bit-identical tensors, counts the same bytes and continues generation with
the same greedy tokens as the cache it was saved from (fp latents, int4 per-token latents, mixed widths; RoPE and
learned positions; with and without zstd; mid-block, so the flush schedule survives too; a left-padded batch with
row sinks); a truncated, foreign, edited or mismatched file is refused with one line naming the problem; a failing
write leaves the previous file intact.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys

import pytest
import torch
from helpers import ARCHS, mixed_widths

import kvlight.files
from kvlight.errors import GeometryMismatchError, KVLightError
from kvlight.serving import persist
from kvlight.serving.persist import CacheFileError
from kvlight.serving.wrapper import CompressedKVModelWrapper

#: name -> fitted_compressor arguments: fp latents, int4 per-token groups, mixed widths (all with exact tokens).
CONFIGS = {
    "pca-fp": {"algo": "pca", "rank": 8, "sink_tokens": 2, "recent_window": 3},
    "pca-int4": {"algo": "pca", "rank": 8, "sink_tokens": 2, "recent_window": 3, "latent_bits": 4},
    "widths": {"algo": "pca", "bits": mixed_widths, "sink_tokens": 2, "recent_window": 3},
    # keys coded relative to the RoPE of blocks of 4 slots: the blocks' rotation tables are rebuilt after loading
    "widths-rope-block4": {"algo": "pca", "bits": mixed_widths, "sink_tokens": 2, "recent_window": 3, "rope_block": 4},
}
ENTROPY = [None, "zstd"]
GREEDY = {"do_sample": False, "pad_token_id": 0}


@pytest.fixture
def wrap(tiny_models):
    """``wrap(arch, compressor, **kwargs)`` -> CompressedKVModelWrapper, closed after the test."""
    made = []

    def make(arch, compressor, **kwargs):
        wrapper = CompressedKVModelWrapper(tiny_models[arch], compressor, **kwargs)
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        wrapper.close()


def compressor_for(fitted_compressor, arch: str, config: str):
    kwargs = dict(CONFIGS[config])
    return fitted_compressor(arch, kwargs.pop("algo"), kwargs.pop("rank", None), **kwargs)


def started(wrapper, ids: torch.Tensor, mask: torch.Tensor | None = None, new_tokens: int = 5):
    """A cache after the prompt ``ids [B, T]`` and ``new_tokens - 1`` decode steps (mid-block), and the sequence."""
    cache = wrapper.new_cache()
    out = wrapper.generate(
        input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens, **GREEDY
    )
    return cache, out


def continued(wrapper, cache, sequence: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The next 12 greedy tokens after ``sequence`` (its last token not yet in ``cache``)."""
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], sequence.shape[1] - mask.shape[1])], dim=1)
    out = wrapper.generate(input_ids=sequence, attention_mask=mask, past_key_values=cache, max_new_tokens=12, **GREEDY)
    return out[:, sequence.shape[1] :]


def assert_same_stored(loaded, original) -> None:
    assert loaded.stored_bytes() == original.stored_bytes()
    for got, want in zip(loaded.layers, original.layers):
        assert (got.length, got.decode_steps, got.num_compressed) == (
            want.length,
            want.decode_steps,
            want.num_compressed,
        )
        mine, theirs = got.stored_tensors(), want.stored_tensors()
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    positions = original.position_log.positions
    if positions is None:
        assert loaded.position_log.positions is None
    else:
        assert torch.equal(loaded.position_log.positions, positions)


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("entropy", ENTROPY, ids=["plain", "zstd"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_a_loaded_cache_continues_with_the_same_tokens(
    arch, config, entropy, tiny_windows, fitted_compressor, wrap, tmp_path
):
    wrapper = wrap(arch, compressor_for(fitted_compressor, arch, config))
    cache, sequence = started(wrapper, tiny_windows["eval"][:1, :20])
    assert cache.layers[0].num_compressed > 0 and cache.layers[0].decode_steps == 4  # mid-block
    path = tmp_path / "cache.safetensors"
    cache.save(path, entropy=entropy)
    loaded = wrapper.load_cache(path)

    assert_same_stored(loaded, cache)
    expected = continued(wrapper, cache, sequence)
    got = continued(wrapper, loaded, sequence)
    assert torch.equal(got, expected)
    assert_same_stored(loaded, cache)  # both went on the same way


def test_zstd_is_smaller_and_plain_holds_just_the_stored_bytes(tiny_windows, fitted_compressor, wrap, tmp_path):
    wrapper = wrap("llama", compressor_for(fitted_compressor, "llama", "widths"))
    cache, _ = started(wrapper, tiny_windows["eval"][:2, :32], new_tokens=1)
    cache.save(tmp_path / "plain", entropy=None)
    cache.save(tmp_path / "zstd", entropy="zstd")
    plain, packed = (tmp_path / "plain").stat().st_size, (tmp_path / "zstd").stat().st_size
    (header,) = struct.unpack("<Q", (tmp_path / "plain").read_bytes()[:8])
    assert plain - 8 - header == cache.stored_bytes()  # no buffer slack on disk
    assert packed < plain


def test_a_left_padded_batch_survives_a_round_trip(tiny_windows, fitted_compressor, wrap, tmp_path):
    compressor = fitted_compressor("llama", "pca", 4, sink_tokens=4, recent_window=4, latent_bits=4)
    wrapper = wrap("llama", compressor)
    rows = [tiny_windows["eval"][0, :20], tiny_windows["eval"][1, :7]]
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 20 - len(row) :], mask[i, 20 - len(row) :] = row, 1
    cache, sequence = started(wrapper, ids, mask)
    assert cache.layers[0].row_sink_slot is not None  # the short row's sink positions sit past the sink slots
    tokens = []
    for entropy in ENTROPY:
        cache.save(tmp_path / f"cache-{entropy}", entropy=entropy)
        loaded = wrapper.load_cache(tmp_path / f"cache-{entropy}")
        assert_same_stored(loaded, cache)
        tokens.append(continued(wrapper, loaded, sequence, mask))
    expected = continued(wrapper, cache, sequence, mask)
    assert all(torch.equal(got, expected) for got in tokens)


@pytest.mark.parametrize("coding", persist.CODINGS)
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.uint8, torch.int32]
)
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 7), (1, 0, 6)])
def test_every_byte_reordering_is_undone_bit_for_bit(coding, dtype, shape):
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(
        0, 256, (math.prod(shape) * size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    tensor = raw.view(dtype).reshape(shape)
    data = persist._reordered(tensor, coding)
    assert len(data) == raw.numel()
    back = persist._restored(data, dtype, list(shape), coding)
    assert back.dtype == dtype and list(back.shape) == list(shape)
    assert torch.equal(back.reshape(-1).view(torch.uint8), raw)


# ---------------------------------------------------------------------- refusals
def header_of(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def write_header(path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_metadata(path, edit) -> None:
    header, body = header_of(path)
    metadata = json.loads(header["__metadata__"]["kvlight"])
    edit(metadata)
    header["__metadata__"]["kvlight"] = json.dumps(metadata)
    write_header(path, header, body)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def random_bytes(path):
    path.write_bytes(os.urandom(4096))


def other_safetensors(path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, path)


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def bad_shape(path):
    """One layer's recent keys lose a token, with the metadata and checksum made to agree (so only shapes are off);
    entropy-coded, its stated shape changes."""
    from safetensors.torch import load, save

    header, _ = header_of(path)
    metadata = json.loads(header["__metadata__"]["kvlight"])
    if metadata["entropy"]:  # the blob is what it was: its stated shape lies
        return edit_metadata(path, lambda m: m["tensors"]["layers.0.keys"]["shape"].__setitem__(2, 1))
    tensors = load(path.read_bytes())
    tensors["layers.0.keys"] = tensors["layers.0.keys"][:, :, 1:].contiguous()
    metadata["tensors"]["layers.0.keys"]["shape"] = list(tensors["layers.0.keys"].shape)
    metadata["sha256"] = persist._digest(tensors)
    path.write_bytes(save(tensors, metadata={"kvlight": json.dumps(metadata)}))


#: name -> (how the file is damaged, error type, words the message must hold).
DAMAGE = {
    "truncated": (truncate, CacheFileError, "truncated"),
    "random-bytes": (random_bytes, CacheFileError, "not a kvlight cache"),
    "foreign-safetensors": (other_safetensors, CacheFileError, "not a kvlight cache"),
    "flipped-byte": (flip_a_byte, CacheFileError, "damaged"),
    "edited-fingerprint": (
        lambda p: edit_metadata(p, lambda m: m.update(fingerprint="0" * 64)),
        CacheFileError,
        "another compressor",
    ),
    "other-version": (lambda p: edit_metadata(p, lambda m: m.update(version=99)), CacheFileError, "version 99"),
    "other-format": (lambda p: edit_metadata(p, lambda m: m.update(format="x")), CacheFileError, "not a kvlight"),
    "bad-shape": (bad_shape, CacheFileError, "bad shapes"),
}


def assert_one_line(error: KVLightError, *words: str) -> None:
    message = str(error)
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("entropy", ENTROPY, ids=["plain", "zstd"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_or_foreign_file_is_refused_with_one_line(
    damage, entropy, tiny_windows, fitted_compressor, wrap, tmp_path
):
    wrapper = wrap("llama", compressor_for(fitted_compressor, "llama", "pca-int4"))
    cache, _ = started(wrapper, tiny_windows["eval"][:1, :20])
    path = tmp_path / "cache.safetensors"
    cache.save(path, entropy=entropy)
    spoil, error, words = DAMAGE[damage]
    spoil(path)
    with pytest.raises(error) as caught:
        wrapper.load_cache(path)
    assert_one_line(caught.value, words, str(path))


def test_a_cache_saved_by_another_compressor_is_refused(tiny_windows, fitted_compressor, wrap, tmp_path):
    saver = wrap("llama", compressor_for(fitted_compressor, "llama", "pca-int4"))
    cache, _ = started(saver, tiny_windows["eval"][:1, :20])
    cache.save(tmp_path / "cache")
    saver.close()
    loader = wrap("llama", compressor_for(fitted_compressor, "llama", "widths"))
    with pytest.raises(CacheFileError) as caught:
        loader.load_cache(tmp_path / "cache")
    assert_one_line(caught.value, "another compressor", "fingerprint")


def test_other_settings_and_another_geometry_are_refused(tiny_windows, fitted_compressor, wrap, tmp_path):
    compressor = compressor_for(fitted_compressor, "llama", "widths")
    saver = wrap("llama", compressor)
    cache, _ = started(saver, tiny_windows["eval"][:1, :20])
    cache.save(tmp_path / "cache")
    saver.close()
    bf16 = wrap("llama", compressor, storage_dtype=torch.bfloat16)
    with pytest.raises(CacheFileError) as caught:
        bf16.load_cache(tmp_path / "cache")
    assert_one_line(caught.value, "other cache settings", "storage_dtype")
    bf16.close()
    gpt2 = wrap("gpt2", compressor_for(fitted_compressor, "gpt2", "widths"))
    with pytest.raises(GeometryMismatchError) as caught:
        gpt2.load_cache(tmp_path / "cache")
    assert_one_line(caught.value, "geometry")


def test_a_missing_file_is_one_line(fitted_compressor, wrap, tmp_path):
    wrapper = wrap("gpt2", compressor_for(fitted_compressor, "gpt2", "pca-fp"))
    with pytest.raises(CacheFileError) as caught:
        wrapper.load_cache(tmp_path / "missing")
    assert_one_line(caught.value, "cannot read")


def test_zstd_without_zstandard_says_what_to_install(tiny_windows, fitted_compressor, wrap, tmp_path, monkeypatch):
    wrapper = wrap("gpt2", compressor_for(fitted_compressor, "gpt2", "pca-fp"))
    cache, _ = started(wrapper, tiny_windows["eval"][:1, :20])
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    with pytest.raises(CacheFileError) as caught:
        cache.save(tmp_path / "cache", entropy="zstd")
    assert_one_line(caught.value, "pip install 'kvlight[disk]'")
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------- atomic writes
def test_a_failing_write_leaves_the_previous_file_intact(tiny_windows, fitted_compressor, wrap, tmp_path, monkeypatch):
    wrapper = wrap("llama", compressor_for(fitted_compressor, "llama", "widths"))
    cache, sequence = started(wrapper, tiny_windows["eval"][:1, :20])
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    before = path.read_bytes()
    wrapper.generate(input_ids=sequence, past_key_values=cache, max_new_tokens=3, **GREEDY)  # the cache moves on

    real_fdopen = os.fdopen

    class HalfWriter:
        """Writes half of what it is given, then fails like a full disk."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(kvlight.files.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError):
        cache.save(path, entropy="zstd")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind
    assert wrapper.load_cache(path).get_seq_length() == sequence.shape[1] - 1
