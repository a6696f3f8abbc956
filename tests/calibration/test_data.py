"""Text sources, token windows, rank sharding and the calibration DataModule."""

import json
import sys
import time
import types
from types import SimpleNamespace

import pytest
import torch

from kvlight.calibration.datamodule import KVCalibrationDataModule, default_capture_dir
from kvlight.calibration.shards import write_shards
from kvlight.calibration.texts import BUILTIN_CORPUS, builtin_documents, iter_texts
from kvlight.calibration.windows import (
    eval_and_calibration_windows,
    leading_special_tokens,
    pack_windows,
    shard_for_rank,
)
from kvlight.errors import CaptureError, DataLoadError

DOCS = [
    "Alpha beta gamma delta.",
    "Caches of keys and values.",
    "  ",
    "Projection to a lower rank keeps most energy; the rest is noise.",
    "Short.",
] * 6


def token_stream(texts, tokenizer):
    """The reference stream pack_windows must cut: documents tokenized and joined by EOS (if any)."""
    stream: list[int] = []
    for number, text in enumerate(texts):
        if number and tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return stream


def assert_one_line(error: BaseException) -> None:
    message = str(error)
    assert message and "\n" not in message, message


# --- builtin corpus ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [BUILTIN_CORPUS, "pydoc", "offline", "Builtin"])
def test_builtin_corpus_is_large_offline_prose(name):
    from pydoc_data.topics import topics

    documents = list(iter_texts(name))

    assert documents == [topics[key] for key in sorted(topics) if topics[key].strip()]
    assert builtin_documents() == [topics[key] for key in sorted(topics)]
    assert sum(len(text) for text in documents) > 100_000


# --- pack_windows ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eos", [True, False])
@pytest.mark.parametrize(
    ("seq_len", "skip", "limit"),
    [(1, 0, 5), (7, 0, None), (7, 3, 4), (16, 2, None), (64, 0, None), (10_000, 0, None)],
)
def test_pack_windows_are_consecutive_non_overlapping_slices(
    data_tokenizer, data_tokenizer_no_eos, eos, seq_len, skip, limit
):
    tokenizer = data_tokenizer if eos else data_tokenizer_no_eos
    stream = token_stream(DOCS, tokenizer)
    available = len(stream) // seq_len
    stop = available if limit is None else min(available, skip + limit)

    windows = list(pack_windows(iter(DOCS), tokenizer, seq_len, skip=skip, limit=limit))

    assert len(windows) == max(0, stop - skip)
    for offset, window in enumerate(windows, start=skip):
        assert window.dtype == torch.long and window.shape == (seq_len,)
        assert window.tolist() == stream[offset * seq_len : (offset + 1) * seq_len]
    if eos and seq_len == 64:
        assert any(tokenizer.eos_token_id in window.tolist() for window in windows)


@pytest.mark.parametrize(("seq_len", "skip", "limit"), [(8, 0, 1), (8, 0, 3), (5, 4, 2), (32, 1, 1)])
def test_pack_windows_stops_reading_the_source_once_it_has_enough(data_tokenizer, seq_len, skip, limit):
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield "one two three"

    per_doc = len(data_tokenizer("one two three", add_special_tokens=False)["input_ids"])
    needed_tokens = (skip + limit) * seq_len
    # k documents hold k * per_doc tokens plus k - 1 EOS separators.
    minimal = next(k for k in range(1, 10_000) if k * per_doc + k - 1 >= needed_tokens)

    windows = list(pack_windows(endless(), data_tokenizer, seq_len, skip=skip, limit=limit))

    assert len(windows) == limit
    assert pulled == minimal


