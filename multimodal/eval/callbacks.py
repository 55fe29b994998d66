"""Lightning adapters of the evaluation code: multi-device embedding, and the zero-shot classification and
retrieval callbacks that evaluate on standard splits during training."""

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from multimodal.data.batch import EvalBatch, jpegs_on_device
from multimodal.data.pixels import EvalTransform, OpenClipEvalTransform
from multimodal.data.sources import ClassFolderSource, EvalBatches, LabelledShardSource, ShardSource
from multimodal.errors import UserError
from multimodal.eval import presets, zeroshot
from multimodal.eval.embed import PartWriter, autocast, embed_shards, encode_batch
from multimodal.eval.retrieval import evaluate_embeddings
from multimodal.model import CLIP


class EmbedModule(pl.LightningModule):
    """Encodes the batches of `EvalBatches`; rank r takes the parts `make_dataset(r, world)` gives. They are
    finished on the device (`batch.finish` with `preprocess`: JPEGs decoded, pixels normalised)."""

    def __init__(self, model: CLIP, make_dataset: Callable[[int, int], IterableDataset], num_workers: int,
                 preprocess: EvalTransform | OpenClipEvalTransform):
        super().__init__()
        self.model = model.eval()
        self.make_dataset, self.num_workers, self.preprocess = make_dataset, num_workers, preprocess

    def predict_dataloader(self) -> DataLoader:
        dataset = self.make_dataset(self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          prefetch_factor=4 if self.num_workers else None)

    def predict_step(self, batch: EvalBatch, batch_idx: int):
        return encode_batch(self.model, batch, self.preprocess)


class EmbeddingWriter(BasePredictionWriter):
    """Writes every finished part to disk; a progress bar with items/s on rank 0."""

    def __init__(self, writer: PartWriter, total: int | None, unit: str):
        super().__init__(write_interval="batch")
        self.writer, self.total, self.unit = writer, total, unit
        self.bar: tqdm | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        # Our batches carry their own part and row bookkeeping; Lightning's batch indices are not used.
        warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
        self.bar = tqdm(total=self.total, unit=self.unit, desc="embedding", disable=not trainer.is_global_zero,
                        mininterval=1.0, dynamic_ncols=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        batch, image_features, text_features = prediction  # the batch as encoded: its rows of images kept
        self.writer.add(batch, image_features, text_features)
        self.bar.update(len(batch.image_rows) if self.unit == "img" else len(batch.text_rows))

    def on_predict_end(self, trainer, pl_module) -> None:
        self.bar.close()


def _whole_parameters(trainer: pl.Trainer):
    """A context with whole parameters outside the training forward: FSDP keeps only shards between steps."""
    wrapped = trainer.strategy.model
    if isinstance(wrapped, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(wrapped, writeback=False)
    return nullcontext()


class ZeroShotCallback(pl.Callback):
    """Zero-shot classification after every validation, logged under the benchmark's name:
    `val/{dataset}/acc1`, `acc5` and `mean_per_class_recall` (`val/imagenet1k/acc1` with the imagenet1k preset).

    Args:
        preset: imagenet1k, cifar10 or cifar100: the class names and templates of the CLIP paper
            (`multimodal.eval.presets`; class folders are checked against it).
        classnames: file of class names, one a line, in label order (for `images`, defaults to folder names).
        images: an ImageFolder-style folder (FOLDER/CLASS/IMAGE).
        shards: shards whose samples carry a `cls` member (instead of `images`), or a CLIP_benchmark
            classification dataset's folder (its test split, class names and templates).
        templates: prompt templates file, one a line with {} for the class name (default: the preset's, else
            the built-in set).
        dataset: the name in the logged keys (default: the preset, a CLIP_benchmark folder's name, else `zeroshot`).
        batch_size: images per forward pass.
    """

    def __init__(self, preset: str | None = None, classnames: str | None = None, images: str | None = None,
                 shards: str | None = None, templates: str | None = None, dataset: str | None = None,
                 batch_size: int = 128):
        if bool(images) == bool(shards):
            raise UserError("ZeroShotCallback needs exactly one of images or shards.")
        if preset is not None and preset not in presets.PRESETS:
            raise UserError(f"ZeroShotCallback preset '{preset}' is not one of {', '.join(presets.PRESETS)}.")
        if preset and classnames:
            raise UserError("ZeroShotCallback takes preset or classnames, not both.")
        self.source = ClassFolderSource(Path(images)) if images else LabelledShardSource(shards)
        self.classnames, self.templates = zeroshot.classes_and_templates(
            self.source, preset, Path(classnames) if classnames else None, Path(templates) if templates else None,
            setting="ZeroShotCallback's {}")
        benchmark = self.source.shards.benchmark if shards else None  # a CLIP_benchmark folder: wds/NAME
        self.dataset = dataset or preset or (benchmark.name if benchmark else "zeroshot")
        self.batch_size = batch_size

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        architecture = pl_module.model.architecture
        batches = EvalBatches(self.source, list(range(self.source.num_parts())),
                              EvalTransform.of(architecture.preprocessing), architecture.tokenizer, self.batch_size,
                              jpegs_on_device("auto", pl_module.device))
        with _whole_parameters(trainer), autocast(pl_module.device):
            result = zeroshot.evaluate(pl_module.model, self.classnames, self.templates, batches)
        for key in ("acc1", "acc5", "mean_per_class_recall"):
            if not math.isnan(result[key]):  # acc5 of fewer than 5 classes
                pl_module.log(f"val/{self.dataset}/{key}", result[key], sync_dist=True)


class RetrievalCallback(pl.Callback):
    """Zero-shot retrieval on a standard test split after every validation, logged under the benchmark's
    name: `val/{dataset}/image_retrieval_recall@k` (text -> image) and `text_retrieval_recall@k`, counted
    as `multimodal eval retrieval` and CLIP_benchmark count them (every image with all its captions).

    Args:
        shards: the split's shards, e.g. written by `multimodal shards karpathy --split test`, or a CLIP_benchmark
            retrieval dataset's folder (its test split).
        dataset: the name in the logged keys (default: the shard folder's name), e.g. mscoco_captions.
        ks: the k of recall@k.
        batch_size: images per forward pass.
    """

    def __init__(self, shards: str, dataset: str | None = None, ks: tuple[int, ...] = (1, 5, 10),
                 batch_size: int = 256):
        source = ShardSource(shards)  # a missing or empty shard folder stops the run before training starts
        path = Path(shards.rstrip("/"))
        self.shards, self.ks, self.batch_size = shards, tuple(ks), batch_size
        benchmark = source.shards.benchmark  # a CLIP_benchmark folder: its name, wds/mscoco_captions
        self.dataset = dataset or (benchmark.name if benchmark else path.name if path.is_dir() else path.parent.name)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        with _whole_parameters(trainer):  # embed_shards autocasts
            emb = embed_shards(pl_module.model, self.shards, self.batch_size, device=pl_module.device, progress=False)
        metrics, _, _ = evaluate_embeddings(emb, self.ks)
        for key, value in metrics.items():
            pl_module.log(f"val/{self.dataset}/{key}", value, sync_dist=True)
