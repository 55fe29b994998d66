"""JPEGs decoded on the training device (`data.decode: gpu`) against the workers' path (`cpu`).

The same crop boxes, pixels within a stated tolerance, bad images counted by kind, and a training
run through Lightning. Without a GPU the device path runs in the main process on the CPU, through
the same code (`batch.finish` with torchvision's `decode_jpeg`).

Tolerance: the workers decode at libjpeg-turbo's smallest DCT scale n/8 covering the crop, the device
at full size. The measured differences print with `pytest tests/test_decode.py -s` (on 32 coco-mini
photos: see the README); most come from the DCT scaling itself, the rest from rounding the box to the
scaled image. Full-size decodes by PIL and by torchvision are identical.
"""

import io
import json
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from multimodal import arch
from multimodal.data.batch import finish
from multimodal.data.datamodule import ShardDataModule
from multimodal.data.formats import MANIFEST
from multimodal.data.pipeline import ImageTextStream
from multimodal.data.pixels import EvalTransform, TrainCrop
from multimodal.recipe import build_module
from tests.conftest import open_clip_transforms
from tests.test_pipeline import batches, write_tar

CPU = torch.device("cpu")
DEVICES = [CPU, *([torch.device("cuda")] if torch.cuda.is_available() else [])]  # where `finish` decodes
MEAN_LEVELS, P99_LEVELS = 4.0, 40.0  # worker path vs device path, levels in 255
# The eval transform of device-decoded pixels against open_clip's (PIL, full size): within a level in 255 where
# libjpeg-turbo decodes (the CPU); nvJPEG's IDCT and chroma upsampling differ from it by a few levels (measured on
# an H200, torch 2.11, 2026-12-04: max 3.89 and mean 0.39 levels for ViT-B-32's 224 px, 1.90 and 0.16 for tiny)
EXACT_LEVELS = {"cpu": (1.1, 0.05), "cuda": (5.0, 0.5)}  # (max, mean)
AS_LEVELS = EvalTransform(224, (0.0, 0.0, 0.0), (1 / 255,) * 3)  # normalisation that keeps the 0-255 levels exact


def finished(batch, crop=None, preprocess=AS_LEVELS, device=CPU):
    """`batch.finish` on `device` (nvJPEG on a GPU), its pixels back on the host as uint8 levels (`AS_LEVELS`:
    x * 255 / 255 is exact)."""
    batch = finish(batch.to(device), device, preprocess, crop).to(CPU)  # as Lightning moves it, and back
    field = "image" if crop is not None else "images"
    pixels = getattr(batch, field)
    return replace(batch, **{field: pixels.round().to(torch.uint8) if pixels is not None else None})


@dataclass(frozen=True)
class RecordingCrop(TrainCrop):
    """Remembers the full-size box of every crop it resamples."""

    boxes: list = field(default_factory=list, compare=False)

    def pixels(self, image, box, full_size=None):
        self.boxes.append(box)
        return super().pixels(image, box, full_size)


