"""The commands on a GPU, as a user runs them: training in bf16 with the JPEGs decoded on the device, an
exact resume of it, and embeddings whose device-decoded pixels give the workers' vectors. Skipped without
CUDA (the CPU runs of the same paths are in test_cli, test_resume and test_decode)."""

import csv
import math

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

DEBUG = str(REPO / "configs" / "debug.yaml")
ON_GPU = ("--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed", "--data.decode", "gpu")
NO_LIMIT = 1 << 40  # CUDA's driver and caching allocator map far more than the CPU suite's heap cap


def test_a_gpu_run_trains_resumes_exactly_and_embeds_as_the_workers_do(tmp_path):
    first = run_cli("train", "--config", DEBUG, *ON_GPU, "--trainer.max_steps", "12", cwd=tmp_path, memory=NO_LIMIT)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "debug" / "version_0"
    second = run_cli("train", "--config", str(run / "config.yaml"), "--resume", str(run),
                     "--trainer.max_steps", "20", cwd=tmp_path, memory=NO_LIMIT)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r["train/loss"]]
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 19, steps  # one row a logging step, across the resume
    losses = [float(r["train/loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < math.log(32), losses
    print(f"gpu losses by logging step: {dict(zip(steps, [round(x, 3) for x in losses]))}")

    ckpt = run / "checkpoints" / "last.ckpt"
    vectors = {}
    for decode in ("gpu", "cpu"):
        out = tmp_path / f"emb-{decode}"
        proc = run_cli("embed", "--checkpoint", str(ckpt), "--shards", str(tmp_path / "runs/debug/data/val"),
                       "--out", str(out), "--decode", decode, "--accelerator", "gpu", cwd=tmp_path, memory=NO_LIMIT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        vectors[decode] = (np.load(out / "img_emb" / "part-00000.npy").astype(np.float32),
                           (out / "img_index" / "part-00000.jsonl").read_text(),
                           np.load(out / "text_emb" / "part-00000.npy").astype(np.float32))
    (gpu, gpu_rows, gpu_text), (cpu, cpu_rows, cpu_text) = vectors["gpu"], vectors["cpu"]
    assert gpu_rows == cpu_rows and gpu.shape == cpu.shape and np.array_equal(gpu_text, cpu_text)
    cosine = (gpu * cpu).sum(1) / (np.linalg.norm(gpu, axis=1) * np.linalg.norm(cpu, axis=1))
    print(f"image embeddings, nvJPEG vs the workers' decoder: cosine min {cosine.min():.4f}, "
          f"mean {cosine.mean():.4f}")
    assert cosine.min() > 0.98, cosine.min()


def test_vit_b_32_trains_eager_in_bf16_with_finite_losses(tmp_path):
    """The run that stopped on NaN losses from its second step on an H200 (see `CLIPModule.on_fit_start`)."""
    proc = run_cli("train", "--config", DEBUG, *ON_GPU, "--model.model_name", "ViT-B-32", "--model.lr", "5e-4",
                   "--model.warmup_steps", "50", "--data.batch_size", "128", "--trainer.max_steps", "12",
                   "--trainer.log_every_n_steps", "1", "--data.synthetic.train_samples", "1536",
                   cwd=tmp_path, memory=NO_LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in csv.DictReader((tmp_path / "runs/debug/version_0/metrics.csv").open()) if r["train/loss"]]
    assert len(rows) == 12 and all(math.isfinite(float(r["train/loss"])) for r in rows), rows
    assert float(rows[-1]["train/nonfinite_steps"]) == 0
