"""The streaming pipeline: webdataset tar shards -> shuffled, decoded, tokenised batches.

    shard URLs -> per (rank, worker) shard stream -> tar members (`tario`) -> shuffle buffer
               -> header + captions (`decode.read_sample`) -> crop box and caption from the sample's seed
               -> decoded and cropped here, or bytes + box for the device (`pixels`) -> tokenised batches

Shards are split by rank and by DataLoader worker. Every worker cycles over its shards (a fresh
shard order each pass) until it has produced its quota of batches, so each rank yields exactly
`num_batches` full batches per epoch however unevenly the shards divide: no rank runs dry while
the others wait in an all-gather. In resampled mode each worker draws shards with replacement.

Only image and caption members are decoded (`multimodal.data.decode`): nothing is unpickled. A
sample that cannot be used is skipped and counted by kind; each batch carries the counts since the
previous one (`batch["bad"]`, `batch["skipped"]`).
"""

import glob
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from multimodal.data.decode import (
    IMAGE_KEYS,
    MAX_IMAGE_PIXELS,
    decodable_on_device,
    decode_checked,
    decode_image,
    decode_sample,
    read_sample,
    tokenize,
)
from multimodal.data.faults import BadSample, FaultCounter, bad_sample_count
from multimodal.data.pixels import TrainCrop, pack
from multimodal.data.shards import MANIFEST, read_manifest
from multimodal.data.tario import tarfile_samples
from multimodal.errors import UserError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
MAX_BAD_IN_A_ROW = 10_000
# A pass starts yielding once its shuffle buffer holds this many samples, and the buffer grows to its
# full size as it goes (open_clip's _SAMPLE_SHUFFLE_INITIAL): a full 5,000-sample buffer of
# full-size JPEGs costs seconds at every epoch boundary before the first batch.
SHUFFLE_INITIAL = 1000


def expand_urls(spec: str) -> list[str]:
    """Shard URLs of `spec`: '::'-separated brace patterns, globs, folders or `pipe:` commands."""
    urls: list[str] = []
    for part in spec.split("::"):
        for item in braceexpand(part.strip()):
            if item.startswith(REMOTE_PREFIXES):
                urls.append(item)
            elif Path(item).is_dir():
                found = sorted(str(p) for p in Path(item).glob("*.tar"))
                if not found:
                    raise UserError(f"Shard folder {item} holds no .tar files: "
                                    "write shards into it with `multimodal shards`.")
                urls.extend(found)
            elif glob.has_magic(item):
                found = sorted(glob.glob(item))
                if not found:
                    raise UserError(f"No shard matches {item}: "
                                    "check the pattern, or write shards with `multimodal shards`.")
                urls.extend(found)
            elif Path(item).is_file():
                urls.append(item)
            else:
                raise UserError(f"Shard {item} does not exist: "
                                "check the path, or write shards with `multimodal shards`.")
    if not urls:
        raise UserError(f"The shard specification '{spec}' names no shards.")
    return urls


def count_samples(urls: list[str]) -> int | None:
    """Total samples of local `urls` from the `sizes.json` beside them; None when unknown."""
    total = 0
    manifests: dict[Path, dict] = {}
    for url in urls:
        path = Path(url)
        if url.startswith(REMOTE_PREFIXES) or not (path.parent / MANIFEST).is_file():
            return None
        if path.parent not in manifests:
            manifests[path.parent] = read_manifest(path.parent / MANIFEST)
        if path.name not in manifests[path.parent]:
            return None
        total += manifests[path.parent][path.name]
    return total


def read_samples(urls: list[str], on_error: Callable[[Exception], bool] = wds.warn_and_continue,
                 min_side: int | None = None, on_device: bool = False
                 ) -> Iterator[tuple[str, Image.Image | np.ndarray | bytes, list[str], dict]]:
    """(key, image, captions, json record) for every decodable sample of `urls`, in order, once.
    `min_side`: decode JPEGs to arrays at the smallest DCT scale keeping both sides >= it (`decode_image`);
    `on_device`: leave the JPEGs a device decodes as their bytes (`decode_sample`)."""
    for raw in tarfile_samples(urls, handler=on_error):
        try:
            image, captions, record = decode_sample(raw, min_side, on_device=on_device)
        except BadSample:
            continue
        yield raw["__key__"], image, captions, record


def read_labelled(urls: list[str], on_error: Callable[[Exception], bool] = wds.warn_and_continue,
                  min_side: int | None = None, on_device: bool = False
                  ) -> Iterator[tuple[str, Image.Image | np.ndarray | bytes, int]]:
    """(key, image, class index) for every sample of `urls` with a decodable image and `cls` member;
    `min_side` and `on_device` as for `read_samples`."""
    for raw in tarfile_samples(urls, handler=on_error):
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        if image_key is None or "cls" not in raw:
            continue
        try:
            label = int(raw["cls"].decode("utf-8").strip())
            image = decode_checked(raw[image_key], min_side, on_device)
        except (ValueError, BadSample):
            continue
        yield raw["__key__"], image, label


