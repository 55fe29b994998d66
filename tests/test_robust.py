"""Whatever bytes a sample holds, reading it gives an image or a bad sample of a named kind.

Property-based (hypothesis): random bytes; images of every format PIL writes, mutated (bytes
changed, cut short, the header of one format on the body of another); JSON of any shape as the
captions; through what every path runs: `read_record`, `decode_image` at training's DCT scale and
at evaluation's full size, the training crop, the evaluation transform, and the device decoder.
Nothing may raise anything but `BadSample`, and its kind must be one of the named kinds.
"""

import io
import json
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from multimodal.data.batch import decode_jpegs
from multimodal.data.decode import IMAGE_KEYS, Members, decode_image, image_header, read_record
from multimodal.data.faults import SAMPLE_KINDS, BadSample
from multimodal.data.pixels import EvalTransform, TrainCrop

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM", "TGA", "PCX", "DDS", "JPEG2000", "SGI", "IM",
           "QOI", "EPS", "PDF", "SPIDER", "DIB", "MPO")
MAX_PIXELS = 4_000_000  # a mutated header may declare any size: keep each example fast
EXAMPLES = int(os.environ.get("ROBUST_EXAMPLES", 400))  # a longer search: ROBUST_EXAMPLES=20000 pytest ...


def _encoded(fmt: str, size: tuple[int, int], mode: str) -> bytes | None:
    buf = io.BytesIO()
    try:
        Image.new(mode, size, (10, 200, 30, 255)[:len(mode)] if mode != "L" else 90).save(buf, fmt)
    except (OSError, ValueError, KeyError):
        return None
    return buf.getvalue()


SEEDS = [data for fmt in FORMATS for size in ((16, 12), (3, 70)) for mode in ("RGB", "L", "RGBA", "CMYK")
         if (data := _encoded(fmt, size, mode))]
READABLE = [data for data in SEEDS if image_header(data) is not None]  # the formats we read, mutated most


def mutate(seed: bytes, changes: list[tuple[int, int]], cut: int | None, skip: int = 0) -> bytes:
    """`seed` with bytes changed at `changes` positions (past the first `skip`) and cut at `cut`."""
    data = bytearray(seed)
    for position, value in changes:
        data[skip + position % max(1, len(data) - skip)] = value
    return bytes(data[:cut] if cut is not None else data)


def splice(head: bytes, body: bytes, at: int) -> bytes:
    return head[:at % len(head)] + body[at % len(body):]


changes = st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=8)
cuts = st.one_of(st.none(), st.integers(0, 2000))
mutated = st.builds(mutate, st.sampled_from(READABLE), changes, cuts)
body_mutated = st.builds(mutate, st.sampled_from(READABLE), changes, cuts, st.just(40))  # headers intact
images = st.one_of(  # mutations of readable formats most often: the cases a decoder meets least
    st.sampled_from(READABLE), mutated, body_mutated, body_mutated,
    st.builds(splice, st.sampled_from(SEEDS), st.sampled_from(SEEDS), st.integers(0, 400)),
    st.sampled_from(SEEDS), st.binary(max_size=600),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)
json_members = st.one_of(
    st.builds(lambda v: json.dumps({"captions": v}).encode(), json_values),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.binary(max_size=200),
    st.just(b"[" * 50_000 + b"]" * 50_000),  # deeper than Python's recursion limit
)


@st.composite
def samples(draw) -> dict:
    raw = {"__key__": "k"}
    if draw(st.integers(0, 9)):  # nine in ten have an image member
        raw[draw(st.sampled_from(IMAGE_KEYS))] = draw(images)
    if draw(st.booleans()):
        raw["json"] = draw(json_members)
    if draw(st.integers(0, 3)):  # three in four have a txt member, most of them a caption
        raw["txt"] = draw(st.one_of(st.just(b"a red square on grass"), st.binary(max_size=60)))
    return raw


def check_image(image) -> None:
    if isinstance(image, np.ndarray):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    else:
        assert isinstance(image, Image.Image) and image.mode == "RGB"


@given(raw=samples())
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_any_sample_is_an_image_with_captions_or_a_named_bad_sample(raw):
    crop, evaluate = TrainCrop(32), EvalTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    try:
        sample = read_record(raw, max_pixels=MAX_PIXELS)
        assert sample.captions and all(isinstance(c, str) and c.strip() for c in sample.captions)
        small = decode_image(sample.data, min_side=32)
        check_image(small)
        box = crop.box(*sample.size, random.Random(0))
        assert crop.pixels(small, box, sample.size).shape == (3, 32, 32)
        full = decode_image(sample.data)
        check_image(full)
        assert evaluate.pixels(full).shape == (3, 32, 32)
        event("decoded")
    except BadSample as bad:
        assert bad.kind in SAMPLE_KINDS
        event(bad.kind)


CAPTION_MEMBERS = [Members(), Members(caption_lines=True), Members(text_key="txt2"),
                   Members(caption_field=("caption_blip",)), Members(text_key="txt", caption_field=("caption", "x")),
                   Members(image_key="webp", label_key="cls")]
