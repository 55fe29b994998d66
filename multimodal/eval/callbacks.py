"""Lightning adapters of the evaluation code: multi-device embedding and zero-shot callbacks."""

import warnings
from collections.abc import Callable

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from multimodal.eval.embed import PartWriter
from multimodal.model import CLIP


class EmbedModule(pl.LightningModule):
    """Encodes the batches of `EmbedBatches`; rank r takes the parts `make_dataset(r, world)` gives."""

    def __init__(self, model: CLIP, make_dataset: Callable[[int, int], IterableDataset], num_workers: int):
        super().__init__()
        self.model = model.eval()
        self.make_dataset, self.num_workers = make_dataset, num_workers

    def predict_dataloader(self) -> DataLoader:
        dataset = self.make_dataset(self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers)

    def predict_step(self, batch: dict, batch_idx: int):
        images = self.model.encode_image(batch["images"]).float().cpu() if batch["images"] is not None else None
        texts = self.model.encode_text(batch["texts"]).float().cpu() if batch["texts"] is not None else None
        return images, texts


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
        image_features, text_features = prediction
        self.writer.add(batch, image_features, text_features)
        self.bar.update(len(batch["image_rows"]) if self.unit == "img" else len(batch["text_rows"]))

    def on_predict_end(self, trainer, pl_module) -> None:
        self.bar.close()
