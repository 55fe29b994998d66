"""The Lightning DataModule: shard specs, batch size and workers in; per-rank loaders out.

Its constructor arguments are the `data:` section of the YAML configs. With `synthetic` set,
`prepare_data` writes the synthetic scenes into the `train_shards` and `val_shards` folders
first (once per node, skipped when they are already there). It normalises pixels on the device
(`on_after_batch_transfer`) and keeps the stream's position in checkpoints (`state_dict`), so a
run stopped mid-epoch continues with the samples it had not seen.
"""

import math
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from multimodal import arch, distributed
from multimodal.data.decode import MAX_IMAGE_PIXELS
from multimodal.data.pipeline import (
    ImageTextStream,
    StreamPosition,
    WorkerProgress,
    check_split,
    count_samples,
    expand_urls,
    seeded,
)
from multimodal.data.pixels import decode_on_device, finish_batch, finish_eval_batch, keep_jpegs_on_host
from multimodal.data.shards import ensure_synthetic
from multimodal.data.sources import EmbedBatches, ShardSource
from multimodal.data.synthetic import SyntheticData
from multimodal.errors import UserError


class ShardDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        model_name: str = "tiny",
        pretrained: str | None = None,
        cache_dir: str | None = None,
        batch_size: int = 256,
        num_workers: int = 4,
        shuffle_buffer: int = 2000,
        resampled: bool = False,
        num_samples: int | None = None,
        seed: int = 0,
        synthetic: SyntheticData | None = None,
        max_bad_fraction: float = 0.1,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        decode: Literal["auto", "cpu", "gpu"] = "auto",
    ):
        """
        Args:
            train_shards: training shards: a folder, a brace pattern (`shard-{000000..000099}.tar`), a glob,
                `pipe:` commands for object stores, or several of these joined by `::`.
            val_shards: held-out shards, in the same forms.
            model_name: architecture whose transforms and tokenizer to use (linked to `model.model_name`).
            pretrained: the weights the model starts from (linked to `model.pretrained`): a tag's or hub
                repository's pixel statistics and resize are what its weights were trained with.
            cache_dir: where published weights and configs are kept (linked to `model.cache_dir`).
            batch_size: samples per batch on each device.
            num_workers: DataLoader worker processes per device.
            shuffle_buffer: samples held in the shuffle buffer of each worker (0 or 1: no shuffling).
            resampled: draw shards with replacement, endlessly (an epoch is then `num_samples` nominal samples).
            num_samples: samples per epoch; read from the shards' sizes.json when not given.
            seed: seed of shard order, shuffle buffer and caption choice.
            synthetic: write this many synthetic scenes into the train/val shard folders if absent.
            max_bad_fraction: stop the run when more than this fraction of the training samples read
                (over all ranks, from the first 1,000 on) was skipped as bad: broken images, missing captions.
            max_image_pixels: skip images that declare more pixels than this, unread (decompression bombs);
                the default is PIL's warning threshold. null: no limit.
            decode: where training JPEGs are decoded: `cpu` in the DataLoader workers; `gpu` on the training
                device, the batch's JPEGs together (nvJPEG on CUDA; on a CPU run, the main process), the
                workers only reading them and drawing their crop boxes; `auto`: `gpu` when training on CUDA.
        """
        super().__init__()
        for name, value in (("batch_size", batch_size), ("num_samples", num_samples)):
            if value is not None and value <= 0:
                raise UserError(f"data.{name} must be a positive integer, got {value}.")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be 0 or more, got {num_workers}.")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise UserError(f"data.max_bad_fraction must be between 0 and 1, got {max_bad_fraction}.")
        self.max_bad_fraction, self.max_image_pixels = max_bad_fraction, max_image_pixels
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.resampled, self.num_samples, self.seed, self.synthetic = resampled, num_samples, seed, synthetic
        self.decode = decode
        self.arch = arch.load(model_name, pretrained, cache_dir)
        self.crop, self.preprocess = self.arch.train_crop, self.arch.eval_transform
        self._resume: dict | None = None
        self._epoch, self._progress = -1, {}  # this epoch's worker -> (batches, samples consumed)
        if synthetic is None:  # fail before any work starts, not at the first batch
            expand_urls(train_shards)
            if val_shards:
                expand_urls(val_shards)
        elif val_shards is None and synthetic.val_samples:
            raise UserError("data.synthetic needs data.val_shards, a folder to write the held-out scenes into.")

    def prepare_data(self) -> None:
        if self.synthetic is None:
            return
        s = self.synthetic
        for option, folder, count, first in (("data.train_shards", self.train_shards, s.train_samples, 0),
                                             ("data.val_shards", self.val_shards, s.val_samples, s.train_samples)):
            if folder and count:
                ensure_synthetic(Path(folder), count, s.shard_size, s.image_size, s.seed, first, option)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Record the stream's position as each training batch arrives, before the step whose
        checkpoint (ModelCheckpoint saves in `on_train_batch_end`) must include it."""
        if isinstance(batch, dict) and "worker" in batch:
            epoch = self.trainer.current_epoch
            if self._epoch != epoch:
                self._epoch, self._progress = epoch, {}
            batches = self._progress.get(batch["worker"], (0, 0))[0]
            self._progress[batch["worker"]] = (batches + 1, int(batch["consumed"]))
        return batch

    def state_dict(self) -> dict:
        """Every rank's stream position, for a mid-epoch resume: (batches, samples) each worker had
        consumed. Called on every rank when Lightning writes a checkpoint."""
        progress = distributed.all_gather_objects(self._progress if self._epoch == self.trainer.current_epoch else {})
        return {"epoch": self.trainer.current_epoch, "global_step": self.trainer.global_step,
                "world_size": self.trainer.world_size, "num_workers": max(1, self.num_workers),
                "ranks": [{int(w): list(p) for w, p in rank.items()} for rank in progress]}

    def load_state_dict(self, state: dict) -> None:
        """The saved position, continued by the next `train_dataloader` (`_resume_args`)."""
        self._resume = state

    def _resume_args(self, rank: int, world: int, num_batches: int) -> dict:
        """ImageTextStream arguments that continue the saved position, once.

        Shards read in order: the epoch continues where it stopped, every worker skipping the samples
        it had consumed, so nothing of the current pass is seen twice. Resampled: shards are drawn
        afresh, with a seed that depends on the step, since an endless draw has no position.
        """
        epoch = self.trainer.current_epoch if self.trainer else 0
        position, self._resume = self._resume, None
        if position is None:
            return {"first_epoch": epoch}
        if self.resampled:
            return {"first_epoch": epoch, "seed": seeded(self.seed, position["global_step"]).getrandbits(31)}
        if position["epoch"] != epoch:  # saved at an epoch's end: the next epoch starts afresh
            return {"first_epoch": epoch}
        if position["world_size"] == world and rank < len(position["ranks"]) and \
                sum(WorkerProgress(*p).batches for p in position["ranks"][rank].values()) >= num_batches:
            return {"first_epoch": epoch + 1}  # saved on the epoch's last step: the next one starts afresh
        workers = max(1, self.num_workers)
        if position["world_size"] != world or position["num_workers"] != workers:
            raise UserError(f"The checkpoint stopped mid-epoch with {position['world_size']} devices x "
                            f"{position['num_workers']} data workers: resume with the same (now {world} x {workers}), "
                            "or from an end-of-epoch checkpoint.")
        done = position["ranks"][rank]
        return {"first_epoch": epoch, "resume": {int(w): WorkerProgress(*p) for w, p in done.items()}}

    def train_dataloader(self) -> DataLoader:
        urls = expand_urls(self.train_shards)
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        total = self.num_samples or count_samples(urls)
        if total is None:
            raise UserError(f"The number of samples in {self.train_shards} is unknown (no sizes.json beside the "
                            "shards): set data.num_samples.")
        if not self.resampled:  # here, before the workers start, and not in each of them
            check_split(len(urls), world, max(1, self.num_workers))
        num_batches = total // (self.batch_size * world)
        if num_batches == 0:
            raise UserError(f"{total} training samples do not fill one global batch of {self.batch_size} x {world} "
                            "devices: lower data.batch_size.")
        resume = self._resume_args(rank, world, num_batches)
        stream = ImageTextStream(
            urls, crop=self.crop, tokenizer=self.arch.tokenizer, decode_on_device=self._decode_on_device(),
            batch_size=self.batch_size, num_batches=num_batches, position=StreamPosition(rank, world),
            shuffle_buffer=self.shuffle_buffer, resampled=self.resampled, max_image_pixels=self.max_image_pixels,
            **{"seed": self.seed, **resume},
        )
        return DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(), prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def _decode_on_device(self) -> bool:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return decode_on_device(self.decode, device)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """As Lightning moves a batch, except the JPEG bytes to decode on the device (`pixels.finish_batch`)."""
        return keep_jpegs_on_host(batch, lambda b: super(ShardDataModule, self).transfer_batch_to_device(
            b, device, dataloader_idx))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """On the device: JPEGs decoded (`data.decode: gpu`), then uint8 pixels normalised (training
        `image`, validation `images`): uint8 travels as a quarter of float32's bytes."""
        if not isinstance(batch, dict):
            return batch
        if "jpeg" in batch and "text" in batch:
            batch = finish_batch(batch, self.crop, batch["text"].device)
        elif "jpeg" in batch:  # a validation batch (`EmbedBatches`)
            batch = finish_eval_batch(batch, self.preprocess, self.trainer.strategy.root_device)
        for key in ("image", "images"):  # training and evaluation share open_clip's statistics
            pixels = batch.get(key)
            if isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8:
                batch[key] = self.preprocess.normalize(pixels)
        return batch

    def val_dataloader(self) -> "EvenBatches | list":
        """Every held-out image with all its captions, once; rank r takes every W-th shard.

        Every rank yields the same number of batches (the most any rank has, padded with dummy
        batches), because each validation step goes through the DDP/FSDP wrapper, whose forward
        is a collective: a rank with fewer batches would leave the others waiting forever.
        """
        if not self.val_shards:
            return []
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        source = ShardSource(self.val_shards)
        sizes = [source.part_size(p) for p in range(source.num_parts())]
        if world > 1 and None in sizes:
            raise UserError(f"The number of samples in the validation shards {self.val_shards} is unknown (no "
                            "sizes.json beside them), so they cannot be split evenly over the ranks: write them "
                            "with `multimodal shards`, or add a sizes.json mapping shard names to sample counts.")
        batches_of = [sum(max(1, math.ceil((sizes[p] or 0) / self.batch_size)) for p in range(r, len(sizes), world))
                      for r in range(world)]
        parts = list(range(source.num_parts()))[rank::world]
        tokenizer = self.arch.tokenizer
        batches = EmbedBatches(source, parts, self.preprocess, tokenizer, self.batch_size,
                               decode_on_device=self._decode_on_device())
        loader = DataLoader(batches, batch_size=None, num_workers=min(self.num_workers, len(parts)))
        size = self.arch.image_size
        padding = {"part": -1, "last": True, "images": torch.zeros(1, 3, size, size, dtype=torch.uint8),
                   "image_rows": [],
                   "texts": tokenizer([""]), "text_rows": []}
        return EvenBatches(loader, max(batches_of), padding)


class EvenBatches:
    """The batches of `loader`, then copies of `padding` up to `length` batches in all.

    An empty batch of the loader (a part without samples) is replaced by `padding` too, so
    that every step runs both towers, as on every other rank.
    """

    def __init__(self, loader: DataLoader, length: int, padding: dict):
        self.loader, self.length, self.padding = loader, length, padding

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        count = 0
        for batch in self.loader:
            count += 1
            yield batch if batch["images"] is not None else self.padding
        for _ in range(count, self.length):
            yield self.padding
