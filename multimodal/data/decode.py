"""One webdataset sample's bytes -> an image, its captions and its class, or a `BadSample` of a named kind.

Only the members that `Members` names are decoded, by this module's own code: the image (jpg, jpeg,
png or webp by default), the captions (json `captions`, else txt; or a chosen text member and json
fields) and the class (`cls`). webdataset's default decoders would unpickle `.pyd` and `.pth`
members. An image's size is read from its header first (`read_record`): one of more than
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
from multimodal.errors import UserError
from multimodal.userfiles import cut_caption

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
class Members:
    """Which members of a webdataset sample hold its image, its captions and its class, and how they read.

    The defaults read every layout we know: the image is the first of jpg, jpeg, png and webp; the
    captions are json's `captions` (ours), else the txt member (img2dataset's caption, CLIP_benchmark's).
    `text_key` and `caption_field` choose instead: the text member of that extension, and/or these json
    fields (each a string or a list of strings; several fields pool their captions, as for a recaptioned
    set with `caption` and `caption_blip`). `caption_lines`: the text member holds one caption a line
    (CLIP_benchmark's retrieval shards, split as its reader splits them: `str.splitlines`).
    """

    image_key: str | None = None
    text_key: str | None = None
    caption_field: tuple[str, ...] = ()
    caption_lines: bool = False
    label_key: str = "cls"

    @property
    def default_captions(self) -> bool:
        return self.text_key is None and not self.caption_field

    @classmethod
    def chosen(cls, image_key: str | None = None, text_key: str | None = None,
               caption_field: str | list[str] | tuple[str, ...] | None = None, label_key: str = "cls",
               setting: str = "data.{}") -> "Members":
        """The members a user's settings choose; `setting` names a setting in the caller's words
        ("data.{}" in a config, "--{}" on a command line)."""
        fields = [caption_field] if isinstance(caption_field, str) else list(caption_field or [])
        for name, value in (("image_key", image_key), ("text_key", text_key), ("label_key", label_key),
                            *(("caption_field", f) for f in fields)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise UserError(f"{setting.format(name)} must name a member or a json field, got {value!r}.")
        return cls(image_key=image_key, text_key=text_key, caption_field=tuple(fields), label_key=label_key)


@dataclass(frozen=True)
class Record:
    """A sample whose image header, captions and class were read, its pixels not yet decoded."""

    key: str
    url: str | None
    data: bytes  # the image member
    size: tuple[int, int]  # (width, height) from the header
    jpeg_colourspace: str | None  # "YCbCr", "Gray", "CMYK", ... for a JPEG libjpeg-turbo reads; else None
    captions: list[str]  # empty only when not asked for
    label: int | None  # the class member's index; None when not asked for
    meta: dict  # the json member, or {}


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


def _checked_header(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[tuple[int, int], str | None]:
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


def read_record(raw: dict, members: Members = Members(), max_pixels: int | None = MAX_IMAGE_PIXELS,
                captions: bool = True, label: bool = False) -> Record:
    """The image member's header, the captions (`captions`) and the class index (`label`) of a raw
    webdataset sample, read as `members` says; raises BadSample."""
    image_key = members.image_key or next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None or image_key not in raw:
        raise BadSample("no image")
    size, colourspace = _checked_header(raw[image_key], max_pixels)
    meta = _json(raw) if "json" in raw else {}
    texts = _captions(raw, meta, members) if captions else []
    index = _label(raw, members.label_key) if label else None
    return Record(raw.get("__key__", ""), raw.get("__url__"), raw[image_key], size, colourspace, texts, index,
                  meta if isinstance(meta, dict) else {})


def decodable_on_device(data: bytes, colourspace: str | None) -> bool:
    """Whether a JPEG goes to the device decoder: colours it decodes, and whole (ends with its EOI
    marker; a cut file goes to the worker's decoder, which names it a truncated image)."""
    return colourspace in JPEG_COLOURS_ON_DEVICE and data.rstrip(b"\0")[-2:] == b"\xff\xd9"


def decode_file(data: bytes, min_side: int | None = None, on_device: bool = False
                ) -> Image.Image | np.ndarray | bytes:
    """An image file's bytes decoded (`decode_image`) once its header passed the checks `read_record` makes of
    a sample's image; raises BadSample. With
    `on_device`, a JPEG the device's decoder reads comes back undecoded, its bytes, for
    `batch.finish` to decode with the rest of its batch."""
    _, colourspace = _checked_header(data)
    return _decode_unless_on_device(data, colourspace, min_side, on_device)


def decode_record(record: Record, min_side: int | None = None, on_device: bool = False
                  ) -> Image.Image | np.ndarray | bytes:
    """`record`'s image as `decode_file` gives it, from the header `read_record` read; raises BadSample."""
    return _decode_unless_on_device(record.data, record.jpeg_colourspace, min_side, on_device)


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


def _json(raw: dict) -> dict | None:
    """The json member as a dict; None when it is not JSON, not UTF-8 or not an object."""
    try:
        record = json.loads(raw["json"])
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested deeper than Python recurses
        return None
    return record if isinstance(record, dict) else None


def _text(raw: dict, key: str, lines: bool) -> list:
    try:
        text = raw[key].decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("unreadable caption") from None
    return text.splitlines() if lines else [text]


def _field(value) -> list | None:
    """A json caption field's captions: a string, or a list of strings; None for any other shape."""
    if isinstance(value, str):
        return [value]
    return value if isinstance(value, list) else None


def _captions(raw: dict, meta: dict | None, members: Members) -> list[str]:
    """The non-empty captions of a sample, read as `members` says, each cut to `userfiles.CAPTION_CHARS`;
    raises BadSample. By default json `captions` first (a string or a list of strings), else the txt member;
    JSON of any other shape is an unreadable caption, never an error. A chosen text member or json field that
    is absent: no caption."""
    if members.default_captions:
        if "json" not in raw and "txt" not in raw:
            raise BadSample("no caption")
        found = _field(meta.get("captions") or []) if meta is not None else None
        if not found and "txt" in raw:
            found = _text(raw, "txt", members.caption_lines)
        if found is None:
            raise BadSample("unreadable caption")
    else:
        found = []
        if members.text_key is not None and members.text_key in raw:
            found += _text(raw, members.text_key, members.caption_lines)
        if members.caption_field and "json" in raw:
            if meta is None:
                raise BadSample("unreadable caption")
            for name in members.caption_field:
                found += _field(meta.get(name)) or []
        elif not found:
            raise BadSample("no caption")
    captions = [cut_caption(c.strip()) for c in found if isinstance(c, str) and c.strip()]
    if not captions:
        raise BadSample("empty caption" if found or members.default_captions else "no caption")
    return captions


def _label(raw: dict, key: str) -> int | None:
    """The class index of a sample's `key` member (CLIP_benchmark's and webdataset's `cls`: decimal
    text); None when it has none or it is not a non-negative integer."""
    try:
        value = int(raw[key].decode("utf-8").strip())
    except (KeyError, ValueError):
        return None
    return value if value >= 0 else None
