"""Benchmark: our training throughput against a bare PyTorch loop and open_clip's trainer, in one run.

    python scripts/bench_train.py [--steps 48] [--batch-size 128] [--workers 1] [--repeats 3]
    python scripts/bench_train.py --accelerator gpu [--model ViT-B-32] [--compile] [--no-open-clip]

Three runs of the same architecture, batch size, AdamW (lr 1e-3 and 5 warmup steps on the CPU, 5e-4 and 50 on
a GPU; weight decay 0.1, betas (0.9, 0.98), eps 1e-6) and precision (fp32 on the CPU, bf16 autocast on a GPU):
- bare: the ceiling. Our model (open_clip's towers), our `clip_loss`, fused AdamW, one random batch
  resident on the device: no Lightning, no data loading, no logging. Timed after warm-up
  (compilation included in the warm-up with `--compile`).
- ours: `multimodal train` on synthetic webdataset shards (.bench/, written once at the model's input
  size), reading train/samples_per_second from metrics.csv (the first window, the loader's start,
  dropped). Also "ours, no data": our LightningModule and Trainer on the bare loop's resident batch,
  which separates the step's own cost from data loading's.
- open_clip: `python -m open_clip_train.main` on the same shards with the same workers, in its own
  virtual environment (.venv-openclip, created on first use: its pipeline needs webdataset <= 0.2.86),
  reading its "N/s/gpu" log lines (the first and the last, partial, window dropped).
  `--no-open-clip` leaves it out (a machine without network).
The default, the CPU: the project's `tiny` architecture (a 2-layer, 128-wide ViT at 64 px and a
2-layer text tower; registered with the reference's open_clip too).

Every run is measured the same way: samples/s over windows of 4 steps. The runs alternate
`--repeats` times and each reports the median of all its windows, with the quartiles: on a shared
machine a 4-step window of the bare loop alone swings by +-12 % from one minute to the next, so
neither a single run nor the best of a few is a fair ratio. Last, the data pipeline's own cost a
sample: one worker's batches of the same shards taken as fast as they come (`bench_data.ours`).
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
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_data import REFERENCE_VENV, reference_python  # noqa: E402
from bench_data import ours as stream_rate  # noqa: E402

from multimodal import arch  # noqa: E402
from multimodal.arch import Architecture  # noqa: E402
from multimodal.data.shards import write_synthetic  # noqa: E402
from multimodal.loss import clip_loss  # noqa: E402
from multimodal.model import create_model  # noqa: E402
from multimodal.optim import param_groups  # noqa: E402

LOG_EVERY = 4
LR, WEIGHT_DECAY, BETAS, EPS = 1e-3, 0.1, (0.9, 0.98), 1e-6


@dataclass(frozen=True)
class Setting:
    architecture: Architecture
    batch_size: int
    steps: int
    workers: int
    gpu: bool
    compile: bool

    @property
    def precision(self) -> str:
        return "bf16-mixed" if self.gpu else "32-true"

    @property
    def lr(self) -> float:
        """DataComp's ViT-B-32 rate on a GPU (1e-3 with 5 warm-up steps took ViT-B-32 to NaN by step 10 in bf16 on
        an H200); the tiny model's on the CPU."""
        return 5e-4 if self.gpu else LR

    @property
    def warmup(self) -> int:
        return 50 if self.gpu else 5

    @property
    def shards(self) -> Path:
        return REPO / ".bench" / f"train-synthetic-{self.architecture.image_size}"


def shards(setting: Setting, samples: int) -> str:
    folder = setting.shards
    if not (folder / "sizes.json").is_file() or sum(1 for _ in folder.glob("*.tar")) * 256 < samples:
        shutil.rmtree(folder, ignore_errors=True)
        write_synthetic(folder, samples, shard_size=256, image_size=setting.architecture.image_size)
    tars = sorted(folder.glob("*.tar"))
    return str(folder / f"shard-{{000000..{len(tars) - 1:06d}}}.tar")


