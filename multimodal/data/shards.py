"""Writing webdataset tar shards of image-text samples (the format is in data/README.md).

One sample per image: `<key>.jpg` (the image), `<key>.txt` (its first caption) and `<key>.json`
(`captions`: all of them, plus where it came from). Sources: the official COCO captions JSON,
`image,caption` CSV tables (Flickr style), the Karpathy split files of COCO, Flickr30k and Flickr8k
(`dataset_coco.json`: Karpathy & Fei-Fei, "Deep Visual-Semantic Alignments", CVPR 2015, the test
splits retrieval is reported on) and the synthetic scenes. Output is deterministic:
the same input gives byte-identical shards (a fixed order, fixed tar mtime, fixed JPEG settings).
Each shard is written to a temporary name and renamed when complete; `sizes.json` (open_clip's
manifest: shard file name -> sample count) is written last.

Sentences about the writers' settings name them through `setting`, a format string in the caller's
words: "{}" (the default) for the names alone, "--{}" on the command line (`multimodal shards`),
"data.{}" in a config; `option` is the caller's name for the output folder.
"""

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import chain, islice
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from multimodal.data import synthetic
from multimodal.data.decode import open_image
from multimodal.data.formats import MANIFEST
from multimodal.errors import UserError
from multimodal.files import atomic_file, write_json
from multimodal.paths import check_output
from multimodal.userfiles import read_json, reading, writing

SHARD_PATTERN = "shard-{:06d}.tar"
SYNTHETIC = "synthetic.json"  # beside synthetic shards: the settings that made them


@dataclass
class Sample:
    key: str  # no dots: webdataset splits member names at the first dot
    image: bytes  # JPEG
    captions: list[str]
    meta: dict = field(default_factory=dict)


@dataclass
class WriteReport:
    sizes: dict[str, int]
    failures: list[tuple[str, str]]  # (file name, reason) of images that could not be read
    splits: dict[str, tuple[int, int]] = field(default_factory=dict)  # Karpathy split -> (images, captions) written

    @property
    def num_samples(self) -> int:
        return sum(self.sizes.values())


def _ours(path: Path) -> bool:
    """Whether `path` is a file that shard writing makes: a shard, a partial shard, a manifest."""
    shard = r"\.?shard-\d{6}\.tar(\.\d+-[0-9a-f]{8}\.partial)?"  # files.partial_path's names
    return path.is_file() and (path.name in (MANIFEST, SYNTHETIC) or re.fullmatch(shard, path.name) is not None)


def prepare_out_dir(out_dir: Path, overwrite: bool, option: str = "out_dir", setting: str = "{}") -> None:
    """Create `out_dir`, which must be new, empty or hold only shards; earlier shards there are
    replaced only when `overwrite`, and a folder holding anything else is never written into."""
    check_output(out_dir, option, kind="folder")
    if out_dir.is_dir():
        others = sorted(p.name for p in out_dir.iterdir() if not _ours(p))
        if others:
            raise UserError(f"{option} {out_dir} holds other files than shards ({', '.join(others[:3])}"
                            f"{', ...' if len(others) > 3 else ''}): choose a new or empty folder.")
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in out_dir.iterdir() if _ours(p))
    if old and not overwrite:
        raise UserError(f"{out_dir} already holds shards: pass {setting.format('overwrite')} to replace them, or "
                        f"choose another {option}.")
    for path in old:
        path.unlink()


def write_shards(samples: Iterable[Sample], out_dir: Path, shard_size: int, total: int | None = None,
                 desc: str = "writing shards", setting: str = "{}") -> dict[str, int]:
    """Write `samples` into `out_dir/shard-NNNNNN.tar` files of `shard_size` samples each."""
    if shard_size <= 0:
        raise UserError(f"{setting.format('shard_size')} must be a positive number of samples, got {shard_size}.")
    sizes: dict[str, int] = {}
    stream = iter(tqdm(samples, total=total, desc=desc, unit="img", mininterval=1.0))
    while (first := next(stream, None)) is not None:  # a shard at a time, streamed into its file
        final = out_dir / SHARD_PATTERN.format(len(sizes))
        count = 0
        with atomic_file(final) as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0)
            for sample in chain([first], islice(stream, shard_size - 1)):
                record = {"key": sample.key, "captions": sample.captions, **sample.meta}
                writer.write({
                    "__key__": sample.key,
                    "jpg": sample.image,
                    "txt": sample.captions[0].encode("utf-8"),
                    "json": json.dumps(record, sort_keys=True).encode("utf-8"),
                })
                count += 1
            writer.close()  # the tar's end blocks; the file itself is closed by atomic_file
        sizes[final.name] = count
    write_json(out_dir / MANIFEST, sizes)
    return sizes


