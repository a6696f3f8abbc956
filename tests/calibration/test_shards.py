"""Token reservoir, atomic checksummed shards and the shard stream."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kvlight.calibration.reservoir import KVReservoir
from kvlight.calibration.shards import KVShardStream, load_manifest, num_rows, write_shards
from kvlight.errors import CaptureError, OutputError

LAYERS, HEADS, DIM = 3, 2, 4


def layer_rows(token_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V rows ``[n, H, D]`` that encode (token id, layer): keys = 10 * id + layer, values = -(10 * id + layer)."""
    code = (token_ids.to(torch.float32) * 10 + layer).view(-1, 1, 1).expand(-1, HEADS, DIM)
    return code.clone(), -code


def stream_tokens(reservoir: KVReservoir, total: int, batch: int) -> None:
    """Offer tokens 0..total-1 in batches, putting every layer for each plan."""
    for start in range(0, total, batch):
        ids = torch.arange(start, min(start + batch, total))
        token_index, slot = reservoir.plan(ids.numel())
        assert torch.equal(token_index, token_index.sort().values)
        assert slot.unique().numel() == slot.numel() and (slot < reservoir.capacity).all()
        for layer in range(LAYERS):
            keys, values = layer_rows(ids, layer)
            reservoir.put(layer, keys, values, token_index, slot)
        assert len(reservoir) <= reservoir.capacity


def kept_ids(reservoir: KVReservoir) -> torch.Tensor:
    """Token ids of the kept rows, after checking every layer, head and dim of a row encodes the same token."""
    keys, values = reservoir.rows()
    layer_code = torch.arange(LAYERS, dtype=torch.float32).view(1, LAYERS, 1, 1)
    ids = (keys - layer_code) / 10
    assert torch.equal(ids, ids[:, :1, :1, :1].expand_as(ids)), "layers of one row hold different tokens"
    assert torch.equal(values, -keys)
    return ids[:, 0, 0, 0].round().long()


# --- reservoir --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "total", "batch"),
    [(1000, 20_000, 512), (50, 30, 7), (10, 10, 3), (1, 100, 9), (64, 1000, 1), (8, 500, 500)],
)
def test_reservoir_keeps_min_seen_capacity_aligned_distinct_rows(capacity, total, batch):
    reservoir = KVReservoir(LAYERS, HEADS, DIM, capacity, seed=0)

    stream_tokens(reservoir, total, batch)
    ids = kept_ids(reservoir)
    keys, values = reservoir.rows()

    assert reservoir.num_seen == total
    assert keys.shape == values.shape == (min(total, capacity), LAYERS, HEADS, DIM)
    assert keys.dtype == values.dtype == torch.float32
    assert ids.unique().numel() == ids.numel()
    assert ((ids >= 0) & (ids < total)).all()
    if total <= capacity:
        assert sorted(ids.tolist()) == list(range(total))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reservoir_sample_is_uniform_over_the_stream(seed):
    total, capacity = 20_000, 1000
    reservoir = KVReservoir(LAYERS, HEADS, DIM, capacity, seed=seed)

    stream_tokens(reservoir, total, batch=333)
    ids = kept_ids(reservoir).double()

    # Uniform over [0, 20000): the mean of 1000 draws has sd ~183 and each half holds ~500 +- 16.
    assert abs(ids.mean().item() - (total - 1) / 2) < 800
    early = int((ids < total / 2).sum())
    assert 400 < early < 600
    assert 400 < capacity - early < 600
    # Every tenth of the stream is represented, not just the first tokens that filled the reservoir.
    assert torch.histc(ids, bins=10, min=0, max=total).min() > 50


def test_reservoir_is_deterministic_for_a_seed():
    runs = []
    for seed in (5, 5, 6):
        reservoir = KVReservoir(LAYERS, HEADS, DIM, 20, seed=seed)
        stream_tokens(reservoir, 500, batch=37)
        runs.append(kept_ids(reservoir))

    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_plan_keeps_only_the_last_token_per_slot():
    # Capacity 1: after the first token every kept token targets slot 0, so a large batch collides.
    reservoir = KVReservoir(1, 1, 1, capacity=1, seed=0)
    reservoir.plan(1)
    reservoir.put(0, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.tensor([0]), torch.tensor([0]))

    token_index, slot = reservoir.plan(10_000)

    assert slot.tolist() == [0] and token_index.numel() == 1


