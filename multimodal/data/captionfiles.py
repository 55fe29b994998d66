"""The caption files people bring, read into one entry per image: the official COCO captions JSON,
`image,caption` CSV tables (Flickr style) and the Karpathy split files of COCO, Flickr30k and Flickr8k
(`dataset_coco.json`: Karpathy & Fei-Fei, "Deep Visual-Semantic Alignments", CVPR 2015). Each reader
checks what it reads: ids, names and captions of the right types, no image listed twice (two samples
would share one key), a CSV caption with unquoted commas read whole or refused naming its line. The
shard writer (data/shards.py) packs the entries' images.
"""

import csv
import io
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from multimodal.errors import UserError
from multimodal.paths import check_input
from multimodal.userfiles import read_json, read_text, reading


@dataclass(frozen=True)
class ImageEntry:
    key: str
    file_name: str
    captions: list[str]
    meta: dict


COCO_LAYOUT = ("COCO images need a whole-number 'id' and a 'file_name', annotations an 'image_id' and a "
               "'caption', as in captions_train2017.json")


def _coco_field(captions_json: Path, item, kind: str, n: int, name: str, optional: bool = False):
    """Field `name` of the `n`th `kind` ("image", "annotation") of a COCO file, checked for its type."""
    def refuse(problem: str) -> UserError:
        return UserError(f"Captions file {captions_json}: {kind} {n} {problem} ({COCO_LAYOUT}).")

    if not isinstance(item, dict):
        raise refuse("is not a JSON object")
    if name not in item:
        if optional:
            return 0
        raise UserError(f"Captions file {captions_json} has an entry without the COCO field '{name}' ({kind} {n}; "
                        f"{COCO_LAYOUT}).")
    value = item[name]
    if name == "file_name":
        if not isinstance(value, str) or not value:
            raise refuse(f"has file_name {value!r}, not a file name")
        return value
    if name == "caption":
        if not isinstance(value, str):
            raise refuse(f"has caption {value!r}, not text")
        return value.strip()
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):  # "42": some tools write ids so
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise refuse(f"has {name} {value!r}, not a whole number")
    return value


def read_coco_entries(captions_json: Path) -> list[ImageEntry]:
    """One entry per captioned image of an official COCO captions file, sorted by image id. Ids written as
    decimal strings are those numbers; an id listed twice, or a field of another type, is refused."""
    check_input(captions_json, "Captions file", "pass a COCO captions JSON")
    coco = read_json(captions_json, kind=object)
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations")):
        raise UserError(f"Captions file {captions_json} lacks the COCO keys 'images' and 'annotations', each a list: "
                        "pass an official COCO captions file such as captions_train2017.json.")
    field_of = partial(_coco_field, captions_json)
    annotations = [(field_of(a, "annotation", n, "image_id"), field_of(a, "annotation", n, "id", True),
                    field_of(a, "annotation", n, "caption")) for n, a in enumerate(coco["annotations"])]
    captions: dict[int, list[str]] = {}
    for image_id, _, caption in sorted(annotations, key=lambda a: a[:2]):
        captions.setdefault(image_id, []).append(caption)
    first: dict[int, int] = {}
    images = []
    for n, im in enumerate(coco["images"]):
        image_id, file_name = field_of(im, "image", n, "id"), field_of(im, "image", n, "file_name")
        if image_id in first:
            raise UserError(f"Captions file {captions_json} lists image id {image_id} twice (images {first[image_id]} "
                            f"and {n}): each image must be listed once, or two samples would share one key.")
        first[image_id] = n
        images.append((image_id, file_name))
    return [ImageEntry(f"{image_id:012d}", file_name, captions[image_id], {"image_id": image_id})
            for image_id, file_name in sorted(images) if captions.get(image_id)]


