"""FLOPs per sample against the transformer arithmetic, the step timer, and the logged throughput."""

import csv

import pytest
import torch

from multimodal import arch, throughput
from multimodal.loss import clip_loss
from multimodal.model import create_model
from multimodal.throughput import StepTimer, flops_per_sample
from tests.conftest import REPO


def count(name: str, **lock) -> float:
    model = create_model(arch.load(name))
    if lock.get("image"):
        model.towers.lock_image_tower()
    return flops_per_sample(model, lambda m, i, t: clip_loss(m.encode_image(i), m.encode_text(t),
                                                             m.logit_scale.exp(), gather=False))


def transformer_forward_flops(tokens: int, width: int, layers: int) -> float:
    """2 FLOPs per multiply-add: QKV, output and 4x MLP projections, then the two attention matmuls."""
    return layers * (2 * tokens * 12 * width**2 + 2 * 2 * tokens**2 * width)


def test_vit_b_32_counts_three_forward_passes_of_the_arithmetic():
    image = transformer_forward_flops(50, 768, 12) + 2 * 49 * (3 * 32 * 32) * 768  # + patch embedding
    text = transformer_forward_flops(77, 512, 12)
    expected = 3 * (image + text)  # backward = 2 x forward
    assert count("ViT-B-32") == pytest.approx(expected, rel=0.03)


def test_a_locked_image_tower_needs_no_backward():
    plain, locked = count("tiny"), count("tiny", image=True)
    assert locked < 0.8 * plain


def test_step_timer_splits_step_time_into_compute_and_data_wait(monkeypatch):
    clock = iter([0.0, 0.3, 1.0, 1.3, 2.0, 2.3, 3.0])  # start, end, start, ...: 0.3 s compute, 0.7 s waiting
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    timer = StepTimer(window=10)
    assert timer.rates() is None
    for _ in range(3):
        timer.start(64)
        timer.end()
    timer.start(64)
    samples_per_second, wait = timer.rates()
    assert samples_per_second == pytest.approx(64.0)
    assert wait == pytest.approx(0.7)


def test_step_timer_leaves_out_paused_time(monkeypatch):
    clock = iter([0.0, 0.5, 1.0, 1.5, 100.0, 100.5, 101.0])  # a pause (validation) between 1.5 and 100
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    timer = StepTimer(window=10)
    timer.start(10)
    timer.end()
    timer.start(10)
    timer.end()
    timer.pause()
    timer.start(10)
    timer.end()
    timer.start(10)
    samples_per_second, wait = timer.rates()
    assert samples_per_second == pytest.approx(10.0) and wait == pytest.approx(0.5)


def test_peak_is_unknown_off_gpu():
    assert throughput.peak_tflops(torch.device("cpu")) is None


def test_training_logs_throughput_data_wait_and_mfu(cli, tmp_path):
    proc = cli("train", "--config", str(REPO / "configs" / "debug.yaml"), "--trainer.max_steps", "10",
               "--model.peak_tflops", "1.0", "--data.val_shards", "null", "--data.synthetic.val_samples", "0",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "runs" / "debug" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/mfu")]
    assert rows
    last = rows[-1]
    assert 0.0 <= float(last["train/data_wait_fraction"]) < 1.0
    tflops = float(last["train/tflops_per_device"])
    assert float(last["train/mfu"]) == pytest.approx(tflops / 1.0)
    # tiny: 0.25 GFLOPs a sample, so TFLOP/s = samples/s x 0.25e-3
    assert tflops == pytest.approx(float(last["train/samples_per_second_per_device"]) * 0.25e-3, rel=0.1)