def fetch_images(url: str, keys: set[str]) -> dict[str, Image.Image]:
    """The images of the samples `keys` of one shard, decoding nothing else."""
    found = {}
    for raw in tarfile_samples([url], handler=wds.warn_and_continue):
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        if raw["__key__"] in keys and image_key is not None:
            try:
                found[raw["__key__"]] = decode_checked(raw[image_key])
            except BadSample:
                continue
            if len(found) == len(keys):
                break
    return found


@dataclass(frozen=True)
class StreamPosition:
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class WorkerProgress:
    """How far one worker got in an epoch: batches it yielded, and raw samples its batches consumed
    (from the shuffle buffer, bad ones included). Enough to skip them without decoding on resume."""

    batches: int = 0
    consumed: int = 0


def seeded(*parts: int | str) -> random.Random:
    """A generator seeded by `parts`, the same in every process: Python's `hash` of a string
    differs between processes (PYTHONHASHSEED), a string seed does not (it goes through SHA-512)."""
    return random.Random(":".join(map(str, parts)))


@dataclass
class _Ready:
    """One training sample on its way into a batch: its pixels, or its JPEG bytes and crop box for the device."""

    key: str
    url: str | None
    caption: str
    pixels: torch.Tensor | None = None
    jpeg: bytes | None = None
    box: tuple[int, int, int, int] | None = None


def check_split(num_shards: int, world_size: int, num_workers: int) -> None:
    """Every (rank, worker) reads whole shards of its own, so there must be a shard for each."""
    if num_shards < world_size * num_workers:
        raise UserError(f"{num_shards} shards cannot be split over {world_size} ranks x {num_workers} "
                        "workers: write more, smaller shards, lower data.num_workers, or set data.resampled.")


