"""Weighted mixtures of shard sources (`data.train_weights`, open_clip's `data.upsampling_factors`): the shares
drawn follow the weights whatever the sources' sizes, every rank still gets equal full batches, a mid-epoch
resume continues the mixture exactly, the shares are logged, and bad weights are one sentence."""

import csv

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from multimodal import arch
from multimodal.data.datamodule import ShardDataModule
from multimodal.data.pipeline import ImageTextStream, StreamPosition
from multimodal.data.pixels import TrainCrop
from multimodal.data.shards import write_synthetic
from multimodal.errors import UserError
from multimodal.recipe import build_module
from tests.conftest import REPO
from tests.test_pipeline import batches, good, write_tar
from tests.test_resume import Keys

DEBUG = str(REPO / "configs" / "debug.yaml")


def source(folder, prefix: str, shards: int, per_shard: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_tar(folder / f"{prefix}{s}.tar", [good(f"{prefix}{s}_{i}") for i in range(per_shard)])
            for s in range(shards)]


def mixture(urls, weights, *, batch_size=50, num_batches=60, resampled=False, rank=0, world=1, seed=0):
    tiny = arch.load("tiny")
    return ImageTextStream(urls, weights=weights, crop=TrainCrop.of(tiny.preprocessing), tokenizer=tiny.tokenizer,
                           batch_size=batch_size,
                           num_batches=num_batches, resampled=resampled, shuffle_buffer=100, seed=seed,
                           position=StreamPosition(rank, world))


@pytest.mark.parametrize("resampled", [False, True])
def test_shares_follow_the_weights_not_the_sizes(tmp_path, resampled):
    """Source a holds 10x the samples of b, weighted 1 to 3: b gives 3/4 of 3,000 samples, cycling its
    30 samples many times over, a 1/4. Four standard deviations of the share are 0.032."""
    a = source(tmp_path / "a", "a", shards=3, per_shard=100)
    b = source(tmp_path / "b", "b", shards=1, per_shard=30)
    out = batches(mixture([a, b], (1.0, 3.0), resampled=resampled))
    keys = [k for batch in out for k in batch.keys]
    share_b = sum(k.startswith("b") for k in keys) / len(keys)
    assert len(keys) == 3000 and abs(share_b - 0.75) < 0.032, share_b
    assert [sum(batch.sources) for batch in out] == [50] * 60
    assert sum(batch.sources[1] for batch in out) == sum(k.startswith("b") for k in keys)  # counted as drawn
    if not resampled:  # each source cycles through all of its samples, pass after pass
        assert {k for k in keys if k.startswith("a")} <= {f"a{s}_{i}" for s in range(3) for i in range(100)}
        assert {k for k in keys if k.startswith("b")} == {f"b0_{i}" for i in range(30)}


def test_every_rank_gets_equal_full_batches_from_a_mixture(tmp_path):
    a = source(tmp_path / "a", "a", shards=4, per_shard=7)
    b = source(tmp_path / "b", "b", shards=2, per_shard=13)
    for rank in range(2):
        out = batches(mixture([a, b], (2.0, 1.0), batch_size=6, num_batches=9, rank=rank, world=2), num_workers=1)
        assert len(out) == 9 and all(len(batch) == 6 for batch in out)
        assert all(k.startswith(("a", "b")) for batch in out for k in batch.keys)


def test_a_zero_weight_source_is_never_drawn(tmp_path):
    a = source(tmp_path / "a", "a", shards=1, per_shard=20)
    b = source(tmp_path / "b", "b", shards=1, per_shard=20)
    out = batches(mixture([a, b], (0.0, 1.0), batch_size=10, num_batches=6))
    assert all(k.startswith("b") for batch in out for k in batch.keys)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    write_synthetic(root / "coco_like", num_samples=192, shard_size=48, image_size=64)
    write_synthetic(root / "cc_like", num_samples=64, shard_size=16, image_size=64, seed=1)
    return root


def fit(spec: str, root, max_steps: int, weights, ckpt=None, every=None):
    pl.seed_everything(0)
    data = ShardDataModule(spec, batch_size=16, num_workers=2, shuffle_buffer=32, train_weights=weights)
    keys = Keys()
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root,
                         callbacks=[keys, ModelCheckpoint(dirpath=root / "ckpt", save_last=True,
                                                          every_n_train_steps=every or max_steps)])
    trainer.fit(build_module(model_name="tiny", warmup_steps=2, count_flops=False), datamodule=data, ckpt_path=ckpt)
    return keys


def test_a_mixture_resumes_mid_epoch_exactly(two_sources, tmp_path):
    """256 samples, 16 batches an epoch: 7 steps, stop, resume to 16; the batches of the whole run."""
    spec = f"{two_sources / 'coco_like'}::{two_sources / 'cc_like'}"
    whole = fit(spec, tmp_path / "whole", 16, [1, 1])
    first = fit(spec, tmp_path / "run", 7, [1, 1])
    second = fit(spec, tmp_path / "run", 16, [1, 1], ckpt=tmp_path / "run" / "ckpt" / "last.ckpt")
    assert len(second.steps) == 9
    # two workers: the resumed DataLoader restarts its round robin, so compare the batches as sets
    assert sorted(sorted(s) for s in first.steps + second.steps) == sorted(sorted(s) for s in whole.steps)
    drawn = [k for s in whole.steps for k in s]
    assert len(set(drawn)) < len(drawn)  # equal shares of 192 and 64 samples: the smaller source repeats


def test_shares_are_logged_per_source_through_the_cli(two_sources, cli, tmp_path):
    spec = f"{two_sources / 'coco_like'}::{two_sources / 'cc_like'}"
    result = cli("train", "--config", DEBUG, "--data.train_shards", spec, "--data.synthetic", "null",
                 "--data.val_shards", "null", "--data.train_weights", "[1, 3]", "--data.batch_size", "32",
                 "--trainer.max_steps", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "runs" / "debug" / "version_0" / "metrics.csv").open()))
    shares = [(float(r["train/share/coco_like"]), float(r["train/share/cc_like"]))
              for r in rows if r.get("train/share/cc_like")]
    assert len(shares) == 2  # steps 5 and 10
    coco, cc = shares[-1]
    assert coco + cc == pytest.approx(1.0) and abs(cc - 0.75) < 0.16  # 320 samples: 4 standard deviations


@pytest.mark.parametrize("settings,sentence", [
    ({"train_weights": [1, 2, 3]}, "gives 3 weights for the 2 sources"),
    ({"train_weights": [1, -1]}, "must be finite, 0 or more, and not all 0"),
    ({"train_weights": [0, 0]}, "must be finite, 0 or more, and not all 0"),
    ({"train_weights": "1::x"}, "must be numbers, one a source"),
    ({"train_weights": [1, 1], "upsampling_factors": [1, 1]}, "not both"),
])
def test_bad_weights_are_one_sentence(two_sources, settings, sentence):
    spec = f"{two_sources / 'coco_like'}::{two_sources / 'cc_like'}"
    with pytest.raises(UserError, match=sentence):
        ShardDataModule(spec, batch_size=16, **settings)


def test_weights_as_open_clip_writes_them_and_its_upsampling_factors(two_sources):
    spec = f"{two_sources / 'coco_like'}::{two_sources / 'cc_like'}"
    assert ShardDataModule(spec, train_weights="1::3").weights == (1.0, 3.0)
    factors = ShardDataModule(spec, upsampling_factors="1::2")
    shares = factors._mixture(factors._train_sources())
    assert shares == (192.0, 128.0)  # open_clip: a source's share is its factor times its samples
    assert factors.source_names == ["coco_like", "cc_like"]