def jpeg_of(path: Path, max_side: int | None) -> tuple[bytes, int, int]:
    """JPEG bytes of the image at `path`, downscaled so its longer side is at most `max_side`.

    A JPEG that needs no resizing is kept byte for byte; other formats are re-encoded.
    """
    data = path.read_bytes()
    with open_image(data) as image:
        image.load()  # decode fully: an unreadable image fails here, at write time
        width, height = image.size
        scale = max_side / max(width, height) if max_side else 1.0
        if scale >= 1.0 and image.format == "JPEG":
            return data, width, height
        rgb = image.convert("RGB")
        if scale < 1.0:
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
            rgb = rgb.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), width, height


@dataclass(frozen=True)
class ImageEntry:
    key: str
    file_name: str
    captions: list[str]
    meta: dict


def _encode_all(entries: list[ImageEntry], images_dir: Path, max_side: int | None, workers: int,
                failures: list) -> Iterator[Sample]:
    """Samples for `entries` in order, reading and resizing on `workers` threads."""

    def load(entry: ImageEntry):
        try:
            return jpeg_of(images_dir / entry.file_name, max_side)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for entry, result in zip(entries, pool.map(load, entries)):
            if isinstance(result, Exception):
                failures.append((entry.file_name, f"{type(result).__name__}: {result}"))
                continue
            image, width, height = result
            yield Sample(entry.key, image, entry.captions,
                         {"file_name": entry.file_name, "width": width, "height": height, **entry.meta})


def _write_entries(entries: list[ImageEntry], images_dir: Path, out_dir: Path, shard_size: int,
                   max_side: int | None, workers: int, overwrite: bool, option: str, setting: str) -> WriteReport:
    if not images_dir.is_dir():
        raise UserError(f"Image folder {images_dir} does not exist: pass the folder that holds the images.")
    if max_side is not None and max_side <= 0:
        raise UserError(f"{setting.format('max_side')} must be a positive number of pixels, got {max_side}.")
    prepare_out_dir(out_dir, overwrite, option, setting)
    failures: list[tuple[str, str]] = []
    samples = _encode_all(entries, images_dir, max_side, workers, failures)
    sizes = write_shards(samples, out_dir, shard_size, total=len(entries), setting=setting)
    return WriteReport(sizes, failures)


def read_coco_entries(captions_json: Path) -> list[ImageEntry]:
    """One entry per captioned image of an official COCO captions file, sorted by image id."""
    if not captions_json.is_file():
        raise UserError(f"Captions file {captions_json} does not exist: pass a COCO captions JSON.")
    coco = read_json(captions_json, kind=object)
    if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations")):
        raise UserError(f"Captions file {captions_json} lacks the COCO keys 'images' and 'annotations': "
                        "pass an official COCO captions file such as captions_train2017.json.")
    try:
        captions: dict[int, list[str]] = {}
        for ann in sorted(coco["annotations"], key=lambda a: (a["image_id"], a.get("id", 0))):
            captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        images = sorted(coco["images"], key=lambda im: im["id"])
        return [
            ImageEntry(f"{im['id']:012d}", im["file_name"], captions[im["id"]], {"image_id": im["id"]})
            for im in images if captions.get(im["id"])
        ]
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"Captions file {captions_json} has an entry without the COCO field {exc}: "
                        "images need 'id' and 'file_name', annotations 'image_id' and 'caption'.") from None


