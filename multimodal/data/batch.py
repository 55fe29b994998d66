"""The batches the data layer hands over, with their fields, and the one step that finishes them on the device.

- `TrainBatch` (`pipeline.ImageTextStream`): one rank's training batch, its stream position and bad-data counts.
- `EvalBatch` (`sources.EvalBatches`): images and captions of a stretch of one part, with the rows that say
  what each is (for embedding folders, retrieval, zero-shot labels, captioning and validation).

Either may carry `DeviceJpegs`: the JPEG bytes that the device decodes (`data.decode: gpu`), which stay in
host memory when the batch moves (`to`: torchvision's device decoder reads host memory). `finish` is the
one step that every consumer calls where the model is (the DataModule for training and validation,
embedding, captioning, zero-shot): the batch's JPEGs decoded together there (nvJPEG on CUDA), each cut
(training: its crop box; evaluation: the centre crop) and put before the worker-decoded pixels, then
uint8 pixels normalised. A worker never normalises: uint8 is a quarter of float32's bytes to move.
"""

import logging
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from multimodal.data.decode import decode_image
from multimodal.data.faults import BadSample, bad_sample_count
from multimodal.data.pixels import Box, EvalTransform, TrainCrop
from multimodal.errors import UserError

log = logging.getLogger("multimodal.data")


@dataclass
class DeviceJpegs:
    """JPEG byte strings packed into one uint8 tensor (a worker hands a tensor over through shared memory,
    where a list of bytes would be pickled through a pipe), with each one's crop box in training."""

    data: torch.Tensor  # (total bytes,) uint8, on the host
    lengths: list[int]
    boxes: list[Box] | None = None  # (top, left, height, width) in full-size pixels; None: evaluation

    @classmethod
    def pack(cls, datas: list[bytes], boxes: list[Box] | None = None) -> "DeviceJpegs":
        lengths = [len(d) for d in datas]
        packed = torch.empty(sum(lengths), dtype=torch.uint8)
        view, start = packed.numpy(), 0
        for data in datas:
            view[start:start + len(data)] = np.frombuffer(data, dtype=np.uint8)
            start += len(data)
        return cls(packed, lengths, boxes)

    def unpack(self) -> list[torch.Tensor]:
        """The byte strings as 1-D uint8 views of `data`."""
        starts = np.cumsum([0, *self.lengths]).tolist()
        return [self.data[start:start + n] for start, n in zip(starts, self.lengths)]

    def __len__(self) -> int:
        return len(self.lengths)

    def pin_memory(self) -> "DeviceJpegs":
        return replace(self, data=self.data.pin_memory())


def _move(tensor: torch.Tensor | None, device, non_blocking: bool | None) -> torch.Tensor | None:
    """`tensor` on `device`; unless told otherwise, asynchronously to an accelerator, as Lightning moves plain
    tensors (it calls a batch's `to(device)` without the flag): a blocking copy from pinned memory would make
    the host wait for the kernels already queued, every step."""
    if non_blocking is None:
        non_blocking = torch.device(device).type not in ("cpu", "mps")
    return tensor.to(device, non_blocking=non_blocking) if tensor is not None else None


def text_length(tokens: torch.Tensor, pad_id: int = 0) -> int:
    """The tokens of the longest of (B, L) captions (a CPU tensor), to its last that is not `pad_id` (open_clip
    pads with 0): counted on the host where the batch is made, so that a step cuts the decoder's input without
    reading the device (`CLIP.forward_captions`)."""
    used = np.flatnonzero((tokens.numpy() != pad_id).any(0))  # numpy: no tensor is read, as no step may
    return int(used[-1]) + 1 if len(used) else 0


