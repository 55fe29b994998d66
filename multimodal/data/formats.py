"""Shard sets as users have them: ours, img2dataset's and CLIP_benchmark's, opened into one `ShardSet`.

    ours (`multimodal shards`)   DIR/shard-NNNNNN.tar, DIR/sizes.json (shard file -> samples: open_clip's)
    img2dataset                  DIR/NNNNN.tar with NNNNN_stats.json (`successes`: the samples in the tar)
                                 and NNNNN.parquet (every input row, with its `status`) beside each
    CLIP_benchmark (`wds_*`)     ROOT/{split}/N.tar, ROOT/{split}/nshards.txt, ROOT/dataset_type.txt
                                 (retrieval, else classification), ROOT/classnames.txt and
                                 ROOT/zeroshot_classification_templates.txt ({c} for the class name)

`open_shards(spec)` takes what a user names (a folder, a brace pattern, a glob, `pipe:` commands, a
CLIP_benchmark root or split folder, or several joined by `::`) and returns its URLs, the samples in
each where a file beside it says, and how its samples read (`decode.Members`: a CLIP_benchmark
retrieval shard holds an image's captions one a line). `read_records` yields a shard set's samples.
A new layout is a branch of `open_shards` (where its files are and what they say) plus its tests.
"""

import glob
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from braceexpand import braceexpand

from multimodal.data.decode import IMAGE_KEYS, MAX_IMAGE_PIXELS, Members, Record, read_record
from multimodal.data.faults import BadSample
from multimodal.data.tario import tarfile_samples
from multimodal.errors import UserError
from multimodal.userfiles import read_json, read_text, reading

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
MANIFEST = "sizes.json"
STATS = "{}_stats.json"  # img2dataset's, beside NNNNN.tar
BENCHMARK_FILES = ("dataset_type.txt", "classnames.txt", "zeroshot_classification_templates.txt")


@dataclass(frozen=True)
class Benchmark:
    """What a CLIP_benchmark webdataset folder says of itself."""

    name: str  # as CLIP_benchmark names it in results: "wds/mscoco_captions"
    task: str  # "retrieval" or "classification"
    classnames: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None  # as written: "{c}" for the class name


@dataclass(frozen=True)
class ShardSet:
    spec: str
    urls: list[str]
    sizes: list[int | None]  # samples in each shard; None where no file says
    members: Members = Members()
    benchmark: Benchmark | None = None
    stats: list[Path | None] = field(default_factory=list)  # img2dataset's stats file of each shard

    @property
    def num_samples(self) -> int | None:
        return None if None in self.sizes else sum(self.sizes)


def read_manifest(path: Path) -> dict[str, int]:
    """A `sizes.json`: shard file name -> number of samples."""
    fix = "delete it, or write the shards again with `multimodal shards`"
    sizes = read_json(path, fix)
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in sizes.values()):
        raise UserError(f"{path} is not a shard manifest (shard file name -> number of samples): {fix}.")
    return sizes


def sources(spec: str) -> list[str]:
    """The `::`-separated parts of a shard specification, each a source of its own in a mixture."""
    parts = [part.strip() for part in spec.split("::")]
    if not all(parts):
        raise UserError(f"The shard specification '{spec}' has an empty part between '::'.")
    return parts


def open_shards(spec: str, members: Members = Members(), split: str | None = None, verify: bool = False,
                default_split: str = "test") -> ShardSet:
    """The shard set `spec` names. `members` chooses what its samples' members mean (a CLIP_benchmark
    retrieval set reads captions one a line on top). `split`: the split of a CLIP_benchmark dataset (its
    root folder's `default_split` when None; a split folder named is that split, and another `split` is
    refused). `verify`: check every img2dataset stats file against its parquet (their status column)."""
    urls: list[str] = []
    benchmark = None
    parts = sources(spec)
    for part in parts:
        root = _benchmark_root(part, split, default_split)
        if root is not None and len(parts) > 1:
            raise UserError(f"{part} is a CLIP_benchmark dataset, whose samples read their own way: give it alone, "
                            "not joined with other shards by '::' (or as a source of a weighted mixture).")
        if root is not None:
            benchmark = _read_benchmark(root[0])
            urls.extend(_benchmark_urls(*root))
        else:
            urls.extend(_expand(part))
    if benchmark is not None and benchmark.task == "retrieval":
        members = replace(members, caption_lines=True)
    sizes, stats = _sizes(urls)
    if verify:
        _verify_stats(urls, sizes, stats)
    return ShardSet(spec, urls, sizes, members, benchmark, stats)