def read_csv_entries(csv_path: Path) -> list[ImageEntry]:
    """One entry per image of an `image,caption` table, in order of first appearance."""
    if not csv_path.is_file():
        raise UserError(f"CSV file {csv_path} does not exist: pass an image,caption table.")
    with reading(csv_path), csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise UserError(f"CSV file {csv_path} needs a header with the columns 'image' and 'caption', "
                            f"found {reader.fieldnames}.")
        captions: dict[str, list[str]] = {}
        for row in reader:
            if row["image"] and row["caption"] and row["caption"].strip():
                captions.setdefault(row["image"], []).append(row["caption"].strip())
    return [ImageEntry(f"{i:09d}", name, caps, {}) for i, (name, caps) in enumerate(captions.items())]


def read_karpathy_entries(karpathy_json: Path, splits: list[str], setting: str = "{}") -> list[ImageEntry]:
    """One entry per image of a Karpathy split file (`dataset_coco.json`, `dataset_flickr30k.json`,
    `dataset_flickr8k.json`) in one of `splits`, in the file's order. `KEY` is the image's position in
    the file (its `imgid` in the published files); `file_name` is `filepath/filename` (COCO), else `filename`."""
    fix = "pass dataset_coco.json, dataset_flickr30k.json or dataset_flickr8k.json"
    if not karpathy_json.is_file():
        raise UserError(f"Karpathy split file {karpathy_json} does not exist: {fix}.")
    images = read_json(karpathy_json, fix).get("images")
    if not isinstance(images, list):
        raise UserError(f"{karpathy_json} is not a Karpathy split file (it has no 'images' list): {fix}.")
    entries, found = [], Counter()
    for i, image in enumerate(images):
        try:
            split, filename = str(image["split"]), str(image["filename"])
            captions = [s["raw"].strip() for s in image["sentences"]]
        except (KeyError, TypeError, AttributeError) as exc:
            problem = f"has no field {exc}" if isinstance(exc, KeyError) else "is not laid out as one"
            raise UserError(f"{karpathy_json} is not a Karpathy split file (image {i} {problem}; every image "
                            f"needs 'split', 'filename' and 'sentences' with 'raw'): {fix}.") from None
        found[split] += 1
        captions = [c for c in captions if c]
        if split in splits and captions:
            ids = {k: image[k] for k in ("imgid", "cocoid") if k in image}
            path = f"{image['filepath']}/{filename}" if image.get("filepath") else filename
            entries.append(ImageEntry(f"{i:09d}", path, captions, {"split": split, "filename": filename, **ids}))
    absent = [s for s in splits if not any(e.meta["split"] == s for e in entries)]
    if absent:
        have = ", ".join(f"{s} ({n} images)" for s, n in found.items()) or "none"
        raise UserError(f"{karpathy_json} has no image in split {', '.join(map(repr, absent))}; its splits are "
                        f"{have}: pass one of them with {setting.format('split')}.")
    return entries


def _locate(entry: ImageEntry, images_dir: Path) -> ImageEntry:
    """`filepath/filename` under `images_dir`, else `filename`: people often pass COCO's val2014/ itself."""
    fallback = entry.meta["filename"]
    if fallback != entry.file_name and not (images_dir / entry.file_name).is_file() \
            and (images_dir / fallback).is_file():
        return replace(entry, file_name=fallback)
    return entry


def write_coco(captions_json: Path, images_dir: Path, out_dir: Path, shard_size: int = 1000,
               max_side: int | None = None, workers: int = 4, overwrite: bool = False, option: str = "out_dir",
               setting: str = "{}") -> WriteReport:
    """`option` names `out_dir`, `setting` `overwrite`, `shard_size` and `max_side`, in the caller's words."""
    entries = read_coco_entries(captions_json)
    return _write_entries(entries, images_dir, out_dir, shard_size, max_side, workers, overwrite, option, setting)


