"""The streaming pipeline: webdataset tar shards -> shuffled, decoded, tokenised `TrainBatch`es.

    shard URLs of each source -> per (rank, worker) shard stream -> tar members (`tario`)
               -> [weighted mixture of sources] -> shuffle buffer
               -> header, captions (`decode.read_record`) -> crop box and caption from the sample's seed
               -> decoded and cropped here, or bytes + box for the device (`pixels`) -> tokenised batches

Shards are split by rank and by DataLoader worker. Every worker cycles over its shards (a fresh
shard order each pass) until it has produced its quota of batches, so each rank yields exactly
`num_batches` full batches per epoch however unevenly the shards divide: no rank runs dry while
the others wait in an all-gather. In resampled mode each worker draws shards with replacement.

A weighted mixture (several sources and their `weights`) draws each sample's source at random with
probability proportional to its weight, from a generator of its own, so a source's share of the
samples is its weight's share whatever its shard sizes; each source is split and cycled as above.

Only the members `decode.Members` names are decoded: nothing is unpickled. A sample that cannot be
used is skipped and counted by kind; each batch carries the counts since the previous one (`bad`).
"""

import random
from bisect import bisect
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate, islice

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from multimodal.data.batch import DeviceJpegs, TrainBatch, text_length
from multimodal.data.decode import MAX_IMAGE_PIXELS, Members, decodable_on_device, decode_image, read_record, tokenize
from multimodal.data.faults import BadSample, FaultCounter
from multimodal.data.pixels import TrainCrop
from multimodal.data.tario import tarfile_samples
from multimodal.errors import UserError

MAX_BAD_IN_A_ROW = 10_000
# A pass starts yielding once its shuffle buffer holds this many samples, and the buffer grows to its
# full size as it goes (open_clip's _SAMPLE_SHUFFLE_INITIAL): a full 5,000-sample buffer of
# full-size JPEGs costs seconds at every epoch boundary before the first batch.
SHUFFLE_INITIAL = 1000


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
    source: int
    pixels: torch.Tensor | None = None
    jpeg: bytes | None = None
    box: tuple[int, int, int, int] | None = None


def check_split(num_shards: int, world_size: int, num_workers: int, what: str = "shards") -> None:
    """Every (rank, worker) reads whole shards of its own, so there must be a shard for each."""
    if num_shards < world_size * num_workers:
        raise UserError(f"{num_shards} {what} cannot be split over {world_size} ranks x {num_workers} "
                        "workers: write more, smaller shards, lower data.num_workers, or set data.resampled.")


