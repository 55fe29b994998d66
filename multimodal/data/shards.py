"""Writing webdataset tar shards of image-text samples (the format is in data/README.md).

One sample per image: `<key>.jpg` (the image), `<key>.txt` (its first caption) and `<key>.json`
(`captions`: all of them, plus where it came from). Sources: the caption files data/captionfiles.py
reads (COCO, CSV tables, Karpathy splits) and the synthetic scenes. Output is deterministic:
the same input gives byte-identical shards (a fixed order, fixed tar mtime, fixed JPEG settings).
Each shard is written to a temporary name and renamed when complete; `sizes.json` (open_clip's
manifest: shard file name -> sample count) is written last, and a write that fails leaves none of the
run's shards behind. Images are read only under the folder given (a name that is absolute or climbs
out with `..` is reported as missing; links inside it are followed), only from regular files of
bounded size (`userfiles.read_bytes`); captions are cut to `userfiles.CAPTION_CHARS`, and a caption
file that lists one image twice, or whose ids or names are not what they should be, is refused.

Sentences about the writers' settings name them through `setting`, a format string in the caller's
words: "{}" (the default) for the names alone, "--{}" on the command line (`multimodal shards`),
"data.{}" in a config; `option` is the caller's name for the output folder.
"""

import io
import json
import os
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from itertools import chain, islice
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from multimodal.data import synthetic
from multimodal.data.captionfiles import ImageEntry, read_coco_entries, read_csv_entries, read_karpathy_entries
from multimodal.data.decode import open_image
from multimodal.data.formats import MANIFEST
from multimodal.errors import UserError
from multimodal.files import atomic_file, partial_of, write_json
from multimodal.paths import check_output, inside
from multimodal.userfiles import (
    CAPTION_CHARS,
    IMAGE_BYTES,
    Refused,
    cut_caption,
    limit,
    read_bytes,
    read_json,
    writing,
)

SHARD_PATTERN = "shard-{:06d}.tar"
SYNTHETIC = "synthetic.json"  # beside synthetic shards: the settings that made them
LOCK = ".synthetic.lock"  # in a synthetic folder: runs started side by side write it one at a time
_WRITTEN = r"shard-\d{6}\.tar|sizes\.json|synthetic\.json"
OURS = re.compile(rf"{_WRITTEN}|{re.escape(LOCK)}")
OUTSIDE = "not under the image folder (an absolute path, or one that climbs out with '..')"


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
    missing: int = 0  # of the failures, images that are not there, or not under the image folder
    cut: int = 0  # captions cut to userfiles.CAPTION_CHARS

    @property
    def num_samples(self) -> int:
        return sum(self.sizes.values())


def _ours(path: Path) -> bool:
    """Whether `path` is a file that shard writing makes: a shard, a manifest, a partial one of either."""
    return path.is_file() and OURS.fullmatch(partial_of(path.name) or path.name) is not None


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
        if path.name != LOCK:  # another run may hold it
            path.unlink()


def write_shards(samples: Iterable[Sample], out_dir: Path, shard_size: int, total: int | None = None,
                 desc: str = "writing shards", setting: str = "{}") -> dict[str, int]:
    """Write `samples` into `out_dir/shard-NNNNNN.tar` files of `shard_size` samples each, then the manifest.
    A failure (a full disk: one sentence) leaves none of these shards: without their manifest they would be
    a set no reader can count."""
    if shard_size <= 0:
        raise UserError(f"{setting.format('shard_size')} must be a positive number of samples, got {shard_size}.")
    sizes: dict[str, int] = {}
    keys: set[str] = set()
    bar = tqdm(samples, total=total, desc=desc, unit="img", mininterval=1.0)
    stream = iter(bar)
    try:
        while (first := next(stream, None)) is not None:  # a shard at a time, streamed into its file
            final = out_dir / SHARD_PATTERN.format(len(sizes))
            with writing(final), atomic_file(final) as f:
                count = _write_tar(f, chain([first], islice(stream, shard_size - 1)), keys)
            sizes[final.name] = count
        with writing(out_dir / MANIFEST):
            write_json(out_dir / MANIFEST, sizes)
    except BaseException:
        for name in sizes:
            (out_dir / name).unlink(missing_ok=True)
        raise
    finally:
        bar.close()  # before the sentence the failure becomes
    return sizes