def write_csv(csv_path: Path, images_dir: Path, out_dir: Path, shard_size: int = 1000,
              max_side: int | None = None, workers: int = 4, overwrite: bool = False, option: str = "out_dir",
              setting: str = "{}") -> WriteReport:
    """`option` names `out_dir`, `setting` `overwrite`, `shard_size` and `max_side`, in the caller's words."""
    entries = read_csv_entries(csv_path)
    return _write_entries(entries, images_dir, out_dir, shard_size, max_side, workers, overwrite, option, setting)


def write_karpathy(karpathy_json: Path, images_dir: Path, out_dir: Path, splits: tuple[str, ...] = ("test",),
                   shard_size: int = 1000, max_side: int | None = None, workers: int = 4,
                   overwrite: bool = False, option: str = "out_dir", setting: str = "{}") -> WriteReport:
    """The images of `splits` with all their captions, as retrieval benchmarks count them (COCO 5k test:
    5,000 images, 25,010 captions; Flickr30k 1k test: 1,000 images, 5,000 captions). `option` names
    `out_dir`, `setting` `split`, `overwrite`, `shard_size` and `max_side`, in the caller's words."""
    entries = read_karpathy_entries(karpathy_json, list(splits), setting)
    if images_dir.is_dir():
        entries = [_locate(entry, images_dir) for entry in entries]
    report = _write_entries(entries, images_dir, out_dir, shard_size, max_side, workers, overwrite, option,
                            setting)
    failed = Counter(name for name, _ in report.failures)
    report.splits = dict.fromkeys(splits, (0, 0))
    for entry in entries:
        if failed[entry.file_name]:
            failed[entry.file_name] -= 1
            continue
        images, captions = report.splits[entry.meta["split"]]
        report.splits[entry.meta["split"]] = (images + 1, captions + len(entry.captions))
    return report


def write_synthetic(out_dir: Path, num_samples: int, shard_size: int, image_size: int = 64, seed: int = 0,
                    first_index: int = 0, overwrite: bool = False, option: str = "out_dir",
                    setting: str = "{}") -> WriteReport:
    """Scenes `first_index .. first_index + num_samples - 1` of `seed` (see `synthetic.scene`), with
    their settings in `synthetic.json` beside the shards."""
    prepare_out_dir(out_dir, overwrite, option, setting)

    def samples() -> Iterator[Sample]:
        for i in range(first_index, first_index + num_samples):
            image, captions, record = synthetic.scene(i, seed=seed, side=image_size)
            yield Sample(f"{i:09d}", image, captions, record)

    sizes = write_shards(samples(), out_dir, shard_size, total=num_samples, desc=f"synthetic {out_dir.name}",
                         setting=setting)
    settings = _synthetic_settings(num_samples, shard_size, image_size, seed, first_index)
    write_json(out_dir / SYNTHETIC, settings)
    return WriteReport(sizes, [])


def _synthetic_settings(num_samples: int, shard_size: int, image_size: int, seed: int, first_index: int) -> dict:
    return {"num_samples": num_samples, "shard_size": shard_size, "image_size": image_size, "seed": seed,
            "first_index": first_index}


def ensure_synthetic(out_dir: Path, num_samples: int, shard_size: int, image_size: int = 64, seed: int = 0,
                     first_index: int = 0, option: str = "out_dir", setting: str = "{}") -> bool:
    """Synthetic scenes in `out_dir` as these settings make them: kept when they are there already,
    (re)written when the folder is new, empty or holds other synthetic scenes; never written into a
    folder that holds anything else. Returns whether it wrote. `setting` names `synthetic`, the section
    that holds these settings ("data.{}" in a config)."""
    marker = out_dir / SYNTHETIC
    settings = _synthetic_settings(num_samples, shard_size, image_size, seed, first_index)
    if marker.is_file():
        if read_json(marker, f"delete {marker} to write the synthetic scenes afresh") == settings \
                and (out_dir / MANIFEST).is_file():
            return False
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"{option} {out_dir} holds files that are not this project's synthetic data: set "
                        f"{setting.format('synthetic')} to null to train on the shards there, or give {option} a new "
                        "folder for the synthetic scenes.")
    write_synthetic(out_dir, num_samples, shard_size, image_size, seed, first_index, overwrite=True, option=option,
                    setting=setting.format("synthetic.{}"))
    return True