def expand_urls(spec: str) -> list[str]:
    """The shard URLs of `spec` (`open_shards`'s forms)."""
    return open_shards(spec).urls


def _expand(part: str) -> list[str]:
    urls = []
    for item in braceexpand(part):
        if item.startswith(REMOTE_PREFIXES):
            urls.append(item)
        elif Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not found:
                raise UserError(f"Shard folder {item} holds no .tar files: write shards into it with "
                                "`multimodal shards`, or name a CLIP_benchmark dataset's folder.")
            urls.extend(found)
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
            if not found:
                raise UserError(f"No shard matches {item}: check the pattern, or write shards with "
                                "`multimodal shards`.")
            urls.extend(found)
        elif Path(item).is_file():
            urls.append(item)
        else:
            raise UserError(f"Shard {item} does not exist: check the path, or write shards with `multimodal shards`.")
    return urls


def _benchmark_root(part: str, split: str | None, default_split: str) -> tuple[Path, str] | None:
    """(root, split) when `part` is a CLIP_benchmark webdataset folder: its root (ROOT/{split}/nshards.txt)
    or one of its splits (SPLIT/nshards.txt); None for any other shard specification."""
    path = Path(part)
    if part.startswith(REMOTE_PREFIXES) or not path.is_dir():
        return None
    if (path / "nshards.txt").is_file():
        if split is not None and split != path.name:
            raise UserError(f"{path} is the {path.name} split of a CLIP_benchmark dataset: to read its {split} split, "
                            f"name the dataset's folder, {path.parent}.")
        return path.parent, path.name
    split = split or default_split
    if (path / split / "nshards.txt").is_file():
        return path, split
    if any((path / name).is_file() for name in BENCHMARK_FILES) and not any(path.glob("*.tar")):
        found = sorted(p.parent.name for p in path.glob("*/nshards.txt"))
        splits = f"splits found: {', '.join(found)}" if found else "no split found"
        raise UserError(f"{path} looks like a CLIP_benchmark dataset but has no {split}/nshards.txt, the file that "
                        f"counts a split's shards ({splits}): name a split's folder ({path}/SPLIT), or download the "
                        "dataset again.")
    return None


def _read_lines(path: Path) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    lines = read_text(path, "download the dataset again").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def _read_benchmark(root: Path) -> Benchmark:
    kind = _read_lines(root / "dataset_type.txt")
    task = kind[0].lower() if kind else "classification"  # CLIP_benchmark's default when the file is absent
    if task not in ("retrieval", "classification"):
        raise UserError(f"{root / 'dataset_type.txt'} says '{task}': only retrieval and classification datasets "
                        "are read (a multilabel dataset's npy labels are not).")
    name = root.resolve().name
    name = "wds/" + (name[4:] if name.startswith("wds_") else name)
    return Benchmark(name, task, _read_lines(root / "classnames.txt"),
                     _read_lines(root / "zeroshot_classification_templates.txt"))


def _benchmark_urls(root: Path, split: str) -> list[str]:
    counted = root / split / "nshards.txt"
    text = read_text(counted, "download the dataset again").strip()
    if not text.isdigit() or int(text) == 0:
        raise UserError(f"{counted} should hold the number of shards of the split, but holds '{text[:40]}': "
                        "download the dataset again.")
    urls = [str(root / split / f"{i}.tar") for i in range(int(text))]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise UserError(f"{missing[0]} is missing ({len(missing)} of the {len(urls)} shards that {counted} counts): "
                        "download the dataset again.")
    return urls


def _sizes(urls: list[str]) -> tuple[list[int | None], list[Path | None]]:
    """Samples in each shard, from the `sizes.json` beside it, else its img2dataset stats file; and the
    stats file of each. Stats files are read in threads: an img2dataset set has one per shard."""
    manifests: dict[Path, dict[str, int]] = {}
    sizes: list[int | None] = [None] * len(urls)
    stats: list[Path | None] = [None] * len(urls)
    todo = []
    for i, url in enumerate(urls):
        if url.startswith(REMOTE_PREFIXES):
            continue
        path = Path(url)
        if path.parent not in manifests:
            manifest = path.parent / MANIFEST
            manifests[path.parent] = read_manifest(manifest) if manifest.is_file() else {}
        if path.name in manifests[path.parent]:
            sizes[i] = manifests[path.parent][path.name]
        elif (path.parent / STATS.format(path.stem)).is_file():
            stats[i] = path.parent / STATS.format(path.stem)
            todo.append(i)
    with ThreadPoolExecutor(min(16, max(1, len(todo)))) as pool:
        for i, count in zip(todo, pool.map(_successes, [stats[i] for i in todo])):
            sizes[i] = count
    return sizes, stats


