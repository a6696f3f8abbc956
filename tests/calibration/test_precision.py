"""Mixed precision: ``bf16-mixed`` calibrates to within 1 % of the float32 perplexity, and the statistics accumulate
in float64 whatever the precision (``16-mixed`` needs a GPU: the gpu-marked test).

Each calibration is validated twice: in float32 (the compressor's own quality, comparable across calibrations) and
under the precision it was fitted with (what a user of that precision sees).
"""

from pathlib import Path

import pytest
import torch
from run_helpers import KVSPLICE, cli_args, load_records, record_config

from kvlight.cli.lightning import lightning_cli

REPO = Path(__file__).resolve().parents[2]
DATA = ["--data.seq_len", "32", "--data.calibration_samples", "8", "--data.eval_samples", "4"]
DATA += ["--data.kv_batch_size", "64"]
ALGO = {
    "pca": (str(REPO / "configs" / "smollm2_pca.yaml"), []),
    # From a random start, so training (not only the float64 statistics) happens under the precision.
    "kvsplice": (str(REPO / "configs" / "smollm2_kvsplice.yaml"), KVSPLICE),
}


def calibrate(algo: str, model: str, root: Path, precision: str, *extra: str) -> tuple[dict, dict]:
    """Fit with ``precision``; returns (fit record, {validation precision: results})."""
    config, algo_args = ALGO[algo]
    args = cli_args(config, model, root, *DATA, *algo_args, "--trainer.precision", precision, *extra)
    lightning_cli(["fit", *args, "--config", record_config(root, "fit")])
    results = {}
    for validation in {"32-true", precision}:
        checkpoint = str(root / "checkpoints" / "last.ckpt")
        validate = cli_args(config, model, root, *DATA, "--trainer.precision", validation, *extra)
        validate += ["--config", record_config(root, f"val-{validation}"), "--ckpt_path", checkpoint]
        lightning_cli(["validate", *validate])
        results[validation] = load_records(root, f"val-{validation}")[0]["results"]
    return load_records(root, "fit")[0], results


@pytest.fixture(scope="module")
def calibrations(tiny_llama_path, tmp_path_factory):
    """``{(algo, precision): (fit record, validation results)}`` on the tiny Llama."""
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVLIGHT_CACHE", str(tmp_path_factory.mktemp("precision-cache")))
        patch.setattr("sys.argv", ["kvlight"])
        for algo in ALGO:
            for precision in ("32-true", "bf16-mixed"):
                root = tmp_path_factory.mktemp(f"{algo}-{precision}")
                out[algo, precision] = calibrate(algo, tiny_llama_path, root, precision)
    return out


@pytest.mark.parametrize("algo", list(ALGO))
def test_bf16_mixed_calibrates_within_one_percent_of_float32(algo, calibrations):
    _, fp32 = calibrations[algo, "32-true"]
    _, bf16 = calibrations[algo, "bf16-mixed"]
    reference = fp32["32-true"]["compressed_perplexity"]
    # The compressor fitted under bf16-mixed, measured in float32 ...
    assert bf16["32-true"]["compressed_perplexity"] == pytest.approx(reference, rel=0.01)
    # ... and measured under bf16-mixed too (the frozen model itself then runs in bf16 autocast).
    assert bf16["bf16-mixed"]["compressed_perplexity"] == pytest.approx(reference, rel=0.01)
    assert bf16["bf16-mixed"]["baseline_perplexity"] == pytest.approx(fp32["32-true"]["baseline_perplexity"], rel=0.01)


@pytest.mark.parametrize("algo", list(ALGO))
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_statistics_accumulate_in_float64(algo, precision, calibrations):
    record, _ = calibrations[algo, precision]
    assert record["statistics_dtypes"] == [["torch.float64"]]


def test_statistics_stay_float64_with_a_bfloat16_model(tiny_llama_path, tmp_path, monkeypatch):
    # The frozen model itself in bfloat16: captured K/V are bf16 (stored as float32 rows), the sums float64.
    monkeypatch.setenv("KVLIGHT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", ["kvlight"])
    config, _ = ALGO["pca"]
    args = cli_args(config, tiny_llama_path, tmp_path, *DATA, "--trainer.precision", "bf16-mixed")
    lightning_cli(["fit", *args, "--model.runtime.model_dtype", "bfloat16", "--config", record_config(tmp_path, "fit")])
    assert load_records(tmp_path, "fit")[0]["statistics_dtypes"] == [["torch.float64"]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA device")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_on_gpu_within_one_percent(precision, tiny_llama_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KVLIGHT_CACHE", str(tmp_path_factory.mktemp("gpu-cache")))
    monkeypatch.setattr("sys.argv", ["kvlight"])
    gpu = ["--trainer.accelerator", "gpu"]
    record, results = calibrate("kvsplice", tiny_llama_path, tmp_path_factory.mktemp(precision), precision, *gpu)
    _, reference = calibrate("kvsplice", tiny_llama_path, tmp_path_factory.mktemp("fp32"), "32-true", *gpu)
    assert record["statistics_dtypes"] == [["torch.float64"]]
    expected = reference["32-true"]["compressed_perplexity"]
    assert results["32-true"]["compressed_perplexity"] == pytest.approx(expected, rel=0.01)
    assert results[precision]["compressed_perplexity"] == pytest.approx(expected, rel=0.01)


def test_a_bfloat16_sensitivity_pass_allocates_the_widths_of_float32(tiny_models, tiny_windows):
    """The widths are the model's choice, not its dtype's: measured on a bf16 copy, at least 80 % of the directions
    get the width the float32 pass gives them, and the bits spent differ by a few directions only."""
    import copy

    from kvlight.analysis.bit_allocation import allocate_bits
    from kvlight.analysis.sensitivity import measure_sensitivity
    from kvlight.geometry import kv_geometry

    model = tiny_models["llama"]
    geometry = kv_geometry(model)
    widths = {}
    for dtype in (torch.float32, torch.bfloat16):
        metrics = measure_sensitivity(
            copy.deepcopy(model).to(dtype), geometry, tiny_windows["calib"], 2, sink_tokens=4, progress=False
        )
        widths[dtype] = allocate_bits(metrics, 0.76, "fisher-white").widths
    for kind in ("k", "v"):
        full, half = widths[torch.float32][kind], widths[torch.bfloat16][kind]
        assert (full == half).mean() >= 0.8, kind
        assert abs(int(full.sum()) - int(half.sum())) <= 0.05 * full.sum(), kind