def _write_tar(f, samples: Iterable[Sample], keys: set[str]) -> int:
    """`samples` as one tar into the open file `f`; `keys`: those written before, none of which may recur
    (readers would see one sample where the manifest counts two)."""
    writer = wds.TarWriter(f, encoder=False, mtime=0.0)
    count = 0
    try:
        for sample in samples:
            if sample.key in keys:
                raise UserError(f"There are two samples with the key {sample.key}: each image must be listed once.")
            keys.add(sample.key)
            record = {"key": sample.key, "captions": sample.captions, **sample.meta}
            writer.write({
                "__key__": sample.key,
                "jpg": sample.image,
                "txt": sample.captions[0].encode("utf-8"),
                "json": json.dumps(record, sort_keys=True).encode("utf-8"),
            })
            count += 1
    except BaseException:
        with suppress(OSError, ValueError):  # closed now, or its stream would write to the closed file later
            writer.close()
        raise
    writer.close()  # the tar's end blocks; the file itself is closed by atomic_file
    return count


def jpeg_of(path: Path, max_side: int | None) -> tuple[bytes, int, int]:
    """JPEG bytes of the image at `path`, downscaled so its longer side is at most `max_side`.

    A JPEG that needs no resizing is kept byte for byte; other formats are re-encoded. Only a regular file
    of at most `userfiles.IMAGE_BYTES` is read (`userfiles.read_bytes`).
    """
    data = read_bytes(path)
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


def _encode_all(entries: list[ImageEntry], images_dir: Path, max_side: int | None, workers: int,
                report: WriteReport) -> Iterator[Sample]:
    """Samples for `entries` in order, read and resized on `workers` threads a few images ahead of the
    writer (memory stays bounded, and a failed write waits for no more); failures go to `report`."""

    def load(entry: ImageEntry):
        if not inside(entry.file_name):
            return Refused(OUTSIDE)
        try:
            return jpeg_of(images_dir / entry.file_name, max_side)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return exc

    todo = iter(entries)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        ahead = deque((entry, pool.submit(load, entry)) for entry in islice(todo, 4 * max(1, workers)))
        try:
            while ahead:
                entry, future = ahead.popleft()
                ahead.extend((e, pool.submit(load, e)) for e in islice(todo, 1))
                result = future.result()
                if isinstance(result, Exception):
                    reason = result.strerror if isinstance(result, Refused) else f"{type(result).__name__}: {result}"
                    report.failures.append((entry.file_name, reason))
                    report.missing += isinstance(result, FileNotFoundError) or not inside(entry.file_name)
                    continue
                image, width, height = result
                yield Sample(entry.key, image, entry.captions,
                             {"file_name": entry.file_name, "width": width, "height": height, **entry.meta})
        finally:
            for _, future in ahead:
                future.cancel()


def _write_entries(entries: list[ImageEntry], images_dir: Path, out_dir: Path, shard_size: int,
                   max_side: int | None, workers: int, overwrite: bool, option: str, setting: str) -> WriteReport:
    if not images_dir.is_dir():
        raise UserError(f"Image folder {images_dir} does not exist: pass the folder that holds the images.")
    if max_side is not None and max_side <= 0:
        raise UserError(f"{setting.format('max_side')} must be a positive number of pixels, got {max_side}.")
    limit(IMAGE_BYTES)  # a bad value of its variable is a sentence now, not in a reading thread
    prepare_out_dir(out_dir, overwrite, option, setting)
    report = WriteReport({}, [], cut=sum(len(c) > limit(CAPTION_CHARS) for e in entries for c in e.captions))
    if report.cut:
        entries = [replace(e, captions=[cut_caption(c) for c in e.captions]) for e in entries]
    samples = _encode_all(entries, images_dir, max_side, workers, report)
    report.sizes = write_shards(samples, out_dir, shard_size, total=len(entries), setting=setting)
    return report


