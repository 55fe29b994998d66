"""Mid-epoch resume: optimizer, scheduler, step and random state restored; the stream positioned so
that no sample of the current pass is seen twice (or, resampled, drawn afresh)."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from multimodal.data.datamodule import ShardDataModule
from multimodal.data.shards import write_synthetic
from multimodal.errors import UserError
from multimodal.module import CLIPModule
from multimodal.recipe import build_module

SAMPLES, SHARD, BATCH = 384, 48, 16  # 8 shards, 24 batches: one exact pass per epoch


class Keys(pl.Callback):
    """The sample keys of every trained batch, in order."""

    def __init__(self):
        self.steps: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(list(batch.keys))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "train"
    write_synthetic(folder, num_samples=SAMPLES, shard_size=SHARD)
    return folder


def fit(shards: Path, root: Path, max_steps: int, ckpt: Path | None = None, workers: int = 2,
        resampled: bool = False, max_epochs: int | None = None, every: int | None = None
        ) -> tuple[Keys, CLIPModule, pl.Trainer]:
    pl.seed_everything(0)
    module = build_module(model_name="tiny", warmup_steps=2, count_flops=False)
    data = ShardDataModule(str(shards), batch_size=BATCH, num_workers=workers, shuffle_buffer=64,
                           resampled=resampled, num_samples=SAMPLES if resampled else None)
    keys = Keys()
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=max_epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         callbacks=[keys, ModelCheckpoint(dirpath=root / "ckpt", save_last=True,
                                                          every_n_train_steps=every or max_steps)])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return keys, module, trainer


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_epoch_sees_every_sample_once(shards, tmp_path, workers):
    whole, _, _ = fit(shards, tmp_path / "whole", max_steps=SAMPLES // BATCH, workers=workers)
    first, _, _ = fit(shards, tmp_path / "run", max_steps=9, workers=workers)
    second, module, trainer = fit(shards, tmp_path / "run", max_steps=SAMPLES // BATCH, workers=workers,
                                  ckpt=tmp_path / "run" / "ckpt" / "last.ckpt")
    assert trainer.global_step == SAMPLES // BATCH and len(second.steps) == SAMPLES // BATCH - 9
    seen = [k for step in first.steps + second.steps for k in step]
    assert len(seen) == len(set(seen)) == SAMPLES  # nothing replayed, nothing skipped
    # the very batches of the uninterrupted run: each worker's stream continued exactly (with two
    # workers the DataLoader restarts its round robin at worker 0, so only the interleaving differs)
    assert sorted(sorted(s) for s in first.steps + second.steps) == sorted(sorted(s) for s in whole.steps)
    if workers == 0:
        assert [sorted(s) for s in first.steps + second.steps] == [sorted(s) for s in whole.steps]


def test_resume_from_the_last_batch_of_an_epoch_loses_no_epoch(shards, tmp_path):
    """A checkpoint written on an epoch's last step (every_n_train_steps dividing the epoch) resumes at
    the next epoch: Lightning 2.6 alone would count the finished epoch twice and train one fewer (here
    none: 24 steps where 48 are due)."""
    epoch = SAMPLES // BATCH
    whole, _, uninterrupted = fit(shards, tmp_path / "whole", max_steps=-1, max_epochs=2, workers=0, every=epoch)
    first, _, _ = fit(shards, tmp_path / "run", max_steps=epoch, workers=0)
    second, _, trainer = fit(shards, tmp_path / "run", max_steps=-1, max_epochs=2, workers=0, every=epoch,
                             ckpt=tmp_path / "run" / "ckpt" / "last.ckpt")
    assert uninterrupted.global_step == 2 * epoch
    assert trainer.global_step == 2 * epoch and trainer.current_epoch == uninterrupted.current_epoch
    assert first.steps + second.steps == whole.steps  # the same epochs, the same order


def test_a_finished_run_ends_with_last_ckpt_at_its_final_step(shards, tmp_path):
    """Checkpoints every 4 steps, 6 steps in all: `last.ckpt` is step 6, not step 4."""
    fit(shards, tmp_path, max_steps=6, workers=0, every=4)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_resume_restores_optimizer_scheduler_and_random_state(shards, tmp_path):
    fit(shards, tmp_path, max_steps=5, workers=0)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5 and ckpt["lr_schedulers"][0]["last_epoch"] == 5
    assert ckpt["optimizer_states"][0]["state"]  # AdamW moments
    assert ckpt["ShardDataModule"]["ranks"][0] == {0: [5, 5 * BATCH]}
    assert set(ckpt["rng_states"][0]) == {"python", "numpy", "torch", "cuda"}
    _, module, trainer = fit(shards, tmp_path, max_steps=6, workers=0, ckpt=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 6
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6


def test_resampled_resume_draws_afresh(shards, tmp_path):
    first, _, _ = fit(shards, tmp_path, max_steps=4, workers=0, resampled=True)
    second, _, _ = fit(shards, tmp_path, max_steps=8, workers=0, resampled=True, ckpt=tmp_path / "ckpt" / "last.ckpt")
    again, _, _ = fit(shards, tmp_path / "fresh", max_steps=8, workers=0, resampled=True)
    assert second.steps[0] != again.steps[4]  # not the original run's continuation: a new seed
    assert len(second.steps) == 4


def test_resume_mid_epoch_with_other_workers_is_one_sentence(shards, tmp_path):
    fit(shards, tmp_path, max_steps=3, workers=2)
    with pytest.raises(UserError, match="with the same"):
        fit(shards, tmp_path, max_steps=6, workers=1, ckpt=tmp_path / "ckpt" / "last.ckpt")


def test_resume_a_run_folder_through_the_cli(cli, tmp_path):
    from tests.conftest import REPO

    config = str(REPO / "configs" / "debug.yaml")
    first = cli("train", "--config", config, "--trainer.max_steps", "12", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "debug" / "version_0"
    second = cli("train", "--config", str(run / "config.yaml"), "--resume", str(run),
                 "--trainer.max_steps", "20", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not (tmp_path / "runs" / "debug" / "version_1").exists()  # logs on in its own folder
    steps = [int(line.split(",")[1]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps.count(4) == 1 and 19 in steps  # the rows of both runs; the second did not start afresh

    missing = cli("train", "--config", config, "--resume", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 2 and "Nothing to resume" in missing.stderr and "Traceback" not in missing.stderr


def test_random_states_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    from multimodal.checkpoint import rng_states, set_rng_states

    torch.save({"rng": rng_states()}, tmp_path / "s.pt")
    drawn = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_states(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert drawn[:2] == again[:2] and torch.equal(drawn[2], again[2])


def test_a_run_resumed_from_an_older_checkpoint_goes_on_writing_its_last_ckpt(shards, tmp_path):
    """Resumed from step 2's checkpoint (not last.ckpt, at step 4): last.ckpt ends at the final step, and no
    last-v1.ckpt is written beside it for a later resume to miss."""
    from multimodal.checkpoint import FinalCheckpoint

    def run(max_steps: int, ckpt: Path | None = None) -> None:
        pl.seed_everything(0)
        data = ShardDataModule(str(shards), batch_size=BATCH, num_workers=0, shuffle_buffer=64)
        trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[FinalCheckpoint(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True,
                                                                           every_n_train_steps=2, save_top_k=-1)])
        trainer.fit(build_module(model_name="tiny", warmup_steps=2, count_flops=False), datamodule=data,
                    ckpt_path=ckpt)

    run(4)
    run(7, tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert [n for n in names if n.startswith("last")] == ["last.ckpt"], names
    assert "epoch=0-step=4.ckpt" in names and "epoch=0-step=4-v1.ckpt" in names  # both timelines' step 4 kept
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 7
