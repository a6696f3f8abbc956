"""``kvlight eval`` and the harness model ``kvlight`` (issue 32), offline on the tiny models of conftest.py.

- a full-rank compressor reproduces the model, so through the ``kvlight`` cache log-likelihoods, rolling
  log-likelihoods and greedy ``generate_until`` equal the plain model's (and the ``dynamic`` cache's), in batches too;
- every prompt reaches the cache in chunks of ``prefill_chunk`` tokens, whichever cache;
- RULER's niah_single_1 is generated from a tokenizer with no network and no nltk download attempt, and runs end to
  end through ``lm_eval.simple_evaluate(model="kvlight", ...)`` and ``kvlight eval``;
- a task that needs the hub, and every bad flag, ends ``kvlight eval`` with one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import one_error_line

from kvlight.cli import main
from kvlight.compressors.compressor import KVCompressor
from kvlight.config import CompressionConfig
from kvlight.geometry import kv_geometry

ROOT = Path(__file__).resolve().parents[2]
#: (context, continuation) pairs: short, long enough for several 16-token chunks, an empty context.
PAIRS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Python's standard library is very extensive, offering a wide range of facilities. " * 3, " It contains"),
    ("", "A continuation scored from the prefix token alone."),
]
PROMPTS = ["Once upon a time", "The standard library contains built-in modules that provide access to " * 2]
CHUNK = 16


def _full_rank(model) -> KVCompressor:
    """A full-rank PCA compressor (identity basis, zero mean): lossless, so the compressed cache is the model's."""
    geometry = kv_geometry(model)
    config = CompressionConfig.uniform(
        geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=geometry.head_dim
    )
    return KVCompressor(config, geometry, algo="pca")


@pytest.fixture(scope="module")
def harness():
    return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def compressor_dirs(tiny_models, tmp_path_factory):
    """``{arch: directory}`` of a saved full-rank compressor of each tiny model."""
    root = tmp_path_factory.mktemp("full-rank")
    dirs = {}
    for arch, model in tiny_models.items():
        dirs[arch] = root / arch
        _full_rank(model).save_pretrained(dirs[arch])
    return dirs


def _lm(arch, cache, tiny_models, tiny_tokenizer, compressor_dirs, **kwargs):
    from kvlight.eval import KVLightLM

    return KVLightLM(
        pretrained=tiny_models[arch],
        tokenizer=tiny_tokenizer,
        cache=cache,
        compressor_path=str(compressor_dirs[arch]) if cache == "kvlight" else None,
        prefill_chunk=CHUNK,
        **kwargs,
    )


