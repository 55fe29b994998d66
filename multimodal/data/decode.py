"""One webdataset sample's bytes -> an image and its captions, or a `BadSample` of a named kind.

Only the image member (jpg/jpeg/png/webp) and the text members (json captions, else txt) are ever
decoded, by this module's own code: webdataset's default decoders would unpickle `.pyd` and `.pth`
members. An image's size is read from its header first (`read_sample`): one of more than
`max_pixels` pixels is refused before any decoding, since a small file can declare 20,000 x 20,000
pixels. JPEGs decode with libjpeg-turbo (simplejpeg) straight into uint8 arrays, at a reduced DCT
scale when the caller needs fewer pixels; other formats and JPEGs it refuses go through PIL, which
may read only common raster formats (PIL_FORMATS). Whatever a sample's bytes are, the result is an
image or a `BadSample` of a named kind, never another exception (tests/test_robust.py).
"""

import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image

from multimodal.data.faults import BadSample

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_PIXELS = 89_478_485  # PIL's warning threshold: 1/4 GiB of 24-bit pixels
JPEG_COLOURS_ON_DEVICE = ("YCbCr", "Gray")  # CMYK and YCCK JPEGs are decoded by the CPU
# The only formats PIL may read for us, whatever a member or file is named: PIL sniffs the bytes, and
# among its other plugins EPS and PDF hand the data to Ghostscript.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # (MPO opens as JPEG)


def open_image(data: bytes) -> Image.Image:
    """PIL's lazy image of `data`, in one of PIL_FORMATS (else PIL's UnidentifiedImageError)."""
    return Image.open(io.BytesIO(data), formats=PIL_FORMATS)


@dataclass(frozen=True)
class Sample:
    """A sample whose image header and captions were read, its pixels not yet decoded."""

    data: bytes  # the image member
    size: tuple[int, int]  # (width, height) from the header
    jpeg_colourspace: str | None  # "YCbCr", "Gray", "CMYK", ... for a JPEG libjpeg-turbo reads; else None
    captions: list[str]
    record: dict  # the json member, or {}


def image_header(data: bytes) -> tuple[tuple[int, int], str | None] | None:
    """((width, height), JPEG colourspace or None) from an image's header, decoding no pixels; None
    when no decoder knows the bytes."""
    if data.startswith(b"\xff\xd8"):
        try:
            height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
            return (width, height), colourspace
        except ValueError:
            pass  # a JPEG libjpeg-turbo's header reader refuses: PIL may still read it
    try:
        with warnings.catch_warnings():  # PIL warns of odd files and of its own size threshold: ours applies
            warnings.simplefilter("ignore")
            with open_image(data) as image:
                return image.size, None
    except Image.DecompressionBombError:
        return ((Image.MAX_IMAGE_PIXELS or 0) * 2 + 1, 1), None  # over PIL's hard limit: oversized either way
    except Exception:  # PIL's format plugins raise what they like on crafted headers
        return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header; None when no decoder knows the bytes."""
    header = image_header(data)
    return header[0] if header else None


def decode_jpeg_pixels(data: bytes, min_side: int) -> np.ndarray | None:
    """A JPEG as (H, W, 3) uint8 RGB, straight from libjpeg-turbo (simplejpeg): no PIL image and no
    extra copy. Decoded at 1/2, 1/4 or 1/8 scale (DCT scaling) when that keeps both sides at least
    `min_side`: the decoder produces no more pixels than the crop needs. None when not a JPEG it reads
    (CMYK, progressive oddities, truncated, not a JPEG at all): the caller falls back to PIL."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_side, min_width=min_side)
    except ValueError:
        return None