def bare(setting: Setting) -> list[float]:
    """Samples/s of a plain loop, each window of LOG_EVERY steps: model, loss and fused AdamW on a batch
    resident on the device."""
    device = torch.device("cuda" if setting.gpu else "cpu")
    torch.manual_seed(0)
    model = create_model(setting.architecture).to(device).train()
    if setting.compile:
        model.towers.visual.compile()
        model.towers.transformer.compile()
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=setting.lr, betas=BETAS, eps=EPS, fused=True)
    size = setting.architecture.image_size
    images = torch.randn(setting.batch_size, 3, size, size, device=device)
    tokens = setting.architecture.tokenizer(["a photo of a thing"] * setting.batch_size).to(device)
    tokens[:, 1:6] = torch.randint(1, 40000, (setting.batch_size, 5), device=device)  # distinct captions

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting.gpu):
            loss = clip_loss(model.encode_image(images), model.encode_text(tokens), model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(10 if setting.compile else 3):
        step()
    rates = []
    for _ in range(setting.steps // LOG_EVERY):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(LOG_EVERY):
            step()
        synchronize(device)
        rates.append(LOG_EVERY * setting.batch_size / (time.perf_counter() - start))
    return rates


def step_only(setting: Setting) -> list[float]:
    """Samples/s of our LightningModule and Trainer on the bare loop's resident batch, no loader, each
    window of LOG_EVERY steps: what the training step itself costs over the bare loop, apart from data
    loading."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from multimodal.recipe import build_module

    size, warm = setting.architecture.image_size, 10 if setting.compile else 3
    batch = {"image": torch.randn(setting.batch_size, 3, size, size),
             "text": setting.architecture.tokenizer(["a photo of a thing"] * setting.batch_size)}
    times = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step >= warm and (trainer.global_step - warm) % LOG_EVERY == 0:
                synchronize(trainer.strategy.root_device)
                times.append(time.perf_counter())

    module = build_module(setting.architecture.name, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS,
                          warmup_steps=5, compile=setting.compile, count_flops=False)
    trainer = pl.Trainer(accelerator="gpu" if setting.gpu else "cpu", devices=1, precision=setting.precision,
                         max_steps=warm + setting.steps + 1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
                         log_every_n_steps=LOG_EVERY)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * (warm + setting.steps + 1), batch_size=None,
                                                     pin_memory=setting.gpu))
    return [LOG_EVERY * setting.batch_size / (end - start) for start, end in zip(times, times[1:])]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(setting: Setting, spec: str) -> list[float]:
    """Samples/s of `multimodal train` on the shards `spec`, each window of LOG_EVERY steps, from its
    metrics.csv."""
    with tempfile.TemporaryDirectory() as run:
        command = [sys.executable, "-m", "multimodal", "train", "--config", str(REPO / "configs" / "debug.yaml"),
                   "--data.train_shards", spec, "--data.synthetic", "null", "--data.val_shards", "null",
                   "--model.model_name", setting.architecture.name, "--model.compile", str(setting.compile).lower(),
                   "--data.batch_size", str(setting.batch_size), "--data.num_workers", str(setting.workers),
                   "--data.shuffle_buffer", "1000", "--model.lr", str(setting.lr),
                   "--model.weight_decay", str(WEIGHT_DECAY), "--model.warmup_steps", str(setting.warmup),
                   "--trainer.max_steps", str(setting.steps + 2 * LOG_EVERY),
                   "--trainer.precision", setting.precision, "--trainer.accelerator", "gpu" if setting.gpu else "cpu",
                   "--trainer.log_every_n_steps", str(LOG_EVERY), "--trainer.enable_progress_bar", "false",
                   "--trainer.callbacks", "[]"]
        proc = subprocess.run(command, cwd=run, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"multimodal train failed:\n{proc.stderr[-3000:]}")
        with open(Path(run) / "runs" / "debug" / "version_0" / "metrics.csv") as f:
            rates = [float(r["train/samples_per_second"]) for r in csv.DictReader(f) if r["train/samples_per_second"]]
    return rates[1:]  # the first window holds the loader's start


def register_tiny(python: Path) -> None:
    found = subprocess.run([str(python), "-c", "import open_clip, os; print(os.path.dirname(open_clip.__file__))"],
                           capture_output=True, text=True, check=True, env={"HF_HUB_OFFLINE": "1"})
    shutil.copyfile(REPO / "configs" / "models" / "tiny.json",
                    Path(found.stdout.strip()) / "model_configs" / "tiny.json")


def theirs(spec: str, setting: Setting) -> list[float]:
    python = reference_python()
    register_tiny(python)
    with tempfile.TemporaryDirectory() as run:
        command = [str(python), "-m", "open_clip_train.main", "--train-data", spec, "--dataset-type", "webdataset",
                   "--train-num-samples", str((setting.steps + 2 * LOG_EVERY) * setting.batch_size),
                   "--batch-size", str(setting.batch_size), "--workers", str(setting.workers),
                   "--model", setting.architecture.name, "--epochs", "1",
                   "--precision", "amp_bf16" if setting.gpu else "fp32",
                   "--lr", str(setting.lr), "--wd", str(WEIGHT_DECAY), "--beta1", str(BETAS[0]),
                   "--beta2", str(BETAS[1]), "--eps", str(EPS), "--warmup", str(setting.warmup),
                   "--log-every-n-steps", str(LOG_EVERY), "--logs", run,
                   "--name", "bench", "--report-to", "", "--save-frequency", "0",
                   *(["--torchcompile"] if setting.compile else []), "--device", "cuda" if setting.gpu else "cpu"]
        env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        proc = subprocess.run(command, cwd=run, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"open_clip_train failed:\n{proc.stderr[-3000:]}")
        log = (Path(run) / "bench" / "out.log").read_text()
    rates = [float(m) for m in re.findall(r"([\d.]+)/s/gpu", log)]
    return rates[1:-1]  # drop start-up and the final (partial) window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default="auto",
                        help="auto: the GPU where CUDA is present")
    parser.add_argument("--model", default=None, help="architecture (default: tiny on the CPU, ViT-B-32 on a GPU)")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on the CPU, 256 on a GPU")
    parser.add_argument("--workers", type=int, default=None, help="default: 1 on the CPU, 12 on a GPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the towers (ours, bare and open_clip)")
    parser.add_argument("--no-open-clip", action="store_true", help="leave out open_clip_train")
    args = parser.parse_args()
    gpu = args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available())
    setting = Setting(arch.load(args.model or ("ViT-B-32" if gpu else "tiny")),
                      args.batch_size or (256 if gpu else 128), args.steps,
                      args.workers if args.workers is not None else (12 if gpu else 1), gpu, args.compile)
    spec = shards(setting, max(8192, (args.steps + 2 * LOG_EVERY) * setting.batch_size))
    windows: dict[str, list[float]] = {"bare": [], "ours": [], "ours, no data": [], "open_clip": []}
    for _ in range(args.repeats):  # alternate, so that none gets a quieter stretch of the machine
        windows["bare"] += bare(setting)
        windows["ours"] += ours(setting, spec)
        windows["ours, no data"] += step_only(setting)
        if not args.no_open_clip:
            windows["open_clip"] += theirs(spec, setting)
    rate = {name: statistics.median(w) for name, w in windows.items() if w}
    device = torch.cuda.get_device_name() if gpu else f"CPU, {os.cpu_count()} cores"
    print(f"{setting.architecture.name} ({setting.architecture.image_size} px), batch {setting.batch_size}, "
          f"{'bf16' if gpu else 'fp32'}{', compiled' if setting.compile else ''}, {setting.workers} worker(s), "
          f"{setting.steps} steps x {args.repeats}, {device}"
          + ("" if args.no_open_clip else f" (reference env: {REFERENCE_VENV.name})"))
    print(f"  samples/s over windows of {LOG_EVERY} steps: median (quartiles), windows")
    for name, w in windows.items():
        if w:
            low, _, high = statistics.quantiles(w, n=4) if len(w) > 1 else (w[0], w[0], w[0])
            print(f"  {name:<14}{rate[name]:9.1f} ({low:.0f}-{high:.0f}), {len(w)}")
    print(f"  ours / bare      {rate['ours'] / rate['bare']:6.2f}x "
          f"(the step alone, on a resident batch: {rate['ours, no data'] / rate['bare']:.2f}x)")
    if "open_clip" in rate:
        print(f"  ours / open_clip {rate['ours'] / rate['open_clip']:6.2f}x")
    # what separates "ours" from "ours, no data": the CPU time of the data pipeline, on these shards
    alone = stream_rate(setting.architecture, spec, setting.batch_size, workers=1, batches=20, normalize=False)
    print(f"  data: one worker alone yields {alone:.0f} samples/s, {1e6 / alone:.0f} us of CPU a sample")


if __name__ == "__main__":
    main()
