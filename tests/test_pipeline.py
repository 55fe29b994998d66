"""The streaming pipeline: equal batches per rank, skipping bad samples, no unpickling, URLs."""

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from multimodal import arch
from multimodal.data.formats import expand_urls, open_shards, read_records
from multimodal.data.pipeline import ImageTextStream, StreamPosition
from multimodal.data.pixels import EvalTransform, TrainCrop
from multimodal.data.shards import write_synthetic
from multimodal.errors import UserError
from tests.conftest import REPO, open_clip_transforms


def jpeg(colour=(200, 30, 30), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)
    return str(path)


def good(key: str, captions=("a red square",)) -> dict:
    return {"__key__": key, "jpg": jpeg(), "json": json.dumps({"captions": list(captions)}).encode()}


def stream(urls, *, batch_size=4, num_batches=3, rank=0, world=1, shuffle_buffer=0, **kw) -> ImageTextStream:
    tiny = arch.load("tiny")
    return ImageTextStream([urls], crop=TrainCrop.of(tiny.preprocessing), tokenizer=tiny.tokenizer,
                           batch_size=batch_size, num_batches=num_batches, position=StreamPosition(rank, world),
                           shuffle_buffer=shuffle_buffer, **kw)


def batches(dataset, num_workers=0) -> list[dict]:
    return list(DataLoader(dataset, batch_size=None, num_workers=num_workers))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_equal_batches_on_every_rank_with_uneven_shards(tmp_path, num_workers):
    sizes = [7, 3, 10, 1, 5, 2, 9]
    urls = [write_tar(tmp_path / f"s{i}.tar", [good(f"{i}_{j}") for j in range(n)]) for i, n in enumerate(sizes)]
    total, world, bs = sum(sizes), 2, 3
    num_batches = total // (bs * world)
    for rank in range(world):
        out = batches(stream(urls, batch_size=bs, num_batches=num_batches, rank=rank, world=world,
                             shuffle_buffer=8), num_workers)
        assert len(out) == num_batches
        assert all(b.image.shape == (bs, 3, 64, 64) and b.text.shape == (bs, 32) for b in out)


def test_resampled_mode_yields_the_nominal_epoch(tmp_path):
    url = write_tar(tmp_path / "s.tar", [good(str(j)) for j in range(5)])
    out = batches(stream([url], batch_size=4, num_batches=7, resampled=True, shuffle_buffer=10))
    assert len(out) == 7


def test_bad_samples_are_skipped_and_counted(tmp_path):
    samples = [good(str(j)) for j in range(8)]
    samples[1] = {"__key__": "1", "jpg": jpeg()[:40], "txt": b"truncated jpeg"}
    samples[3] = {"__key__": "3", "jpg": b"this is not an image", "txt": b"junk"}
    samples[5] = {"__key__": "5", "jpg": jpeg()}  # no text at all
    samples[6] = {"__key__": "6", "jpg": jpeg(), "txt": b"   "}  # empty caption
    samples.append({"__key__": "8", "jpg": b"", "txt": b"zero bytes"})
    url = write_tar(tmp_path / "s.tar", samples)
    out = batches(stream([url], batch_size=2, num_batches=2))
    assert len(out) == 2 and sum(b.skipped for b in out) == 4
    assert sorted(r.key for r in read_records([url])) == ["0", "2", "4", "7"]


def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = pickle.dumps(Payload())
    url = write_tar(tmp_path / "s.tar", [
        {**good(str(j)), "pyd": evil, "pth": evil, "pickle": evil} for j in range(4)
    ])
    assert len(batches(stream([url], batch_size=2, num_batches=4))) == 4
    assert len(list(read_records([url]))) == 4
    assert not marker.exists()
    pickle.loads(evil)  # the payload is live: loading it would have created the file
    assert marker.exists()


def test_a_random_caption_at_every_visit(tmp_path):
    captions = [f"caption number {i}" for i in range(5)]
    url = write_tar(tmp_path / "s.tar", [good("0", captions)])
    out = batches(stream([url], batch_size=1, num_batches=40))
    seen = {tuple(b.text[0].tolist()) for b in out}
    assert len(seen) == 5


def test_epochs_reshuffle(tmp_path):
    write_synthetic(tmp_path / "d", num_samples=64, shard_size=16)
    ds = stream(expand_urls(str(tmp_path / "d")), batch_size=8, num_batches=8, shuffle_buffer=32)
    first, second = (torch.cat([b.text for b in batches(ds)]) for _ in range(2))
    assert not torch.equal(first, second)