def read_csv_entries(csv_path: Path) -> list[ImageEntry]:
    """One entry per image of an `image,caption` table, in order of first appearance. A row with more fields
    than the header, its caption's unquoted commas, is read whole when the caption is the last column, and
    refused, naming its line, when it is not."""
    check_input(csv_path, "CSV file", "pass an image,caption table")
    text = read_text(csv_path)
    with reading(csv_path):
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, [])
        if not {"image", "caption"} <= set(header):
            raise UserError(f"CSV file {csv_path} needs a header with the columns 'image' and 'caption', "
                            f"found {header or None}.")
        image, caption = header.index("image"), header.index("caption")
        captions: dict[str, list[str]] = {}
        for row in _rows(reader, header, caption, csv_path):
            if len(row) > max(image, caption) and row[image] and row[caption].strip():
                captions.setdefault(row[image], []).append(row[caption].strip())
    return [ImageEntry(f"{i:09d}", name, caps, {}) for i, (name, caps) in enumerate(captions.items())]


def _rows(reader, header: list[str], caption: int, csv_path: Path) -> Iterator[list[str]]:
    """The rows of a CSV table, a caption with unquoted commas joined again (only when it is the last column)."""
    line = reader.line_num + 1  # where the next row starts
    try:
        for row in reader:
            if len(row) > len(header):
                if caption != len(header) - 1:
                    raise UserError(f"CSV file {csv_path} line {line} has {len(row)} fields, its header "
                                    f"{len(header)}: quote a caption that holds commas (\"a dog, a ball\").")
                row = row[:caption] + [",".join(row[caption:])]
            yield row
            line = reader.line_num + 1
    except csv.Error as exc:
        if "field larger than field limit" not in str(exc):
            raise
        raise UserError(f"CSV file {csv_path} line {line} has a field of over {csv.field_size_limit()} "
                        "characters: a quote (\") left open reads the rest of the file as one field; check its "
                        "quotes.") from None


def read_karpathy_entries(karpathy_json: Path, splits: list[str], setting: str = "{}") -> list[ImageEntry]:
    """One entry per image of a Karpathy split file (`dataset_coco.json`, `dataset_flickr30k.json`,
    `dataset_flickr8k.json`) in one of `splits`, in the file's order. `KEY` is the image's position in
    the file (its `imgid` in the published files); `file_name` is `filepath/filename` (COCO), else `filename`."""
    fix = "pass dataset_coco.json, dataset_flickr30k.json or dataset_flickr8k.json"
    check_input(karpathy_json, "Karpathy split file", fix)
    images = read_json(karpathy_json, fix).get("images")
    if not isinstance(images, list):
        raise UserError(f"{karpathy_json} is not a Karpathy split file (it has no 'images' list): {fix}.")
    entries, found, first = [], Counter(), {}
    for i, image in enumerate(images):
        try:
            split, filename = str(image["split"]), image["filename"]
            captions = [s["raw"].strip() for s in image["sentences"]]
            if not isinstance(filename, str) or not isinstance(image.get("filepath") or "", str):
                raise TypeError
        except (KeyError, TypeError, AttributeError) as exc:
            problem = f"has no field {exc}" if isinstance(exc, KeyError) else "is not laid out as one"
            raise UserError(f"{karpathy_json} is not a Karpathy split file (image {i} {problem}; every image "
                            f"needs 'split', 'filename' and 'sentences' with 'raw'): {fix}.") from None
        found[split] += 1
        captions = [c for c in captions if c]
        if split in splits and captions:
            ids = {k: image[k] for k in ("imgid", "cocoid") if k in image}
            path = f"{image['filepath']}/{filename}" if image.get("filepath") else filename
            if path in first:
                raise UserError(f"{karpathy_json} lists {path} twice (images {first[path]} and {i}): each image must "
                                "be listed once, or retrieval would count it as two.")
            first[path] = i
            entries.append(ImageEntry(f"{i:09d}", path, captions, {"split": split, "filename": filename, **ids}))
    absent = [s for s in splits if not any(e.meta["split"] == s for e in entries)]
    if absent:
        have = ", ".join(f"{s} ({n} images)" for s, n in found.items()) or "none"
        raise UserError(f"{karpathy_json} has no image in split {', '.join(map(repr, absent))}; its splits are "
                        f"{have}: pass one of them with {setting.format('split')}.")
    return entries
