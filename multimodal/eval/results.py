"""Evaluation results in CLIP_benchmark's layout, and tables of them.

One result is what `clip_benchmark eval --output` writes: `dataset`, `model`, `pretrained`, `task`
(`zeroshot_retrieval` or `zeroshot_classification`), `metrics` (`image_retrieval_recall@5`,
`text_retrieval_recall@5`, ...; `acc1`, `acc5`, `mean_per_class_recall`) and `language`, so the
files mix with CLIP_benchmark's own and its `clip_benchmark build` reads them. Beside those: the
checkpoint, its training `step` and `epoch` (for curves over a run's checkpoints), and the counts.

`append_row` adds one row a run to a CSV table (as `clip_benchmark build` lays its table out: the
metrics as columns), so that a sweep over checkpoints becomes one file; `read_results` reads a
folder of result files back, for `multimodal plot`, each field it draws checked.

Nothing a user wrote is lost: a table that cannot be read back exactly (a column named twice, a row
longer or shorter than its header) is not appended to, nor is a result written over a file that is
not a result, unless the caller says to (`overwrite`).
"""

import csv
import io
import json
from pathlib import Path

from multimodal.errors import UserError
from multimodal.files import write_text
from multimodal.userfiles import read_json, reading, writing

LANGUAGE = "en"
RESULT_BYTES = 1 << 20  # a result file is a few kB: anything larger is not one
FIRST_COLUMNS = ("dataset", "model", "pretrained", "task", "language", "step", "epoch", "checkpoint")


def result(task: str, dataset: str, model: str, pretrained: str | None, metrics: dict[str, float],
           **extra) -> dict:
    """A result as CLIP_benchmark lays it out, with `extra` fields (checkpoint, step, counts) beside."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained or "", "task": task,
            "metrics": dict(metrics), "language": LANGUAGE, **extra}


def row(record: dict) -> dict:
    """The flat table row of a result: its fields, then its metrics as columns."""
    return {**{k: v for k, v in record.items() if k != "metrics"}, **record["metrics"]}


def is_result(value) -> bool:
    """Whether a JSON value is a result as `result` lays it out (an object with a task and metrics)."""
    return isinstance(value, dict) and isinstance(value.get("task"), str) and isinstance(value.get("metrics"), dict)


def check_result_file(path: Path, overwrite: bool = False, setting: str = "{}") -> None:
    """Refuse to write a result over an existing `path` that is not one (a user's own JSON, a list, not JSON at
    all), unless `overwrite`: an earlier result is replaced. `setting` names the options `overwrite` and `out` in
    the caller's words ("--{}" on a command line)."""
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    ours = False
    if path.is_file() and path.stat().st_size <= RESULT_BYTES:  # never a pipe, nor a large file read whole
        try:
            ours = is_result(read_json(path, kind=object))
        except UserError:  # not JSON, not UTF-8: not ours either
            pass
    if not ours:
        raise UserError(f"{path} exists and is not an evaluation result (a JSON object with task and metrics): pass "
                        f"{setting.format('overwrite')} to replace it, or choose another {setting.format('out')}.")


def read_table(table: Path, overwrite: bool = False, setting: str = "{}") -> list[dict]:
    """The rows of the CSV `table` (none if it is absent), read back exactly: a table that cannot be (a column
    named twice, a row longer or shorter than the header) is refused, as appending to it would lose values,
    unless `overwrite`, which starts it afresh. `setting` names the options `overwrite` and `out_table` in the
    caller's words ("--{}" on a command line)."""
    if not (table.exists() or table.is_symlink()):
        return []
    fix = f"pass {setting.format('overwrite')} to replace it, or choose another {setting.format('out_table')}"
    try:
        if not table.is_file():  # a pipe would never end
            raise UserError(f"{table} is not a regular file: {fix}.")
        with reading(table, fix):
            lines = [r for r in csv.reader(io.StringIO(table.read_text(encoding="utf-8-sig"), newline="")) if r]
        header = lines[0] if lines else []
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            raise UserError(f"{table} names the column '{twice[0]}' twice, so a row appended would lose one of its "
                            f"values: {fix}.")
        for number, cells in enumerate(lines[1:], start=2):
            if len(cells) != len(header):
                raise UserError(f"{table} row {number} has {len(cells)} values under a header of {len(header)}, "
                                f"so it cannot be read back as a table: {fix}.")
    except UserError:
        if overwrite:
            return []
        raise
    return [dict(zip(header, cells)) for cells in lines[1:]]


def append_row(table: Path, record: dict, overwrite: bool = False, setting: str = "{}") -> None:
    """`table` (a CSV file, created if absent) with one more row; a new metric becomes a new column, empty
    in the rows before. The whole file is written again atomically: an interrupted append loses nothing.
    A table that cannot be read back exactly is refused (`read_table`), or with `overwrite` started afresh."""
    rows = read_table(table, overwrite, setting)
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


# The fields of a result that `multimodal plot` reads: (name, what it must be, whether a value is that). A
# `step` may be absent or null (weights not from a run of ours); the others must be there.
PLOTTED = (("dataset", "a name", lambda v: isinstance(v, str) and bool(v)),
           ("task", "a name", lambda v: isinstance(v, str) and bool(v)),
           ("metrics", "an object of metrics", lambda v: isinstance(v, dict)),
           ("step", "a whole number", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))))


def _check_plotted(path: Path, record: dict) -> None:
    fix = "write it as `multimodal eval --out` does, or move the file out of the folder"
    for name, wanted, fits in PLOTTED:
        if name not in record and not fits(None):
            raise UserError(f"{path} has no '{name}' field: {fix}.")
        if not fits(record.get(name)):
            raise UserError(f"{path}: its '{name}' is {json.dumps(record[name])[:60]}, not {wanted}: {fix}.")


def read_results(folder: Path) -> list[dict]:
    """The results (CLIP_benchmark-layout JSON files) in `folder`, ordered by training step; JSON objects without
    task and metrics (other files) are passed over, a result whose fields cannot be drawn is refused."""
    records = []
    for path in sorted(folder.glob("*.json")):
        record = read_json(path, "pass a folder of `multimodal eval --out` results")
        if "task" not in record or "metrics" not in record:
            continue
        _check_plotted(path, record)
        records.append(record)
    if not records:
        raise UserError(f"{folder} holds no evaluation results (JSON files with task and metrics): write them with "
                        "`multimodal eval ... --out FOLDER/NAME.json`.")
    return sorted(records, key=lambda r: (r.get("step") is None, r.get("step") or 0))
