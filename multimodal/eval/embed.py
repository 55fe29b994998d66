"""Embeddings of images and texts: computed batch by batch, written in parts, read back.

An embedding folder (the output of `multimodal embed`):

    info.json                      model, checkpoint, source, dtype, dim
    img_emb/part-00000.npy         (n, D) image embeddings of part 0 (float16 or float32)
    img_index/part-00000.jsonl     n lines: key, file_name, url of each image row
    text_emb/part-00000.npy        (m, D) text embeddings
    text_index/part-00000.jsonl    m lines: caption, key, and `image` (row of its image in the part)

Each file is written under a temporary name and renamed; the index files are written last, so a
part whose index files exist is complete, and a resumed run skips it. A folder of parts (embeddings
here, captions in `eval.captions`) is resumed only by a run with the same settings (`settings_changed`),
and written by one run at a time (`folder_of_one_run`: a second run at the same moment is refused,
the partial files of a run killed while writing are removed).
"""

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
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
from multimodal.files import PARTIAL_SUFFIX, atomic_file, partial_of, write_text
from multimodal.model import CLIP
from multimodal.userfiles import read_json, reading, writing

PART = "part-{:05d}"


def settings_changed(path: Path, settings: dict, overwrite: bool, what: str, setting: str = "{}") -> bool:
    """Whether earlier parts beside the settings file `path` (JSON) were made with other `settings` and must be
    cleared before resuming; refused in one sentence naming the changed settings unless `overwrite`. `setting`
    names the options `overwrite` and `out` in the caller's words ("--{}" on a command line)."""
    if not path.is_file():
        return False
    overwrite_option, out_option = setting.format("overwrite"), setting.format("out")
    old = read_json(path, f"pass {overwrite_option} to start afresh, or choose another {out_option}")
    if old != settings and not overwrite:
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        raise UserError(f"{path.parent} holds {what} made with other settings ({', '.join(changed)}): "
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
    """Collects batch outputs per part and writes each part when its last batch arrives."""

    def __init__(self, out: Path, dim: int, dtype: str = "float16", images: bool = True, texts: bool = True):
        if dtype not in ("float16", "float32"):
            raise UserError(f"dtype must be float16 or float32, got {dtype}.")
        self.out, self.dim, self.dtype = out, dim, np.dtype(dtype)
        self.kinds = [k for k, wanted in (("img", images), ("text", texts)) if wanted]
        self.open: dict[int, _Part] = {}
        self.rows_written = 0

    def done(self, part: int) -> bool:
        return all((self.out / f"{kind}_index" / f"{PART.format(part)}.jsonl").is_file() for kind in self.kinds)

    def discard(self, parts: Iterable[int]) -> None:
        """Remove `parts` as if never written: a later run embeds them again (index files first: a part
        without its index is not done)."""
        for sub in ("index", "emb"):
            for part in parts:
                for kind in self.kinds:
                    suffix = ".jsonl" if sub == "index" else ".npy"
                    (self.out / f"{kind}_{sub}" / f"{PART.format(part)}{suffix}").unlink(missing_ok=True)

    def add(self, batch: EvalBatch, image_features: torch.Tensor | None, text_features: torch.Tensor | None) -> None:
        part = self.open.setdefault(batch.part, _Part())
        part.add(batch, image_features, text_features)
        if batch.last:
            self._write(batch.part, self.open.pop(batch.part))

    def _write(self, index: int, part: _Part) -> None:
        outputs = {"img": (part.images, part.image_rows), "text": (part.texts, part.text_rows)}
        for kind in self.kinds:  # embeddings first, index files last: an index means a finished part
            chunks, _ = outputs[kind]
            array = torch.cat(chunks).numpy() if chunks else np.zeros((0, self.dim), np.float32)
            with atomic_file(self.out / f"{kind}_emb" / f"{PART.format(index)}.npy") as f:
                np.save(f, array.astype(self.dtype))
        for kind in self.kinds:
            _, rows = outputs[kind]
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            write_text(self.out / f"{kind}_index" / f"{PART.format(index)}.jsonl", text)
            self.rows_written += len(rows)


LOCK = ".lock"  # in an embedding folder: held (flock) by the run writing it


@contextlib.contextmanager
def folder_of_one_run(out: Path, option: str = "out") -> Iterator[None]:
    """`out` (created if absent) for this run alone while the block runs: another run that asks for it meanwhile
    is refused in one sentence naming `option`. The lock is an flock on `out/.lock`, which ends with the
    process however it ends; once it is held, the partial files of runs killed while writing `out` are
    removed. A folder this run created and left empty (stopped by an error) is removed again."""
    created = not out.exists()
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{out} is being written by another run right now: wait for it to end (the same command "
                        f"then resumes the folder), or choose another {option}.") from None
    except OSError:  # a file system without locks: runs side by side there are the user's to keep apart
        pass
    try:
        for stale in [p for p in (*out.glob(f".*{PARTIAL_SUFFIX}"), *out.glob(f"*/.*{PARTIAL_SUFFIX}"))
                      if partial_of(p.name)]:
            stale.unlink(missing_ok=True)
        yield
    except BaseException:
        if created and out.is_dir() and [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        os.close(fd)


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
