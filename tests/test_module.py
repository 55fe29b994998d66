"""The LightningModule: logit_scale clamped after every optimizer step, per-step LR schedule."""

import math

import pytest
import pytorch_lightning as pl
import torch

from multimodal.data.datamodule import ShardDataModule
from multimodal.data.shards import write_synthetic
from multimodal.module import CLIPModule


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic(folder, num_samples=64, shard_size=16)
    return str(folder)


def fit(module: CLIPModule, shards: str, steps: int, tmp_path) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ShardDataModule(shards, batch_size=8, num_workers=0, shuffle_buffer=16))
    return trainer


@pytest.mark.parametrize("start,expected", [(10.0, math.log(100)), (-3.0, 0.0)])
def test_logit_scale_is_clamped_after_each_step(shards, tmp_path, start, expected):
    module = CLIPModule("tiny", lr=1e-6, warmup_steps=1)
    with torch.no_grad():
        module.model.logit_scale.fill_(start)
    fit(module, shards, steps=2, tmp_path=tmp_path)
    assert module.model.logit_scale.item() == pytest.approx(expected, abs=1e-6)


def test_learning_rate_follows_warmup_then_cosine_per_step(shards, tmp_path):
    module = CLIPModule("tiny", lr=1e-3, warmup_steps=4, min_lr_ratio=0.0)
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(accelerator="cpu", max_steps=12, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ShardDataModule(shards, batch_size=8, num_workers=0, shuffle_buffer=0))
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    groups = trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
