"""The command line, in-process: LightningCLI ``fit``/``validate`` on tiny models, the ``calibrate`` one-shot, the
shipped YAML configs, and bad input (one line on stderr, exit code 2, nothing written)."""

import csv
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import one_error_line, tiny_calibrate_args

from kvlight.cli import main
from kvlight.cli.lightning import lightning_cli
from kvlight.compressors.compressor import PCACompressor, load_compressor
from kvlight.config import CompressionConfig
from kvlight.geometry import kv_geometry

REPO = Path(__file__).resolve().parents[2]
YAMLS = sorted((REPO / "configs").glob("*.yaml"))
TINY_DATA = ["--data.seq_len", "32", "--data.calibration_samples", "4", "--data.eval_samples", "2"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI compares its args with sys.argv; make sys.argv look like a bare ``kvlight`` call."""
    monkeypatch.setattr("sys.argv", ["kvlight"])


def lightning_args(config: Path, model: str, root: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(config),
        "--model.model",
        model,
        *TINY_DATA,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--model.compression.rank",
        "8",
        "--model.compression.rank_k",  # a YAML may set rank_k/rank_v for the embedded default's head_dim 64
        "8",
        "--model.compression.rank_v",
        "8",
        "--model.compression.sink_tokens",  # plain latents, so the byte counts below follow the rank alone
        "0",
        "--model.compression.recent_window",
        "0",
        "--model.compression.latent_bits",
        "null",
        *extra,
    ]


def compressor_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------- 6. every shipped YAML parses
@pytest.mark.parametrize("config", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_parses_through_the_lightning_cli(config, capsys):
    assert YAMLS, "no configs/*.yaml found"
    with pytest.raises(SystemExit) as done:
        lightning_cli(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(config.read_text())

    def same(written: dict, printed: dict, where: str) -> None:  # every key written parses to its value
        for key, value in written.items():
            if isinstance(value, dict) and isinstance(printed.get(key), dict):
                same(value, printed[key], f"{where}.{key}")
            else:
                assert printed[key] == value, f"{config.name}: {where}.{key}"

    for section in ("model", "data"):
        same(written[section], printed[section], section)
    assert printed["trainer"]["max_epochs"] == written["trainer"]["max_epochs"]
    assert "model" not in printed["data"]  # linked from model.model: one model, one tokenizer


@pytest.mark.parametrize("config", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_instantiates_on_a_tiny_model(config, tiny_llama_path, tmp_path):
    # lightning_args picks the CPU; FSDP refuses it, so multi-GPU YAMLs instantiate with the default strategy here.
    single = ["--trainer.strategy", "auto", "--trainer.devices", "1"] if not torch.cuda.is_available() else []
    cli = lightning_cli(lightning_args(config, tiny_llama_path, tmp_path, *single), run=False)
    written = yaml.safe_load(config.read_text())
    assert cli.model.hparams.compression["compressor"] == written["model"]["compression"]["compressor"]
    assert cli.model.compressor.latent_dims() == [(2 * 8, 2 * 8)] * 2  # 2 KV heads x rank 8, both layers
    assert cli.datamodule.hparams.model == tiny_llama_path
    assert cli.trainer.max_epochs == written["trainer"]["max_epochs"]


# ---------------------------------------------------------------------- 5. fit -> validate --ckpt_path
FIT_CASES = {
    "llama-pca": ("llama", "smollm2_pca.yaml", []),
    "gpt2-kvsplice-random": (
        "gpt2",
        "smollm2_kvsplice.yaml",
        [
            "--trainer.max_epochs",
            "8",
            "--model.backend_options",
            '{"kvsplice": {"init": "random"}}',
            "--model.objective.lr",
            "0.02",
            "--data.kv_batch_size",
            "32",
        ],
    ),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fit_then_validate_from_checkpoint(case, tmp_path, tiny_model_paths, tiny_rows, kvlight_cache):
    from kvlight.calibration.module import KVCalibrationModule

    arch, config_name, extra = FIT_CASES[case]
    config, model = REPO / "configs" / config_name, tiny_model_paths[arch]
    logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]

    assert main(["fit", *lightning_args(config, model, tmp_path, *extra, *logger)]) == 0

    run = tmp_path / "lightning_logs" / "version_0"
    checkpoint = run / "checkpoints" / "last.ckpt"
    state = compressor_state(checkpoint)
    # Only the compressor is checkpointed: never the frozen model.
    assert state and all(key.startswith("compressor.") for key in state)
    assert any(key.endswith("mean") and state[key].abs().max() > 0 for key in state)  # the statistics pass ran
    assert any(kvlight_cache.joinpath("captures").iterdir())  # captures went to $KVLIGHT_CACHE

    if "kvsplice" in case:  # the Adam epochs after the statistics epoch lowered the logged loss
        with (run / "metrics.csv").open() as handle:
            losses = [float(row["train/loss_step"]) for row in csv.DictReader(handle) if row.get("train/loss_step")]
        assert len(losses) >= 20
        assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses

    # Inference code reloads the compressor from the checkpoint alone.
    module = KVCalibrationModule.load_from_checkpoint(checkpoint)
    assert_same_state({f"compressor.{k}": v for k, v in module.compressor.state_dict().items()}, state)
    with torch.no_grad():
        assert math.isfinite(float(module.compressor.reconstruction_loss(*tiny_rows[arch]["heldout"])))

    validated = lightning_cli(
        ["validate", *lightning_args(config, model, tmp_path, *extra), "--ckpt_path", str(checkpoint)]
    )
    results = validated.model.results
    assert_same_state({f"compressor.{k}": v for k, v in validated.model.compressor.state_dict().items()}, state)
    assert all(math.isfinite(results[key]) for key in ("baseline_perplexity", "compressed_perplexity"))
    assert 1 < results["baseline_perplexity"] < 320  # below uniform guessing over the tiny vocabulary
    assert results["compressed_perplexity"] >= 0.9 * results["baseline_perplexity"]
    geometry = kv_geometry(module.frozen)
    positions = 2 * 32 * 4 if geometry.rope else 0  # eval batch of 2 windows x 32 tokens, int32 positions
    full = results["dynamic_cache_bytes"]
    assert results["compressed_cache_bytes"] == full / 2 + positions  # rank 8 of head_dim 16
    assert results["memory_savings_pct"] == pytest.approx(100 * (0.5 - positions / full))


# ---------------------------------------------------------------------- 5. calibrate one-shot
PRINTED = {
    "Baseline perplexity": "baseline_perplexity",
    "Compressed perplexity": "compressed_perplexity",
    "Perplexity degradation": "perplexity_degradation_pct",
    "Memory savings": "memory_savings_pct",
    "Calibration time": "calibration_time_s",
}


def parse_printed(stdout: str) -> dict[str, float]:
    values = {}
    for label, key in PRINTED.items():
        match = re.search(rf"^{label}:\s+([+-]?[0-9.]+)[%s]?(?: \(.*\))?$", stdout, flags=re.MULTILINE)
        assert match, f"missing line {label!r} in:\n{stdout}"
        values[key] = float(match.group(1))
    return values


def test_config_uniform_then_calibrate_pca(tmp_path, tiny_llama_path, tiny_models, kvlight_cache, capsys):
    config_path = tmp_path / "cfg.json"
    argv = ["config", "uniform", "--model", tiny_llama_path, "--rank", "8", "--compressor", "pca"]
    assert main([*argv, "-o", str(config_path)]) == 0
    capsys.readouterr()

    output = tmp_path / "out"
    code = main(
        tiny_calibrate_args(tiny_llama_path, output, "--compressor", "pca", "--compression-config", str(config_path))
    )
    stdout = capsys.readouterr().out
    assert code == 0
    printed = parse_printed(stdout)
    assert f"Results saved to {output}/calibration_results_pca.json and {output}/compressor_pca.pt" in stdout

    results = json.loads((output / "calibration_results_pca.json").read_text())
    for key, value in printed.items():
        decimals = 1 if key in ("memory_savings_pct", "calibration_time_s") else 2
        assert value == pytest.approx(results[key], abs=0.5 * 10**-decimals + 1e-9), key
    assert results["perplexity_degradation_pct"] == pytest.approx(
        100 * (results["compressed_perplexity"] / results["baseline_perplexity"] - 1)
    )
    assert results["compression_config"] == json.loads(config_path.read_text())
    # The memory a user's budget is read against: an fp16 cache, whatever dtype the model ran in.
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[results["model_dtype"]]
    assert results["fp16_cache_bytes"] == results["dynamic_cache_bytes"] * 2 / itemsize
    vs_fp16 = 100 * (1 - results["compressed_cache_bytes"] / results["fp16_cache_bytes"])
    assert results["memory_savings_vs_fp16_pct"] == pytest.approx(vs_fp16)
    assert (f"; {vs_fp16:.1f}% vs fp16)" in stdout) == (itemsize == 4)
    assert results["compressor"] == "pca" and results["seq_len"] == 32
    # The first result line is the budget as --kv-budget counts it: the bytes kept, of an fp16 DynamicCache's.
    assert results["kv_budget"] == pytest.approx(results["compressed_cache_bytes"] / results["fp16_cache_bytes"])
    # Result lines only: not the progress bars, nor the plan printed before the fit (recipe, time estimate).
    before = ("Recipe:", "Time estimate:", "Time budget:")
    lines = [line for line in stdout.splitlines() if re.match(r"[A-Z][\w ]+: ", line) and not line.startswith(before)]
    first = re.fullmatch(r"KV budget:\s+([0-9.]+)% of an fp16 DynamicCache's bytes \(measured\)", lines[0])
    assert first and float(first.group(1)) == pytest.approx(100 * results["kv_budget"], abs=0.05), stdout

    # compressor_pca.pt loads into the seed's PCACompressor(config) ...
    compressor = PCACompressor(CompressionConfig.from_json(output / "compression_config_pca.json"))
    compressor.load_state_dict(torch.load(output / "compressor_pca.pt"))
    # ... equals the checkpoint's compressor and the save_pretrained copy.
    checkpoint = compressor_state(output / "checkpoints" / "last.ckpt")
    assert all(key.startswith("compressor.") for key in checkpoint)
    assert_same_state({f"compressor.{k}": v for k, v in compressor.state_dict().items()}, checkpoint)
    pretrained = load_compressor(output / "compressor_pca", geometry=kv_geometry(tiny_models["llama"]))
    assert_same_state(pretrained.state_dict(), compressor.state_dict())


# ---------------------------------------------------------------------- 7. bad input
def _bert_dir(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "bert"
    )
    return str(tmp_path / "bert")


def _mla_dir(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=16, n_routed_experts=2,
        num_experts_per_tok=1, first_k_dense_replace=1,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mla")  # a real causal LM; caches a latent
    return str(tmp_path / "mla")


BAD_MODELS = {
    "missing_dir": (lambda tmp: str(tmp / "no-such-model"), ["could not load model", "local directory"]),
    "missing_gguf": (lambda tmp: str(tmp / "model.gguf"), ["does not exist", ".gguf"]),
    "bert": (_bert_dir, ["'bert'", "not supported", "gpt2", "llama"]),
    "mla": (_mla_dir, ["'deepseek_v3'", "not supported", "latent", "gpt2", "llama"]),
}


def assert_nothing_written(output: Path, cache: Path) -> None:
    written = [p for p in output.rglob("*") if p.is_file()] if output.exists() else []
    assert written == [], written
    assert not cache.exists()  # no capture started


@pytest.mark.parametrize("case", list(BAD_MODELS))
@pytest.mark.parametrize("command", ["calibrate", "config"])
def test_bad_model_is_one_line_exit_2(case, command, tmp_path, kvlight_cache, capfd):
    from kvlight.errors import ModelLoadError
    from kvlight.models import load_model

    make, fragments = BAD_MODELS[case]
    model = make(tmp_path)
    capfd.readouterr()  # save_pretrained's progress bar is not the command's output
    output = tmp_path / "out"
    if command == "calibrate":
        argv = tiny_calibrate_args(model, output)
    else:
        argv = ["config", "uniform", "--model", model, "--rank", "4", "-o", str(output / "cfg.json")]

    assert main(argv) == 2
    captured = capfd.readouterr()
    line = one_error_line(captured.err)
    for fragment in fragments:
        assert fragment in line
    assert_nothing_written(output, kvlight_cache)
    with pytest.raises(ModelLoadError):
        load_model(model)


def test_offline_hub_dataset_is_one_line_exit_2(tmp_path, tiny_llama_path, kvlight_cache, data_hf_offline, capfd):
    output = tmp_path / "out"
    assert main(tiny_calibrate_args(tiny_llama_path, output, "--calibration-dataset", "wikitext")) == 2
    line = one_error_line(capfd.readouterr().err)
    assert "wikitext" in line and "built-in corpus" in line
    assert_nothing_written(output, kvlight_cache)


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_output_dir_fails_before_any_work(where, tmp_path, tiny_llama_path, kvlight_cache, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    output = blocker / "out" if where == "under_a_file" else blocker
    start = time.perf_counter()
    assert main(tiny_calibrate_args(tiny_llama_path, output)) == 2
    elapsed = time.perf_counter() - start
    line = one_error_line(capfd.readouterr().err)
    assert "output directory" in line and str(output) in line
    assert elapsed < 2.0  # before the model is loaded or any text is tokenized
    assert not kvlight_cache.exists()
    assert blocker.read_text() == "not a directory"


def test_unwritable_config_output_is_one_line(tmp_path, tiny_llama_path, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["config", "uniform", "--model", tiny_llama_path, "--rank", "4", "-o", str(blocker / "cfg.json")]) == 2
    assert "output directory" in one_error_line(capfd.readouterr().err)
