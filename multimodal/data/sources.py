"""What to embed, evaluate or validate on, cut into parts: shard sets of any layout `formats` reads, a
folder of images, or a text file (one text a line), and `EvalBatches`, their `EvalBatch`es.

A part is the unit of output and of resuming: one per shard, or `part_size` consecutive images
or lines. `EvalBatches` yields the batches of the parts given to one (rank, worker) in order;
a batch never spans two parts and the last batch of every part, possibly empty, says so, so
that a writer can close the part. A new kind of source is one `Source` subclass plus its tests.
"""

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from multimodal.data.batch import DeviceJpegs, EvalBatch
from multimodal.data.decode import IMAGE_KEYS, Members, decode_file, decode_record, read_record, tokenize
from multimodal.data.faults import BadSample
from multimodal.data.formats import ShardSet, open_shards
from multimodal.data.pixels import EvalTransform, OpenClipEvalTransform
from multimodal.data.tario import tarfile_samples
from multimodal.errors import UserError
from multimodal.userfiles import read_bytes, read_lines

log = logging.getLogger("multimodal.data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


@dataclass(eq=False)  # items are compared by identity: an array's == is element-wise
class Item:
    image: Image.Image | np.ndarray | bytes | None  # None for a text-only item; bytes: a JPEG for the device
    image_row: dict  # what the image index records: key, file_name, ...
    texts: list[str] = field(default_factory=list)
    text_rows: list[dict] = field(default_factory=list)


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, at any depth, by suffix (IMAGE_SUFFIXES), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_file(path: Path, min_side: int | None = None, on_device: bool = False
                    ) -> Image.Image | np.ndarray | bytes | None:
    """An image file as `decode.decode_file` gives it, or None, with a warning saying why it was skipped:
    unreadable, not a regular file or over its size limit (`userfiles.read_bytes`: refused unread), not an
    image, or more than MAX_IMAGE_PIXELS pixels declared (refused before decoding)."""
    try:
        return decode_file(read_bytes(path), min_side, on_device)
    except OSError as exc:
        log.warning("skipping %s: %s", path, exc.strerror or exc)
    except BadSample as bad:
        log.warning("skipping %s: %s", path, bad.kind)
    return None


class Source:
    """Parts of items. `has_images` / `has_texts` say which embeddings the source produces."""

    has_images = True
    has_texts = True

    def num_parts(self) -> int:
        raise NotImplementedError

    def part_size(self, part: int) -> int | None:
        return None

    def items(self, part: int, min_side: int | None = None, on_device: bool = False) -> Iterator[Item]:
        """The items of `part`; `min_side`: JPEGs may be decoded at a reduced DCT scale that keeps both
        sides at least this (`decode.decode_image`), as (H, W, 3) uint8 arrays; `on_device`: the JPEGs
        a device decodes are left as their bytes."""
        raise NotImplementedError


class ShardSource(Source):
    """A shard set (`formats.open_shards`: ours, img2dataset's, CLIP_benchmark's), a shard a part: each
    image with all its captions (`labels`: with its class index instead, samples without one left out).
    With `json`, an image's row also holds its sample's json member under "json" (img2dataset's url,
    caption, status, width, ...; {} without one), for the metadata an embedding folder keeps.
    A shard that holds another number of samples than the file beside it says stops the run, in one
    sentence: its counts and its samples come from different runs."""

    def __init__(self, shards: str | ShardSet, members: Members = Members(), split: str | None = None,
                 labels: bool = False, json: bool = False):
        self.shards = shards if isinstance(shards, ShardSet) else open_shards(shards, members, split, verify=True)
        self.urls, self.labels, self.json = self.shards.urls, labels, json
        self.has_texts = not labels

    def num_parts(self) -> int:
        return len(self.urls)

    def part_size(self, part: int) -> int | None:
        return self.shards.sizes[part]

    def items(self, part: int, min_side: int | None = None, on_device: bool = False) -> Iterator[Item]:
        url, faults = self.urls[part], []

        def on_error(exc: Exception) -> bool:
            faults.append(exc)
            return wds.warn_and_continue(exc)

        read = 0
        for raw in tarfile_samples([url], handler=on_error):
            read += 1
            try:
                record = read_record(raw, self.shards.members, captions=not self.labels, label=self.labels)
                if self.labels and record.label is None:
                    continue
                image = decode_record(record, min_side, on_device)
            except BadSample:
                continue
            row = {"key": record.key, "url": url,
                   **({"file_name": record.meta["file_name"]} if "file_name" in record.meta else {}),
                   **({"label": record.label} if self.labels else {}), **({"json": record.meta} if self.json else {})}
            yield Item(image, row, record.captions, [{"key": record.key, "caption": c} for c in record.captions])
        expected = self.shards.sizes[part]
        if not faults and expected is not None and read != expected:
            said = self.shards.stats[part].name if self.shards.stats and self.shards.stats[part] else "sizes.json"
            raise UserError(f"{url} holds {read} samples but {said} says {expected}: the shard and its counts come "
                            "from different runs; write or download them again.")


class LabelledShardSource(ShardSource):
    """Shards whose samples carry a class index (a `cls` member, or `members.label_key`): one image item
    each, its row holding the "label"; samples without one are left out."""

    has_texts = False

    def __init__(self, shards: str | ShardSet, members: Members = Members(), split: str | None = None):
        super().__init__(shards, members, split, labels=True)


def fetch_images(url: str, keys: set[str], members: Members = Members()) -> dict[str, Image.Image]:
    """The images of the samples `keys` of one shard, decoding nothing else."""
    found = {}
    for raw in tarfile_samples([url], handler=wds.warn_and_continue):
        image_key = members.image_key or next((k for k in IMAGE_KEYS if k in raw), None)
        if raw["__key__"] in keys and image_key in raw:
            try:
                found[raw["__key__"]] = decode_file(raw[image_key])
            except BadSample:
                continue
            if len(found) == len(keys):
                break
    return found


class ImageFolderSource(Source):
    """The images under a folder, at any depth, `part_size` a part; an image's row holds its path."""

    has_texts = False
    labels: list[int] | None = None  # a label for each of `files` (ClassFolderSource)

    def __init__(self, folder: Path, part_size: int):
        if not folder.is_dir():
            raise UserError(f"Image folder {folder} does not exist: pass a folder of images.")
        self.folder, self.size = folder, part_size
        self.files = image_files(folder)
        if not self.files:
            raise UserError(f"Image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")

    def num_parts(self) -> int:
        return math.ceil(len(self.files) / self.size)

    def part_size(self, part: int) -> int:
        return len(self.files[part * self.size:(part + 1) * self.size])

    def items(self, part: int, min_side: int | None = None, on_device: bool = False) -> Iterator[Item]:
        for i in range(part * self.size, min((part + 1) * self.size, len(self.files))):
            path = self.files[i]
            image = read_image_file(path, min_side, on_device)
            if image is not None:
                row = {"key": path.relative_to(self.folder).as_posix(), "file_name": str(path)}
                yield Item(image, row if self.labels is None else {**row, "label": self.labels[i]})


class ClassFolderSource(ImageFolderSource):
    """An ImageFolder-style folder (FOLDER/CLASS/IMAGE): the class folders in sorted order are labels
    0, 1, ...; an image's row also holds its "label"."""

    def __init__(self, folder: Path, part_size: int = 10000):
        if not folder.is_dir():
            raise UserError(f"Image folder {folder} does not exist: pass an ImageFolder-style folder.")
        self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not self.classes:
            raise UserError(f"{folder} has no class sub-folders: use the ImageFolder layout FOLDER/CLASS/IMAGE.")
        self.folder, self.size = folder, part_size
        by_class = [(path, label) for label, name in enumerate(self.classes) for path in image_files(folder / name)]
        self.files, self.labels = [path for path, _ in by_class], [label for _, label in by_class]


class TextFileSource(Source):
    has_images = False

    def __init__(self, path: Path, part_size: int):
        self.lines = read_lines(path, "Text")
        self.size = part_size

    def num_parts(self) -> int:
        return math.ceil(len(self.lines) / self.size)

    def part_size(self, part: int) -> int:
        return len(self.lines[part * self.size:(part + 1) * self.size])

    def items(self, part: int, min_side: int | None = None, on_device: bool = False) -> Iterator[Item]:
        first = part * self.size
        for i, line in enumerate(self.lines[first:first + self.size], start=first):
            yield Item(None, {}, [line], [{"key": f"{i:09d}", "caption": line}])


class EvalBatches(IterableDataset):
    """`EvalBatch`es of up to `batch_size` items of the given parts, split over DataLoader workers.

    The images are `preprocess.pixels` of images decoded no larger than it needs (`decode_side`): uint8
    that the consumer normalises on its device (`batch.finish`), or, from `OpenClipEvalTransform`, float32
    already normalised. With `decode_on_device`, the JPEGs a device decodes travel as their bytes
    (`jpegs`), first in `image_rows`, and `batch.finish` turns them into pixels there.
    """

    def __init__(self, source: Source, parts: list[int], preprocess: EvalTransform | OpenClipEvalTransform,
                 tokenizer: Callable, batch_size: int, decode_on_device: bool = False):
        super().__init__()
        self.source, self.parts = source, parts
        self.decode_on_device = decode_on_device and preprocess.decode_side is not None
        self.preprocess, self.tokenizer, self.batch_size = preprocess, tokenizer, batch_size

    def _batch(self, part: int, items: list[Item], last: bool) -> EvalBatch:
        jpegs = [i for i in items if isinstance(i.image, bytes)]
        decoded = [i for i in items if i.image is not None and not isinstance(i.image, bytes)]
        with_image = jpegs + decoded
        position = {id(item): n for n, item in enumerate(with_image)}
        text_rows = []
        for item in items:  # a caption row points at its image's row within this batch
            image = {"image": position[id(item)]} if item.image is not None else {}
            text_rows.extend({**row, **image} for row in item.text_rows)
        texts = [t for i in items for t in i.texts]
        tokens, text_rows = self._tokens(texts, text_rows)
        return EvalBatch(
            part, last,
            images=torch.stack([self.preprocess.pixels(i.image) for i in decoded]) if decoded else None,
            image_rows=[i.image_row for i in with_image], texts=tokens, text_rows=text_rows,
            jpegs=DeviceJpegs.pack([i.image for i in jpegs]) if jpegs else None,
        )

    def _tokens(self, texts: list[str], rows: list[dict]) -> tuple[torch.Tensor | None, list[dict]]:
        """The texts tokenised together; (rare) one the tokenizer refuses is left out with its row."""
        tokens, refused = tokenize(self.tokenizer, texts)
        for i in refused:
            log.warning("skipping a text the tokenizer refuses: %r", texts[i][:60])
        return tokens, [row for i, row in enumerate(rows) if i not in refused]

    def __iter__(self) -> Iterator[EvalBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for part in self.parts[worker::num_workers]:
            pending: list[Item] = []
            for item in self.source.items(part, min_side=self.preprocess.decode_side, on_device=self.decode_on_device):
                if len(pending) == self.batch_size:
                    yield self._batch(part, pending, last=False)
                    pending = []
                pending.append(item)
            yield self._batch(part, pending, last=True)
