"""Bounded memory: capture keeps at most ``max_samples_per_head`` rows whatever the amount of text (a reservoir),
consumes its batches one at a time, and text sources are streamed, never materialised whole."""

import itertools
import weakref
from pathlib import Path

import pytest
import torch
from run_helpers import cli_args, load_records, record_config

from kvlight.calibration.capture import capture_kv
from kvlight.calibration.datamodule import KVCalibrationDataModule
from kvlight.calibration.texts import iter_texts
from kvlight.calibration.windows import eval_and_calibration_windows
from kvlight.cli import main
from kvlight.geometry import kv_geometry

REPO = Path(__file__).resolve().parents[2]


class TrackedBatches:
    """Yields ``[4, 32]`` token batches from a long text stream, checking that capture holds no more than the
    current and the previous batch alive when it asks for the next one (a list() would hold all of them)."""

    def __init__(self, windows: torch.Tensor, batches: int) -> None:
        self.windows, self.batches = windows, batches
        self.alive: list[weakref.ref] = []
        self.most_alive = 0
        self.produced = 0

    def __iter__(self):
        for index in range(self.batches):
            self.most_alive = max(self.most_alive, sum(ref() is not None for ref in self.alive))
            rows = torch.arange(index * 4, index * 4 + 4) % self.windows.shape[0]
            batch = self.windows[rows].clone()
            self.alive.append(weakref.ref(batch))
            self.produced += 1
            yield batch
            del batch


CAPACITIES = [(50, 12), (300, 12), (1000, 3)]  # (capacity, batches of 4 x 32 tokens)


@pytest.mark.parametrize(("capacity", "batches"), CAPACITIES)
def test_capture_keeps_at_most_capacity_rows_of_a_longer_stream(capacity, batches, tiny_models, tiny_windows):
    model = tiny_models["llama"]
    geometry = kv_geometry(model)
    stream = TrackedBatches(tiny_windows["train"][:, :32], batches)

    reservoir = capture_kv(model, geometry, iter(stream), capacity=capacity, progress=False)

    tokens = batches * 4 * 32
    assert reservoir.num_seen == tokens and stream.produced == batches
    keys, values = reservoir.rows()
    assert keys.shape == values.shape == (min(capacity, tokens), 2, 2, 16)
    # The storage itself is bounded by the capacity, not by the stream: [capacity, L, H, D] float32 for K and V.
    assert keys.untyped_storage().nbytes() <= capacity * 2 * 2 * 16 * 4
    assert stream.most_alive <= 2  # batches were consumed one at a time, never collected into a list
    assert torch.isfinite(keys).all() and torch.isfinite(values).all()


def test_fit_captures_at_most_max_samples_per_head_rows(tiny_llama_path, tmp_path, kvlight_cache, monkeypatch):
    # 8 windows x 32 tokens = 256 tokens through `kvlight fit` with a bound of 40 rows.
    monkeypatch.setattr("sys.argv", ["kvlight"])
    pca = str(REPO / "configs" / "smollm2_pca.yaml")
    data = ["--data.seq_len", "32", "--data.calibration_samples", "8", "--data.eval_samples", "2"]
    data += ["--data.max_samples_per_head", "40", "--data.kv_batch_size", "16"]
    data += ["--config", record_config(tmp_path, "fit")]
    assert main(["fit", *cli_args(pca, tiny_llama_path, tmp_path, *data)]) == 0
    (record,) = load_records(tmp_path, "fit")
    assert record["capture"]["tokens_seen"] == 8 * 32
    assert record["capture"]["num_rows"] == 40
    assert record["rows"]["0"] == 40  # the statistics read exactly the kept rows


class EndlessDocuments:
    """An endless document stream that counts what was pulled and fails loudly if anyone tries to read it all."""

    def __init__(self, limit: int = 10_000) -> None:
        self.pulled, self.limit = 0, limit

    def __call__(self, *args, **kwargs):
        for number in itertools.count():
            if number >= self.limit:
                raise AssertionError("the text source was being read to its end")
            self.pulled += 1
            yield f"Document number {number} talks about caches, keys and values at some length. " * 3


def test_windows_are_cut_from_an_endless_stream(data_tokenizer):
    source = EndlessDocuments()
    evaluation, calibration = eval_and_calibration_windows(source, data_tokenizer, 64, 4, 8)
    assert evaluation.shape == (4, 64) and calibration.shape == (8, 64)
    assert source.pulled < 50  # only what 12 windows need


def test_data_module_streams_an_endless_source(data_tokenizer, monkeypatch):
    source = EndlessDocuments()
    monkeypatch.setattr("kvlight.calibration.datamodule.iter_texts", source)
    module = KVCalibrationDataModule(dataset="a-hub-dataset-too-big-to-hold", seq_len=64, calibration_samples=8)
    module.tokenizer = data_tokenizer
    module.setup("fit")
    assert module.calibration_windows().shape == (8, 64)
    assert source.pulled < 50


def test_local_files_are_read_lazily(data_hf_offline, tmp_path):
    # iter_texts hands back a lazy iterator over the datasets streaming reader: the first documents arrive
    # without the file being parsed into memory (later parts of the file are never touched here).
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(f"Paragraph {i} of a long file." for i in range(20_000)))
    documents = iter_texts(str(path))
    assert iter(documents) is documents  # an iterator, not a list
    assert list(itertools.islice(documents, 3)) == [f"Paragraph {i} of a long file." for i in range(3)]