@dataclass
class TrainBatch:
    image: torch.Tensor  # (n, 3, S, S) uint8 decoded by a worker; after `finish`, (B, 3, S, S) float32 normalised
    text: torch.Tensor  # (B, L) token ids: the samples of `jpegs` first, then those of `image`
    keys: list[str]  # (B,) the samples' keys, in the order of `text`
    jpegs: DeviceJpegs | None = None  # the first B - n samples' JPEGs and crop boxes, decoded by `finish`
    bad: dict[str, int] = field(default_factory=dict)  # samples skipped and shard faults since the last batch
    read: int = 0  # raw samples read for this batch, good and bad
    worker: int = 0  # the DataLoader worker that made it
    consumed: int = 0  # raw samples that worker's batches consumed this epoch: the stream's position
    sources: tuple[int, ...] = ()  # samples drawn from each source of a weighted mixture
    text_length: int = 0  # tokens of the longest caption (to its last token not padding, 0); 0: not counted

    @property
    def skipped(self) -> int:
        """Bad samples skipped for this batch (shard faults not counted)."""
        return bad_sample_count(self.bad)

    def __len__(self) -> int:
        return self.text.shape[0]

    def to(self, device, non_blocking: bool | None = None) -> "TrainBatch":
        """On `device` (Lightning's transfer calls this), but for the JPEG bytes, which stay on the host."""
        return replace(self, image=_move(self.image, device, non_blocking), text=_move(self.text, device, non_blocking))

    def pin_memory(self) -> "TrainBatch":
        return replace(self, image=self.image.pin_memory(), text=self.text.pin_memory(),
                       jpegs=self.jpegs.pin_memory() if self.jpegs else None)


@dataclass
class EvalBatch:
    part: int  # the part of the source its items come from; -1 for a padding batch
    last: bool  # the part's last batch: a writer may close the part
    images: torch.Tensor | None  # (n, 3, S, S) uint8 (float32 normalised after `finish`, or from an exact transform)
    image_rows: list[dict]  # one a image, the JPEGs' first: key, file_name, url, label, ... as the source reads them
    texts: torch.Tensor | None  # (m, L) token ids
    text_rows: list[dict]  # (m,) caption and key, and "image": its image's position in this batch
    jpegs: DeviceJpegs | None = None  # the first len(jpegs) images' JPEGs, decoded by `finish`

    def to(self, device, non_blocking: bool | None = None) -> "EvalBatch":
        return replace(self, images=_move(self.images, device, non_blocking),
                       texts=_move(self.texts, device, non_blocking))

    def pin_memory(self) -> "EvalBatch":
        return replace(self, images=self.images.pin_memory() if self.images is not None else None,
                       texts=self.texts.pin_memory() if self.texts is not None else None,
                       jpegs=self.jpegs.pin_memory() if self.jpegs else None)

    def without_images(self, dropped: list[int]) -> "EvalBatch":
        """This batch without the images at positions `dropped` (of `image_rows`) and their captions."""
        gone = set(dropped)
        keep = [i for i in range(len(self.image_rows)) if i not in gone]
        new_position = {old: new for new, old in enumerate(keep)}
        texts = [j for j, row in enumerate(self.text_rows) if row.get("image") not in gone]
        rows = [self.text_rows[j] for j in texts]
        return replace(self, image_rows=[self.image_rows[i] for i in keep],
                       text_rows=[{**row, "image": new_position[row["image"]]} if "image" in row else row
                                  for row in rows],
                       texts=self.texts[texts] if self.texts is not None and texts else None)


def jpegs_on_device(decode: str, device: torch.device) -> bool:
    """Whether JPEGs are decoded on `device`, as `data.decode` and `--decode` say ("auto", "cpu" or "gpu"):
    "auto" on a GPU; "gpu" on a CPU run decodes them in the main process with the device path's code
    (what the tests check against the workers' path)."""
    return decode == "gpu" or (decode == "auto" and device.type == "cuda")


def finish(batch: TrainBatch | EvalBatch, device: torch.device, preprocess: EvalTransform,
           crop: TrainCrop | None = None) -> TrainBatch | EvalBatch:
    """A batch made ready for the model on `device`: its JPEGs decoded there and cut (a training batch by
    `crop` and each sample's box, an evaluation batch by `preprocess`'s resize and centre crop), then its
    uint8 pixels normalised with `preprocess`'s statistics. Tensors already on `device` stay there."""
    if isinstance(batch, TrainBatch):
        if batch.jpegs is not None:
            batch = _decode_training_jpegs(batch, crop, device)
        return replace(batch, image=_normalized(batch.image, preprocess))
    if batch.jpegs is not None:
        batch = _decode_eval_jpegs(batch, preprocess, device)
    return replace(batch, images=_normalized(batch.images, preprocess))