class ImageTextStream(IterableDataset):
    """Exactly `num_batches` full `TrainBatch`es per epoch for one rank, split over the DataLoader's workers.

    `sources` holds the shard URLs of each source: one source, or a mixture drawn by `weights` (one per
    source; their shares of the samples); `members`, how each source's samples read (one for all, or one
    a source: a CLIP_benchmark retrieval folder's captions are one a line). Each batch carries the bad
    samples and shard faults met since the previous one, by kind (`multimodal.data.faults`), the raw
    samples read for it, and for a mixture the samples it took from each source.

    `worker` and `consumed` (raw samples this worker's batches have consumed so far this epoch)
    let a trainer record its position; `resume` (worker -> WorkerProgress) continues epoch
    `first_epoch` from such a position: each worker replays its shard order, mixture draws and shuffle
    buffer without decoding, skips the samples it had consumed, and yields only its remaining batches.
    The shuffle buffer and the mixture draw from generators of their own; each sample's crop and caption
    from a seed of (seed, epoch, rank, worker, its position in the stream): the replay, and the pixels,
    are exact.

    `image` holds (3, S, S) uint8 pixels of `crop` (`multimodal.data.pixels`), normalised on the
    device (`batch.finish`). With `decode_on_device`, the JPEGs that the device can decode are not
    decoded here: the batch carries their bytes and crop boxes (`jpegs`), and they come first in `text`
    and `keys`.
    """

    def __init__(self, sources: list[list[str]], *, crop: TrainCrop, tokenizer: Callable, batch_size: int,
                 num_batches: int, weights: tuple[float, ...] | None = None,
                 members: Members | list[Members] = Members(),
                 position: StreamPosition = StreamPosition(), shuffle_buffer: int = 1000, resampled: bool = False,
                 seed: int = 0, first_epoch: int = 0, resume: dict[int, WorkerProgress] | None = None,
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS, decode_on_device: bool = False):
        super().__init__()
        if any(isinstance(urls, str) for urls in sources) or (weights is not None and len(weights) != len(sources)):
            raise ValueError("sources: a list of URL lists, one a source; weights: one a source")
        self.sources, self.weights = sources, weights
        self.members = members if isinstance(members, list) else [members] * len(sources)  # one a source
        self.crop, self.tokenizer = crop, tokenizer
        self.max_image_pixels, self.decode_on_device = max_image_pixels, decode_on_device
        self.faults = FaultCounter()
        self.batch_size, self.num_batches, self.position = batch_size, num_batches, position
        self.shuffle_buffer, self.resampled, self.seed = shuffle_buffer, resampled, seed
        self.first_epoch, self.resume = first_epoch, resume or {}
        self.epoch = first_epoch - 1  # advanced by every __iter__, in the worker's own copy (persistent workers)

    def __len__(self) -> int:
        return self.num_batches

    def _passes(self, source: int, worker: int, num_workers: int) -> Iterator[Iterator[str]]:
        """This worker's shard URLs of one source, one iterator per pass over its shards (a fresh order
        each pass); resampled: a single endless draw with replacement."""
        pos, urls = self.position, self.sources[source]
        tag = () if source == 0 else (f"source{source}",)
        if self.resampled:
            rng = seeded(self.seed, self.epoch, pos.rank, worker, "resampled", *tag)
            yield (rng.choice(urls) for _ in iter(int, 1))
            return
        slot, slots = pos.rank * num_workers + worker, pos.world_size * num_workers
        check_split(len(urls), pos.world_size, num_workers)
        cycle = 0
        while True:
            order = list(urls)
            seeded(self.seed, self.epoch, cycle, "shards", *tag).shuffle(order)  # same on every rank
            yield iter(order[slot::slots])
            cycle += 1

    def _shuffled(self, raw: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            return raw
        return wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, SHUFFLE_INITIAL), rng=rng)(raw)

    def _source_samples(self, source: int, worker: int, num_workers: int, rng: random.Random | None
                        ) -> Iterator[dict]:
        """Raw samples of one source, pass after pass, each tagged with its source; with `rng`, shuffled
        within each pass (the buffer drains at the end of a pass, so a pass over shards read in order
        yields every sample of this worker's shards exactly once)."""
        for urls in self._passes(source, worker, num_workers):
            raw = tarfile_samples(urls, handler=self.faults.shard_fault)
            empty = True
            for sample in self._shuffled(raw, rng) if rng is not None else raw:
                empty = False
                sample["__source__"] = source
                yield sample
            if empty:  # a whole pass over our shards gave nothing: never loop forever
                raise UserError(f"The shards of worker {worker} on rank {self.position.rank}"
                                f"{f' in source {source}' if len(self.sources) > 1 else ''} hold no readable "
                                "image-text sample.")

    def _raw_samples(self, worker: int, num_workers: int, rng: random.Random) -> Iterator[dict]:
        """Raw samples, shuffled by `rng`: one source's pass by pass; a mixture's as they are drawn, each
        sample's source chosen by the weights from a generator of its own."""
        if len(self.sources) == 1:
            return self._source_samples(0, worker, num_workers, rng)
        streams = [self._source_samples(i, worker, num_workers, None) for i in range(len(self.sources))]
        draw = seeded(self.seed, self.epoch, self.position.rank, worker, "mixture")
        cumulative = list(accumulate(self.weights or [1.0] * len(streams)))
        last = len(streams) - 1
        mixed = (next(streams[min(bisect(cumulative, draw.random() * cumulative[-1]), last)]) for _ in iter(int, 1))
        return self._shuffled(mixed, rng)

    def _ready(self, raw: dict, worker: int, consumed: int) -> _Ready:
        """One raw sample made ready for a batch; raises BadSample. Its crop box and caption come from
        its own seed: the same whatever came before it, so a resumed run that skips what it had read
        without decoding it gets the same pixels, and the worker and device paths the same boxes."""
        record = read_record(raw, self.members[raw.get("__source__", 0)], self.max_image_pixels)
        rng = seeded(self.seed, self.epoch, self.position.rank, worker, consumed)
        box = self.crop.box(*record.size, rng)
        caption = record.captions[rng.randrange(len(record.captions))]
        ready = _Ready(record.key, record.url, caption, raw.get("__source__", 0))
        if self.decode_on_device and decodable_on_device(record.data, record.jpeg_colourspace):
            ready.jpeg, ready.box = record.data, box
        else:
            image = decode_image(record.data, min_side=self.crop.size)
            ready.pixels = self.crop.pixels(image, box, record.size)
        return ready

    def _batch(self, ready: list[_Ready], tokens: torch.Tensor, **fields) -> TrainBatch:
        """The batch of `ready` (tokens in its order): device-decoded JPEGs first, then the others."""
        order = sorted(range(len(ready)), key=lambda i: ready[i].jpeg is None)  # stable: the device's JPEGs first
        here = [ready[i] for i in order if ready[i].jpeg is None]
        on_device = [ready[i] for i in order if ready[i].jpeg is not None]
        size = self.crop.size
        image = torch.stack([r.pixels for r in here]) if here else torch.empty(0, 3, size, size, dtype=torch.uint8)
        jpegs = DeviceJpegs.pack([r.jpeg for r in on_device], [r.box for r in on_device]) \
            if self.decode_on_device else None
        counts = Counter(r.source for r in ready)
        sources = tuple(counts[i] for i in range(len(self.sources))) if len(self.sources) > 1 else ()
        return TrainBatch(image, tokens[order], [ready[i].key for i in order], jpegs, sources=sources,
                          text_length=text_length(tokens), **fields)

    def _tokens(self, ready: list[_Ready]) -> tuple[torch.Tensor | None, list[_Ready]]:
        """The captions of `ready` tokenised together, or (rare) None and the samples whose captions the
        tokenizer took: one it refuses is an unreadable caption, counted, and the batch reads on."""
        tokens, refused = tokenize(self.tokenizer, [r.caption for r in ready])
        for i in refused:
            self.faults.add("unreadable caption", ready[i].url, ready[i].key, "the tokenizer refused it")
        return (None, [r for i, r in enumerate(ready) if i not in refused]) if refused else (tokens, ready)

    def _batches(self, raw_samples: Iterator[dict], worker: int, consumed: int) -> Iterator[TrainBatch]:
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
                yield self._batch(ready, tokens, bad=self.faults.take(), read=read, worker=worker, consumed=consumed)
                ready, read = [], 0

    def __iter__(self) -> Iterator[TrainBatch]:
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
