"""Embeddings of images and texts: computed batch by batch, written in parts, read back.

An embedding folder (the output of `multimodal embed`), clip-retrieval's layout and more:

    info.json                      model, checkpoint, source, dtype, dim
    img_emb/part-00000.npy         (n, D) image embeddings of part 0 (float16 or float32)
    text_emb/part-00000.npy        (m, D) text embeddings
    metadata/part-00000.parquet    n rows: key, caption, url, file_name, the sample's json fields (`metadata`)
    img_index/part-00000.jsonl     n lines: key, file_name, url of each image row
    text_index/part-00000.jsonl    m lines: caption, key, and `image` (row of its image in the part)

Each file is written under a temporary name and renamed; the index files are written last, so a
part whose index files exist is complete, and a resumed run skips it. A folder of parts (embeddings
here, captions in `eval.captions`) is resumed only by a run with the same settings (`settings_changed`).
Runs write a folder side by side part by part (`claim`: a lock for its settings, one a part, so that
runs on disjoint part ranges share it and a second run of the same parts is refused; the partial files
of a run killed while writing a part are removed by the next run to take the part).
"""

import contextlib
import errno
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from multimodal.data.batch import EvalBatch, finish, jpegs_on_device
from multimodal.data.pixels import EvalTransform, OpenClipEvalTransform
from multimodal.data.sources import EvalBatches, ShardSource
from multimodal.data.workers import leave_stop_signals_to_the_trainer
from multimodal.errors import UserError
from multimodal.eval.metadata import image_metadata, parquet_bytes, text_metadata
from multimodal.files import PARTIAL_SUFFIX, atomic_file, partial_of, write_bytes, write_text
from multimodal.model import CLIP
from multimodal.userfiles import read_json, reading, writing

PART = "part-{:05d}"


def settings_changed(path: Path, settings: dict, overwrite: bool, what: str, setting: str = "{}",
                     folder: str | None = None) -> bool:
    """Whether earlier parts beside the settings file `path` (JSON) were made with other `settings` and must be
    cleared before resuming; refused in one sentence naming the changed settings unless `overwrite`. `setting`
    names the options `overwrite` and `out` in the caller's words ("--{}" on a command line); `folder` the
    folder, where the user knows it by another name than `path`'s (a bucket's URL)."""
    if not path.is_file():
        return False
    overwrite_option, out_option = setting.format("overwrite"), setting.format("out")
    old = read_json(path, f"pass {overwrite_option} to start afresh, or choose another {out_option}")
    if old != settings and not overwrite:
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        raise UserError(f"{folder or path.parent} holds {what} made with other settings ({', '.join(changed)}): "
                        f"pass {overwrite_option} to replace them, or choose another {out_option}.")
    return old != settings


@dataclass
class Embeddings:
    image_features: torch.Tensor  # (N, D)
    text_features: torch.Tensor  # (M, D)
    text_to_image: torch.Tensor  # (M,), -1 for texts without an image
    image_rows: list[dict] = field(default_factory=list)  # (N,)
    text_rows: list[dict] = field(default_factory=list)  # (M,)


@torch.no_grad()
def encode_batch(model: CLIP, batch: EvalBatch, preprocess: EvalTransform | OpenClipEvalTransform | None = None,
                 ) -> tuple[EvalBatch, torch.Tensor | None, torch.Tensor | None]:
    """(batch, image_features, text_features) of one `EvalBatch`, the features float32 on the CPU (None where
    the batch has no images or no texts), encoded on the model's device. With `preprocess`, the batch is
    moved there and finished there first (`batch.finish`: JPEGs decoded, pixels normalised; the batch
    returned has the rows of the images kept); without, it is ready (a DataModule finished it)."""
    if preprocess is not None:
        device = next(model.parameters()).device
        batch = finish(batch.to(device), device, preprocess)
    images = model.encode_image(batch.images).float().cpu() if batch.images is not None else None
    texts = model.encode_text(batch.texts).float().cpu() if batch.texts is not None else None
    return batch, images, texts