class ImageTextStream(IterableDataset):
    """Full batches of {"image": (B, 3, H, W), "text": (B, L), "keys": [B], "bad": {kind: count},
    "skipped": int, "read": int, "worker": int, "consumed": int} for one rank.

    `bad` counts the samples skipped and shard faults met since the previous batch, by kind
    (`multimodal.data.faults`); `skipped` is its number of bad samples, `read` the raw samples
    read for this batch, good and bad.

    `worker` and `consumed` (raw samples this worker's batches have consumed so far this epoch)
    let a trainer record its position; `resume` (worker -> WorkerProgress) continues epoch
    `first_epoch` from such a position: each worker replays its shard order and shuffle buffer
    without decoding, skips the samples it had consumed, and yields only its remaining batches.
    The shuffle buffer draws from its own generator; each sample's crop and caption from a seed of
    (seed, epoch, rank, worker, its position in the stream): the replay, and the pixels, are exact.

    `image` holds (3, S, S) uint8 pixels of `crop` (`multimodal.data.pixels`), normalised on the
    device by the DataModule. With `decode_on_device`, the JPEGs that the device can decode are not
    decoded here: the batch carries their bytes ("jpeg", one uint8 tensor, cut by "jpeg_lengths") and
    crop boxes ("jpeg_boxes"), and they come first in "text" and "keys"; `image` holds the others'
    pixels (`pixels.finish_batch` puts them together on the device).

    Yields exactly `num_batches` batches per epoch, split over the DataLoader's workers.
    """

    def __init__(self, urls: list[str], *, crop: TrainCrop, tokenizer: Callable, batch_size: int,
                 num_batches: int, position: StreamPosition = StreamPosition(), shuffle_buffer: int = 1000,
                 resampled: bool = False, seed: int = 0, first_epoch: int = 0,
                 resume: dict[int, WorkerProgress] | None = None, max_image_pixels: int | None = MAX_IMAGE_PIXELS,
                 decode_on_device: bool = False):
        super().__init__()
        self.urls, self.crop, self.tokenizer = urls, crop, tokenizer
        self.max_image_pixels, self.decode_on_device = max_image_pixels, decode_on_device
        self.faults = FaultCounter()
        self.batch_size, self.num_batches, self.position = batch_size, num_batches, position
        self.shuffle_buffer, self.resampled, self.seed = shuffle_buffer, resampled, seed
        self.first_epoch, self.resume = first_epoch, resume or {}
        self.epoch = first_epoch - 1  # advanced by every __iter__, in the worker's own copy (persistent workers)

    def __len__(self) -> int:
        return self.num_batches

    def _passes(self, worker: int, num_workers: int) -> Iterator[Iterator[str]]:
        """This worker's shard URLs, one iterator per pass over its shards (a fresh order each pass);
        resampled: a single endless draw with replacement."""
        pos = self.position
        if self.resampled:
            rng = seeded(self.seed, self.epoch, pos.rank, worker, "resampled")
            yield (rng.choice(self.urls) for _ in iter(int, 1))
            return
        slot, slots = pos.rank * num_workers + worker, pos.world_size * num_workers
        check_split(len(self.urls), pos.world_size, num_workers)
        cycle = 0
        while True:
            order = list(self.urls)
            seeded(self.seed, self.epoch, cycle, "shards").shuffle(order)  # same on every rank
            yield iter(order[slot::slots])
            cycle += 1

    def _raw_samples(self, worker: int, num_workers: int, rng: random.Random) -> Iterator[dict]:
        """Raw samples, shuffled within each pass: the buffer drains at the end of a pass, so one
        pass yields every sample of this worker's shards exactly once."""
        for urls in self._passes(worker, num_workers):
            raw = tarfile_samples(urls, handler=self.faults.shard_fault)
            if self.shuffle_buffer > 1:
                raw = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, SHUFFLE_INITIAL), rng=rng)(raw)
            empty = True
            for sample in raw:
                empty = False
                yield sample
            if empty:  # a whole pass over our shards gave nothing: never loop forever
                raise UserError(f"The shards of worker {worker} on rank {self.position.rank} hold no readable "
                                "image-text sample.")

    def _ready(self, raw: dict, worker: int, consumed: int) -> _Ready:
        """One raw sample made ready for a batch; raises BadSample. Its crop box and caption come from
        its own seed: the same whatever came before it, so a resumed run that skips what it had read
        without decoding it gets the same pixels, and the worker and device paths the same boxes."""
        sample = read_sample(raw, self.max_image_pixels)
        rng = seeded(self.seed, self.epoch, self.position.rank, worker, consumed)
        box = self.crop.box(*sample.size, rng)
        caption = sample.captions[rng.randrange(len(sample.captions))]
        if self.decode_on_device and decodable_on_device(sample.data, sample.jpeg_colourspace):
            return _Ready(raw["__key__"], raw.get("__url__"), caption, jpeg=sample.data, box=box)
        image = decode_image(sample.data, min_side=self.crop.size)
        return _Ready(raw["__key__"], raw.get("__url__"), caption, pixels=self.crop.pixels(image, box, sample.size))

    def _batch(self, ready: list[_Ready], tokens: torch.Tensor) -> dict:
        """The batch of `ready` (tokens in its order): device-decoded JPEGs first, then the others."""
        order = sorted(range(len(ready)), key=lambda i: ready[i].jpeg is None)  # stable: the device's JPEGs first
        here = [ready[i] for i in order if ready[i].jpeg is None]
        size = self.crop.size
        batch = {"image": torch.stack([r.pixels for r in here]) if here else torch.empty(0, 3, size, size,
                                                                                          dtype=torch.uint8),
                 "text": tokens[order], "keys": [ready[i].key for i in order]}
        if self.decode_on_device:
            on_device = [ready[i] for i in order if ready[i].jpeg is not None]
            batch["jpeg"], batch["jpeg_lengths"] = pack([r.jpeg for r in on_device])
            batch["jpeg_boxes"] = [r.box for r in on_device]
        return batch

    def _tokens(self, ready: list[_Ready]) -> tuple[torch.Tensor | None, list[_Ready]]:
        """The captions of `ready` tokenised together, or (rare) None and the samples whose captions the
        tokenizer took: one it refuses is an unreadable caption, counted, and the batch reads on."""
        tokens, refused = tokenize(self.tokenizer, [r.caption for r in ready])
        for i in refused:
            self.faults.add("unreadable caption", ready[i].url, ready[i].key, "the tokenizer refused it")
        return (None, [r for i, r in enumerate(ready) if i not in refused]) if refused else (tokens, ready)

    def _batches(self, raw_samples: Iterator[dict], worker: int, consumed: int) -> Iterator[dict]:
        ready, read, bad_in_a_row = [], 0, 0
        for raw in raw_samples:
            consumed, read = consumed + 1, read + 1
            try:
                ready.append(self._ready(raw, worker, consumed))
            except BadSample as bad:
                self.faults.add(bad.kind, raw.get("__url__"), raw.get("__key__"))
                bad_in_a_row += 1
                if bad_in_a_row == MAX_BAD_IN_A_ROW:
                    raise UserError(f"{MAX_BAD_IN_A_ROW} samples in a row in {raw.get('__url__')} could not be "
                                    "used: check that the shards hold images with captions.") from None
                continue
            bad_in_a_row = 0
            if len(ready) == self.batch_size:
                tokens, ready = self._tokens(ready)
                if tokens is None:  # some captions refused: read more samples to fill the batch
                    continue
                bad = self.faults.take()
                yield {**self._batch(ready, tokens), "bad": bad, "skipped": bad_sample_count(bad), "read": read,
                       "worker": worker, "consumed": consumed}
                ready, read = [], 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        self.epoch += 1
        quota = self.num_batches // num_workers + (worker < self.num_batches % num_workers)
        done = self.resume.get(worker, WorkerProgress()) if self.epoch == self.first_epoch else WorkerProgress()
        seed = (self.seed, self.epoch, self.position.rank, worker)
        raw = self._raw_samples(worker, num_workers, seeded(*seed, "buffer"))
        for _ in islice(raw, done.consumed):  # resuming: what was already trained on, read but not decoded
            pass
        self.faults = FaultCounter(f"rank {self.position.rank}, worker {worker}")  # faults replayed: counted before
        yield from islice(self._batches(raw, worker, done.consumed), max(0, quota - done.batches))
