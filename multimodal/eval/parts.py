"""An embedding folder's parts of one kind (`img_emb/part-N.npy` with `img_index/part-N.jsonl`, or `text_`), as
`multimodal embed` writes them: their rows and offsets, memory-mapped a bounded number at a time, each checked
against what its .npy header promises; and the index entries (key, url or file_name, caption) of their rows."""

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from multimodal.errors import UserError
from multimodal.eval.metadata import first_captions
from multimodal.userfiles import reading

KINDS = {"image": "img", "text": "text"}


class Parts:
    """The embedding parts of one kind of an embedding folder: their rows, offsets, and memory maps (opened as
    needed, a bounded number at a time), each checked against what its .npy header promises."""

    def __init__(self, folder: Path, kind: str, names: list[str] | None = None, rows: list[int] | None = None):
        self.folder, self.prefix = folder, KINDS[kind]
        if names is None:
            names = sorted(p.stem for p in (folder / f"{self.prefix}_index").glob("part-*.jsonl"))
            rows, dims = zip(*(self._header(name) for name in names)) if names else ((), ())
            if len(set(dims)) > 1:
                raise UserError(f"Embedding folder {folder} mixes embedding sizes {sorted(set(dims))}: its parts "
                                "come from different models; index the parts of one model.")
            self.dim = dims[0] if dims else 0
        self.names, self.rows = list(names), list(rows)
        self.offsets = np.concatenate([[0], np.cumsum(self.rows, dtype=np.int64)])
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    def path(self, i: int) -> Path:
        return self.folder / f"{self.prefix}_emb" / f"{self.names[i]}.npy"

    def index_path(self, i: int) -> Path:
        """Part i's index entries, one JSON line a row."""
        return self.folder / f"{self.prefix}_index" / f"{self.names[i]}.jsonl"

    def _header(self, name: str) -> tuple[int, int]:
        """(rows, dim) of a part, its .npy checked: 2-D float16 or float32, all its bytes there."""
        path = self.folder / f"{self.prefix}_emb" / f"{name}.npy"
        redo = (f"delete {self.prefix}_index/{name}.jsonl and run `multimodal embed --out {self.folder}` again to "
                "compute the part afresh")
        with reading(path, redo), open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"NumPy format version {version} is not one `multimodal embed` writes")
            shape, fortran, dtype = read_header(f)
            start, size = f.tell(), path.stat().st_size
        if len(shape) != 2 or fortran or dtype not in (np.float16, np.float32):
            raise UserError(f"{path} is not a 2-D float16 or float32 array: {redo}.")
        if start + shape[0] * shape[1] * dtype.itemsize > size:
            raise UserError(f"{path} is cut short: its header promises {shape[0]} rows of {shape[1]} but the file "
                            f"holds {(size - start) // max(shape[1] * dtype.itemsize, 1)}: {redo}.")
        return shape[0], shape[1]

    def array(self, i: int) -> np.ndarray:
        """Part i, memory-mapped, (rows, dim)."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        path = self.path(i)
        with reading(path, "build the index again with `multimodal index`"):
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.shape != (self.rows[i], self.dim):
            raise UserError(f"{path} holds {array.shape} vectors, not the {(self.rows[i], self.dim)} the index "
                            "was built from: build the index again with `multimodal index`.")
        self._open[i] = array
        if len(self._open) > 256:  # each map holds a file descriptor
            self._open.popitem(last=False)
        return array

    def chunks(self, parts: range, size: int = 65536):
        """(first row id, rows as stored) of `parts`, in order, `size` rows at a time."""
        for i in parts:
            array = self.array(i)
            for start in range(0, array.shape[0], size):
                yield int(self.offsets[i]) + start, array[start:start + size]

    def take(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), dim) float32 rows of global row `ids`, read part by part, each part's in ascending order
        (the pages of a memory map in the order they lie)."""
        out = np.zeros((len(ids), self.dim), np.float32)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        bounds = np.searchsorted(sorted_ids, self.offsets)
        for i in np.nonzero(np.diff(bounds))[0]:
            span = slice(bounds[i], bounds[i + 1])
            out[order[span]] = self.array(int(i))[sorted_ids[span] - self.offsets[i]]
        return out

    def locate(self, row: int) -> tuple[int, int]:
        """(part, row within it) of a global row."""
        part = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return part, int(row - self.offsets[part])


def jsonl_rows(path: Path) -> list[dict]:
    """The rows of a part's JSONL index file, one JSON object a line."""
    redo = "run `multimodal embed` again for the part"
    with reading(path, redo):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path} holds a line that is not a JSON object: {redo}.")
    return rows


def part_rows(parts: Parts, part: int) -> tuple[list[dict], dict[int, str]]:
    """The index rows of `part` (its JSONL file), and for images the first caption of each row that has one (from
    the part's text rows, which name their image's row)."""
    name = parts.names[part]
    lines = jsonl_rows(parts.index_path(part))
    texts = parts.folder / "text_index" / f"{name}.jsonl"
    return lines, first_captions(jsonl_rows(texts)) if parts.prefix == "img" and texts.is_file() else {}


def row_of(lines: list[dict], captions: dict[int, str], local: int) -> dict:
    """Row `local` of a part read by `part_rows`, with its image's first caption where it has none of its own."""
    row = dict(lines[local]) if local < len(lines) else {}
    if "caption" not in row and local in captions:
        row["caption"] = captions[local]
    return row


def describe(parts: Parts, rows: list[int]) -> list[dict]:
    """The index rows (key, url or file_name, caption) of global `rows`, read from the parts holding them only;
    an image row without a caption of its own gets the first caption of its part's texts."""
    out: list[dict] = [{} for _ in rows]
    by_part: dict[int, list[tuple[int, int]]] = {}
    for i, row in enumerate(rows):
        part, local = parts.locate(row)
        by_part.setdefault(part, []).append((i, local))
    for part, wanted in by_part.items():
        lines, captions = part_rows(parts, part)
        for i, local in wanted:
            out[i] = row_of(lines, captions, local)
    return out


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