@torch.no_grad()
def labelled_features(model: CLIP, batches: Iterable[EvalBatch], preprocess: EvalTransform | OpenClipEvalTransform
                      | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 image features and (N,) class indices of the labelled images in `batches` (`EvalBatches`
    of a labelled source: each image row holds its "label"), in order, encoded where the model is
    (`encode_batch` with `preprocess`, the architecture's eval transform unless given)."""
    preprocess = preprocess or EvalTransform.of(model.architecture.preprocessing)
    features, labels = [], []
    for batch in batches:
        batch, images, _ = encode_batch(model.eval(), batch, preprocess)
        if images is not None:
            features.append(images)
            labels.extend(row["label"] for row in batch.image_rows)
    if not features:
        raise UserError("No labelled image could be read: check that the folder holds images in class folders, or "
                        "that the samples carry a class (a cls member), and that the images open (those skipped are "
                        "named above).")
    return torch.cat(features), torch.tensor(labels, dtype=torch.long)


class _Part:
    def __init__(self):
        self.images: list[torch.Tensor] = []
        self.texts: list[torch.Tensor] = []
        self.image_rows: list[dict] = []
        self.text_rows: list[dict] = []

    def add(self, batch: EvalBatch, image_features, text_features) -> None:
        offset = len(self.image_rows)
        self.image_rows.extend(batch.image_rows)
        self.text_rows.extend({**r, "image": r["image"] + offset} if "image" in r else r for r in batch.text_rows)
        if image_features is not None:
            self.images.append(image_features)
        if text_features is not None:
            self.texts.append(text_features)


class PartWriter:
    """Collects batch outputs per part and writes each part when its last batch arrives: its embeddings, its
    metadata (a row per image row, or per text row for a source of texts alone), then its index files.
    `publish`, given, is called with the part's files in that order once they are written (an upload)."""

    def __init__(self, out: Path, dim: int, dtype: str = "float16", images: bool = True, texts: bool = True,
                 publish: Callable[[list[Path]], None] | None = None):
        if dtype not in ("float16", "float32"):
            raise UserError(f"dtype must be float16 or float32, got {dtype}.")
        self.out, self.dim, self.dtype, self.publish = out, dim, np.dtype(dtype), publish
        self.kinds = [k for k, wanted in (("img", images), ("text", texts)) if wanted]
        self.open: dict[int, _Part] = {}
        self.rows_written = 0

    def files(self, part: int) -> list[Path]:
        """The files of `part`, in the order they are written: the last ones mark it done."""
        name = PART.format(part)
        return [*(self.out / f"{kind}_emb" / f"{name}.npy" for kind in self.kinds),
                self.out / "metadata" / f"{name}.parquet",
                *(self.out / f"{kind}_index" / f"{name}.jsonl" for kind in self.kinds)]

    def done(self, part: int) -> bool:
        return all(path.is_file() for path in self.files(part)[-len(self.kinds):])

    def discard(self, parts: Iterable[int]) -> None:
        """Remove `parts` as if never written: a later run embeds them again (index files first: a part
        without its index is not done)."""
        for part in parts:
            for path in reversed(self.files(part)):
                path.unlink(missing_ok=True)

    def add(self, batch: EvalBatch, image_features: torch.Tensor | None, text_features: torch.Tensor | None) -> None:
        part = self.open.setdefault(batch.part, _Part())
        part.add(batch, image_features, text_features)
        if batch.last:
            self._write(batch.part, self.open.pop(batch.part))

    def _write(self, index: int, part: _Part) -> None:
        outputs = {"img": (part.images, part.image_rows), "text": (part.texts, part.text_rows)}
        files = self.files(index)
        for kind, path in zip(self.kinds, files):  # embeddings first, index files last: an index means a finished part
            chunks, _ = outputs[kind]
            array = torch.cat(chunks).numpy() if chunks else np.zeros((0, self.dim), np.float32)
            with atomic_file(path) as f:
                np.save(f, array.astype(self.dtype))
        rows = image_metadata(part.image_rows, part.text_rows) if "img" in self.kinds else \
            text_metadata(part.text_rows)
        write_bytes(files[len(self.kinds)], parquet_bytes(rows))
        for kind, path in zip(self.kinds, files[len(self.kinds) + 1:]):
            _, rows = outputs[kind]
            text = "".join(json.dumps({k: v for k, v in r.items() if k != "json"}, ensure_ascii=False) + "\n"
                           for r in rows)
            write_text(path, text)
            self.rows_written += len(rows)
        if self.publish is not None:
            self.publish(files)


LOCK = ".lock"  # in an embedding folder: POSIX record locks on its bytes (`Claim`)


class Claim:
    """A run's hold on an embedding folder: byte 0 of its `.lock` while the run reads or writes info.json,
    byte 1 + N while it embeds part N. They are POSIX record locks (fcntl), which the kernel lets go when the
    process ends however it ends, and which NFS and Lustre hold across nodes where they lock at all."""

    def __init__(self, out: Path, option: str):
        self.out, self.option, self.locking = out, option, True
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)

    def _lock(self, start: int, length: int = 1, blocking: bool = False) -> bool:
        if self.locking:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB), length, start)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    return False
                self.locking = False  # a file system without locks: runs side by side are the user's to keep apart
        return True

    def _unlock(self, start: int, length: int = 1) -> None:
        if self.locking:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, length, start)

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """The block alone among the runs claiming the folder (to compare and write info.json), the partial
        info.json files of runs killed meanwhile removed."""
        self._lock(0, blocking=True)
        try:
            for stale in self.out.glob(f".*{PARTIAL_SUFFIX}"):
                if partial_of(stale.name):
                    stale.unlink(missing_ok=True)
            yield
        finally:
            self._unlock(0)

    def others_writing(self) -> bool:
        """Whether another run is embedding parts of the folder now (asked before this run takes any)."""
        if not self._lock(1, 0):  # length 0: every part
            return True
        self._unlock(1, 0)
        return False

    def parts(self, parts: Iterable[int], done: Callable[[int], bool]) -> list[int]:
        """Those of `parts` not `done`, each now this run's alone, their partial files from killed runs removed;
        refused in one sentence when another run is embedding one of them."""
        todo = []
        for part in parts:
            if done(part):
                continue
            if not self._lock(1 + part):
                if done(part):  # finished by the other run just now
                    continue
                raise UserError(f"{self.out} is being written by another run right now (part {part}): wait for it "
                                f"to end (the same command then resumes the folder), or choose another {self.option}.")
            todo.append(part)
        mine = set(todo)
        for stale in self.out.glob(f"*/.*{PARTIAL_SUFFIX}"):
            found = re.match(r"part-(\d+)\.", partial_of(stale.name) or "")
            if found and int(found.group(1)) in mine:
                stale.unlink(missing_ok=True)
        return todo


