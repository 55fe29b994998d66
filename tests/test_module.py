"""The LightningModule: logit_scale clamped after every optimizer step, per-step LR schedule; the loss it is
built with, chosen by what the loss class declares."""

import inspect
import math
import typing

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import MixedPrecision

from multimodal.data.datamodule import ShardDataModule
from multimodal.data.shards import write_synthetic
from multimodal.errors import UserError
from multimodal.loss import LOSSES, ClipLoss
from multimodal.module import CLIPModule
from multimodal.recipe import build_module


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
    module = build_module("tiny", lr=1e-6, warmup_steps=1)
    with torch.no_grad():
        module.model.logit_scale.fill_(start)
    fit(module, shards, steps=2, tmp_path=tmp_path)
    assert module.model.logit_scale.item() == pytest.approx(expected, abs=1e-6)


def test_learning_rate_follows_warmup_then_cosine_per_step(shards, tmp_path):
    module = build_module("tiny", lr=1e-3, warmup_steps=4, min_lr_ratio=0.0)
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


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_steps(shards, tmp_path, precision):
    """On CPU, Lightning turns a plain precision="16-mixed" into bf16; the plugin keeps fp16 + scaling."""
    module = build_module("tiny", lr=1e-3, warmup_steps=1)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *args):
            losses.append(outputs["loss"].item())

    trainer = pl.Trainer(accelerator="cpu", plugins=[MixedPrecision(precision, "cpu")], max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Record()], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ShardDataModule(shards, batch_size=8, num_workers=0, shuffle_buffer=16))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert (scaler is not None) == (precision == "16-mixed")  # gradient scaling only for fp16
    assert module.model.logit_scale.dtype == torch.float32  # master weights stay fp32


def test_the_loss_choices_are_the_losses():
    assert typing.get_args(inspect.signature(build_module).parameters["loss"].annotation) == tuple(LOSSES)


def test_a_new_loss_is_checked_and_built_by_what_its_class_declares(monkeypatch):
    """The recipe asks a loss class what it needs, never its name: one entry in LOSSES is the whole wiring."""

    class Cacheless(ClipLoss):
        init_logit_scale, init_logit_bias = math.log(5), -3.0
        supports_micro_batches = False

    class Captioning(ClipLoss):
        needs_caption_decoder = True

    monkeypatch.setitem(LOSSES, "cacheless", Cacheless)
    monkeypatch.setitem(LOSSES, "captioning", Captioning)
    module = build_module("tiny", loss="cacheless")
    assert type(module.loss) is Cacheless
    assert module.model.logit_scale.item() == pytest.approx(math.log(5)) and module.model.logit_bias.item() == -3.0
    with pytest.raises(UserError, match="model.loss cacheless needs more of each sample than its features"):
        build_module("tiny", loss="cacheless", micro_batches=2)
    with pytest.raises(UserError, match="model.loss captioning trains a CoCa architecture's caption decoder: tiny"):
        build_module("tiny", loss="captioning")