def _locate(entry: ImageEntry, images_dir: Path) -> ImageEntry:
    """`filepath/filename` under `images_dir`, else `filename`: people often pass COCO's val2014/ itself."""
    fallback = entry.meta["filename"]
    if fallback != entry.file_name and inside(entry.file_name) and inside(fallback) \
            and not (images_dir / entry.file_name).is_file() and (images_dir / fallback).is_file():
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
    their settings in `synthetic.json` beside the shards. The settings are written first and the manifest
    last: a run stopped at any point leaves a folder known as synthetic scenes, and complete only with both."""
    prepare_out_dir(out_dir, overwrite, option, setting)

    def samples() -> Iterator[Sample]:
        for i in range(first_index, first_index + num_samples):
            image, captions, record = synthetic.scene(i, seed=seed, side=image_size)
            yield Sample(f"{i:09d}", image, captions, record)

    with writing(out_dir / SYNTHETIC):
        write_json(out_dir / SYNTHETIC, _synthetic_settings(num_samples, shard_size, image_size, seed, first_index))
    sizes = write_shards(samples(), out_dir, shard_size, total=num_samples, desc=f"synthetic {out_dir.name}",
                         setting=setting)
    return WriteReport(sizes, [])


def _synthetic_settings(num_samples: int, shard_size: int, image_size: int, seed: int, first_index: int) -> dict:
    return {"num_samples": num_samples, "shard_size": shard_size, "image_size": image_size, "seed": seed,
            "first_index": first_index}


def ensure_synthetic(out_dir: Path, num_samples: int, shard_size: int, image_size: int = 64, seed: int = 0,
                     first_index: int = 0, option: str = "out_dir", setting: str = "{}") -> bool:
    """Synthetic scenes in `out_dir` as these settings make them: kept when they are there already,
    (re)written when the folder is new, empty or holds other synthetic scenes (or a stopped run's part of
    them); never written into a folder that holds anything else. Runs started side by side write them once,
    one at a time (`_locked`): the others wait, then find them complete. Returns whether it wrote.
    `setting` names `synthetic`, the section that holds these settings ("data.{}" in a config)."""
    settings = _synthetic_settings(num_samples, shard_size, image_size, seed, first_index)
    if _synthetic_done(out_dir, settings):
        return False
    _refuse_others(out_dir, option, setting, locked=False)
    check_output(out_dir, option, kind="folder")
    with _locked(out_dir):
        if _synthetic_done(out_dir, settings):  # another run wrote them while this one waited
            return False
        _refuse_others(out_dir, option, setting, locked=True)
        write_synthetic(out_dir, num_samples, shard_size, image_size, seed, first_index, overwrite=True,
                        option=option, setting=setting.format("synthetic.{}"))
    return True


def _synthetic_done(out_dir: Path, settings: dict) -> bool:
    marker = out_dir / SYNTHETIC
    return marker.is_file() and (out_dir / MANIFEST).is_file() \
        and read_json(marker, f"delete {marker} to write the synthetic scenes afresh") == settings


def _refuse_others(out_dir: Path, option: str, setting: str, locked: bool) -> None:
    """Refuse a folder holding files other than this project's synthetic scenes: any file that shard writing
    does not make, or, asked with the lock held (no other run is half-way), shards without the settings beside
    them (`multimodal shards` wrote those)."""
    files = list(out_dir.iterdir()) if out_dir.is_dir() else []
    others = [p for p in files if not _ours(p)]
    if locked and not (out_dir / SYNTHETIC).is_file():
        others += [p for p in files if p.name == MANIFEST or p.name.startswith("shard-")]
    if others:
        raise UserError(f"{option} {out_dir} holds files that are not this project's synthetic data: set "
                        f"{setting.format('synthetic')} to null to train on the shards there, or give {option} a new "
                        "folder for the synthetic scenes.")


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """`folder` (made if new) held by this process alone while the block runs: an exclusive flock on its
    LOCK file, which the kernel lets go when the process ends, however it ends. Where the file system
    keeps no locks, the block runs unlocked."""
    import fcntl  # here: POSIX only

    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