def photo(seed: int, size=(640, 480), quality: int = 90) -> bytes:
    """A photo-like JPEG at COCO's size: noise at four scales, coarse ones strongest (as 1/f)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(3, size[1], size[0])
    for div, amplitude in ((32, 1.0), (16, 0.5), (8, 0.25), (4, 0.12)):
        noise = torch.rand(3, max(1, size[1] // div), max(1, size[0] // div), generator=g) - 0.5
        image += amplitude * torch.nn.functional.interpolate(noise[None], size=(size[1], size[0]), mode="bicubic")[0]
    pixels = ((image / 1.9 + 0.5) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def sample(key: str, image: bytes, suffix: str = "jpg") -> dict:
    return {"__key__": key, suffix: image, "json": json.dumps({"captions": [f"caption of {key}"]}).encode()}


def stream(urls, crop, batch_size, on_device, num_batches=1) -> ImageTextStream:
    return ImageTextStream([urls], crop=crop, tokenizer=arch.load("tiny").tokenizer, batch_size=batch_size,
                           num_batches=num_batches, shuffle_buffer=0, decode_on_device=on_device)


@pytest.fixture(params=["generated", "coco-mini"])
def jpegs(request, tmp_path) -> list[str]:
    """Shards of 32 JPEGs: generated photo-like images, or real COCO photos (skipped when absent)."""
    if request.param == "generated":
        images = [photo(i, size=(640 - 40 * (i % 5), 480 + 16 * (i % 3))) for i in range(32)]
    else:
        coco = request.getfixturevalue("coco_mini")
        images = [p.read_bytes() for p in sorted((coco / "val2017").glob("*.jpg"))[:32]]
    return [write_tar(tmp_path / f"s{s}.tar", [sample(f"{s}_{i:02d}", images[s * 16 + i]) for i in range(16)])
            for s in range(2)]


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("size", [224, 64])
def test_device_decoding_has_the_workers_boxes_and_their_pixels_to_within_the_tolerance(jpegs, size, device):
    on_workers, on_device = RecordingCrop(size), RecordingCrop(size)
    worker_batches = batches(stream(jpegs, on_workers, 16, on_device=False, num_batches=2))
    device_batches = batches(stream(jpegs, on_device, 16, on_device=True, num_batches=2))
    assert all(b.image.shape[0] == 0 and len(b.jpegs.boxes) == 16 for b in device_batches)  # all sent
    assert [tuple(box) for b in device_batches for box in b.jpegs.boxes] == on_workers.boxes  # the same boxes

    diffs = []
    for ours, theirs in zip(device_batches, worker_batches):
        ours = finished(ours, on_device, device=device)
        assert ours.keys == theirs.keys and torch.equal(ours.text, theirs.text)
        assert ours.image.shape == theirs.image.shape == (16, 3, size, size)
        diffs.append((ours.image.int() - theirs.image.int()).abs().float().flatten())
    diff = torch.cat(diffs)
    print(f"{device} vs worker pixels at {size} px: mean {diff.mean():.2f}, p99 {diff.quantile(0.99):.0f} levels")
    assert diff.mean() < MEAN_LEVELS and diff.quantile(0.99) <= P99_LEVELS, (diff.mean(), diff.quantile(0.99))
    assert [tuple(box) for box in on_device.boxes] == on_workers.boxes  # the device path cropped with them


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (80, 80), (10, 200, 30, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (90, 70), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    """A JPEG whose header reads but whose scan holds an unsupported marker: no decoder takes it."""
    data = photo(99, size=(120, 96))
    sos = data.index(b"\xff\xda")
    return data[:sos + 20] + b"\xff\xc8" + b"\x00" * 100 + b"\xff\xd9"


def test_bad_images_on_the_device_path_are_counted_by_kind_and_the_batch_keeps_its_size(tmp_path):
    """A corrupt JPEG fails on the device and again on the CPU: counted as a corrupt image, a copy of
    another sample takes its place. A cut JPEG (no end marker), a CMYK JPEG and a PNG never go to the
    device: the workers decode them (the cut one is counted there, as a truncated image)."""
    good = [sample(f"g{i}", photo(i, size=(96, 80))) for i in range(8)]
    odd = [sample("corrupt", corrupt_jpeg()), sample("cut", photo(50)[:3000]), sample("cmyk", cmyk_jpeg()),
           sample("png", png(), "png")]
    url = write_tar(tmp_path / "odd.tar", good[:4] + odd + good[4:])
    crop = TrainCrop(64)
    [worker] = batches(stream([url], crop, 11, on_device=False))
    [device] = batches(stream([url], crop, 11, on_device=True))
    assert worker.bad == {"truncated image": 1, "corrupt image": 1}
    assert device.bad == {"truncated image": 1}  # the worker's part; the corrupt one is still bytes
    assert len(device.jpegs.boxes) == 9 and device.keys[-2:] == ["cmyk", "png"]

    device = finished(device, crop)
    assert device.bad == {"truncated image": 1, "corrupt image": 1} and device.skipped == 2
    assert device.image.shape == (11, 3, 64, 64) and device.text.shape[0] == 11
    assert "corrupt" not in device.keys and len(set(device.keys)) == 10  # one sample twice
    replaced = device.keys.index(next(k for k in device.keys if device.keys.count(k) == 2))
    twin = len(device.keys) - 1 - device.keys[::-1].index(device.keys[replaced])
    assert torch.equal(device.image[replaced], device.image[twin])
    assert torch.equal(device.text[replaced], device.text[twin])
    by_key = dict(zip(worker.keys, worker.image))
    for key in ("cmyk", "png"):  # decoded by the workers in both modes: the same pixels
        assert torch.equal(device.image[device.keys.index(key)], by_key[key])


def test_training_with_device_decoding_runs_through_lightning(tmp_path):
    """`data.decode: gpu` on a CPU run: the JPEG bytes stay in host memory through Lightning's transfer,
    are decoded in the main process, normalised, and the model trains on them."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        write_tar(shards / f"shard-{s:06d}.tar", [sample(f"{s}_{i}", photo(s * 16 + i, size=(96, 80)))
                                                  for i in range(16)])
    (shards / MANIFEST).write_text(json.dumps({f"shard-{s:06d}.tar": 16 for s in range(2)}))
    seen = []

    class Pixels(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((batch.image.dtype, tuple(batch.image.shape), batch.jpegs is not None))

    data = ShardDataModule(str(shards), batch_size=8, num_workers=1, decode="gpu")
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Pixels()])
    trainer.fit(build_module("tiny", lr=1e-3, warmup_steps=1), datamodule=data)
    assert trainer.global_step == 3
    assert seen == [(torch.float32, (8, 3, 64, 64), False)] * 3
    auto = ShardDataModule(str(shards), batch_size=8, num_workers=0)
    assert auto.decode == "auto" and not auto._decode_on_device()  # no trainer: the workers decode
    for device, expected in ((torch.device("cuda"), True), (CPU, False)):
        auto.trainer = type("Trainer", (), {"strategy": type("Strategy", (), {"root_device": device})})()
        assert auto._decode_on_device() is expected  # auto: on the device when training on CUDA


