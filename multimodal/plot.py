"""Curves drawn to PNG: a run's training and validation metrics (its metrics.csv), or evaluation results
over training steps (a folder of `multimodal eval --out` results, one a checkpoint)."""

import csv
from pathlib import Path

from multimodal.errors import UserError
from multimodal.files import atomic_file
from multimodal.userfiles import reading, writing

PANELS = (
    ("loss", ("train/loss", "val/loss")),
    ("logit scale", ("train/logit_scale",)),
    ("learning rate", ("train/lr",)),
    ("text -> image recall", ("val/image_retrieval_recall@1", "val/image_retrieval_recall@5",
                              "val/image_retrieval_recall@10")),
    ("image -> text recall", ("val/text_retrieval_recall@1", "val/text_retrieval_recall@5",
                              "val/text_retrieval_recall@10")),
    ("samples / s", ("train/samples_per_second",)),
)


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metric name -> [(step, value)] from a CSVLogger metrics.csv (or the run folder holding it)."""
    csv_path = path / "metrics.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise UserError(f"No metrics.csv at {path}: pass a run folder such as runs/demo/version_0.")
    series: dict[str, list[tuple[int, float]]] = {}
    with reading(csv_path), csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "step" not in (reader.fieldnames or []):
            raise UserError(f"{csv_path} has no 'step' column: pass the metrics.csv of a run's CSVLogger.")
        for row in reader:
            try:
                step = int(row["step"])
                values = [(key, float(value)) for key, value in row.items()
                          if key not in ("step", "epoch") and isinstance(value, str) and value]
            except (TypeError, ValueError):
                raise UserError(f"{csv_path} line {reader.line_num} is not a row of numbers: remove it, or plot "
                                "another run.") from None
            for key, value in values:
                series.setdefault(key, []).append((step, value))
    if not series:
        raise UserError(f"{csv_path} holds no metrics yet.")
    return series


def plot_run(path: Path, out: Path | None = None) -> Path:
    """Draw the curves of the run at `path` into `out` (default: curves.png in the run folder); a folder of
    evaluation results (no metrics.csv) is drawn by `plot_results`."""
    if path.is_dir() and not (path / "metrics.csv").is_file() and any(path.glob("*.json")):
        return plot_results(path, out)
    series = read_metrics(path)
    panels = [(title, [k for k in keys if k in series]) for title, keys in PANELS]
    out = out or (path if path.is_dir() else path.parent) / "curves.png"
    return _draw([(title, {k: series[k] for k in keys}) for title, keys in panels if keys], "step", out)


def plot_results(folder: Path, out: Path | None = None) -> Path:
    """Recall (and zero-shot accuracy) over training steps from a folder of evaluation results, one panel
    per dataset and task; results of weights without a step are placed in file order."""
    from multimodal.eval.results import read_results

    records = read_results(folder)
    stepped = all(isinstance(r.get("step"), int) for r in records)
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for i, record in enumerate(records):
        panel = panels.setdefault(f"{record['dataset']} ({record['task'].replace('zeroshot_', 'zero-shot ')})", {})
        for key, value in record["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # `read_results` checked the rest
                panel.setdefault(key, []).append((record["step"] if stepped else i, float(value)))
    return _draw(sorted(panels.items()), "step" if stepped else "result", out or folder / "results.png")


def _draw(panels: list[tuple[str, dict[str, list[tuple[int, float]]]]], xlabel: str, out: Path) -> Path:
    import matplotlib  # here: reading the metrics (and finding a mistake in them) needs no plotting library

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    with writing(out):
        with atomic_file(out) as f:
            fig.savefig(f, format=out.suffix[1:], dpi=110)
    plt.close(fig)
    return out