def _successes(path: Path) -> int:
    """The samples img2dataset wrote into the tar beside a stats file."""
    fix = "it should be the stats file img2dataset wrote beside the shard of the same number"
    stats = read_json(path, fix, kind=object)
    count = stats.get("successes") if isinstance(stats, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise UserError(f"{path} has no sample count ('successes'): {fix}.")
    return count


def _verify_stats(urls: list[str], sizes: list[int | None], stats: list[Path | None]) -> None:
    """Each img2dataset stats file against its parquet: both count the samples written into the tar."""
    for url, size, stat in zip(urls, sizes, stats):
        parquet = Path(url).with_suffix(".parquet")
        if stat is None or not parquet.is_file():
            continue
        import pyarrow.parquet as pq

        with reading(parquet, "it should be the parquet img2dataset wrote beside the shard"):
            table = pq.read_table(parquet, columns=["status"])
        written = sum(1 for status in table.column("status").to_pylist() if status == "success")
        if written != size:
            raise UserError(f"{parquet} lists {written} successful samples but {stat.name} says {size}: the shard's "
                            "files come from different runs; download or write the shard again.")


def count_samples(url: str) -> int:
    """The samples of one tar shard, counted by reading it (nothing decoded): for a shard no file counts."""
    return sum(1 for _ in tarfile_samples([url], handler=_raise))


def _raise(exc: Exception) -> bool:
    raise exc


def read_records(urls: list[str], members: Members = Members(), on_error: Callable[[Exception], bool] = _raise,
                 captions: bool = True, label: bool = False, max_pixels: int | None = MAX_IMAGE_PIXELS
                 ) -> Iterator[Record]:
    """Every usable sample of `urls` as a `Record` (captions and/or class read, pixels not decoded), in
    order, once; samples that cannot be used (`decode.read_record` raised BadSample) are left out."""
    for raw in tarfile_samples(urls, handler=on_error):
        try:
            record = read_record(raw, members, max_pixels, captions=captions, label=label)
        except BadSample:
            continue
        if not label or record.label is not None:
            yield record


def check_members(shards: ShardSet, captions: bool = True, label: bool = False, setting: str = "data.{}") -> None:
    """Refuse, in one sentence, a chosen member that the first sample of the first local shard lacks: a
    `text_key` or `caption_field` no sample has would otherwise make every sample a bad one. `setting`
    names a setting in the caller's words ("data.{}" in a config, "--{}" on a command line)."""
    if not shards.urls or shards.urls[0].startswith(REMOTE_PREFIXES):
        return
    first = next(iter(tarfile_samples(shards.urls[:1], handler=lambda exc: False)), None)
    if first is None:
        return
    m, url = shards.members, shards.urls[0]
    have = ", ".join(sorted(k for k in first if not k.startswith("__")))
    chosen = [("image_key", m.image_key)] + ([("text_key", m.text_key)] if captions else []) + \
        ([("label_key", m.label_key)] if label else [])
    for name, key in chosen:
        if key is not None and key not in first:
            raise UserError(f"The first sample of {url} has no '{key}' member (it has {have}): set "
                            f"{setting.format(name)} to one of them.")
    if m.image_key is None and not any(k in first for k in IMAGE_KEYS):
        raise UserError(f"The first sample of {url} has no image member ({', '.join(IMAGE_KEYS)}; it has {have}): "
                        f"set {setting.format('image_key')} to the one holding its image.")
    if captions and m.caption_field and not (m.text_key is not None and m.text_key in first):
        try:
            meta = json.loads(first["json"]) if "json" in first else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or not any(f in meta for f in m.caption_field):
            fields = ", ".join(sorted(meta)) if isinstance(meta, dict) and meta else "no json fields"
            raise UserError(f"The json of the first sample of {url} has no field "
                            f"{' or '.join(repr(f) for f in m.caption_field)} (it has {fields}): set "
                            f"{setting.format('caption_field')} to the field holding its captions.")