@contextlib.contextmanager
def claim(out: Path, option: str = "out") -> Iterator[Claim]:
    """`out` (created if absent) claimed by this run while the block runs (`Claim`); `option` names it in the
    user's words. A folder this run created and left empty (stopped by an error) is removed again."""
    created = not out.exists()
    held = Claim(out, option)
    try:
        yield held
    except BaseException:
        if created and out.is_dir() and [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        os.close(held.fd)


def collect(batches: Iterable[tuple[EvalBatch, torch.Tensor | None, torch.Tensor | None]]) -> Embeddings:
    """Embeddings in memory from (batch, image_features, text_features) in order, parts in turn."""
    parts: dict[int, _Part] = {}
    for batch, image_features, text_features in batches:
        parts.setdefault(batch.part, _Part()).add(batch, image_features, text_features)
    return _join([parts[k] for k in sorted(parts)])


def _join(parts: list[_Part]) -> Embeddings:
    images, texts, image_rows, text_rows, text_to_image = [], [], [], [], []
    for part in parts:
        offset = len(image_rows)
        images.extend(part.images)
        texts.extend(part.texts)
        image_rows.extend(part.image_rows)
        text_rows.extend(part.text_rows)
        text_to_image.extend(r["image"] + offset if "image" in r else -1 for r in part.text_rows)
    cat = lambda chunks: torch.cat(chunks) if chunks else torch.zeros(0, 0)  # noqa: E731
    return Embeddings(cat(images), cat(texts), torch.tensor(text_to_image, dtype=torch.long), image_rows, text_rows)


def load_folder(folder: Path) -> Embeddings:
    """All parts of an embedding folder, checked for consistency."""
    read_info(folder)
    parts = []
    names = sorted({p.stem for kind in ("img", "text") for p in (folder / f"{kind}_index").glob("part-*.jsonl")})
    if not names:
        raise UserError(f"Embedding folder {folder} holds no finished part.")
    dims = set()
    for name in names:
        part = _Part()
        for kind, chunks, rows in (("img", part.images, part.image_rows), ("text", part.texts, part.text_rows)):
            index = folder / f"{kind}_index" / f"{name}.jsonl"
            if not index.is_file():
                continue
            emb = folder / f"{kind}_emb" / f"{name}.npy"
            if not emb.is_file():
                raise UserError(f"Embedding folder {folder} has {kind}_index/{index.name} "
                                f"but no {kind}_emb/{emb.name}: re-run `multimodal embed`.")
            redo = (f"delete {kind}_index/{index.name} and run `multimodal embed --out {folder}` again to "
                    "compute the part afresh")
            with reading(emb, redo):
                array = np.load(emb, allow_pickle=False)
            lines = _index_rows(index, redo)
            if array.ndim != 2 or array.shape[0] != len(lines):
                raise UserError(f"Embedding folder {folder}: {kind}_emb/{emb.name} has {array.shape[0]} rows "
                                f"but {kind}_index/{index.name} lists {len(lines)}: re-run `multimodal embed`.")
            if array.shape[0]:
                dims.add(array.shape[1])
                chunks.append(torch.from_numpy(array.astype(np.float32)))
            rows.extend(lines)
        if any(r.get("image", -1) >= len(part.image_rows) for r in part.text_rows if "image" in r):
            raise UserError(f"Embedding folder {folder}: a text row of {name} points past its part's images.")
        parts.append(part)
    if len(dims) > 1:
        raise UserError(f"Embedding folder {folder} mixes embedding sizes {sorted(dims)}: its parts come from "
                        "different models.")
    return _join(parts)


def _index_rows(path: Path, redo: str) -> list[dict]:
    """The rows of a part's JSONL index, one JSON object a line."""
    rows = []
    with reading(path, redo):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number} is not JSON ({exc.msg}): {redo}.") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {number} is not a JSON object: {redo}.")
            rows.append(row)
    return rows


