"""The Lightning DataModule: shard specs, batch size and workers in; per-rank loaders out.

Its constructor arguments are the `data:` section of the YAML configs. With `synthetic` set,
`prepare_data` writes the synthetic scenes into the `train_shards` and `val_shards` folders
first (once per node, skipped when they are already there). It finishes batches on the device
(`batch.finish`: JPEGs decoded there, pixels normalised) and keeps the stream's position in
checkpoints (`state_dict`), so a run stopped mid-epoch continues with the samples it had not seen.
"""

import math
import re
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from multimodal import arch, distributed
from multimodal.data.batch import EvalBatch, TrainBatch, finish, jpegs_on_device
from multimodal.data.decode import MAX_IMAGE_PIXELS, Members
from multimodal.data.formats import ShardSet, check_members, count_samples, open_shards, sources
from multimodal.data.pipeline import ImageTextStream, StreamPosition, WorkerProgress, check_split, seeded
from multimodal.data.pixels import EvalTransform, TrainCrop
from multimodal.data.shards import ensure_synthetic
from multimodal.data.sources import EvalBatches, ShardSource
from multimodal.data.synthetic import SyntheticData
from multimodal.data.workers import leave_stop_signals_to_the_trainer
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
        train_weights: list[float] | str | None = None,
        upsampling_factors: list[float] | str | None = None,
        image_key: str | None = None,
        text_key: str | None = None,
        caption_field: str | list[str] | None = None,
        seed: int = 0,
        synthetic: SyntheticData | None = None,
        max_bad_fraction: float = 0.1,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        decode: Literal["auto", "cpu", "gpu"] = "auto",
    ):
        """
        Args:
            train_shards: training shards: a folder (ours, or img2dataset's output), a brace pattern
                (`shard-{000000..000099}.tar`), a glob, `pipe:` commands for object stores, or several of these
                joined by `::`: one shard list, or with `train_weights` the sources of a weighted mixture.
            val_shards: held-out shards, in the same forms, or a CLIP_benchmark retrieval dataset's folder.
            model_name: architecture whose transforms and tokenizer to use (linked to `model.model_name`).
            pretrained: the weights the model starts from (linked to `model.pretrained`): a tag's or hub
                repository's pixel statistics and resize are what its weights were trained with.
            cache_dir: where published weights and configs are kept (linked to `model.cache_dir`).
            batch_size: samples per batch on each device.
            num_workers: DataLoader worker processes per device.
            shuffle_buffer: samples held in the shuffle buffer of each worker (0 or 1: no shuffling).
            resampled: draw shards with replacement, endlessly (an epoch is then `num_samples` nominal samples).
            num_samples: samples per epoch; read from the shards' sizes.json, or img2dataset's *_stats.json,
                when not given.
            train_weights: the share of training samples drawn from each `::`-separated source of
                `train_shards`, e.g. [1, 3] (or "1::3"): each sample's source is drawn with these weights.
            upsampling_factors: open_clip's `--train-data-upsampling-factors` instead of `train_weights`
                ([1, 2] or "1::2"): source i's share is its factor times its number of samples.
            image_key: the member holding the image (default: the first of jpg, jpeg, png, webp).
            text_key: the member holding the caption, e.g. txt or a second text member (default: json
                `captions`, else txt).
            caption_field: json field(s) holding captions (a string or a list of strings each), e.g.
                caption_blip for a recaptioned set; several fields pool their captions.
            seed: seed of shard order, mixture draws, shuffle buffer and caption choice.
            synthetic: write this many synthetic scenes into the train/val shard folders if absent.
            max_bad_fraction: stop the run when more than this fraction of the training samples read
                (over all ranks, from the first 1,000 on) was skipped as bad: broken images, missing captions.
            max_image_pixels: skip images that declare more pixels than this, unread (decompression bombs);
                the default is PIL's warning threshold. null: no limit.
            decode: where training JPEGs are decoded: `cpu` in the DataLoader workers; `gpu` on the training
                device, the batch's JPEGs together (nvJPEG on CUDA; on a CPU run, the main process), the
                workers only reading them and drawing their crop boxes; `auto`: `gpu` when training on CUDA.
        """
        super().__init__()  # the numbers are checked with the rest of the config (`recipe.check_run`)
        self.max_bad_fraction, self.max_image_pixels = max_bad_fraction, max_image_pixels
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.resampled, self.num_samples, self.seed, self.synthetic = resampled, num_samples, seed, synthetic
        self.decode = decode
        self.members = Members.chosen(image_key, text_key, caption_field, setting="data.{}")
        self.weights = read_weights(train_weights, upsampling_factors, len(sources(train_shards)))
        self.upsampling = upsampling_factors is not None
        self.arch = arch.load(model_name, pretrained, cache_dir)
        self.crop, self.preprocess = TrainCrop.of(self.arch.preprocessing), EvalTransform.of(self.arch.preprocessing)
        self._resume: dict | None = None
        self._epoch, self._progress = -1, {}  # this epoch's worker -> (batches, samples consumed)
        if synthetic is None:  # fail before any work starts, not at the first batch
            for shards in self._train_sources():
                check_members(shards)
            if val_shards:
                check_members(open_shards(val_shards, self.members))
        elif val_shards is None and synthetic.val_samples:
            raise UserError("data.synthetic needs data.val_shards, a folder to write the held-out scenes into.")

    def _train_sources(self) -> list[ShardSet]:
        """The training shard set: one, or each source of a weighted mixture (a CLIP_benchmark dataset's
        folder: its train split; validation reads its test split)."""
        if self.weights is None:
            return [open_shards(self.train_shards, self.members, default_split="train")]
        return [open_shards(spec, self.members, default_split="train") for spec in sources(self.train_shards)]

    @property
    def source_names(self) -> list[str]:
        """A short name for each source of the mixture (its folder's), as its share is logged."""
        names = []
        for spec in sources(self.train_shards):
            path = Path(re.split(r"[{*?\[]", spec)[0].rstrip("/"))
            folder = path.name if path.suffix != ".tar" else path.parent.name
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder) or "source"
            names.append(name if name not in names else f"{name}_{len(names)}")
        return names

    def prepare_data(self) -> None:
        if self.synthetic is None:
            return
        s = self.synthetic
        for option, folder, count, first in (("data.train_shards", self.train_shards, s.train_samples, 0),
                                             ("data.val_shards", self.val_shards, s.val_samples, s.train_samples)):
            if folder and count:
                ensure_synthetic(Path(folder), count, s.shard_size, s.image_size, s.seed, first, option, "data.{}")

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Record the stream's position as each training batch arrives, before the step whose
        checkpoint (ModelCheckpoint saves in `on_train_batch_end`) must include it."""
        if isinstance(batch, TrainBatch):
            epoch = self.trainer.current_epoch
            if self._epoch != epoch:
                self._epoch, self._progress = epoch, {}
            batches = self._progress.get(batch.worker, (0, 0))[0]
            self._progress[batch.worker] = (batches + 1, batch.consumed)
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

    def _mixture(self, shards: list[ShardSet]) -> tuple[float, ...] | None:
        """Each source's share of the samples: `train_weights`, or open_clip's upsampling factors times
        each source's samples."""
        if self.weights is None or not self.upsampling:
            return self.weights
        unknown = [s.spec for s in shards if s.num_samples is None]
        if unknown:
            raise UserError(f"data.upsampling_factors weighs each source by its samples, and the number of samples in "
                            f"{unknown[0]} is unknown (no sizes.json or *_stats.json beside its shards): give "
                            "data.train_weights, each source's share, instead.")
        return tuple(f * s.num_samples for f, s in zip(self.weights, shards))

    def train_dataloader(self) -> DataLoader:
        shards = self._train_sources()
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        counts = [s.num_samples for s in shards]
        total = self.num_samples or (None if None in counts else sum(counts))
        if total is None:
            raise UserError(f"The number of samples in {self.train_shards} is unknown (no sizes.json or img2dataset "
                            "*_stats.json beside the shards): set data.num_samples.")
        if not self.resampled:  # here, before the workers start, and not in each of them
            for source in shards:
                check_split(len(source.urls), world, max(1, self.num_workers),
                            f"shards of {source.spec}" if len(shards) > 1 else "shards")
        num_batches = total // (self.batch_size * world)
        if num_batches == 0:
            raise UserError(f"{total} training samples do not fill one global batch of {self.batch_size} x {world} "
                            "devices: lower data.batch_size.")
        resume = self._resume_args(rank, world, num_batches)
        stream = ImageTextStream(
            [s.urls for s in shards], weights=self._mixture(shards), members=[s.members for s in shards],
            crop=self.crop,
            tokenizer=self.arch.tokenizer, decode_on_device=self._decode_on_device(),
            batch_size=self.batch_size, num_batches=num_batches, position=StreamPosition(rank, world),
            shuffle_buffer=self.shuffle_buffer, resampled=self.resampled, max_image_pixels=self.max_image_pixels,
            **{"seed": self.seed, **resume},
        )
        return DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(), prefetch_factor=4 if self.num_workers > 0 else None,
            worker_init_fn=leave_stop_signals_to_the_trainer,
        )

    def _decode_on_device(self) -> bool:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return jpegs_on_device(self.decode, device)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """On the device: JPEGs decoded (`data.decode: gpu`), then uint8 pixels normalised (`batch.finish`):
        uint8 travels as a quarter of float32's bytes."""
        if isinstance(batch, (TrainBatch, EvalBatch)):
            device = batch.text.device if isinstance(batch, TrainBatch) else self.trainer.strategy.root_device
            return finish(batch, device, self.preprocess, self.crop)
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
        source = ShardSource(self.val_shards, self.members)
        sizes = [source.part_size(p) for p in range(source.num_parts())]
        if world > 1 and None in sizes:  # every rank must know every rank's batches: count what no file counts
            sizes = [size if size is not None else count_samples(url) for size, url in zip(sizes, source.urls)]
        batches_of = [sum(max(1, math.ceil((sizes[p] or 0) / self.batch_size)) for p in range(r, len(sizes), world))
                      for r in range(world)]
        parts = list(range(source.num_parts()))[rank::world]
        tokenizer = self.arch.tokenizer
        batches = EvalBatches(source, parts, self.preprocess, tokenizer, self.batch_size,
                              decode_on_device=self._decode_on_device())
        loader = DataLoader(batches, batch_size=None, num_workers=min(self.num_workers, len(parts)),
                            worker_init_fn=leave_stop_signals_to_the_trainer)  # validation runs inside training
        size = self.arch.image_size
        padding = EvalBatch(-1, True, images=torch.zeros(1, 3, size, size, dtype=torch.uint8), image_rows=[],
                            texts=tokenizer([""]), text_rows=[])
        return EvenBatches(loader, max(batches_of), padding)


