"""Compressors shared like adapters: ``KVCompressor.from_pretrained`` from a local directory (offline) and from a
mocked Hugging Face Hub, ``push_to_hub`` / ``push_directory`` against a mocked ``HfApi``, the model card written from
calibration results, and one-line :class:`~kvlight.errors.HubError` refusals (offline, no such repo, not an id).
Nothing here reaches the network: ``snapshot_download`` and ``HfApi`` are replaced, or HF_HUB_OFFLINE stays set."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import Mock

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from kvlight.compressors.card import model_card
from kvlight.compressors.compressor import KVCompressor
from kvlight.compressors.hub import push_directory
from kvlight.config import CompressionConfig
from kvlight.errors import HubError, KVLightError
from kvlight.geometry import KVGeometry

GEOMETRY = KVGeometry("llama", num_layers=2, num_kv_heads=2, head_dim=8, rope=True)
FILES = {"compressor.safetensors", "compressor_config.json", "README.md"}
#: what `kvlight calibrate` writes to calibration_results_<compressor>.json (the keys the card reads).
RESULTS = {
    "model": "HuggingFaceTB/SmolLM2-135M",
    "compressor": "pca",
    "baseline_perplexity": 12.3456,
    "compressed_perplexity": 12.5,
    "perplexity_degradation_pct": 1.25,
    "compressed_cache_bytes": 240.0,
    "fp16_cache_bytes": 1000.0,
    "calibration_dataset": "builtin",
    "calibration_samples": 64,
    "seq_len": 512,
    "model_dtype": "float32",
}
COMMAND = "kvlight calibrate --model HuggingFaceTB/SmolLM2-135M --kv-budget 0.24 --push-to-hub me/smollm2-kv"


def compressor() -> KVCompressor:
    """A small PCA compressor with non-trivial weights (a random orthonormal basis, a mean), its base model named."""
    config = CompressionConfig.uniform(2, 2, 8, rank=4)
    made = KVCompressor(config, GEOMETRY, algo="pca")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in made.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    made.base_model = {"name": "HuggingFaceTB/SmolLM2-135M", "fingerprint": "0" * 24, "kv_probe": [[0.5] * 16] * 4}
    return made


def same_weights(a: KVCompressor, b: KVCompressor) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict()
    )


def one_line(error: BaseException, *words: str) -> str:
    message = str(error)
    assert "\n" not in message and isinstance(error, KVLightError), message
    for word in words:
        assert word in message, (word, message)
    return message


class FakeApi:
    """``HfApi`` stand-in: records ``create_repo`` and the files (and their text) ``upload_folder`` would send."""

    calls: list = []
    uploaded: dict[str, bytes] = {}

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, commit_message=None, **kwargs):
        FakeApi.calls.append(("upload_folder", repo_id, commit_message))
        folder = Path(folder_path)
        FakeApi.uploaded = {
            p.name: p.read_bytes() for p in folder.iterdir() if allow_patterns is None or p.name in allow_patterns
        }


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A mocked hub: pushes land in FakeApi.uploaded; snapshot_download serves them back from a local folder."""
    FakeApi.calls, FakeApi.uploaded = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    downloads = []

    def snapshot_download(repo_id, **kwargs):
        downloads.append((repo_id, kwargs))
        folder = tmp_path / "hub-cache" / repo_id.replace("/", "--")
        folder.mkdir(parents=True, exist_ok=True)
        for name, blob in FakeApi.uploaded.items():
            (folder / name).write_bytes(blob)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return downloads


