"""A training step reads no device value on the host, except on logging steps.

On a GPU such a read (`.item()`, `float()`, `bool()` of a tensor, all of which call
`aten._local_scalar_dense`) makes the CPU wait for every queued kernel before it can queue the
next step's. On the CPU the same calls are visible to a `TorchDispatchMode`: real training steps
run under one that records each call with the batch it happened in.
"""

import os
import traceback

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode

from multimodal.data.datamodule import ShardDataModule
from multimodal.data.shards import write_synthetic
from multimodal.monitor import RunProgressBar
from multimodal.recipe import build_module

LOG_EVERY = 4


class HostReads(TorchDispatchMode):
    """Records every `aten._local_scalar_dense` of this process with the current batch index."""

    def __init__(self):
        super().__init__()
        self.pid, self.batch, self.reads = os.getpid(), None, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and os.getpid() == self.pid:  # not in forked workers
            self.reads.append((self.batch, "".join(traceback.format_stack(limit=14)[:-1])))
        return func(*args, **(kwargs or {}))


class Record(pl.Callback):
    def __init__(self, mode: HostReads):
        self.mode = mode

    def on_train_start(self, trainer, pl_module):
        self.mode.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode.batch = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.mode.__exit__(None, None, None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sync-shards")
    write_synthetic(folder, num_samples=256, shard_size=32, image_size=64)
    return str(folder)


@pytest.mark.parametrize("precision,micro_batches,decode", [("32-true", 1, "cpu"), ("bf16-mixed", 2, "cpu"),
                                                            ("32-true", 1, "gpu")])
def test_training_steps_read_device_values_only_on_logging_steps(shards, tmp_path, precision, micro_batches, decode):
    """fp32; bf16 with gradient-cached micro-batches; and JPEGs decoded on the device (here the CPU)."""
    mode = HostReads()
    module = build_module("tiny", lr=1e-3, warmup_steps=2, micro_batches=micro_batches)
    trainer = pl.Trainer(accelerator="cpu", precision=precision, max_steps=12, log_every_n_steps=LOG_EVERY,
                         logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[RunProgressBar(), Record(mode)], gradient_clip_val=1.0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ShardDataModule(shards, batch_size=16, num_workers=1, shuffle_buffer=64,
                                                   decode=decode))
    assert trainer.global_step == 12

    logging_steps = {step for step in range(12) if (step + 1) % LOG_EVERY == 0}
    steps_with_reads = {batch for batch, _ in mode.reads}
    others = [stack for batch, stack in mode.reads if batch not in logging_steps]
    assert not others, f"host reads in steps {sorted(steps_with_reads)}; one outside logging steps:\n{others[0]}"
    assert steps_with_reads == logging_steps  # the recorder sees the reads that logging makes
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = metrics.splitlines()[0].split(",")
    assert {"train/loss", "train/lr", "train/samples_per_second", "train/nonfinite_steps"} <= set(header)


def test_batches_move_to_an_accelerator_without_waiting_for_it(monkeypatch):
    """Lightning moves a typed batch by calling its `to(device)` with no flag (it passes non_blocking only
    to bare tensors): the batch copies asynchronously to an accelerator ("meta" stands in for one here),
    synchronously to the CPU, and leaves the JPEG bytes on the host for the device decoder."""
    from lightning_fabric.utilities.apply_func import move_data_to_device

    from multimodal.data.batch import DeviceJpegs, EvalBatch, TrainBatch

    flags, to = [], torch.Tensor.to

    def recorded(self, *args, **kwargs):
        flags.append(kwargs.get("non_blocking"))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recorded)
    jpegs = DeviceJpegs.pack([b"\xff\xd8jpeg"], [(0, 0, 4, 4)])
    train = TrainBatch(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, 5, dtype=torch.long), ["a", "b"],
                       jpegs)
    moved = move_data_to_device(train, torch.device("meta"))
    assert flags == [True, True] and moved.image.is_meta and moved.text.is_meta
    assert moved.jpegs.data.device.type == "cpu"
    flags.clear()
    evaluation = EvalBatch(0, True, torch.zeros(1, 3, 4, 4, dtype=torch.uint8), [{}], torch.zeros(1, 5), [{}])
    move_data_to_device(evaluation, torch.device("meta"))
    move_data_to_device(evaluation, torch.device("cpu"))
    assert flags == [True, True, False, False]
