"""A callback that turns chosen training batches into NaN pixels on one rank: a loss that is not
finite, as a bad batch or an overflow gives. Used as a trainer callback with this folder on PYTHONPATH."""

import pytorch_lightning as pl


class PoisonBatches(pl.Callback):
    def __init__(self, batches: list[int], rank: int = 0):
        """`batches`: which of this rank's training batches, counted from 0 over the run."""
        self.batches, self.rank, self.seen = set(batches), rank, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen in self.batches and trainer.global_rank == self.rank:
            batch.image.fill_(float("nan"))  # normalised float pixels by now (on_after_batch_transfer)
        self.seen += 1
