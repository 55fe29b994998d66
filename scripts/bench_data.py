"""Benchmark: our data pipeline against open_clip's webdataset pipeline, images/s side by side.

    python scripts/bench_data.py [--workers 2] [--batch-size 64] [--batches 40] [--data ../shared/data/coco-mini]

Both read the same shards of full-size COCO JPEGs (about 640 x 480, written once into .bench/ with
`write_coco` and no resizing), draw shards with replacement, shuffle, decode, crop to ViT-B-32's
224 px with open_clip's train transform, tokenise one caption and batch, with the same batch size
and DataLoader workers. Ours: `ImageTextStream` with JPEG draft-mode decoding and uint8 pixels,
timed twice: normalising them on the CPU (as conservative as it gets: training does it on the
accelerator, and here it takes CPU time from the two workers) and as the uint8 batches training gets;
where CUDA is present, a third time with the JPEGs decoded on the GPU (`data.decode: gpu`). Also
printed: our stream's cost a sample in one process without workers, and the tar reading alone, ours
(`multimodal.data.tario`) against webdataset's reader on Python's tarfile.

`--layout img2dataset`: the same photos in img2dataset's webdataset layout instead (NNNNN.tar with
KEY.jpg, KEY.txt, KEY.json; NNNNN.parquet and NNNNN_stats.json beside; written by the tests' builder,
`tests/layouts.py`), read by both pipelines. Either layout also prints the cost a sample of a weighted
mixture of the two COCO splits (`data.train_weights`, each sample's source drawn) against the same
shards as one source, in one process.
Theirs: `open_clip_train.data.get_wds_dataset`, run in its own virtual environment (.venv-openclip,
created on first use: open_clip_train's pipeline needs webdataset <= 0.2.86; with webdataset 1.0 it
fails with KeyError 'fname'). Prints images/s of both and their ratio (ours / theirs).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from multimodal import arch  # noqa: E402
from multimodal.arch import Architecture  # noqa: E402
from multimodal.data import formats  # noqa: E402
from multimodal.data.batch import finish  # noqa: E402
from multimodal.data.formats import expand_urls  # noqa: E402
from multimodal.data.pipeline import ImageTextStream  # noqa: E402
from multimodal.data.pixels import EvalTransform, TrainCrop  # noqa: E402
from multimodal.data.shards import write_coco  # noqa: E402
from multimodal.data.tario import tarfile_samples  # noqa: E402

MODEL = "ViT-B-32"
REFERENCE_VENV = REPO / ".venv-openclip"
REFERENCE_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "open_clip_torch==3.3.0", "webdataset==0.2.86",
                      "pandas", "braceexpand"]

THEIRS = r"""
import json, sys, time
from argparse import Namespace
import open_clip
from open_clip_train.data import get_wds_dataset
urls, batch_size, workers, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
args = Namespace(train_data=urls, val_data=None, train_num_samples=batch_size * (batches + 5) * 4,
                 dataset_resampled=True, train_data_upsampling_factors=None, seed=0, batch_size=batch_size,
                 workers=workers, world_size=1, rank=0, distributed=False)
preprocess = open_clip.image_transform(224, is_train=True)
data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
loader = iter(data.dataloader)
for _ in range(3):  # workers start, shuffle buffers fill
    next(loader)
start = time.perf_counter()
for _ in range(batches):
    images, texts = next(loader)