def test_a_png_only_shard_needs_no_device_decoder(tmp_path):
    url = write_tar(tmp_path / "p.tar", [sample(f"p{i}", png(), "png") for i in range(4)])
    [batch] = batches(stream([url], TrainCrop(32), 4, on_device=True))
    assert batch.jpegs.boxes == [] and batch.jpegs.data.numel() == 0
    batch = finished(batch, TrainCrop(32))
    assert batch.image.shape == (4, 3, 32, 32) and np.all(batch.image.numpy() <= 3)


@pytest.mark.parametrize("name", ["ViT-B-32", "tiny"])
def test_evaluation_pixels_match_open_clips_eval_transform(jpegs, name):
    """Shorter side resized, centre crop, normalised: from the full-size image, open_clip's eval
    transform to a level in 255; from the DCT-scaled decode that evaluation uses, the tolerance above."""
    import webdataset as wds

    from multimodal.data.decode import decode_image

    architecture = arch.load(name)
    ours, theirs = EvalTransform.of(architecture.preprocessing), open_clip_transforms(architecture)[1]
    level = 1 / (255 * min(ours.std))  # one uint8 level in normalised units, at most
    full, scaled = [], []
    for raw in wds.tarfile_samples([{"url": url} for url in jpegs]):
        reference = theirs(decode_image(raw["jpg"]))  # a full-size PIL image
        full.append((ours(decode_image(raw["jpg"])) - reference).abs().flatten() / level)
        scaled.append((ours(decode_image(raw["jpg"], min_side=ours.size)) - reference).abs().flatten() / level)
    full, scaled = torch.cat(full), torch.cat(scaled)
    print(f"eval pixels vs open_clip, {name}: full-size max {full.max():.2f}; DCT-scaled mean {scaled.mean():.2f}, "
          f"p99 {scaled.quantile(0.99):.0f} levels")
    assert full.max() <= 1.1 and full.mean() < 0.05
    assert scaled.mean() < MEAN_LEVELS and scaled.quantile(0.99) <= P99_LEVELS, (scaled.mean(), scaled.quantile(0.99))


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("name", ["ViT-B-32", "tiny"])
def test_evaluation_on_the_device_path_has_the_workers_rows_and_their_pixels_to_within_the_tolerance(jpegs, name,
                                                                                                   device):
    """`embed --decode gpu`: the workers send JPEG bytes, the batch is decoded and given the eval transform
    where it is encoded. Same rows and captions as the workers' path; pixels within the training path's
    tolerance of it (the workers decode at a reduced DCT scale, the device at full size), and within a
    level in 255 of open_clip's eval transform on the full-size PIL image (a few levels with nvJPEG: EXACT_LEVELS)."""
    import webdataset as wds

    from multimodal.data.decode import decode_image
    from multimodal.data.sources import EvalBatches, ShardSource

    architecture = arch.load(name)
    preprocess, tokenizer = EvalTransform.of(architecture.preprocessing), architecture.tokenizer
    as_levels = replace(AS_LEVELS, size=preprocess.size)
    reference, level = open_clip_transforms(architecture)[1], 1 / (255 * min(preprocess.std))
    photos = {raw["__key__"]: raw["jpg"] for raw in wds.tarfile_samples([{"url": url} for url in jpegs])}
    from_open_clip = []

    def embed_batches(on_device: bool) -> list[dict]:
        return list(EvalBatches(ShardSource("::".join(jpegs)), [0, 1], preprocess, tokenizer, 16, on_device))

    diffs = []
    for ours, theirs in zip(embed_batches(True), embed_batches(False), strict=True):
        assert ours.images is None and len(ours.jpegs) == 16  # every JPEG sent as bytes
        ours = finished(ours, preprocess=as_levels, device=device)
        assert ours.image_rows == theirs.image_rows and ours.text_rows == theirs.text_rows
        assert torch.equal(ours.texts, theirs.texts)
        assert ours.images.shape == theirs.images.shape == (16, 3, preprocess.size, preprocess.size)
        diffs.append((ours.images.int() - theirs.images.int()).abs().float().flatten())
        for row, pixels in zip(ours.image_rows, preprocess.normalize(ours.images)):
            expected = reference(decode_image(photos[row["key"]]))
            from_open_clip.append((pixels - expected).abs().flatten() / level)
    diff, exact = torch.cat(diffs), torch.cat(from_open_clip)
    print(f"eval {device} vs worker pixels, {name}: mean {diff.mean():.2f}, p99 {diff.quantile(0.99):.0f} levels; "
          f"vs open_clip's eval transform: mean {exact.mean():.3f}, max {exact.max():.2f} levels")
    assert diff.mean() < MEAN_LEVELS and diff.quantile(0.99) <= P99_LEVELS, (diff.mean(), diff.quantile(0.99))
    most, mean = EXACT_LEVELS[device.type]
    assert exact.max() <= most and exact.mean() < mean, (exact.mean(), exact.max())