def read_info(folder: Path, setting: str | None = None) -> dict:
    """An embedding folder's info.json: which model made it, from what. `setting`, where the caller can take
    the weights from elsewhere, names its options `checkpoint` and `model` ("--{}" on a command line)."""
    path = folder / "info.json"
    if not path.is_file():
        raise UserError(f"{folder} is not an embedding folder (no info.json): write one with `multimodal embed`.")
    info = read_json(path, "write the folder again with `multimodal embed`")
    weights = info.get("checkpoint") or info.get("pretrained") or str(info.get("model")).startswith("hf-hub:")
    if not isinstance(info.get("model"), str) or not weights:
        elsewhere = f", or pass {setting.format('checkpoint')} and {setting.format('model')}" if setting else ""
        raise UserError(f"{path} does not name the model and weights that made the embeddings: write the "
                        f"folder again with `multimodal embed`{elsewhere}.")
    return info


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on GPU; nothing on CPU, where fp32 is both exact and faster."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def embed_shards(model: CLIP, shards: "str | ShardSource", batch_size: int = 256, num_workers: int = 0,
                 device: torch.device | None = None, progress: bool = True,
                 preprocess: EvalTransform | OpenClipEvalTransform | None = None, decode: str = "auto") -> Embeddings:
    """Every image and caption of `shards` (a specification, or a `ShardSource` of any layout), in one process,
    batched as `multimodal embed` batches. `preprocess`: the model architecture's eval transform unless given;
    `decode`: where JPEGs are decoded (`batch.jpegs_on_device`)."""
    source, architecture = shards if isinstance(shards, ShardSource) else ShardSource(shards), model.architecture
    preprocess = preprocess or EvalTransform.of(architecture.preprocessing)
    device = device or default_device()
    dataset = EvalBatches(source, list(range(source.num_parts())), preprocess, architecture.tokenizer, batch_size,
                          decode_on_device=jpegs_on_device(decode, device))
    model = model.eval().to(device)
    loader = DataLoader(dataset, batch_size=None, num_workers=min(num_workers, source.num_parts()),
                        pin_memory=device.type == "cuda", worker_init_fn=leave_stop_signals_to_the_trainer)
    with tqdm(total=source.shards.num_samples, unit="img", desc="embedding", mininterval=1.0,
              disable=not progress) as bar:  # closed, its line ended, before any error is printed

        def outputs():
            for batch in loader:
                with autocast(device):
                    batch, image_features, text_features = encode_batch(model, batch, preprocess)
                bar.update(len(batch.image_rows))
                yield batch, image_features, text_features

        return collect(outputs())
