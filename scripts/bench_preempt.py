"""Benchmark: how long a preempted run takes to leave, from SLURM's signal to the requeue and to its exit.

    python scripts/bench_preempt.py [--models tiny ViT-B-32] [--repeats 2] [--batch-size 4]

Each run is `multimodal train` of the debug config (synthetic shards, CPU, fp32, batch --batch-size; a CSV row
every step) with SLURM_JOB_ID set and a stand-in `scontrol` on PATH that records when it is called. Once a
step's row is in metrics.csv (the next step has just begun: the worst moment, a whole step to finish) the
script sends SIGUSR1 and measures, from the signal:
- checkpoint: last.ckpt in place (its modification time: the atomic write's rename);
- requeue: the stand-in scontrol called by rank 0;
- exit: the process gone (data workers stopped, interpreter closed).
Beside them: the model's parameter count, last.ckpt's size (weights and AdamW's two moments, fp32) and the
median step time of the run before the signal. Times are the median over --repeats runs. On the CPU the
step dominates ViT-B-32's figures (a 1.8 GB checkpoint of ~151M parameters); on a GPU the step is short and
the checkpoint write (file system bandwidth) is what --signal's lead time has to cover.
"""

import argparse
import csv
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEBUG = REPO / "configs" / "debug.yaml"
LOGGER = ('[{"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs", '
          '"name": "debug", "flush_logs_every_n_steps": 1}}]')
SCONTROL = """#!/usr/bin/env bash
echo "$(date +%s.%N) $*" >> "$SCONTROL_CALLS"
"""


def steps_logged(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    return [row for row in csv.DictReader(metrics.read_text().splitlines()) if row.get("train/loss")]


def one_run(folder: Path, model: str, batch: int, after_step: int) -> dict:
    """One preempted run in `folder`: its figures, in seconds and bytes."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    calls = folder / "scontrol-calls.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SCONTROL_CALLS": str(calls),
           "SLURM_JOB_ID": "4242", "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "multimodal", "train", "--config", str(DEBUG), "--model.model_name", model,
            "--data.batch_size", str(batch), "--data.synthetic.train_samples", str(64 * batch),
            "--data.synthetic.shard_size", str(16 * batch), "--data.val_shards", "null",
            "--data.synthetic.val_samples", "0", "--trainer.max_steps", "1000", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", LOGGER, "--trainer.callbacks", "[]"]
    run = folder / "runs" / "debug" / "version_0"
    with open(folder / "stderr.txt", "w") as stderr:
        child = subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    while len(steps_logged(run / "metrics.csv")) <= after_step:
        if child.poll() is not None:
            raise SystemExit(f"the run ended early:\n{(folder / 'stderr.txt').read_text()[-3000:]}")
        time.sleep(0.01)
    rows = steps_logged(run / "metrics.csv")
    signalled = time.time()
    os.kill(child.pid, signal.SIGUSR1)
    status = child.wait()
    exited = time.time()
    if status != 75 or not calls.is_file():
        raise SystemExit(f"exit status {status}:\n{(folder / 'stderr.txt').read_text()[-3000:]}")
    last = run / "checkpoints" / "last.ckpt"
    rates = [float(r["train/samples_per_second"]) for r in rows if r.get("train/samples_per_second")]
    return {"checkpoint": last.stat().st_mtime - signalled, "requeue": float(calls.read_text().split()[0]) - signalled,
            "exit": exited - signalled, "bytes": last.stat().st_size, "step": batch / statistics.median(rates)}


def parameters(model: str) -> int:
    sys.path.insert(0, str(REPO))
    from multimodal import arch
    from multimodal.model import create_model

    return sum(p.numel() for p in create_model(arch.load(model)).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "ViT-B-32"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--after-step", type=int, default=3, help="signal once this many steps are logged")
    args = parser.parse_args()
    print(f"{'model':<10} {'params':>8} {'last.ckpt':>10} {'step':>7} {'checkpoint':>11} {'requeue':>8} "
          f"{'exit':>7}   (seconds after SIGUSR1; median of {args.repeats})")
    for model in args.models:
        runs = []
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="bench-preempt-") as tmp:
                runs.append(one_run(Path(tmp), model, args.batch_size, args.after_step))
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"{model:<10} {parameters(model) / 1e6:>7.1f}M {median['bytes'] / 1e9:>8.2f}GB {median['step']:>6.2f}s "
              f"{median['checkpoint']:>10.2f}s {median['requeue']:>7.2f}s {median['exit']:>6.2f}s", flush=True)


if __name__ == "__main__":
    main()