def _instances(kind: str, arguments: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


@torch.no_grad()
def _reference_loglikelihood(model, lm, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) from one plain forward of the model, no cache."""
    if context:
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
    else:
        context_ids, continuation_ids = [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False)
    ids = torch.tensor([context_ids + continuation_ids])
    logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0, -len(continuation_ids) :]
    targets = torch.tensor(continuation_ids)
    return float(logp.gather(-1, targets[:, None]).sum()), bool((logp.argmax(-1) == targets).all())


# ------------------------------------------------------------------------------- equal to the plain model
EQUAL_CASES = [
    (arch, cache, batch) for arch in ("llama", "gpt2") for cache in ("kvlight", "dynamic") for batch in (1, 2)
]


@pytest.mark.parametrize(("arch", "cache", "batch"), EQUAL_CASES)
def test_loglikelihoods_equal_the_plain_model(
    harness, arch, cache, batch, tiny_models, tiny_tokenizer, compressor_dirs
):
    model = tiny_models[arch]
    with _lm(arch, cache, tiny_models, tiny_tokenizer, compressor_dirs, batch_size=batch) as lm:
        got = lm.loglikelihood(_instances("loglikelihood", PAIRS), disable_tqdm=True)
        expected = [_reference_loglikelihood(model, lm, *pair) for pair in PAIRS]
        for (value, greedy), (want, want_greedy) in zip(got, expected):
            assert value == pytest.approx(want, abs=1e-4)
            assert greedy == want_greedy


@pytest.mark.parametrize(("arch", "cache", "batch"), EQUAL_CASES)
def test_generate_until_equals_the_plain_model(
    harness, arch, cache, batch, tiny_models, tiny_tokenizer, compressor_dirs
):
    from lm_eval.models.utils import postprocess_generated_text

    model = tiny_models[arch]
    settings = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    with _lm(arch, cache, tiny_models, tiny_tokenizer, compressor_dirs, batch_size=batch) as lm:
        got = lm.generate_until(_instances("generate_until", [(p, settings) for p in PROMPTS]), disable_tqdm=True)
    for prompt, text in zip(PROMPTS, got):
        ids = torch.tensor([tiny_tokenizer.encode(prompt)])
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.eos_token_id)
        expected = tiny_tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        assert text == postprocess_generated_text(expected, ["\n\n", tiny_tokenizer.eos_token], None)


def test_rolling_windows_sum_to_the_whole(harness, tiny_models, tiny_tokenizer, compressor_dirs):
    """One string longer than max_length: the sum over its disjoint windows, through the compressed cache."""
    text = PAIRS[1][0] * 4
    with _lm("llama", "kvlight", tiny_models, tiny_tokenizer, compressor_dirs, max_length=40) as lm:
        compressed = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    with _lm("llama", "dynamic", tiny_models, tiny_tokenizer, compressor_dirs, max_length=40) as lm:
        plain = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert compressed[0] == pytest.approx(plain[0], abs=1e-3)
    assert plain[0] < 0


# ------------------------------------------------------------------------------- chunked prefill
def _spy(lm):
    """Record, per cache the LM makes, how many tokens each update of layer 0 brings."""
    calls: list[list[int]] = []
    make = lm.new_cache

    def new_cache():
        cache = make()
        seen: list[int] = []
        calls.append(seen)
        update = cache.update

        def counted(key_states, value_states, layer_idx, *args, **kwargs):
            if layer_idx == 0:
                seen.append(int(key_states.shape[-2]))
            return update(key_states, value_states, layer_idx, *args, **kwargs)

        cache.update = counted
        return cache

    lm.new_cache = new_cache
    return calls


@pytest.mark.parametrize("cache", ["kvlight", "dynamic", "quanto-int4"])
def test_prompts_fill_the_cache_in_chunks(harness, cache, tiny_models, tiny_tokenizer, compressor_dirs):
    if cache.startswith("quanto"):
        pytest.importorskip("optimum.quanto")
    text = PAIRS[1][0]
    tokens = len(tiny_tokenizer.encode(text))
    assert tokens > 2 * CHUNK
    with _lm("llama", cache, tiny_models, tiny_tokenizer, compressor_dirs) as lm:
        calls = _spy(lm)
        lm.loglikelihood(_instances("loglikelihood", [(text, " end")]), disable_tqdm=True)
        settings = {"until": [], "max_gen_toks": 3, "do_sample": False}
        lm.generate_until(_instances("generate_until", [(text, settings)]), disable_tqdm=True)
    scored, generated = calls
    whole = len(lm.tok_encode(text + " end")) - 1  # the last token is only predicted
    assert scored == [CHUNK] * (whole // CHUNK) + ([whole % CHUNK] if whole % CHUNK else [])
    prefill = tokens - 1  # the last prompt token is generate's first step
    chunks = [CHUNK] * (prefill // CHUNK) + ([prefill % CHUNK] if prefill % CHUNK else [])
    assert generated[: len(chunks)] == chunks
    assert generated[len(chunks) :] and set(generated[len(chunks) :]) == {1}  # then one token per step


# ------------------------------------------------------------------------------- report
@pytest.mark.parametrize(
    ("values", "low", "high", "method"),
    [
        ([0] * 10, 0.0, 0.2775, "wilson"),
        ([1] * 10, 0.7225, 1.0, "wilson"),
        ([1] * 5 + [0] * 5, 0.2366, 0.7634, "wilson"),
        ([0.5, 0.5, 0.5, 0.5], 0.5, 0.5, "normal"),
    ],
)
def test_intervals(harness, values, low, high, method):
    from kvlight.eval.report import interval

    got = interval(values)
    assert got[0] == pytest.approx(low, abs=1e-4) and got[1] == pytest.approx(high, abs=1e-4) and got[2] == method


# ------------------------------------------------------------------------------- RULER offline, end to end
LENGTH = 448  # the tiny tokenizer (320 tokens) needs ~390 for the template, a needle and 128 generated tokens


def _offline_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_offline_ruler_generation_tries_no_download(harness, tiny_llama_path):
    """A fresh process (lm-eval's prepare_niah tries nltk's download when first imported): niah_single_1 is built from
    the tokenizer alone, and nltk never tries the network nor prints."""
    code = (
        "import sys, nltk\n"
        "calls = []\n"
        "nltk.download = lambda *a, **k: calls.append(a) or False\n"
        "from kvlight.eval.run import build_tasks\n"
        "from kvlight.models import load_tokenizer\n"
        f"sets = build_tasks(['niah_single_1'], [{LENGTH}], load_tokenizer({tiny_llama_path!r}))\n"
        "task = sets[0].tasks['niah_single_1']\n"
        "docs = list(task.test_docs())\n"
        "assert nltk.download is not None\n"
        "print(len(docs), max(d['length'] for d in docs), docs[0]['max_length'], len(calls))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_offline_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    count, longest, length, downloads = map(int, done.stdout.split()[-4:])
    assert count > 0 and length == LENGTH and longest <= LENGTH
    # punkt_tab is not installed here: prepare_niah's download ran into kvlight's offline no-op, not into nltk's
    assert downloads == 0
    assert "nltk_data" not in done.stdout + done.stderr


def test_split_sentences_falls_back_offline(harness):
    from kvlight.eval.ruler import split_sentences

    assert split_sentences('One. "Two?" Three!  Four') == ["One.", '"Two?"', "Three!", "Four"]


@pytest.fixture(scope="module")
def built_ruler(harness, tiny_llama_path):
    from kvlight.eval.run import build_tasks

    return build_tasks(["niah_single_1"], [LENGTH], tiny_llama_path)


def test_simple_evaluate_model_kvlight(harness, built_ruler, tiny_llama_path, tmp_path):
    """``lm_eval.simple_evaluate(model="kvlight", model_args=...)`` once kvlight.eval is imported."""
    import lm_eval

    import kvlight.eval  # noqa: F401  (registers "kvlight")
    from kvlight.models import load_model

    _full_rank(load_model(tiny_llama_path)).save_pretrained(tmp_path / "c")
    scores = {}
    for cache in ("dynamic", "kvlight"):
        args = f"pretrained={tiny_llama_path},cache={cache},prefill_chunk=32"
        if cache == "kvlight":
            args += f",compressor_path={tmp_path / 'c'}"
        results = lm_eval.simple_evaluate(
            model="kvlight",
            model_args=args,
            tasks=list(built_ruler[0].tasks.values()),
            task_manager=built_ruler[0].manager,
            limit=2,
            bootstrap_iters=0,
        )
        assert results["config"]["cache"] == cache and results["config"]["prefill_chunk"] == 32
        scores[cache] = [s["resps"] for s in results["samples"]["niah_single_1"]]
    assert scores["kvlight"] == scores["dynamic"]


def test_kvlight_eval_writes_one_table(harness, built_ruler, tiny_llama_path, tmp_path, capsys):
    from kvlight.models import load_model

    _full_rank(load_model(tiny_llama_path)).save_pretrained(tmp_path / "c")
    output = tmp_path / "out"
    argv = ["eval", "--model", tiny_llama_path, "--caches", "dynamic,kvlight", "--compressor-path", str(tmp_path / "c")]
    argv += ["--tasks", "niah_single_1", "--max-seq-lengths", str(LENGTH), "--limit", "2", "--output-dir", str(output)]
    argv += ["--prefill-chunk", "32", "--device", "cpu"]
    assert main(argv) == 0
    results = json.loads((output / "results.json").read_text())
    rows = {row["cache"]: row for row in results["rows"] if row["metric"] == "score"}
    assert set(rows) == {"dynamic", "kvlight"}
    assert rows["dynamic"]["value"] == rows["kvlight"]["value"] and rows["dynamic"]["n"] == 2
    assert rows["dynamic"]["interval"] == "wilson" and rows["dynamic"]["length"] == LENGTH
    table = (output / "results.md").read_text()
    assert "| task | length | metric | n | dynamic | kvlight |" in table
    assert "| niah_single_1 | 448 | score | 2 |" in table
    assert "| niah_single_1 | 448 | score | 2 |" in capsys.readouterr().out
    assert sorted(p.name for p in output.iterdir()) == ["results.json", "results.md"]


# ------------------------------------------------------------------------------- one line, exit 2
def test_a_hub_only_task_fails_in_one_line(harness, tiny_llama_path, tmp_path):
    argv = ["eval", "--model", tiny_llama_path, "--caches", "dynamic", "--tasks", "niah_single_2", "--limit", "1"]
    argv += ["--output-dir", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-m", "kvlight.cli", *argv], capture_output=True, text=True, env=_offline_env(), timeout=300
    )
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "niah_single_2" in line and "baber/paul_graham_essays" in line and "niah_single_1" in line
    assert not (tmp_path / "out").exists()


BAD = {
    "kvlight without a compressor": (["--caches", "kvlight"], "needs --compressor-path"),
    "unknown cache": (["--caches", "dynamic,fp8"], "unknown cache 'fp8'"),
    "compressor without kvlight": (["--caches", "dynamic", "--compressor-path", "x"], "add kvlight to --caches"),
    "zero limit": (["--caches", "dynamic", "--limit", "0"], "--limit '0' must be"),
    "bad length": (["--caches", "dynamic", "--max-seq-lengths", "2k,4096"], "--max-seq-lengths '2k,4096' must be"),
    "empty task": (["--caches", "dynamic", "--tasks", "niah_single_1,"], "--tasks"),
    "bad dtype": (["--caches", "dynamic", "--dtype", "int8"], "--dtype"),
    "unknown flag": (["--caches", "dynamic", "--seq-len", "8"], "unrecognized arguments"),
    "output under a file": (["--caches", "dynamic", "--output-dir", "{tmp}/a-file/out"], "cannot write"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(case, capsys, tmp_path):
    argv, fragment = BAD[case]
    (tmp_path / "a-file").write_text("")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert main(["eval", *argv]) == 2
    captured = capsys.readouterr()
    assert fragment in one_error_line(captured.err)
    assert captured.out == ""


def test_without_the_harness_says_what_to_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a)
    )
    assert main(["eval", "--caches", "dynamic", "--output-dir", str(tmp_path / "out")]) == 2
    assert "pip install 'kvlight[eval]'" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_import_kvlight_loads_no_harness():
    code = "import sys, kvlight, kvlight.cli, kvlight.cli.eval; kvlight.compress; assert 'lm_eval' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_offline_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
