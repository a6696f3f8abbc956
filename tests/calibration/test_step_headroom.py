"""``--step-headroom``: the static steps a fit ends with are widened once, after its last step, so that the saved
compressor, the checkpoint and the printed perplexity all hold the widened steps, whatever the backend and
objective (a trained fit would otherwise train the headroom away)."""

import json

import pytest
import torch
from helpers import tiny_calibrate_args

from kvlight.calibration.module import KVCalibrationModule
from kvlight.cli import main
from kvlight.compressors.compressor import load_compressor
from kvlight.compressors.statistics import levels_of

#: case -> (backend, flags besides the budget): a closed form, reconstruction epochs (which train the steps on the
#: squared error), and distillation steps (which train them on the KL).
CASES = {
    "pca-closed-form": ("pca", ["--compressor", "pca"]),
    "kvsplice-reconstruction": ("kvsplice", ["--compressor", "kvsplice", "--epochs", "2"]),
    "kvsplice-kl": ("kvsplice", ["--compressor", "kvsplice", "--objective", "kl", "--epochs", "1"]),
}
HEADROOM = 1.5


def steps(compressor) -> dict:
    return {key: [t.detach() for t in compressor.codec(*key).quantizer_steps()] for key in compressor.width_codecs()}


@pytest.mark.parametrize("case", list(CASES))
def test_the_final_steps_are_widened_once_and_saved(case, tiny_llama_path, tmp_path, kvlight_cache, capsys):
    algo, flags = CASES[case]
    fitted, printed = {}, {}
    for headroom in (1.0, HEADROOM):
        output = tmp_path / f"h{headroom:g}"
        argv = tiny_calibrate_args(tiny_llama_path, output, "--kv-budget", "0.25", "--step-headroom", f"{headroom:g}")
        assert main([*argv, "--seed", "3", *flags]) == 0
        saved = load_compressor(output / f"compressor_{algo}")
        checkpoint = KVCalibrationModule.load_from_checkpoint(output / "checkpoints" / "last.ckpt").compressor
        fitted[headroom] = steps(saved)
        assert fitted[headroom].keys() and all(
            torch.equal(a, b) for key in fitted[headroom] for a, b in zip(fitted[headroom][key], steps(checkpoint)[key])
        ), "the checkpoint holds other steps than the saved compressor"
        results = json.loads((output / f"calibration_results_{algo}.json").read_text())
        printed[headroom] = results["compressed_perplexity"]
    capsys.readouterr()
    for key, (step, offset) in fitted[1.0].items():
        wide_step, wide_offset = fitted[HEADROOM][key]
        widths = load_compressor(tmp_path / "h1" / f"compressor_{algo}").codec(*key).widths
        levels = levels_of(widths)
        coded = levels > 0
        assert coded.any()
        torch.testing.assert_close(wide_step[coded], HEADROOM * step[coded], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            wide_offset + wide_step * levels / 2, offset + step * levels / 2, rtol=1e-5, atol=1e-6
        )
    assert printed[1.0] != printed[HEADROOM]  # what was printed is the widened compressor's perplexity