def _with_bos(tokenizer):
    """``tokenizer`` that puts ``<bos>`` before every text it encodes with special tokens, as Gemma's does."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", bos_token="<bos>")


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize(("seq_len", "skip", "limit"), [(2, 0, 5), (8, 0, None), (8, 3, 4), (65, 1, None)])
def test_every_window_starts_with_the_tokens_the_tokenizer_puts_first(data_tokenizer, bos, seq_len, skip, limit):
    """A BOS-trained model (Gemma) reads each window after its ``<bos>``; the rest of the window is the stream, with
    nothing skipped or repeated; a tokenizer that adds no BOS (SmolLM2, GPT-2) gets the plain slices."""
    tokenizer = _with_bos(data_tokenizer) if bos else data_tokenizer
    prefix = [tokenizer.bos_token_id] if bos else []
    assert leading_special_tokens(tokenizer) == prefix
    body = seq_len - len(prefix)
    stream = token_stream(DOCS, tokenizer)
    stop = len(stream) // body if limit is None else min(len(stream) // body, skip + limit)

    windows = list(pack_windows(iter(DOCS), tokenizer, seq_len, skip=skip, limit=limit))

    assert len(windows) == stop - skip > 0
    for offset, window in enumerate(windows, start=skip):
        assert window.shape == (seq_len,)
        assert window.tolist() == prefix + stream[offset * body : (offset + 1) * body]


def test_a_window_with_room_only_for_the_bos_is_refused(data_tokenizer):
    with pytest.raises(ValueError, match="leading special tokens"):
        list(pack_windows(iter(DOCS), _with_bos(data_tokenizer), 1))


@pytest.mark.parametrize(("kwargs", "match"), [({"seq_len": 0}, "seq_len"), ({"seq_len": 4, "skip": -1}, "skip")])
def test_pack_windows_rejects_bad_arguments(data_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack_windows(DOCS, data_tokenizer, **kwargs)


# --- eval / calibration windows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seq_len", "eval_samples", "calibration_samples"), [(32, 4, 6), (128, 8, 16), (17, 0, 3), (64, 5, 0)]
)
def test_eval_and_calibration_windows_are_disjoint_prefix_windows_and_repeatable(
    data_tokenizer, seq_len, eval_samples, calibration_samples
):
    calls = 0

    def factory():
        nonlocal calls
        calls += 1
        return iter_texts(BUILTIN_CORPUS)

    evaluation, calibration = eval_and_calibration_windows(
        factory, data_tokenizer, seq_len, eval_samples, calibration_samples
    )
    again = eval_and_calibration_windows(factory, data_tokenizer, seq_len, eval_samples, calibration_samples)
    expected = list(
        pack_windows(iter_texts(BUILTIN_CORPUS), data_tokenizer, seq_len, limit=eval_samples + calibration_samples)
    )

    assert calls == 2  # one pass over the source per call
    assert evaluation.dtype == calibration.dtype == torch.long
    assert evaluation.shape == (eval_samples, seq_len) and calibration.shape == (calibration_samples, seq_len)
    assert evaluation.tolist() == [window.tolist() for window in expected[:eval_samples]]
    assert calibration.tolist() == [window.tolist() for window in expected[eval_samples:]]
    assert not {tuple(row) for row in evaluation.tolist()} & {tuple(row) for row in calibration.tolist()}
    assert torch.equal(again[0], evaluation) and torch.equal(again[1], calibration)


@pytest.mark.parametrize(
    ("seq_len", "eval_samples", "calibration_samples"), [(64, 100, 100), (10_000, 1, 1), (4, 0, 10_000)]
)
def test_too_short_text_says_how_many_windows_it_holds(data_tokenizer, seq_len, eval_samples, calibration_samples):
    holds = len(token_stream([text for text in DOCS if text.strip()], data_tokenizer)) // seq_len

    with pytest.raises(DataLoadError) as caught:
        eval_and_calibration_windows(
            lambda: [text for text in DOCS if text.strip()], data_tokenizer, seq_len, eval_samples, calibration_samples
        )

    assert_one_line(caught.value)
    message = str(caught.value)
    assert f"holds only {holds} windows of {seq_len} tokens" in message
    assert "--calibration-samples" in message and "--seq-len" in message


# --- local files -------------------------------------------------------------------------------------------------


def _write_txt(path):
    path.write_text("First paragraph\nstill first.\n\nSecond one.\n\n\n\nThird.\n")
    return "first paragraph", 3


def _write_jsonl(path):
    rows = [{"text": "one", "id": 1}, {"text": "  ", "id": 2}, {"text": "two", "id": 3}, {"text": None, "id": 4}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return "one", 2


def _write_json(path):
    path.write_text(json.dumps([{"text": "uno"}, {"text": "dos"}, {"text": "tres"}]))
    return "uno", 3


def _write_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "", "p2", "p3", "p4"], "n": [1, 2, 3, 4, 5]}), path)
    return "p1", 4


WRITERS = {
    ".txt": _write_txt,
    ".text": _write_txt,
    ".jsonl": _write_jsonl,
    ".json": _write_json,
    ".parquet": _write_parquet,
}


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_local_files_stream_through_datasets(data_hf_offline, tmp_path, suffix):
    path = tmp_path / f"corpus{suffix}"
    first, count = WRITERS[suffix](path)

    texts = list(iter_texts(str(path)))

    assert len(texts) == count
    assert texts[0].lower().startswith(first)
    assert all(text.strip() for text in texts)


def test_txt_documents_are_paragraphs(data_hf_offline, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("line one\nline two\n\nnext paragraph\n")

    assert [text.strip() for text in iter_texts(str(path))] == ["line one\nline two", "next paragraph"]


def test_directory_reads_every_file_of_its_format_in_sorted_order(data_hf_offline, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "nested").mkdir(parents=True)
    (corpus / "b.jsonl").write_text('{"body": "from b"}\n')
    (corpus / "a.jsonl").write_text('{"body": "from a"}\n')
    (corpus / "nested" / "c.json").write_text('[{"body": "from c"}]')
    (corpus / "README.md").write_text("not data")
    (corpus / ".hidden.jsonl").write_text('{"body": "hidden"}\n')

    assert list(iter_texts(str(corpus), text_field="body")) == ["from a", "from b", "from c"]


# --- errors -----------------------------------------------------------------------------------------------------


# Each case: files to create under tmp_path (a name ending in "/" is an empty directory), the dataset argument
# ("{tmp}" is replaced by tmp_path, relative paths resolve inside it), extra iter_texts arguments, and fragments
# the message must contain.
ERROR_CASES = [
    pytest.param({}, "{tmp}/missing.txt", {}, ["no such file", "missing.txt"], id="missing-file"),
    pytest.param({}, "./nowhere/data", {}, ["no such file", "nowhere"], id="missing-relative-path"),
    pytest.param({}, "a/b/c", {}, ["no such file"], id="missing-deep-path"),
    pytest.param(
        {},
        "wikitext",
        {},
        [
            "could not load dataset 'wikitext' (config 'wikitext-2-raw-v1', split 'train') from the hub: ",
            "--calibration-dataset path/to/text.txt",
            "--calibration-dataset builtin",
        ],
        id="offline-hub-dataset",
    ),
    pytest.param(
        {},
        "someone/some-corpus",
        {"split": "validation"},
        ["could not load dataset 'someone/some-corpus' (split 'validation') from the hub"],
        id="offline-owner-name-hub-dataset",
    ),
    pytest.param(
        {"rows.jsonl": '{"content": "x", "id": 1}\n'},
        "rows.jsonl",
        {},
        ["no 'text' column", "content", "id", "--text-field"],
        id="missing-text-field",
    ),
    pytest.param({"rows.jsonl": '{"text": 3}\n'}, "rows.jsonl", {}, ["holds int values"], id="non-text-field"),
    pytest.param({"rows.csv": "text\nx\n"}, "rows.csv", {}, ["unsupported file type '.csv'"], id="unsupported-type"),
    pytest.param({"empty/": None}, "empty", {}, ["holds no .txt"], id="empty-directory"),
    pytest.param(
        {"mixed/a.txt": "a", "mixed/b.jsonl": '{"text": "b"}\n'},
        "mixed",
        {},
        ["mixes file types (.jsonl, .txt)"],
        id="mixed-directory",
    ),
    pytest.param(
        {"bad.jsonl": '{"text": "ok"}\n{not json\n'}, "bad.jsonl", {}, ["could not read", "bad.jsonl"], id="bad-jsonl"
    ),
]


@pytest.mark.parametrize(("files", "dataset", "kwargs", "fragments"), ERROR_CASES)
def test_bad_sources_raise_one_line_data_load_errors(
    data_hf_offline, tmp_path, monkeypatch, files, dataset, kwargs, fragments
):
    monkeypatch.chdir(tmp_path)
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        else:
            path.write_text(content)
    started = time.monotonic()

    with pytest.raises(DataLoadError) as caught:
        list(iter_texts(dataset.format(tmp=tmp_path), **kwargs))

    assert time.monotonic() - started < 10  # offline: no network retries
    assert_one_line(caught.value)
    for fragment in fragments:
        assert fragment in str(caught.value)


# --- rank sharding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 8, 17])
def test_shard_for_rank_covers_every_index_once(n, world_size):
    shares = [shard_for_rank(n, rank, world_size) for rank in range(world_size)]

    assert sorted(index for share in shares for index in share) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(share == sorted(share) for share in shares)


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (-1, 2), (0, 0)])
def test_shard_for_rank_rejects_bad_ranks(rank, world_size):
    with pytest.raises(ValueError):
        shard_for_rank(4, rank, world_size)


# --- DataModule -------------------------------------------------------------------------------------------------


def make_module(tokenizer, rank=None, world_size=None, **overrides):
    settings = {"seq_len": 32, "eval_samples": 7, "calibration_samples": 5, "batch_size": 3} | overrides
    module = KVCalibrationDataModule(**settings)
    module.tokenizer = tokenizer
    if rank is not None:
        module.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    return module


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_partition_eval_and_calibration_windows(data_tokenizer, world_size):
    reference = make_module(data_tokenizer)
    reference.setup("fit")
    all_eval, all_calibration = reference.eval_windows(), reference.calibration_windows()

    eval_rows, calibration_rows = [], []
    for rank in range(world_size):
        module = make_module(data_tokenizer, rank, world_size)
        module.setup("fit")
        batches = list(module.val_dataloader())
        assert all(batch.dtype == torch.long and batch.shape[1] == 32 and batch.shape[0] <= 3 for batch in batches)
        assert len(batches) == len(module.val_dataloader())
        tested = torch.cat(list(module.test_dataloader()))
        validated = torch.cat(batches)
        assert torch.equal(tested, validated)
        eval_rows += validated.tolist()
        calibration_rows += module.calibration_windows().tolist()

    assert sorted(eval_rows) == sorted(all_eval.tolist()) and len(eval_rows) == 7
    assert sorted(calibration_rows) == sorted(all_calibration.tolist()) and len(calibration_rows) == 5
    assert not {tuple(row) for row in eval_rows} & {tuple(row) for row in calibration_rows}


def test_setup_loads_the_tokenizer_of_the_model_lazily(data_tokenizer, monkeypatch):
    requested = []

    def load_tokenizer(model):
        requested.append(model)
        return data_tokenizer

    monkeypatch.setitem(sys.modules, "kvlight.models", types.SimpleNamespace(load_tokenizer=load_tokenizer))
    module = KVCalibrationDataModule(model="some/model", seq_len=16, eval_samples=2, calibration_samples=2)

    module.setup("validate")
    module.setup("fit")  # windows are built once

    assert requested == ["some/model"]
    assert module.tokenizer is data_tokenizer
    assert module.calibration_windows().shape == (2, 16)
    assert module.hparams.model == "some/model"


@pytest.mark.parametrize(
    "field",
    [
        {"dataset": "pydoc"},
        {"dataset_config": "x"},
        {"split": "test"},
        {"text_field": "body"},
        {"seq_len": 33},
        {"calibration_samples": 6},
        {"eval_samples": 8},
        {"max_samples_per_head": 99},
        {"seed": 1},
    ],
)
def test_capture_key_changes_with_every_setting_that_changes_the_capture(data_tokenizer, field):
    base = make_module(data_tokenizer).capture_key("model-a")

    assert make_module(data_tokenizer).capture_key("model-a") == base
    assert len(base) == 64 and int(base, 16) >= 0
    assert make_module(data_tokenizer, **field).capture_key("model-a") != base
    assert make_module(data_tokenizer).capture_key("model-b") != base
    assert make_module(data_tokenizer, 0, 2).capture_key("model-a") != make_module(data_tokenizer, 1, 2).capture_key(
        "model-a"
    )
    # Settings that do not change the captured rows share the capture.
    assert make_module(data_tokenizer, batch_size=1, kv_batch_size=7, num_workers=2).capture_key("model-a") == base


def test_capture_key_follows_local_file_edits(data_tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("version one")
    before = make_module(data_tokenizer, dataset=str(path)).capture_key("m")
    path.write_text("version two, longer")

    assert make_module(data_tokenizer, dataset=str(path)).capture_key("m") != before


@pytest.mark.parametrize(
    ("capture_dir", "env", "expected"),
    [
        ("explicit", None, "explicit"),
        (None, "kvcache", "kvcache/captures"),
        (None, None, "home/.cache/kvlight/captures"),
    ],
)
def test_capture_path(data_tokenizer, tmp_path, monkeypatch, capture_dir, env, expected):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if env is None:
        monkeypatch.delenv("KVLIGHT_CACHE", raising=False)
    else:
        monkeypatch.setenv("KVLIGHT_CACHE", str(tmp_path / env))
    module = make_module(data_tokenizer, capture_dir=str(tmp_path / capture_dir) if capture_dir else None)

    path = module.capture_path("fingerprint")

    assert path == tmp_path / expected / module.capture_key("fingerprint")[:16]
    if capture_dir is None:
        assert path.parent == default_capture_dir()


def test_train_dataloader_needs_captured_shards(data_tokenizer):
    with pytest.raises(CaptureError) as caught:
        make_module(data_tokenizer).train_dataloader()

    assert_one_line(caught.value)
    assert "capture" in str(caught.value)


def test_train_dataloader_streams_the_recorded_shards(data_tokenizer, tmp_path):
    keys = torch.arange(12 * 2 * 1 * 4, dtype=torch.float32).reshape(12, 2, 1, 4)
    write_shards(tmp_path / "capture", keys, -keys, rows_per_shard=5, meta={})
    module = make_module(data_tokenizer, kv_batch_size=4)
    module.stream_shards(tmp_path / "capture", num_batches=5)

    batches = list(module.train_dataloader())

    assert len(batches) == 5
    assert all(batch["keys"].shape == (4, 2, 1, 4) for batch in batches)
    assert all(torch.equal(batch["values"], -batch["keys"]) for batch in batches)
    assert module.kv_stream is not None and len(module.kv_stream) == 5


@pytest.mark.parametrize(
    ("setting", "flag"),
    [
        ({"seq_len": 0}, "--seq-len"),
        ({"eval_samples": -1}, "--eval-samples"),
        ({"kv_batch_size": 0}, "data.kv_batch_size"),
    ],
)
def test_invalid_settings_are_rejected(setting, flag):
    with pytest.raises(DataLoadError) as caught:
        KVCalibrationDataModule(**setting)

    assert_one_line(caught.value)
    assert flag in str(caught.value)
