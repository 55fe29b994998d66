"""Benchmark on one GPU: a bare loop, our training eager and compiled, open_clip_train and embedding, side by side.

On the GPU machine, from the project root (the second line: the same on a CPU, in about a minute):

    python scripts/bench_gpu.py [--data COCO_DIR | --synthetic] [--steps 300] [--batch-size 256] [--workers 12]
    python scripts/bench_gpu.py --accelerator cpu --model tiny --steps 8 --batch-size 16 --no-open-clip

Every training row runs the same architecture, batch size, AdamW settings (`bench_train`'s) and precision:
bf16 autocast on CUDA, fp32 on the CPU. Samples/s are the median of windows of 4 steps, with the quartiles;
MFU is the model FLOPs of a sample (forward and backward, counted by `multimodal.throughput`) times
samples/s over the GPU's peak, where `multimodal.throughput.PEAK_TFLOPS` knows it ("-" elsewhere).
- bare loop, eager and compiled (`bench_train.bare`): the ceiling. open_clip's towers in our model, our
  `clip_loss`, fused AdamW, one batch resident on the device: no Lightning, no data loading. Compiled:
  both towers through `torch.compile`, compilation inside the warm-up.
- multimodal train, eager and compiled (`--model.compile true`): the command on the shards
  (`bench_train.ours`: its logged `train/samples_per_second`, the first window, the loader's start, dropped).
- open_clip_train, eager (`bench_train.theirs`): `python -m open_clip_train.main` on the same shards with
  the same workers, in its own virtual environment (.venv-openclip, created on first use; `--no-open-clip`
  leaves it out on a machine without network).
- multimodal embed: the command over the same shards, every image with its captions, one pass; images/s
  from the line it prints once the model is loaded to its end (the loader's and device's start included;
  its batches end with each shard, so with fewer photos than a batch they hold the shard's).
Then the ratios: ours / bare loop, eager and compiled; ours / open_clip_train, both eager.

Shards: the val2017 images and captions of a COCO folder (`--data`; by default ../shared/data/coco-mini
where it exists) as they are, written by `multimodal.data.shards.write_coco` into shards of one batch, or,
with `--synthetic` or without a COCO folder, synthetic scenes at the model's input size (`write_synthetic`).
The shards are listed as many times as the steps need, so that each run is one epoch, without a boundary.
Everything is written into a temporary folder and removed at the end.

Without CUDA (or with `--accelerator cpu`) the same run goes end to end on the CPU, the device printed as
"cpu"; `--no-compile` leaves out the compiled rows, which take minutes to compile there.
"""

import argparse
import dataclasses
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_train import LOG_EVERY, Setting, bare, ours, theirs  # noqa: E402

from multimodal import arch  # noqa: E402
from multimodal.data.shards import SHARD_PATTERN, write_coco, write_synthetic  # noqa: E402
from multimodal.errors import UserError, message  # noqa: E402
from multimodal.loss import clip_loss  # noqa: E402
from multimodal.model import create_model  # noqa: E402
from multimodal.throughput import flops_per_sample, peak_tflops  # noqa: E402

COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
SPLIT = "val2017"
SYNTHETIC_BATCHES = 2  # distinct synthetic samples: this many batches
MAX_LISTING = 100_000  # characters of the repeated listing; Linux takes up to 128 KiB in one argument


@dataclasses.dataclass(frozen=True)
class Shards:
    listing: str  # the shards' brace pattern, '::'-joined as many times as the steps need
    samples: int  # in the whole listing
    what: str


def write(folder: Path, data: Path | None, setting: Setting) -> Shards:
    """Shards of one batch each, from the COCO folder `data` (None: synthetic), listed as many times as
    training needs: the training rows' steps (and their dropped first window), a quarter more, and a
    shard more for each worker, as open_clip_train splits whole shards over its workers."""
    if data is None:
        sizes = write_synthetic(folder, SYNTHETIC_BATCHES * setting.batch_size, shard_size=setting.batch_size,
                                image_size=setting.architecture.image_size).sizes
        what = f"synthetic scenes at {setting.architecture.image_size} px"
    else:
        sizes = write_coco(data / "annotations" / f"captions_{SPLIT}.json", data / SPLIT, folder,
                           shard_size=setting.batch_size).sizes
        what = f"COCO {SPLIT} images of {data} at full size"
    distinct = sum(sizes.values())
    needed = 1.25 * (setting.steps + 2 * LOG_EVERY) * setting.batch_size + setting.workers * max(sizes.values())
    copies = math.ceil(needed / distinct)
    shards = str(folder / SHARD_PATTERN.replace("{:06d}", f"{{000000..{len(sizes) - 1:06d}}}"))
    if copies * (len(shards) + 2) > MAX_LISTING:
        raise UserError(f"{distinct} samples would be listed {copies} times for {setting.steps} steps, more than one "
                        "command-line argument holds: pass fewer --steps, or --data a larger COCO folder.")
    return Shards("::".join([shards] * copies), copies * distinct,
                  f"{distinct} {what} in {len(sizes)} shard(s), listed {copies} times")