def test_too_few_shards_for_ranks_and_workers(tmp_path):
    url = write_tar(tmp_path / "s.tar", [good(str(j)) for j in range(8)])
    with pytest.raises(UserError, match="cannot be split over 2 ranks"):
        list(stream([url], world=2))


def test_url_forms(tmp_path):
    write_synthetic(tmp_path / "d", num_samples=30, shard_size=10)
    folder = tmp_path / "d"
    by_folder = expand_urls(str(folder))
    assert len(by_folder) == 3
    assert expand_urls(f"{folder}/shard-{{000000..000002}}.tar") == by_folder
    assert expand_urls(f"{folder}/*.tar") == by_folder
    assert expand_urls(f"{folder}/shard-000000.tar::{folder}/shard-00000[12].tar") == by_folder
    assert open_shards(str(folder)).num_samples == 30
    piped = [f"pipe:cat {u}" for u in by_folder]
    assert expand_urls("::".join(piped)) == piped and open_shards("::".join(piped)).num_samples is None
    assert len(list(read_records(piped))) == 30
    with pytest.raises(UserError, match="does not exist"):
        expand_urls(f"{folder}/shard-{{000000..000005}}.tar")
    with pytest.raises(UserError, match="No shard matches"):
        expand_urls(f"{tmp_path}/nothing-*.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .tar"):
        expand_urls(str(tmp_path / "empty"))


class TorchDraws:
    """Draws from torch's CPU generator in the order and form of torchvision's RandomResizedCrop."""

    def uniform(self, a: float, b: float) -> float:
        return torch.empty(1).uniform_(a, b).item()

    def randint(self, a: int, b: int) -> int:
        return int(torch.randint(a, b + 1, size=(1,)).item())


def test_crop_boxes_are_torchvisions_random_resized_crop():
    """Given torch's draws, `TrainCrop.box` gives torchvision's boxes (open_clip's train crop),
    including the centre-crop fallback of images too elongated for the allowed ratios."""
    import torchvision.transforms as T

    crop = TrainCrop.of(arch.load("ViT-B-32").preprocessing)
    sizes = [(640, 480), (480, 640), (224, 224), (1000, 90), (90, 1000), (333, 257), (65, 64)]
    for seed in range(300):
        width, height = sizes[seed % len(sizes)]
        torch.manual_seed(seed)
        theirs = T.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.9, 1.0], [3 / 4, 4 / 3])
        torch.manual_seed(seed)
        assert crop.box(width, height, TorchDraws()) == tuple(theirs), (seed, width, height)


def test_uint8_training_pixels_normalised_on_device_match_open_clips_train_transform():
    """Same crop box for the same random state; resampling agrees to a level or two in 255."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (300, 420, 3), generator=g, dtype=torch.uint8)
    smooth = torch.nn.functional.avg_pool2d(noise.permute(2, 0, 1)[None].float(), 9, 1, 4)[0]  # photo-like
    image = Image.fromarray(smooth.permute(1, 2, 0).round().to(torch.uint8).numpy())
    architecture = arch.load("ViT-B-32")
    train, _ = open_clip_transforms(architecture)
    crop = TrainCrop.of(architecture.preprocessing)
    for seed in range(5):
        torch.manual_seed(seed)
        theirs = train(image)
        torch.manual_seed(seed)
        pixels = crop.pixels(image, crop.box(*image.size, TorchDraws()))
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
        ours = EvalTransform.of(architecture.preprocessing).normalize(pixels[None])[0]
        level = 1 / (255 * 0.26)  # one uint8 level in normalised units
        assert (ours - theirs).abs().mean() < 0.5 * level
        assert (ours - theirs).abs().max() < 4 * level


@pytest.mark.parametrize("size,min_side,expected", [
    ((1600, 1200), 224, (400, 300)),  # 1/4 scale: 1/8 would be 150 px high, under 224
    ((640, 480), 224, (320, 240)),
    ((640, 480), 300, (400, 300)),  # libjpeg-turbo scales by n/8: 5/8 keeps 300 px
    ((1600, 1200), None, (1600, 1200)),
])
def test_large_jpegs_decode_at_the_smallest_scale_that_covers_the_crop(size, min_side, expected):
    """Draft decoding: the JPEG's DCT is scaled by n/8, the smallest n keeping both sides >= min_side."""
    from tests.test_faults import decode_sample

    image, captions, _ = decode_sample({"jpg": jpeg(size=size), "txt": b"a caption"}, min_side)
    width_height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    assert width_height == expected and captions == ["a caption"]
    png = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(png, format="PNG")
    assert decode_sample({"png": png.getvalue(), "txt": b"x"}, min_side)[0].size == size  # not a JPEG: whole