def test_put_stores_only_planned_rows_from_any_float_dtype():
    reservoir = KVReservoir(1, HEADS, DIM, capacity=4, seed=0)
    token_index, slot = reservoir.plan(3)
    keys = torch.arange(3 * HEADS * DIM, dtype=torch.bfloat16).view(3, HEADS, DIM)

    reservoir.put(0, keys, keys + 1, token_index, slot)
    stored_keys, stored_values = reservoir.rows()

    assert stored_keys.dtype == torch.float32
    assert torch.equal(stored_keys[:, 0], keys.float())
    assert torch.equal(stored_values[:, 0], keys.float() + 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_put_rejects_non_finite_rows(bad):
    reservoir = KVReservoir(1, HEADS, DIM, capacity=4)
    token_index, slot = reservoir.plan(2)
    keys = torch.zeros(2, HEADS, DIM)
    keys[1, 0, 0] = bad

    with pytest.raises(CaptureError) as caught:
        reservoir.put(0, keys, torch.zeros_like(keys), token_index, slot)

    assert "NaN or inf" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("action", "error"),
    [
        ("wrong shape", ValueError),
        ("bad layer", ValueError),
        ("plan before every layer is put", RuntimeError),
        ("rows before every layer is put", RuntimeError),
    ],
)
def test_reservoir_misuse_is_reported(action, error):
    reservoir = KVReservoir(2, HEADS, DIM, capacity=4)
    token_index, slot = reservoir.plan(2)
    rows = torch.zeros(2, HEADS, DIM)
    reservoir.put(0, rows, rows, token_index, slot)

    with pytest.raises(error):
        if action == "wrong shape":
            reservoir.put(1, torch.zeros(2, HEADS + 1, DIM), torch.zeros(2, HEADS + 1, DIM), token_index, slot)
        elif action == "bad layer":
            reservoir.put(2, rows, rows, token_index, slot)
        elif action == "plan before every layer is put":
            reservoir.plan(2)
        else:
            reservoir.rows()


# --- shards on disk ---------------------------------------------------------------------------------------------