def embed(setting: Setting, shards: Shards, folder: Path) -> float:
    """Images/s (with their captions) of `multimodal embed` over `shards`, a randomly initialised model."""
    weights = folder / "towers.pt"
    torch.save(create_model(setting.architecture).towers.state_dict(), weights)
    command = [sys.executable, "-m", "multimodal", "embed", "--checkpoint", str(weights),
               "--model", setting.architecture.name, "--shards", shards.listing, "--out", str(folder / "embeddings"),
               "--batch_size", str(setting.batch_size), "--num_workers", str(setting.workers),
               "--accelerator", "gpu" if setting.gpu else "cpu"]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        start = None
        for line in proc.stdout:  # "0 of N parts already done; embedding N.": the model is loaded
            if start is None and re.search(r"; embedding \d+\.$", line.strip()):
                start = time.perf_counter()
        proc.wait()
        end = time.perf_counter()
        if proc.returncode != 0 or start is None:
            errors.seek(0)
            sys.exit(f"multimodal embed failed:\n{errors.read()[-3000:]}")
    return shards.samples / (end - start)


def row(label: str, windows: list[float] | str, flops: float, peak: float | None) -> str:
    """One training row: median samples/s (quartiles), windows, MFU; or why it was left out."""
    if isinstance(windows, str):
        return f"  {label:<28}{'-':>9}  (left out: {windows})"
    median = statistics.median(windows)
    low, _, high = statistics.quantiles(windows, n=4) if len(windows) > 1 else (median,) * 3
    mfu = f"{flops * median / (peak * 1e12):6.1%}" if peak else f"{'-':>6}"
    return f"  {label:<28}{median:9.1f}  ({low:.0f}-{high:.0f}, {len(windows)} windows)  MFU {mfu}"


def ratio(label: str, numerator: list[float] | str, denominator: list[float] | str) -> str:
    """The ratio of two rows' medians, or "-" where either was left out."""
    if isinstance(numerator, str) or isinstance(denominator, str):
        return f"  {label:<32}{'-':>6}"
    return f"  {label:<32}{statistics.median(numerator) / statistics.median(denominator):5.2f}x"


