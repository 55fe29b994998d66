"""Evaluation results in CLIP_benchmark's layout, and tables of them.

One result is what `clip_benchmark eval --output` writes: `dataset`, `model`, `pretrained`, `task`
(`zeroshot_retrieval` or `zeroshot_classification`), `metrics` (`image_retrieval_recall@5`,
`text_retrieval_recall@5`, ...; `acc1`, `acc5`, `mean_per_class_recall`) and `language`, so the
files mix with CLIP_benchmark's own and its `clip_benchmark build` reads them. Beside those: the
checkpoint, its training `step` and `epoch` (for curves over a run's checkpoints), and the counts.

`append_row` adds one row a run to a CSV table (as `clip_benchmark build` lays its table out: the
metrics as columns), so that a sweep over checkpoints becomes one file; `read_results` reads a
folder of result files back, for `multimodal plot`.
"""

import csv
import io
from pathlib import Path

from multimodal.errors import UserError
from multimodal.files import write_text
from multimodal.userfiles import read_json, reading, writing

LANGUAGE = "en"
FIRST_COLUMNS = ("dataset", "model", "pretrained", "task", "language", "step", "epoch", "checkpoint")


def result(task: str, dataset: str, model: str, pretrained: str | None, metrics: dict[str, float],
           **extra) -> dict:
    """A result as CLIP_benchmark lays it out, with `extra` fields (checkpoint, step, counts) beside."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained or "", "task": task,
            "metrics": dict(metrics), "language": LANGUAGE, **extra}


def row(record: dict) -> dict:
    """The flat table row of a result: its fields, then its metrics as columns."""
    return {**{k: v for k, v in record.items() if k != "metrics"}, **record["metrics"]}


def append_row(table: Path, record: dict) -> None:
    """`table` (a CSV file, created if absent) with one more row; a new metric becomes a new column, empty
    in the rows before. The whole file is written again atomically: an interrupted append loses nothing."""
    rows: list[dict] = []
    if table.exists():
        with reading(table, "pass a CSV written by `multimodal eval --out_table`, or a new file"):
            rows = list(csv.DictReader(io.StringIO(table.read_text(encoding="utf-8"))))
    rows.append({k: "" if v is None else v for k, v in row(record).items()})
    seen = dict.fromkeys(FIRST_COLUMNS)
    for r in rows:
        seen.update(dict.fromkeys(r))
    columns = [c for c in seen if any(c in r for r in rows)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with writing(table):
        write_text(table, text.getvalue())


def read_results(folder: Path) -> list[dict]:
    """The results (CLIP_benchmark-layout JSON files) in `folder`, ordered by training step."""
    files = sorted(folder.glob("*.json"))
    records = [r for r in (read_json(f, "pass a folder of `multimodal eval --out` results") for f in files)
               if isinstance(r.get("metrics"), dict) and "task" in r]
    if not records:
        raise UserError(f"{folder} holds no evaluation results (JSON files with task and metrics): write them with "
                        "`multimodal eval ... --out FOLDER/NAME.json`.")
    return sorted(records, key=lambda r: (r.get("step") is None, r.get("step") or 0))
