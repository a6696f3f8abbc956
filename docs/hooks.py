"""MkDocs hook: the benchmark plots live in bench/results/ (where the benchmarks write them); the site serves them
as results/plots/NAME.png without a second copy in docs/ that could go stale."""

from pathlib import Path

from mkdocs.structure.files import File

PLOTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def on_files(files, config):
    for plot in sorted(PLOTS.glob("*.png")):
        files.append(File.generated(config, f"results/plots/{plot.name}", abs_src_path=str(plot)))
    return files