elapsed = time.perf_counter() - start
print(json.dumps({"images_per_second": batches * batch_size / elapsed, "shape": list(images.shape)}))
"""


def shards(data: Path, layout: str = "ours") -> str:
    """Shards of the COCO subset at full resolution, written once; a '::'-joined spec of both splits."""
    specs = []
    for split in ("train2017", "val2017"):
        out = REPO / ".bench" / f"coco-full-{split}" if layout == "ours" else REPO / ".bench" / f"i2d-coco-{split}"
        if layout == "ours" and not (out / "sizes.json").is_file():
            write_coco(data / "annotations" / f"captions_{split}.json", data / split, out, shard_size=20)
        if layout == "img2dataset" and not (out / "00000_stats.json").is_file():
            from tests.layouts import write_img2dataset

            coco = json.loads((data / "annotations" / f"captions_{split}.json").read_text())
            captions: dict[int, list[str]] = {}
            for a in coco["annotations"]:
                captions.setdefault(a["image_id"], []).append(a["caption"].strip())
            photos = [(im["file_name"], (data / split / im["file_name"]).read_bytes(), captions[im["id"]])
                      for im in sorted(coco["images"], key=lambda im: im["id"]) if im["id"] in captions]
            write_img2dataset(out, photos, per_shard=20)
        specs.append(str(out))
    return "::".join(specs)


def ours(architecture: Architecture, spec: str, batch_size: int, workers: int, batches: int, normalize: bool = True,
         device: torch.device | None = None, mixture: bool = False) -> float:
    """Images/s of our stream. `device`: decode the JPEGs there (`data.decode: gpu`), the workers only
    reading them and drawing crop boxes; the batches are then finished and normalised on the device.
    `mixture`: the '::' parts of `spec` as the sources of an equal-weight mixture, not one list of shards."""
    sources = [expand_urls(part) for part in formats.sources(spec)] if mixture else [expand_urls(spec)]
    crop = TrainCrop.of(architecture.preprocessing)
    stream = ImageTextStream(sources, weights=(1.0,) * len(sources) if mixture else None, crop=crop,
                             tokenizer=architecture.tokenizer, batch_size=batch_size,
                             num_batches=batches + 3, shuffle_buffer=1000, resampled=True,
                             decode_on_device=device is not None)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                             pin_memory=device is not None and device.type == "cuda"))
    preprocess = EvalTransform.of(architecture.preprocessing)  # its normalisation: open_clip's statistics

    def take() -> None:
        batch = next(loader)
        if normalize or device is not None:
            where = device or torch.device("cpu")
            finish(batch.to(where), where, preprocess, crop)

    for _ in range(3):
        take()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        take()
    synchronize(device)
    return batches * batch_size / (time.perf_counter() - start)


def tar_reading(spec: str, passes: int = 5) -> tuple[float, float]:
    """Microseconds a raw sample to read the shards: (our tar reader, webdataset's on Python's tarfile)."""
    urls = expand_urls(spec) * passes
    best = {}
    for name, read in (("ours", lambda: tarfile_samples(urls, handler=wds.reraise_exception)),
                       ("webdataset", lambda: wds.tarfile_samples([{"url": u} for u in urls]))):
        for _ in range(3):
            start = time.perf_counter()
            count = sum(1 for _ in read())
            best[name] = min(best.get(name, 1e9), (time.perf_counter() - start) / count * 1e6)
    return best["ours"], best["webdataset"]


def synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_python() -> Path:
    python = REFERENCE_VENV / "bin" / "python"
    if not python.is_file():
        print(f"Creating {REFERENCE_VENV} for open_clip_train's pipeline (a few minutes, once)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(REFERENCE_VENV)], check=True)
        subprocess.run([str(REFERENCE_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        *REFERENCE_PACKAGES], check=True)
    return python


def theirs(spec: str, batch_size: int, workers: int, batches: int) -> float:
    urls = "::".join(expand_urls(spec))
    proc = subprocess.run([str(reference_python()), "-c", THEIRS, urls, str(batch_size), str(workers), str(batches)],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        sys.exit(f"open_clip's pipeline failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "coco-mini")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two this many times, keep the best")
    parser.add_argument("--layout", choices=("ours", "img2dataset"), default="ours",
                        help="the shards' layout: ours (`multimodal shards coco`) or img2dataset's")
    args = parser.parse_args()
    if not (args.data / "annotations").is_dir():
        sys.exit(f"{args.data} is not a COCO folder (annotations/, train2017/, val2017/).")
    torch.set_num_threads(1)
    spec, architecture = shards(args.data, args.layout), arch.load(MODEL)
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    ours_best = ours_pipeline = theirs_best = ours_gpu = 0.0
    for _ in range(args.repeats):  # alternate, so that neither gets a quieter machine
        ours_best = max(ours_best, ours(architecture, spec, args.batch_size, args.workers, args.batches))
        theirs_best = max(theirs_best, theirs(spec, args.batch_size, args.workers, args.batches))
        ours_pipeline = max(ours_pipeline, ours(architecture, spec, args.batch_size, args.workers, args.batches,
                                                 normalize=False))
        if gpu is not None:
            ours_gpu = max(ours_gpu, ours(architecture, spec, args.batch_size, args.workers, args.batches, device=gpu))
    print(f"{args.batches} batches of {args.batch_size} full-size COCO JPEGs ({args.layout} layout) -> {MODEL} 224 px "
          f"train crops, {args.workers} workers")
    print(f"  ours      {ours_best:8.1f} images/s, normalised here on the CPU "
          f"({ours_pipeline:.1f} as uint8, normalised on the accelerator in training)")
    if gpu is not None:
        print(f"  ours, JPEGs decoded on {torch.cuda.get_device_name(gpu)} (data.decode gpu) "
              f"{ours_gpu:8.1f} images/s, normalised there")
    print(f"  open_clip {theirs_best:8.1f} images/s")
    alone, mixed = [], []
    for _ in range(4):  # alternating; medians, as the machine's load swings between runs
        alone.append(1e6 / ours(architecture, spec, args.batch_size, 0, args.batches // 4))
        mixed.append(1e6 / ours(architecture, spec, args.batch_size, 0, args.batches // 4, mixture=True))
    print(f"  ours in this process, no workers: {statistics.median(alone):.0f} us a sample (read, box, decode, crop, "
          f"tokenise); as a two-source mixture {statistics.median(mixed):.0f} us "
          f"({statistics.median(mixed) / statistics.median(alone):.2f}x the cost; medians of 4 alternating runs)")
    tar_ours, tar_theirs = tar_reading(spec)
    print(f"  reading the tar shards alone: ours {tar_ours:.0f} us a sample, webdataset (tarfile) {tar_theirs:.0f} us "
          f"({tar_theirs / tar_ours:.1f}x)")
    print(f"  ratio     {ours_best / theirs_best:8.2f}x (ours / open_clip; "
          f"{ours_pipeline / theirs_best:.2f}x with normalisation on the accelerator"
          + (f"; {ours_gpu / theirs_best:.2f}x decoding on the GPU)" if gpu is not None else ")"))


if __name__ == "__main__":
    main()