def attempt(label: str, run):
    """`run()`, or, where it fails (the commands exit with their stderr's tail), why: printed in full to
    stderr, the row left out, and the other rows still measured."""
    try:
        return run()
    except SystemExit as exc:
        print(f"{label} failed: {exc.code}", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - a tool the row needs (open_clip_train's environment) failed
        print(f"{label} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return "failed, see stderr"


def measure(setting: Setting, shards: Shards, with_compile: bool, with_open_clip: bool) -> dict[str, list[float] | str]:
    """Each training row's windows, or why it was left out; one run after the other."""
    compiled = dataclasses.replace(setting, compile=True)
    runs = {"bare loop, eager": lambda: bare(setting),
            "bare loop, compiled": (lambda: bare(compiled)) if with_compile else "--no-compile",
            "multimodal train, eager": lambda: ours(setting, shards.listing),
            "multimodal train, compiled": (lambda: ours(compiled, shards.listing)) if with_compile else "--no-compile",
            "open_clip_train, eager": (lambda: theirs(shards.listing, setting)) if with_open_clip else "--no-open-clip"}
    windows = {}
    for label, run in runs.items():
        print(f"running {label}...", file=sys.stderr, flush=True)
        windows[label] = run if isinstance(run, str) else attempt(label, run)
        if not isinstance(windows[label], str):  # each row as it is measured, should a later one take the run down
            print(row(label, windows[label], 0.0, None), file=sys.stderr, flush=True)
        if setting.gpu:
            torch.cuda.empty_cache()  # the bare loop's memory, for the commands that follow
    return windows


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default="auto",
                        help="auto: the GPU where CUDA is present")
    parser.add_argument("--model", default=None, help="architecture (default: tiny on the CPU, ViT-B-32 on a GPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps a run (default: 48 on the CPU, 300 on a GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on the CPU, 256 on a GPU")
    parser.add_argument("--workers", type=int, default=None, help="data workers (default: 1 on the CPU, 12 on a GPU)")
    parser.add_argument("--data", type=Path, default=COCO_MINI if COCO_MINI.is_dir() else None,
                        help=f"a COCO folder (annotations/captions_{SPLIT}.json, {SPLIT}/); "
                             "default: the project's COCO subset where present, else synthetic shards")
    parser.add_argument("--synthetic", action="store_true", help="synthetic shards even where a COCO folder is")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    parser.add_argument("--no-open-clip", action="store_true", help="leave out open_clip_train")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    gpu = args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        sys.exit("--accelerator gpu needs CUDA, which this machine lacks: pass --accelerator cpu.")
    data = None if args.synthetic else args.data
    coco = data is None or ((data / "annotations" / f"captions_{SPLIT}.json").is_file() and (data / SPLIT).is_dir())
    if not coco:
        sys.exit(f"{data} is not a COCO folder (annotations/captions_{SPLIT}.json and {SPLIT}/): pass --data a COCO "
                 "folder, or --synthetic.")
    steps = args.steps or (300 if gpu else 48)
    if steps < LOG_EVERY:
        sys.exit(f"--steps {steps} is fewer than one window of {LOG_EVERY} steps: pass --steps {LOG_EVERY} or more.")
    try:
        architecture = arch.load(args.model or ("ViT-B-32" if gpu else "tiny"))
        setting = Setting(architecture, args.batch_size or (256 if gpu else 128), steps,
                          args.workers if args.workers is not None else (12 if gpu else 1), gpu, compile=False)
        with tempfile.TemporaryDirectory() as folder:
            shards = write(Path(folder) / "shards", data, setting)
            windows = measure(setting, shards, not args.no_compile, not args.no_open_clip)
            print("running multimodal embed...", file=sys.stderr, flush=True)
            images = attempt("multimodal embed", lambda: embed(setting, shards, Path(folder)))
    except UserError as exc:
        sys.exit(f"error: {message(exc)}")
    report(setting, shards, windows, images)


def report(setting: Setting, shards: Shards, windows: dict[str, list[float] | str], images: float | str
           ) -> None:
    device = torch.device("cuda" if setting.gpu else "cpu")
    name = torch.cuda.get_device_name(device) if setting.gpu else "cpu"
    flops = flops_per_sample(create_model(setting.architecture),
                             lambda m, i, t: clip_loss(m.encode_image(i), m.encode_text(t), m.logit_scale.exp()))
    peak = peak_tflops(device)
    a = setting.architecture
    print(f"device: {name} (torch {torch.__version__})")
    print(f"{a.name} ({a.image_size} px), batch {setting.batch_size}, {'bf16' if setting.gpu else 'fp32'}, "
          f"{setting.workers} data worker(s), {setting.steps} steps a run")
    print(f"shards: {shards.what} ({shards.samples} samples)")
    print(f"samples/s, median of {LOG_EVERY}-step windows; MFU: {flops / 1e9:.3g} GFLOP a sample over "
          + (f"{peak:g} TFLOP/s" if peak else "an unknown peak"))
    for label, w in windows.items():
        print(row(label, w, flops, peak))
    if isinstance(images, str):
        print(f"  {'multimodal embed':<28}{'-':>9}  (left out: {images})")
    else:
        print(f"  {'multimodal embed':<28}{images:9.1f}  images/s with their captions, one pass")
    print(ratio("ours / bare loop, eager", windows["multimodal train, eager"], windows["bare loop, eager"]))
    print(ratio("ours / bare loop, compiled", windows["multimodal train, compiled"], windows["bare loop, compiled"]))
    print(ratio("ours / open_clip_train, eager", windows["multimodal train, eager"], windows["open_clip_train, eager"]))


if __name__ == "__main__":
    main()
