"""A training step reads no device value on the host, except on logging steps.

On a GPU such a read (`.item()`, `float()`, `bool()` of a tensor, all of which call
`aten._local_scalar_dense`) makes the CPU wait for every queued kernel before it can queue the
next step's. On the CPU the same calls are visible to a `TorchDispatchMode`: real training steps
run under one that records each call with the batch it happened in.
"""

import os
import traceback
import warnings

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
    """Runs training under `mode`; on CUDA also under the sync debug mode, which warns at every operation
    that makes the host wait for the device (a read, a blocking copy, `nonzero`...): recorded in `syncs`
    with the step and the stack."""

    def __init__(self, mode: HostReads):
        self.mode, self.syncs, self._shown = mode, [], None

    def _sync(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            step = -1 if self.mode.batch is None else self.mode.batch  # -1: set-up, before the first step
            self.syncs.append((step, "".join(traceback.format_stack(limit=14)[:-2])))
        else:
            self._shown(message, category, filename, lineno, file, line)

    def on_train_start(self, trainer, pl_module):
        self.mode.__enter__()
        if pl_module.device.type == "cuda":
            warnings.simplefilter("always")
            self._shown, warnings.showwarning = warnings.showwarning, self._sync
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode.batch = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.mode.__exit__(None, None, None)
        if self._shown is not None:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._shown


GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sync-shards")
    write_synthetic(folder, num_samples=256, shard_size=32, image_size=64)
    return str(folder)


@pytest.mark.parametrize("accelerator,precision,micro_batches,decode", [
    ("cpu", "32-true", 1, "cpu"), ("cpu", "bf16-mixed", 2, "cpu"), ("cpu", "32-true", 1, "gpu"),
    *([("gpu", "bf16-mixed", 1, "gpu"), ("gpu", "bf16-mixed", 2, "cpu"), ("gpu", "32-true", 1, "gpu")] if GPU else [])])
def test_training_steps_read_device_values_only_on_logging_steps(shards, tmp_path, accelerator, precision,
                                                                 micro_batches, decode):
    """fp32; bf16 with gradient-cached micro-batches; and JPEGs decoded on the device (the CPU here, and a GPU
    where there is one: there the sync debug mode also finds any other wait, after the first step's set-up)."""
    mode = HostReads()
    record = Record(mode)
    module = build_module("tiny", lr=1e-3, warmup_steps=2, micro_batches=micro_batches)
    trainer = pl.Trainer(accelerator=accelerator, precision=precision, max_steps=12, log_every_n_steps=LOG_EVERY,
                         logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[RunProgressBar(), record], gradient_clip_val=1.0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ShardDataModule(shards, batch_size=16, num_workers=1, shuffle_buffer=64,
                                                   decode=decode))
    assert trainer.global_step == 12

    logging_steps = {step for step in range(12) if (step + 1) % LOG_EVERY == 0}
    steps_with_reads = {batch for batch, _ in mode.reads}
    others = [stack for batch, stack in mode.reads if batch not in logging_steps]
    assert not others, f"host reads in steps {sorted(steps_with_reads)}; one outside logging steps:\n{others[0]}"
    assert steps_with_reads == logging_steps  # the recorder sees the reads that logging makes
    waits = [(step, stack) for step, stack in record.syncs if step not in logging_steps and step > 0]
    print(f"{accelerator}: {len(record.syncs)} synchronizing operations, in steps "
          f"{sorted({step for step, _ in record.syncs})}")
    assert not waits, f"{len(waits)} waits for the GPU outside logging steps; the first, in step {waits[0][0]}:\n" \
                      f"{waits[0][1]}"
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