def numbered_rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[n, L, H, D]`` whose every entry is the row number (keys) or its negation (values)."""
    keys = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, LAYERS, HEADS, DIM).clone()
    return keys, -keys


def row_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    assert torch.equal(batch["values"], -batch["keys"])
    return batch["keys"][:, 0, 0, 0].long().tolist()


@pytest.mark.parametrize(
    ("n", "rows_per_shard", "shards"), [(10, 1, 10), (10, 3, 4), (10, 10, 1), (10, 100, 1), (0, 4, 0)]
)
def test_write_shards_round_trips_through_load_manifest(tmp_path, n, rows_per_shard, shards):
    keys, values = numbered_rows(n)
    meta = {"model": "tiny", "seq_len": 32}

    manifest = write_shards(tmp_path / "capture", keys, values, rows_per_shard, meta)

    assert load_manifest(tmp_path / "capture") == manifest
    assert json.loads((tmp_path / "capture" / "manifest.json").read_text()) == manifest
    assert num_rows(manifest) == n and manifest["meta"] == meta and len(manifest["files"]) == shards
    assert manifest["row_shape"] == [LAYERS, HEADS, DIM]
    loaded = [load_file(tmp_path / "capture" / entry["name"]) for entry in manifest["files"]]
    if loaded:
        assert torch.equal(torch.cat([shard["keys"] for shard in loaded]), keys)
        assert torch.equal(torch.cat([shard["values"] for shard in loaded]), values)
    names = sorted(path.name for path in (tmp_path / "capture").iterdir())
    assert names == sorted([entry["name"] for entry in manifest["files"]] + ["manifest.json"])  # no temp files


def test_rewriting_a_capture_removes_stale_shards(tmp_path):
    write_shards(tmp_path, *numbered_rows(10), rows_per_shard=2, meta={})
    manifest = write_shards(tmp_path, *numbered_rows(4), rows_per_shard=2, meta={})

    assert sorted(path.name for path in tmp_path.glob("shard-*")) == [entry["name"] for entry in manifest["files"]]
    assert load_manifest(tmp_path) == manifest and num_rows(manifest) == 4


def test_unwritable_directory_raises_output_error(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")

    with pytest.raises(OutputError) as caught:
        write_shards(tmp_path / "a-file" / "capture", *numbered_rows(2), rows_per_shard=1, meta={})

    assert "a-file" in str(caught.value) and "\n" not in str(caught.value)


def _truncate(directory):
    shard = directory / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])


def _flip_byte(directory):
    shard = directory / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: the file still parses, only the checksum can tell
    shard.write_bytes(bytes(data))


def _rewrite_manifest(directory, change):
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


CORRUPTIONS = {
    "truncated shard": _truncate,
    "flipped byte": _flip_byte,
    "missing shard": lambda d: (d / "shard-00001.safetensors").unlink(),
    "missing manifest": lambda d: (d / "manifest.json").unlink(),
    "garbage manifest": lambda d: (d / "manifest.json").write_text("{not json"),
    "foreign manifest": lambda d: (d / "manifest.json").write_text('{"files": []}'),
    "escaping file name": lambda d: _rewrite_manifest(d, lambda m: m["files"][0].update(name="../outside")),
    "row count mismatch": lambda d: _rewrite_manifest(d, lambda m: m.update(num_rows=99)),
}
SHARD_DAMAGE = {"truncated shard", "flipped byte", "missing shard"}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_damaged_capture_is_never_trusted(tmp_path, corruption):
    write_shards(tmp_path, *numbered_rows(9), rows_per_shard=3, meta={})
    CORRUPTIONS[corruption](tmp_path)

    assert load_manifest(tmp_path) is None
    if corruption == "flipped byte":
        assert load_manifest(tmp_path, verify=False) is not None  # same size: only the checksum catches it
    else:
        assert load_manifest(tmp_path, verify=False) is None  # sizes and structure are checked without hashing

    with pytest.raises(CaptureError) as caught:
        list(KVShardStream(tmp_path, batch_size=3, num_batches=3))

    message = str(caught.value)
    assert "\n" not in message
    assert ("shard-00001.safetensors" if corruption in SHARD_DAMAGE else "manifest.json") in message


def test_missing_directory_has_no_manifest(tmp_path):
    assert load_manifest(tmp_path / "never-written") is None


def test_stream_of_an_empty_capture_is_an_error(tmp_path):
    write_shards(tmp_path, *numbered_rows(0), rows_per_shard=4, meta={})

    with pytest.raises(CaptureError, match="no rows"):
        KVShardStream(tmp_path, batch_size=2, num_batches=1)


# --- streaming --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "rows_per_shard", "batch_size", "num_batches"),
    [
        (12, 5, 4, 3),  # exactly one pass; batches span shards
        (12, 12, 3, 4),  # one shard
        (10, 3, 4, 7),  # fewer rows than needed: cycles
        (40, 7, 4, 2),  # more rows than needed: stops early
        (3, 2, 8, 2),  # batch larger than the whole capture
        (6, 2, 2, 0),  # no batches
    ],
)
def test_stream_yields_exactly_num_batches_of_full_size(tmp_path, rows, rows_per_shard, batch_size, num_batches):
    write_shards(tmp_path, *numbered_rows(rows), rows_per_shard=rows_per_shard, meta={})
    stream = KVShardStream(tmp_path, batch_size=batch_size, num_batches=num_batches, seed=3)

    batches = list(stream)

    assert len(stream) == num_batches and len(batches) == num_batches
    for batch in batches:
        assert set(batch) == {"keys", "values"}
        assert batch["keys"].shape == batch["values"].shape == (batch_size, LAYERS, HEADS, DIM)
        assert all(0 <= row < rows for row in row_ids(batch))
    # Every pass over the data visits each row once before any row repeats.
    seen = [row for batch in batches for row in row_ids(batch)]
    for start in range(0, len(seen), rows):
        chunk = seen[start : start + rows]
        assert len(set(chunk)) == len(chunk)
        if len(chunk) == rows:
            assert sorted(chunk) == list(range(rows))


@pytest.mark.parametrize(("rows", "rows_per_shard", "batch_size"), [(12, 5, 4), (30, 4, 6), (16, 16, 2)])
def test_one_epoch_covers_every_row_once(tmp_path, rows, rows_per_shard, batch_size):
    write_shards(tmp_path, *numbered_rows(rows), rows_per_shard=rows_per_shard, meta={})
    stream = KVShardStream(tmp_path, batch_size=batch_size, num_batches=rows // batch_size)

    for epoch in range(3):
        stream.set_epoch(epoch)
        seen = [row for batch in stream for row in row_ids(batch)]
        assert sorted(seen) == list(range(rows))


def test_epochs_reshuffle_and_replay_deterministically(tmp_path):
    write_shards(tmp_path, *numbered_rows(40), rows_per_shard=8, meta={})
    stream = KVShardStream(tmp_path, batch_size=5, num_batches=8, seed=0)

    def order(epoch):
        stream.set_epoch(epoch)
        return [row for batch in stream for row in row_ids(batch)]

    first, second = order(0), order(1)

    assert first != second and sorted(first) == sorted(second)
    assert order(0) == first
    other_seed = KVShardStream(tmp_path, batch_size=5, num_batches=8, seed=1)
    assert [row for batch in other_seed for row in row_ids(batch)] != first


def test_dataloader_workers_split_the_same_sequence(tmp_path):
    write_shards(tmp_path, *numbered_rows(24), rows_per_shard=5, meta={})
    stream = KVShardStream(tmp_path, batch_size=4, num_batches=9, seed=2)
    expected = [row_ids(batch) for batch in stream]

    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)

    assert [row_ids(batch) for batch in loader] == expected
