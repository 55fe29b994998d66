"""Benchmark: our training throughput against open_clip's own trainer, side by side on one machine.

    python scripts/bench_train.py [--steps 48] [--batch-size 128] [--workers 1] [--repeats 2]

Both train the project's `tiny` architecture (a 2-layer, 128-wide ViT at 64 px and a 2-layer text
tower; registered with the reference's open_clip too) from scratch on the same synthetic
webdataset shards (.bench/train-synthetic, written once), with the same batch size, DataLoader
workers, fp32 precision, AdamW (lr 1e-3, weight decay 0.1, 5 warmup steps) on the CPU.
Ours: `multimodal train`, reading train/samples_per_second from metrics.csv. Theirs:
`python -m open_clip_train.main`, in its own virtual environment (.venv-openclip, created on
first use: its pipeline needs webdataset <= 0.2.86), reading its "N/s/gpu" log lines. The first
logged window of each run (start-up) is dropped, the median of the rest kept, the two alternated
`--repeats` times and the best median of each reported, with the ratio (ours / open_clip).
"""

import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_data import REFERENCE_VENV, reference_python  # noqa: E402

from multimodal.data.shards import write_synthetic  # noqa: E402

SHARDS = REPO / ".bench" / "train-synthetic"
LOG_EVERY = 4


def shards(samples: int) -> str:
    if not (SHARDS / "sizes.json").is_file() or sum(1 for _ in SHARDS.glob("*.tar")) * 256 < samples:
        shutil.rmtree(SHARDS, ignore_errors=True)
        write_synthetic(SHARDS, samples, shard_size=256, image_size=64)
    tars = sorted(SHARDS.glob("*.tar"))
    return str(SHARDS / f"shard-{{000000..{len(tars) - 1:06d}}}.tar")


def ours(steps: int, batch_size: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as run:
        command = [sys.executable, "-m", "multimodal", "train", "--config", str(REPO / "configs" / "debug.yaml"),
                   "--data.train_shards", str(SHARDS), "--data.synthetic", "null", "--data.val_shards", "null",
                   "--data.batch_size", str(batch_size), "--data.num_workers", str(workers),
                   "--data.shuffle_buffer", "1000", "--model.lr", "1e-3", "--model.weight_decay", "0.1",
                   "--model.warmup_steps", "5", "--trainer.max_steps", str(steps), "--trainer.precision", "32-true",
                   "--trainer.log_every_n_steps", str(LOG_EVERY), "--trainer.enable_progress_bar", "false",
                   "--trainer.callbacks", "[]"]
        proc = subprocess.run(command, cwd=run, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"multimodal train failed:\n{proc.stderr[-3000:]}")
        with open(Path(run) / "runs" / "debug" / "version_0" / "metrics.csv") as f:
            rates = [float(r["train/samples_per_second"]) for r in csv.DictReader(f) if r["train/samples_per_second"]]
    return statistics.median(rates[1:])


def register_tiny(python: Path) -> None:
    found = subprocess.run([str(python), "-c", "import open_clip, os; print(os.path.dirname(open_clip.__file__))"],
                           capture_output=True, text=True, check=True, env={"HF_HUB_OFFLINE": "1"})
    shutil.copyfile(REPO / "configs" / "models" / "tiny.json",
                    Path(found.stdout.strip()) / "model_configs" / "tiny.json")


def theirs(spec: str, steps: int, batch_size: int, workers: int) -> float:
    python = reference_python()
    register_tiny(python)
    with tempfile.TemporaryDirectory() as run:
        command = [str(python), "-m", "open_clip_train.main", "--train-data", spec, "--dataset-type", "webdataset",
                   "--train-num-samples", str(steps * batch_size), "--batch-size", str(batch_size),
                   "--workers", str(workers), "--model", "tiny", "--precision", "fp32", "--epochs", "1",
                   "--lr", "1e-3", "--wd", "0.1", "--warmup", "5", "--log-every-n-steps", str(LOG_EVERY),
                   "--logs", run, "--name", "bench", "--report-to", "", "--save-frequency", "0", "--device", "cpu"]
        env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        proc = subprocess.run(command, cwd=run, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"open_clip_train failed:\n{proc.stderr[-3000:]}")
        log = (Path(run) / "bench" / "out.log").read_text()
    rates = [float(m) for m in re.findall(r"([\d.]+)/s/gpu", log)]
    return statistics.median(rates[1:-1])  # drop start-up and the final (partial) window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    spec = shards(max(8192, args.steps * args.batch_size))
    ours_best = theirs_best = 0.0
    for _ in range(args.repeats):
        ours_best = max(ours_best, ours(args.steps, args.batch_size, args.workers))
        theirs_best = max(theirs_best, theirs(spec, args.steps, args.batch_size, args.workers))
    print(f"tiny (64 px), batch {args.batch_size}, fp32, {args.workers} worker(s), {args.steps} steps, "
          f"CPU, {os.cpu_count()} cores (reference env: {REFERENCE_VENV.name})")
    print(f"  ours      {ours_best:8.1f} samples/s")
    print(f"  open_clip {theirs_best:8.1f} samples/s")
    print(f"  ratio     {ours_best / theirs_best:8.2f}x (ours / open_clip)")


if __name__ == "__main__":
    main()