def checked_header(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[tuple[int, int], str | None]:
    """`image_header` of an image that may be decoded; raises BadSample (empty, not an image, or more
    than `max_pixels` pixels: refused before any decoding, as a small file can declare 20,000 x 20,000)."""
    if not data:
        raise BadSample("empty image")
    header = image_header(data)
    if header is None:
        raise BadSample("not an image")
    (width, height), _ = header
    if max_pixels and width * height > max_pixels:
        raise BadSample("oversized image")
    return header


def read_sample(raw: dict, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Sample:
    """The image member's header and the captions of a raw webdataset sample; raises BadSample."""
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None:
        raise BadSample("no image")
    size, colourspace = checked_header(raw[image_key], max_pixels)
    captions, record = _captions(raw)
    return Sample(raw[image_key], size, colourspace, captions, record)


def decodable_on_device(data: bytes, colourspace: str | None) -> bool:
    """Whether a JPEG goes to the device decoder: colours it decodes, and whole (ends with its EOI
    marker; a cut file goes to the worker's decoder, which names it a truncated image)."""
    return colourspace in JPEG_COLOURS_ON_DEVICE and data.rstrip(b"\0")[-2:] == b"\xff\xd9"


def decode_checked(data: bytes, min_side: int | None = None, on_device: bool = False
                   ) -> Image.Image | np.ndarray | bytes:
    """`decode_image` of an image whose header passed `checked_header`; raises BadSample. With
    `on_device`, a JPEG the device's decoder reads comes back undecoded, its bytes, for
    `pixels.finish_eval_batch` to decode with the rest of its batch."""
    _, colourspace = checked_header(data)
    return _decode_unless_on_device(data, colourspace, min_side, on_device)


def _decode_unless_on_device(data: bytes, colourspace: str | None, min_side: int | None, on_device: bool
                             ) -> Image.Image | np.ndarray | bytes:
    """The bytes of a JPEG the device decodes (`on_device`), else `decode_image`."""
    return data if on_device and decodable_on_device(data, colourspace) else decode_image(data, min_side)


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image | np.ndarray:
    """An RGB image; raises BadSample. With `min_side`, JPEGs come back as (H, W, 3) uint8 arrays from
    `decode_jpeg_pixels` and other images as PIL images drafted to no less than `min_side`; without it,
    always full-size PIL images."""
    pixels = decode_jpeg_pixels(data, min_side) if min_side else None
    if pixels is not None:
        return pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image(data) as image:
                if min_side and image.format == "JPEG":
                    image.draft("RGB", (min_side, min_side))
                return image.convert("RGB")
    except Exception as exc:  # PIL's plugins raise OSError, ValueError, NotImplementedError, ... on crafted data
        raise BadSample("truncated image" if "truncat" in str(exc).lower() else "corrupt image") from exc


def decode_sample(raw: dict, min_side: int | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS,
                  on_device: bool = False) -> tuple[Image.Image | np.ndarray | bytes, list[str], dict]:
    """(RGB image, captions, json record) from a raw webdataset sample; raises BadSample with its kind.
    `on_device`: JPEGs the device decodes are left as bytes (`decode_checked`)."""
    sample = read_sample(raw, max_pixels)
    image = _decode_unless_on_device(sample.data, sample.jpeg_colourspace, min_side, on_device)
    return image, sample.captions, sample.record


def tokenize(tokenizer, texts: list[str]) -> tuple[torch.Tensor | None, list[int]]:
    """(tokens of the texts the tokenizer takes, indices of those it refuses). All in one call, as a rule;
    text by text only after that call failed: a tokenizer's failure is a text's, never the run's."""
    try:
        return (tokenizer(texts) if texts else None), []
    except Exception:
        taken, refused = [], []
        for i, text in enumerate(texts):
            try:
                taken.append(tokenizer([text])[0])
            except Exception:
                refused.append(i)
        return (torch.stack(taken) if taken else None), refused


def _captions(raw: dict) -> tuple[list[str], dict]:
    """(captions, json record): json `captions` first (a string or a list of strings), else the txt
    member; raises BadSample. JSON of any other shape is an unreadable caption, never an error."""
    if "json" not in raw and "txt" not in raw:
        raise BadSample("no caption")
    record: dict = {}
    captions: list = []
    if "json" in raw:
        try:
            record = json.loads(raw["json"])
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested deeper than Python recurses
            record = None
        if not isinstance(record, dict):
            if "txt" not in raw:
                raise BadSample("unreadable caption")
            record = {}
        captions = record.get("captions") or []
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list):
            if "txt" not in raw:
                raise BadSample("unreadable caption")
            captions = []
    if not captions and "txt" in raw:
        try:
            captions = [raw["txt"].decode("utf-8")]
        except UnicodeDecodeError:
            raise BadSample("unreadable caption") from None
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise BadSample("empty caption")
    return captions, record
