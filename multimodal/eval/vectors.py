"""An index's re-ranking stage: its vectors in float16, stored as faiss stores an `IndexScalarQuantizer` of
type fp16 (L2), so that faiss maps the file (`IO_FLAG_MMAP_IFC`: the rows stay on disk, in the page cache) and
re-scores candidates from it in C++ (`IndexRefine`), `rerank` rows a query.

faiss serialises such an index as a header (dimension, ntotal, the quantiser's type) followed by its codes,
which for fp16 are the rows' float16 bytes as they are. `writing` writes that header for a known count and
then the rows a chunk at a time (nothing is held in memory), and checks the file by reading it back with faiss;
`concatenate` joins the files of index pieces in order, streamed, as faiss's merge joins their lists."""

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from multimodal.files import atomic_file

CHUNK_ROWS = 65536
READ_FLAGS = faiss.IO_FLAG_MMAP_IFC  # the codes memory-mapped, not read


def header(dim: int, count: int) -> bytes:
    """The serialised fp16 scalar-quantiser index of `count` `dim`-d rows up to its first code byte. faiss writes
    an empty one; its ntotal (bytes 8:16) and its codes' byte count (the last 8) are set here."""
    empty = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    head = bytearray(faiss.serialize_index(empty).tobytes())
    if head[:4] != b"IxSQ" or head[8:16] != bytes(8) or head[-8:] != bytes(8):
        raise RuntimeError("faiss serialises IndexScalarQuantizer in a layout this version of multimodal does not "
                           "know: install the faiss-cpu version pyproject.toml names")
    head[8:16] = struct.pack("<q", count)
    head[-8:] = struct.pack("<Q", count * dim * 2)
    return bytes(head)


def read(path: Path):
    """The faiss index of a vectors file, its rows memory-mapped (not read)."""
    return faiss.read_index(str(path), READ_FLAGS)


def rows(path: Path, dim: int) -> np.ndarray:
    """A vectors file's (count, dim) float16 rows, memory-mapped."""
    return np.memmap(path, np.float16, mode="r", offset=len(header(dim, 0))).reshape(-1, dim)


@contextmanager
def writing(path: Path, dim: int, count: int) -> Iterator[Callable[[np.ndarray], None]]:
    """A function that appends (n, dim) rows to the vectors file of `count` rows at `path`, written through
    `multimodal.files` (whole or not at all) and checked once the block ends. Rows as stored (float16) where of
    unit length, normalised where not: the stage ranks by L2 distance, which orders unit vectors as cosine does."""
    written = 0

    def write(x: np.ndarray) -> None:
        nonlocal written
        x16 = np.asarray(x, dtype=np.float16)
        norms = np.linalg.norm(x16.astype(np.float32), axis=1, keepdims=True)
        if not np.all(np.abs(norms - 1) <= 2e-3):  # embeddings as written are unit length to float16's precision
            x16 = (x16 / np.maximum(norms, 1e-12)).astype(np.float16)
        f.write(np.ascontiguousarray(x16).tobytes())
        written += len(x16)

    with atomic_file(path) as f:
        f.write(header(dim, count))
        yield write
        if written != count:
            raise RuntimeError(f"{path}: {written} rows written of the {count} promised")
    check(path, dim, count)


def check(path: Path, dim: int, count: int) -> None:
    """faiss reads the file back as `count` rows whose first and last are the rows written."""
    index, stored = read(path), rows(path, dim)
    if index.ntotal != count or index.d != dim or (count and not (
            np.array_equal(index.reconstruct(0), stored[0].astype(np.float32))
            and np.array_equal(index.reconstruct(count - 1), stored[-1].astype(np.float32)))):
        raise RuntimeError(f"faiss reads {path} otherwise than it was written: install the faiss-cpu version "
                           "pyproject.toml names")


def concatenate(pieces: list[Path], out: Path, dim: int) -> None:
    """One vectors file of the rows of `pieces`' vectors files in order, streamed a chunk at a time."""
    arrays = [rows(p, dim) for p in pieces]
    with writing(out, dim, sum(len(a) for a in arrays)) as write:
        for array in arrays:
            for start in range(0, len(array), CHUNK_ROWS):
                write(array[start:start + CHUNK_ROWS])