def test_training_batches_carry_uint8_pixels(tmp_path):
    from multimodal.data.datamodule import ShardDataModule

    write_synthetic(tmp_path / "train", num_samples=64, shard_size=16)
    data = ShardDataModule(str(tmp_path / "train"), batch_size=8, num_workers=0)
    batch = next(iter(data.train_dataloader()))
    assert batch.image.dtype == torch.uint8 and batch.image.shape == (8, 3, 64, 64)


def test_training_jpeg_decoding_equals_pils_pixels():
    """The training path decodes JPEGs with libjpeg-turbo directly: the same pixels as PIL, as arrays."""
    import numpy as np

    from tests.test_faults import decode_sample

    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (3, 240, 320), generator=g, dtype=torch.uint8)
    smooth = torch.nn.functional.avg_pool2d(noise[None].float(), 5, 1, 2)[0].round().to(torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
    raw = {"jpg": buf.getvalue(), "txt": b"x"}
    array, _, _ = decode_sample(raw, min_side=224)
    pil, _, _ = decode_sample(raw)
    assert isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.flags.writeable
    assert np.abs(array.astype(int) - np.asarray(pil).astype(int)).max() <= 1
    cmyk = io.BytesIO()
    Image.new("CMYK", (240, 240), (10, 20, 30, 0)).save(cmyk, format="JPEG")
    image, _, _ = decode_sample({"jpg": cmyk.getvalue(), "txt": b"x"}, min_side=224)
    reference = np.asarray(decode_sample({"jpg": cmyk.getvalue(), "txt": b"x"})[0]).astype(int)
    assert image.shape == (240, 240, 3) and np.abs(np.asarray(image).astype(int) - reference).max() <= 2


def test_shards_without_a_single_sample_stop_with_one_sentence(tmp_path):
    import tarfile

    for i in range(2):
        with tarfile.open(tmp_path / f"empty-{i}.tar", "w"):
            pass  # a valid tar holding nothing
    with pytest.raises(UserError, match="hold no readable image-text sample"):
        next(iter(stream([str(p) for p in sorted(tmp_path.glob("*.tar"))], batch_size=2, num_batches=1)))


def test_the_stream_is_the_same_in_every_process(tmp_path):
    """Shard order, shuffle buffer and caption choice do not depend on Python's per-process string
    hashing (PYTHONHASHSEED): ranks, resumed runs and reruns see the same data."""
    captions = [f"caption number {i}" for i in range(5)]
    urls = [write_tar(tmp_path / f"{s}.tar", [good(f"{s}-{i}", captions) for i in range(6)]) for s in range(3)]
    script = ("import sys, torch; from tests.test_pipeline import stream, batches; "
              f"out = batches(stream({urls!r}, batch_size=3, num_batches=6, shuffle_buffer=4)); "
              "print([b.keys for b in out], torch.stack([b.text for b in out]).sum(-1).tolist())")
    runs = {subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(runs) == 1


def test_a_pass_yields_its_first_batch_long_before_its_shuffle_buffer_is_full(tmp_path, monkeypatch):
    """A 5,000-sample buffer starts yielding after SHUFFLE_INITIAL samples, and grows as it goes: the
    first batch of every pass (epoch) costs about a thousand samples read, and one batch decoded."""
    from multimodal.data import pipeline

    urls = [write_tar(tmp_path / f"s{i}.tar", [good(f"{i}_{j}") for j in range(1500)]) for i in range(4)]
    read, decoded, before_first_batch = [0], [0], []
    tarfile_samples, decode_image = pipeline.tarfile_samples, pipeline.decode_image

    def counted_samples(*args, **kwargs):
        for sample in tarfile_samples(*args, **kwargs):
            read[0] += 1
            yield sample

    def counted_decode(*args, **kwargs):
        decoded[0] += 1
        return decode_image(*args, **kwargs)

    monkeypatch.setattr(pipeline, "tarfile_samples", counted_samples)
    monkeypatch.setattr(pipeline, "decode_image", counted_decode)
    ds = stream(urls, batch_size=16, num_batches=2, shuffle_buffer=5000)
    for _epoch in range(2):
        read[0] = decoded[0] = 0
        next(iter(ds))
        before_first_batch.append((read[0], decoded[0]))
    for samples_read, samples_decoded in before_first_batch:
        assert samples_read <= pipeline.SHUFFLE_INITIAL + 2 * 16 and samples_decoded == 16