caption_jsons = st.builds(lambda field, v: json.dumps({field: v}).encode(),
                          st.sampled_from(["caption", "caption_blip", "captions", "x"]), json_values)


@given(raw=samples(), members=st.sampled_from(CAPTION_MEMBERS), extra=st.fixed_dictionaries({}, optional={
    "txt2": st.binary(max_size=40), "json": caption_jsons, "cls": st.binary(max_size=6)}))
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_any_sample_read_with_any_members_is_captions_and_a_class_or_a_named_bad_sample(raw, members, extra):
    """Whatever a sample's members hold and whichever members are chosen (a second text member, json fields
    of any shape, captions one a line, a class member): non-empty captions and a class index or None, or a
    bad sample of a named kind."""
    try:
        record = read_record({**raw, **extra}, members, max_pixels=MAX_PIXELS, label=True)
        assert record.captions and all(isinstance(c, str) and c.strip() == c and c for c in record.captions)
        assert record.label is None or (isinstance(record.label, int) and record.label >= 0)
        event(f"read, {len(record.captions)} caption(s)")
    except BadSample as bad:
        assert bad.kind in SAMPLE_KINDS
        event(bad.kind)


@given(data=images)
@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_device_decoder_returns_an_image_or_its_error_for_any_bytes(data):
    """`decode_jpegs` (the device path; here on the CPU) never raises: a bad image comes back as its
    exception, which `batch.finish` retries with PIL and then counts."""
    if not data:
        return  # the workers never send an empty member
    out = decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], torch.device("cpu"))
    assert len(out) == 1 and isinstance(out[0], (torch.Tensor, Exception))


@pytest.mark.parametrize("shape", [(1, 5000, 3), (5000, 1, 3), (2, 3, 3), (1, 1, 3)])
def test_evaluation_pixels_of_extreme_shapes_stay_small(shape):
    """An image of extreme aspect ratio keeps only its middle before resizing (a 1 x 10^7 image would
    otherwise be resized to 32 x 3 x 10^8 pixels on its way to the centre crop)."""
    out = EvalTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).pixels(np.zeros(shape, np.uint8))
    assert out.shape == (3, 32, 32)


def test_a_crafted_dds_that_pil_identifies_but_cannot_decode_is_a_bad_sample():
    """A DDS header with pixel format flags 0 made PIL raise NotImplementedError (issue 10); DDS is
    not among the formats PIL may read for us, and any PIL error is a bad sample anyway."""
    dds = bytearray(_encoded("DDS", (8, 8), "RGB"))
    dds[80:84] = b"\0\0\0\0"  # DDS_PIXELFORMAT.dwFlags
    with pytest.raises(BadSample) as bad:
        read_record({"jpg": bytes(dds), "txt": b"x"})
    assert bad.value.kind == "not an image"


def test_a_caption_the_tokenizer_refuses_is_counted_and_the_batch_stays_full(tmp_path):
    from multimodal import arch
    from multimodal.data.pipeline import ImageTextStream
    from tests.test_pipeline import batches, good, write_tar

    tokenize = arch.load("tiny").tokenizer

    def tokenizer(texts):
        if any("boom" in t for t in texts):
            raise RuntimeError("a tokenizer failure")
        return tokenize(texts)

    url = write_tar(tmp_path / "s.tar", [good(f"{i}", captions=["boom" if i in (2, 5) else "a red square"])
                                         for i in range(12)])
    stream = ImageTextStream([[url]], crop=TrainCrop(32), tokenizer=tokenizer, batch_size=5, num_batches=2,
                             shuffle_buffer=0)
    first, second = batches(stream)
    assert first.text.shape[0] == second.text.shape[0] == 5
    assert "2" not in first.keys + second.keys and "5" not in first.keys + second.keys
    assert first.bad.get("unreadable caption", 0) + second.bad.get("unreadable caption", 0) == 2


def test_evaluation_leaves_out_a_text_the_tokenizer_refuses():
    from multimodal import arch
    from multimodal.data.sources import EvalBatches, Item

    tokenize = arch.load("tiny").tokenizer

    def tokenizer(texts):
        if any("boom" in t for t in texts):
            raise RuntimeError("a tokenizer failure")
        return tokenize(texts)

    items = [Item(np.zeros((40, 50, 3), np.uint8), {"key": f"{i}"}, [f"caption {i}", "boom" if i == 1 else "fine"],
                  [{"key": f"{i}", "caption": c} for c in (f"caption {i}", "boom" if i == 1 else "fine")])
             for i in range(3)]
    batches = EvalBatches(None, [], EvalTransform(32, (0.5,) * 3, (0.25,) * 3), tokenizer, batch_size=8)
    batch = batches._batch(0, items, last=True)
    assert batch.texts.shape[0] == 5 and len(batch.text_rows) == 5
    assert "boom" not in [r["caption"] for r in batch.text_rows]
    assert [r["image"] for r in batch.text_rows] == [0, 0, 1, 2, 2]
