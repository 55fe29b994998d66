"""Shard sets in the layouts users bring, built by the tests from real photos: img2dataset's output
(written here file by file, as its webdataset writer and stats logger write them) and CLIP_benchmark's
webdataset benchmarks (written by CLIP_benchmark's own converter, `clip_benchmark.webdataset_builder`)."""

import csv
import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

# img2dataset's parquet schema (webdataset output, save_caption, no additional columns), in its order
IMG2DATASET_FIELDS = ("url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                      "original_height", "exif", "sha256")


def flickr_photos(flickr: Path, count: int, start: int = 0) -> list[tuple[str, bytes, list[str]]]:
    """(file name, JPEG bytes, its five captions) of `count` Flickr8k photos in the file's order."""
    captions: dict[str, list[str]] = {}
    with (flickr / "captions.txt").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["image"], []).append(row["caption"].strip())
    names = list(captions)[start:start + count]
    return [(name, (flickr / "images" / name).read_bytes(), captions[name]) for name in names]


def write_img2dataset(folder: Path, photos: list[tuple[str, bytes, list[str]]], per_shard: int,
                      failed_every: int = 0, extra: dict | None = None) -> list[Path]:
    """`photos` as img2dataset writes a download of their URLs: NNNNN.tar (KEY.jpg, KEY.txt: the caption,
    KEY.json: the row's fields), NNNNN.parquet (every input row, with its status) and NNNNN_stats.json.
    Every `failed_every`-th URL failed to download (a parquet row, no sample). `extra`: json fields of
    every sample (name -> function of the photo's captions), e.g. a recaption."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard, first in enumerate(range(0, len(photos), per_shard)):
        rows, successes = [], 0
        tar = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(tar)) as writer:
            for index, (name, data, captions) in enumerate(photos[first:first + per_shard]):
                key = f"{shard:05d}{index:04d}"
                failed = failed_every and (first + index) % failed_every == failed_every - 1
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
                row = {"url": f"https://example.org/{name}", "caption": captions[0], "key": key,
                       "status": "failed_to_download" if failed else "success",
                       "error_message": "HTTP Error 404: Not Found" if failed else None,
                       "width": None if failed else width, "height": None if failed else height,
                       "original_width": None if failed else width, "original_height": None if failed else height,
                       "exif": None if failed else "{}",
                       "sha256": None if failed else hashlib.sha256(data).hexdigest()}
                rows.append(row)
                if failed:
                    continue
                successes += 1
                meta = {**row, **{k: make(captions) for k, make in (extra or {}).items()}}
                writer.write({"__key__": key, "jpg": data, "txt": captions[0], "json": json.dumps(meta, indent=4)})
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        stats = {"count": len(rows), "successes": successes, "failed_to_download": len(rows) - successes,
                 "failed_to_resize": 0, "duration": 1.5,
                 "status_dict": {"success": successes, **({"HTTP Error 404: Not Found": len(rows) - successes}
                                                         if len(rows) > successes else {})}}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        shards.append(tar)
    return shards


class _Listed(list):
    """A list that CLIP_benchmark's converter reads as a dataset, with its class names and templates."""

    classes: list[str] | None = None
    templates: list[str] | None = None


def _webp(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="webp", lossless=True)
    return out.getvalue()


def write_clip_benchmark_retrieval(root: Path, photos: list[tuple[str, bytes, list[str]]], split: str = "test",
                                   max_count: int = 10_000) -> Path:
    """A CLIP_benchmark retrieval dataset (wds_flickr8k's layout): lossless webp images and all their captions,
    written by `clip_benchmark.webdataset_builder.convert_retrieval_dataset`."""
    from clip_benchmark.webdataset_builder import convert_retrieval_dataset

    convert_retrieval_dataset(_Listed((_webp(data), captions) for _, data, captions in photos), split, str(root),
                              image_format="webp", max_count=max_count, verbose=False)
    return root


def write_clip_benchmark_classification(root: Path, images: list[tuple[bytes, int]], classes: list[str],
                                        templates: list[str], split: str = "test", max_count: int = 10_000) -> Path:
    """A CLIP_benchmark classification dataset: JPEG images with their `cls`, classnames.txt and the templates
    ({c} for the class name), written by `clip_benchmark.webdataset_builder.convert_dataset`."""
    from clip_benchmark.webdataset_builder import convert_dataset

    dataset = _Listed(images)
    dataset.classes, dataset.templates = classes, templates
    convert_dataset(dataset, split, str(root), image_format="jpg", max_count=max_count, verbose=False)
    return root


def keyword_classes(photos: list[tuple[str, bytes, list[str]]], many: bool = False
                    ) -> tuple[list[tuple[bytes, int]], list[str]]:
    """Photos labelled by what their first caption names first in this order: a dog, a child, else a person
    (three classes); `many`: a dog, a child, a woman, a man, water, else a scene (six)."""
    kinds = [("dog", {"dog", "dogs", "puppy"}), ("child", {"child", "girl", "boy", "kid", "children", "girls", "boys"})]
    if many:
        kinds += [("woman", {"woman", "women", "lady"}), ("man", {"man", "men", "guy"}),
                  ("water", {"water", "beach", "ocean", "lake", "pool", "river", "sea"})]
    classes = [name for name, _ in kinds] + ["scene" if many else "person"]

    def label(caption: str) -> int:
        words = set(caption.lower().replace(",", " ").replace(".", " ").split())
        return next((i for i, (_, names) in enumerate(kinds) if words & names), len(kinds))

    return [(data, label(captions[0])) for _, data, captions in photos], classes