def read_weights(weights: list[float] | str | None, factors: list[float] | str | None,
                 num_sources: int) -> tuple[float, ...] | None:
    """`data.train_weights` or `data.upsampling_factors` as numbers, one a source of `train_shards`."""
    if weights is not None and factors is not None:
        raise UserError("Give data.train_weights (each source's share) or data.upsampling_factors (open_clip's), "
                        "not both.")
    given, name = (weights, "train_weights") if weights is not None else (factors, "upsampling_factors")
    if given is None:
        return None
    try:
        values = [float(w) for w in (given.split("::") if isinstance(given, str) else given)]
    except (TypeError, ValueError):
        raise UserError(f"data.{name} must be numbers, one a source (a list, or joined by '::' as open_clip "
                        f"writes them), got {given!r}.") from None
    if len(values) != num_sources:
        raise UserError(f"data.{name} gives {len(values)} weights for the {num_sources} sources of data.train_shards "
                        "(its parts joined by '::'): give one a source.")
    if not all(math.isfinite(v) and v >= 0 for v in values) or not any(v > 0 for v in values):
        raise UserError(f"data.{name} must be finite, 0 or more, and not all 0, got {values}.")
    return tuple(values)


class EvenBatches:
    """The `EvalBatch`es of `loader`, then copies of `padding` up to `length` batches in all.

    An empty batch of the loader (a part without samples) is replaced by `padding` too, so
    that every step runs both towers, as on every other rank.
    """

    def __init__(self, loader: DataLoader, length: int, padding: EvalBatch):
        self.loader, self.length, self.padding = loader, length, padding

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        count = 0
        for batch in self.loader:
            count += 1
            yield batch if batch.images is not None or batch.jpegs is not None else self.padding
        for _ in range(count, self.length):
            yield self.padding
