"""An embedding part's metadata as clip-retrieval and autofaiss read it: `metadata/part-NNNNN.parquet`, a row
per embedding row (of img_emb, or of text_emb for a source of texts alone), in the same order.

Columns: key, caption (an image's first caption; a text's own), url and file_name (strings, null where the
source has none), then the scalar fields of the sample's json member (img2dataset's: url, caption, status,
width, height, sha256, ...) in sorted order, less those four. A field's type follows its values in the part
(bool, int64, float64 where ints and floats mix, else string); nested values are left out. The bytes
depend on the rows alone: no pandas index, no timestamps, so a part written twice is the same file.
"""

import io
import json
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

FIXED = ("key", "caption", "url", "file_name")
SCALARS = (str, int, float, bool, type(None))


def first_captions(text_rows: Sequence[dict]) -> dict[int, str]:
    """Image row (in the part) -> its first caption: the first of the part's text rows that names it."""
    first: dict[int, str] = {}
    for row in text_rows:
        if isinstance(row.get("image"), int):
            first.setdefault(row["image"], row.get("caption", ""))
    return first


def image_metadata(image_rows: Sequence[dict], text_rows: Sequence[dict]) -> list[dict]:
    """A metadata row per image row: its key, first caption (`first_captions`), url and file name from its json
    member (else its row), and the member's scalar fields."""
    first = first_captions(text_rows)
    rows = []
    for i, row in enumerate(image_rows):
        meta = {k: v for k, v in (row.get("json") or {}).items() if isinstance(v, SCALARS)}
        url = meta.get("url")
        file_name = meta.get("file_name", row.get("file_name"))
        rows.append({**{k: v for k, v in meta.items() if k not in FIXED}, "key": row.get("key"),
                     "caption": first.get(i), "url": url if isinstance(url, str) else None,
                     "file_name": file_name if isinstance(file_name, str) else None})
    return rows


def text_metadata(text_rows: Sequence[dict]) -> list[dict]:
    """A metadata row per text row of a source of texts alone: its key and the text."""
    return [{"key": row.get("key"), "caption": row.get("caption"), "url": None, "file_name": None}
            for row in text_rows]


def _type(values: list) -> pa.DataType:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if present and all(isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63 for v in present):
        return pa.int64()
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def _cell(value, kind: pa.DataType):
    if value is None or kind != pa.string() or isinstance(value, str):
        return value
    return json.dumps(value)


def parquet_bytes(rows: Sequence[dict]) -> bytes:
    """`rows` (from `image_metadata` or `text_metadata`) as a parquet file."""
    extra = sorted({k for row in rows for k in row} - set(FIXED))
    columns, fields = [], []
    for name in (*FIXED, *extra):
        values = [row.get(name) for row in rows]
        kind = pa.string() if name in FIXED else _type(values)
        fields.append(pa.field(name, kind))
        columns.append(pa.array([_cell(v, kind) for v in values], type=kind))
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(columns, schema=pa.schema(fields)), buffer)
    return buffer.getvalue()