# ---------------------------------------------------------------------- from_pretrained
def test_a_local_directory_loads_offline_without_the_hub(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a local directory must not reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    saved = compressor()
    saved.save_pretrained(tmp_path / "c")
    for given in (tmp_path / "c", str(tmp_path / "c")):
        loaded = KVCompressor.from_pretrained(given)
        assert same_weights(saved, loaded) and loaded.geometry == GEOMETRY
        assert loaded.base_model["name"] == "HuggingFaceTB/SmolLM2-135M"


def test_a_hub_id_is_downloaded_and_loaded(fake_hub, tmp_path):
    saved = compressor()
    url = saved.push_to_hub("me/smollm2-kv")
    loaded = KVCompressor.from_pretrained("me/smollm2-kv", revision="v1", cache_dir=tmp_path / "cache")
    assert url == "https://huggingface.co/me/smollm2-kv"
    assert same_weights(saved, loaded) and loaded.geometry == GEOMETRY
    ((repo_id, kwargs),) = fake_hub
    assert repo_id == "me/smollm2-kv" and kwargs["revision"] == "v1" and kwargs["cache_dir"] == tmp_path / "cache"
    assert set(kwargs["allow_patterns"]) == FILES


def test_a_hub_id_with_another_geometry_is_refused(fake_hub):
    compressor().push_to_hub("me/smollm2-kv")
    other = KVGeometry("gpt2", num_layers=2, num_kv_heads=4, head_dim=8, rope=False)
    with pytest.raises(KVLightError) as caught:
        KVCompressor.from_pretrained("me/smollm2-kv", geometry=other)
    one_line(caught.value, "fitted to HuggingFaceTB/SmolLM2-135M", "gpt2")


def _response(status: int) -> Mock:
    """What an HTTP error of huggingface_hub carries (only its status is read)."""
    return Mock(status_code=status, headers={})


#: what snapshot_download raises -> words the one-line HubError must hold (beside the id).
DOWNLOAD_ERRORS = {
    "offline": (LocalEntryNotFoundError("outgoing traffic has been disabled"), ["local directory", "go online"]),
    "no-repo": (RepositoryNotFoundError("404 Client Error\nmore", response=_response(404)), ["check the id", "token"]),
    "gated": (GatedRepoError("403\nmore", response=_response(403)), ["gated", "token"]),
    "no-revision": (RevisionNotFoundError("404\nmore", response=_response(404)), ["revision 'v9'"]),
    "http-500": (HfHubHTTPError("500 Server Error\ndetails", response=_response(500)), ["500 Server Error", "retry"]),
    "no-connection": (ConnectionError("Connection refused\ntrace"), ["Connection refused", "directory"]),
}


@pytest.mark.parametrize("case", DOWNLOAD_ERRORS)
def test_a_hub_failure_is_one_line_naming_the_id(case, monkeypatch):
    error, words = DOWNLOAD_ERRORS[case]

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(HubError) as caught:
        KVCompressor.from_pretrained("me/smollm2-kv", revision="v9")
    one_line(caught.value, "'me/smollm2-kv'", *words)


def test_offline_without_a_mock_is_one_line(tmp_path, monkeypatch):
    """The real snapshot_download under HF_HUB_OFFLINE (the test session sets it) with an empty cache."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as caught:
        KVCompressor.from_pretrained("nobody/no-such-compressor", cache_dir=tmp_path / "empty")
    one_line(caught.value, "'nobody/no-such-compressor'", "HF_HUB_OFFLINE", "save_pretrained")


@pytest.mark.parametrize(
    "given,words",
    [
        ("./no/such/dir", ["no directory of that name", "repo id"]),
        ("no/such/dir", ["no directory of that name", "repo id"]),
        ("/abs/missing", ["no directory of that name", "repo id"]),
        ("bad id!", ["no directory of that name", "repo id"]),
        ("", ["empty", "save_pretrained"]),
    ],
)
def test_neither_a_directory_nor_a_repo_id_is_one_line(given, words, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(HubError) as caught:
        KVCompressor.from_pretrained(given)
    one_line(caught.value, *words)


def test_a_file_or_a_repo_without_a_compressor_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(HubError) as caught:
        KVCompressor.from_pretrained(tmp_path / "weights.bin")
    one_line(caught.value, "is a file", "directory")
    (tmp_path / "other").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path / "other"))
    with pytest.raises(HubError) as caught:
        KVCompressor.from_pretrained("me/a-model-not-a-compressor")
    one_line(caught.value, "'me/a-model-not-a-compressor'", "compressor_config.json", "not a kvlight compressor")


# ---------------------------------------------------------------------- push_to_hub, push_directory
def test_push_to_hub_uploads_the_files_and_a_card(fake_hub):
    url = compressor().push_to_hub("me/smollm2-kv", private=True, token="hf_x", commit_message="first")
    assert url == "https://huggingface.co/me/smollm2-kv"
    assert ("init", "hf_x") in FakeApi.calls
    assert ("create_repo", "me/smollm2-kv", True, True) in FakeApi.calls  # exist_ok=True
    assert ("upload_folder", "me/smollm2-kv", "first") in FakeApi.calls
    assert set(FakeApi.uploaded) == FILES
    card = FakeApi.uploaded["README.md"].decode()
    assert card.startswith("---\nlibrary_name: kvlight\nbase_model: HuggingFaceTB/SmolLM2-135M\n")
    assert 'kvlight.from_pretrained(model, "me/smollm2-kv")' in card
    assert "keeping 50.0% of an fp16 cache's bytes (at long context)" in card  # nominal: rank 4 of 8, no results
    assert "## Results" not in card  # nothing was measured


def test_push_to_hub_writes_the_card_it_is_given(fake_hub):
    card = model_card(RESULTS, compressor(), COMMAND, "me/smollm2-kv")
    compressor().push_to_hub("me/smollm2-kv", card=card)
    assert FakeApi.uploaded["README.md"].decode() == card


def test_push_directory_uploads_a_saved_directory_with_its_card(fake_hub, tmp_path):
    directory = tmp_path / "compressor_pca"
    card = model_card(RESULTS, compressor(), COMMAND)
    compressor().save_pretrained(directory, card=card)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    url = push_directory(directory, "me/smollm2-kv")
    assert url == "https://huggingface.co/me/smollm2-kv"
    assert set(FakeApi.uploaded) == FILES
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # the directory is not changed
    assert FakeApi.uploaded["README.md"].decode() == card


def test_push_directory_without_a_card_names_the_call_that_writes_one(fake_hub, tmp_path):
    directory = tmp_path / "compressor_pca"
    compressor().save_pretrained(directory)
    with pytest.raises(KVLightError) as caught:
        push_directory(directory, "me/smollm2-kv")
    one_line(caught.value, "README.md", ".push_to_hub('me/smollm2-kv')")
    assert FakeApi.uploaded == {}


def _raise(error):
    def method(*args, **kwargs):
        raise error

    return method


#: (how the push fails, words of the one-line error)
PUSH_ERRORS = {
    "offline": ({"env": "1"}, ["HF_HUB_OFFLINE", "'me/smollm2-kv'"]),
    "unauthorized": (
        {"create_repo": HfHubHTTPError("401 Client Error: Unauthorized\nmore", response=_response(401))},
        ["401", "hf auth login"],
    ),
    "no-connection": ({"upload_folder": ConnectionError("Connection refused")}, ["Connection refused", "network"]),
}


@pytest.mark.parametrize("case", PUSH_ERRORS)
def test_a_push_failure_is_one_line(case, fake_hub, monkeypatch, tmp_path):
    how, words = PUSH_ERRORS[case]
    if "env" in how:
        monkeypatch.setenv("HF_HUB_OFFLINE", how["env"])
    for method in ("create_repo", "upload_folder"):
        if method in how:
            monkeypatch.setattr(FakeApi, method, _raise(how[method]))
    with pytest.raises(HubError) as caught:
        compressor().push_to_hub("me/smollm2-kv")
    one_line(caught.value, *words)


def test_push_directory_refuses_what_is_not_a_compressor_or_an_id(fake_hub, tmp_path):
    with pytest.raises(KVLightError) as caught:
        push_directory(tmp_path, "me/smollm2-kv")
    one_line(caught.value, "save_pretrained")
    compressor().save_pretrained(tmp_path / "c")
    with pytest.raises(HubError) as caught:
        push_directory(tmp_path / "c", "me/too/deep")
    one_line(caught.value, "repo id")
    assert FakeApi.uploaded == {}


# ---------------------------------------------------------------------- the model card
def test_the_card_reports_the_calibration_results():
    card = model_card(RESULTS, compressor(), COMMAND, "me/smollm2-kv")
    front = card.split("---")[1]
    assert "library_name: kvlight" in front and "base_model: HuggingFaceTB/SmolLM2-135M" in front
    assert "- kv-cache" in front and "- pca" in front
    assert "keeping 24.0% of an fp16 cache's bytes (measured at 512 tokens)" in card  # compressed / fp16 bytes
    assert "| KV budget (fraction of fp16 bytes kept, at 512 tokens) | 0.240 |" in card
    assert "| Perplexity, full cache | 12.346 |" in card and "| Perplexity, compressed | 12.500 |" in card
    assert "| Perplexity degradation | +1.25 % |" in card
    assert f"```bash\n{COMMAND}\n```" in card
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")' in card
    assert 'with kvlight.from_pretrained(model, "me/smollm2-kv") as wrapped:' in card
    assert "Passkey" not in card  # no retrieval figures measured, none shown


@pytest.mark.parametrize(
    "extra,row",
    [
        ({"kv_budget": 0.125}, "| KV budget (fraction of fp16 bytes kept, at 512 tokens) | 0.125 |"),
        ({"passkey": 0.9}, "| Passkey retrieval accuracy | 0.900 |"),
        ({"retrieval": {"passkey": 0.8, "copy_accuracy": 0.95}}, "| Copy accuracy | 0.950 |"),
    ],
    ids=["measured-budget", "passkey", "retrieval-dict"],
)
def test_the_card_shows_what_the_results_hold(extra, row):
    assert row in model_card({**RESULTS, **extra}, compressor(), None)


def test_the_card_of_the_embedded_default_and_of_a_local_model():
    embedded = model_card({**RESULTS, "model": "embedded:smollm2-135m-instruct"}, compressor(), None)
    assert (
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in embedded
        and "model, tokenizer = load_model(), load_tokenizer(None)" in embedded
    )
    local = model_card({**RESULTS, "model": "/data/models/my-llama"}, compressor(), None)
    assert "base_model" not in local.split("---")[1]  # a local path is no hub id
    assert "<user>/<repo>" in local  # no repo known yet


def test_save_pretrained_writes_the_card_beside_the_files(tmp_path):
    compressor().save_pretrained(tmp_path / "plain")
    assert {p.name for p in (tmp_path / "plain").iterdir()} == FILES - {"README.md"}
    card = model_card(RESULTS, compressor(), COMMAND)
    compressor().save_pretrained(tmp_path / "carded", card=card)
    assert (tmp_path / "carded" / "README.md").read_text() == card


def test_the_cards_snippet_runs(tmp_path, tiny_tokenizer):
    """The card's Python block, run as written, on a tiny model saved to disk and the compressor saved beside it."""
    import re

    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvlight.compressors.provenance import base_model_record

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    made = KVCompressor(CompressionConfig.uniform(2, 2, 8, rank=8), GEOMETRY, algo="pca")
    made.base_model = base_model_record(model, str(tmp_path / "model"))
    card = model_card({**RESULTS, "model": str(tmp_path / "model")}, made, None, str(tmp_path / "compressor"))
    made.save_pretrained(tmp_path / "compressor", card=card)
    (block,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    scope: dict = {}
    exec(compile(block, "card", "exec"), scope)  # noqa: S102 - the card's own snippet
    assert scope["output"].shape[1] > scope["inputs"]["input_ids"].shape[1]
    assert scope["model"].config._attn_implementation == "sdpa"  # the with-block restored it