def _normalized(pixels: torch.Tensor | None, preprocess: EvalTransform) -> torch.Tensor | None:
    return preprocess.normalize(pixels) if pixels is not None and pixels.dtype == torch.uint8 else pixels


def decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """JPEG bytes (1-D uint8 CPU tensors) -> (3, H, W) uint8 RGB images on `device`, decoded together
    (nvJPEG's batched decoder on CUDA). An image that cannot be decoded comes back as its exception."""
    if not jpegs:
        return []
    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad image fails the whole call: find it, decode the others
        out: list[torch.Tensor | Exception] = []
        for data in jpegs:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                out.append(exc)
        return out


def _decode_training_jpegs(batch: TrainBatch, crop: TrainCrop, device: torch.device) -> TrainBatch:
    """The JPEGs decoded on `device`, cropped with their boxes and resampled there, put before the
    worker-decoded pixels. One the device's decoder refuses is decoded again on the CPU (PIL); one that
    fails there too is a bad sample of its kind, counted in `bad`, and a copy of another sample of the
    batch (image, caption and key) takes its place: every rank keeps the batch size the gathered loss needs."""
    jpegs = batch.jpegs.unpack()
    pixels: list[torch.Tensor | None] = []
    bad: Counter = Counter()
    for data, image, box in zip(jpegs, decode_jpegs(jpegs, device), batch.jpegs.boxes):
        try:
            if isinstance(image, Exception):
                image = decode_image(data.numpy().tobytes())  # a full-size PIL image, or BadSample
            pixels.append(crop.pixels(image, box).to(device, non_blocking=True))
        except BadSample as exc:
            bad[exc.kind] += 1
            pixels.append(None)
    text, keys = batch.text, list(batch.keys)
    if bad:
        everyone = pixels + list(batch.image.unbind())
        good = [i for i, p in enumerate(everyone) if p is not None]
        if not good:
            raise UserError("No image of a whole training batch could be decoded: check the shards.")
        text = text.clone()
        for i in [i for i, p in enumerate(pixels) if p is None]:
            copy = good[i % len(good)]
            pixels[i], text[i], keys[i] = everyone[copy], text[copy], keys[copy]
    image = torch.cat([torch.stack(pixels), batch.image]) if pixels else batch.image
    return replace(batch, image=image, text=text, keys=keys, jpegs=None, bad=dict(Counter(batch.bad) + bad))


def _decode_eval_jpegs(batch: EvalBatch, preprocess: EvalTransform, device: torch.device) -> EvalBatch:
    """The JPEGs decoded on `device`, resized and centre-cropped there (`preprocess.pixels`), put before
    the worker-decoded pixels. One the device's decoder refuses is decoded again on the CPU; one that
    fails there too is left out with its captions, with a warning saying so, as the workers leave out images
    they cannot decode."""
    jpegs = batch.jpegs.unpack()
    pixels: list[torch.Tensor | None] = []
    for row, data, image in zip(batch.image_rows, jpegs, decode_jpegs(jpegs, device)):
        try:
            if isinstance(image, Exception):
                image = decode_image(data.numpy().tobytes(), preprocess.size)
            pixels.append(preprocess.pixels(image).to(device, non_blocking=True))
        except BadSample as exc:
            log.warning("skipping %s: %s", row.get("file_name") or row.get("key"), exc.kind)
            pixels.append(None)
    dropped = [i for i, p in enumerate(pixels) if p is None]
    if dropped:
        batch = batch.without_images(dropped)
    decoded = [p for p in pixels if p is not None]
    parts = ([torch.stack(decoded)] if decoded else []) + \
        ([batch.images.to(device, non_blocking=True)] if batch.images is not None else [])
    return replace(batch, images=torch.cat(parts) if parts else None, jpegs=None)