def test_an_image_no_decoder_reads_is_left_out_of_an_evaluation_batch_with_its_captions(tmp_path, caplog):
    """The corrupt JPEG reaches the device path and fails there and on the CPU: its row and its caption
    leave the batch, the captions of the others point at their images' new rows. A CMYK JPEG and a PNG
    are decoded by the workers, after the device's JPEGs."""
    from multimodal.data.sources import EvalBatches, ShardSource

    good = [sample(f"g{i}", photo(i, size=(96, 80))) for i in range(4)]
    url = write_tar(tmp_path / "odd.tar", [good[0], good[1], sample("corrupt", corrupt_jpeg()),
                                          sample("cmyk", cmyk_jpeg()), sample("png", png(), "png"), good[2], good[3]])
    architecture = arch.load("tiny")
    preprocess = EvalTransform.of(architecture.preprocessing)
    [device] = EvalBatches(ShardSource(url), [0], preprocess, architecture.tokenizer, 16, decode_on_device=True)
    [worker] = EvalBatches(ShardSource(url), [0], preprocess, architecture.tokenizer, 16)
    assert [r["key"] for r in device.image_rows] == ["g0", "g1", "corrupt", "g2", "g3", "cmyk", "png"]
    assert "corrupt" not in [r["key"] for r in worker.image_rows]  # the workers' decoder refused it

    device = finished(device, preprocess=replace(AS_LEVELS, size=preprocess.size))
    assert "skipping" in caplog.text
    keys = [r["key"] for r in device.image_rows]
    assert keys == ["g0", "g1", "g2", "g3", "cmyk", "png"] and device.images.shape[0] == 6
    assert [keys[r["image"]] for r in device.text_rows] == [r["key"] for r in device.text_rows]
    assert device.texts.shape[0] == len(device.text_rows) == 6
    by_key = dict(zip((r["key"] for r in worker.image_rows), worker.images))
    for key in ("cmyk", "png"):  # decoded by the workers in both modes: the same pixels
        assert torch.equal(device.images[keys.index(key)], by_key[key])
