"""Shared fixtures. Data-pipeline fixtures are prefixed ``data_``."""

import pytest

_DATA_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Key and value caches grow with every generated token.",
    "Low-rank projections keep most of the energy of each head.",
    "A reservoir keeps a uniform sample of an unbounded stream.",
    "def f(x):\n    return x * 2  # code, numbers 0123456789 and punctuation!?",
]


def _data_byte_level_tokenizer(eos: bool):
    # A real fast tokenizer built in-process: byte-level BPE can encode any text, so no test depends on the hub.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_DATA_TRAINING_TEXT * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>" if eos else None)


@pytest.fixture(scope="session")
def data_tokenizer():
    """Byte-level BPE ``PreTrainedTokenizerFast`` with ``<eos>`` as its EOS token."""
    return _data_byte_level_tokenizer(eos=True)


@pytest.fixture(scope="session")
def data_tokenizer_no_eos():
    """The same tokenizer without an EOS token (documents are then joined directly)."""
    return _data_byte_level_tokenizer(eos=False)


@pytest.fixture
def data_hf_offline(monkeypatch, tmp_path):
    """Hugging Face libraries offline and caching under ``tmp_path``.

    The libraries read HF_HUB_OFFLINE when they are imported, so the constants are patched as well as the variable.
    """
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return tmp_path
