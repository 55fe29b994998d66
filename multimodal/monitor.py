"""What a user watches while training runs: throughput and MFU, bad data and non-finite steps, the shares
of a data mixture, the progress bar. Lightning callbacks; `multimodal.recipe` hands the first three to the
module, which attaches them.

None of them reads a device value on the host except on logging steps (every
`trainer.log_every_n_steps` steps) and at the end: on a GPU, a read makes the CPU wait for the
queued kernels, and the next step's kernels cannot be queued while it waits. Counts accumulate in
device tensors or in Python values that came from the data loader; limits are checked when the
counts are read, so a run that must stop stops up to `log_every_n_steps` steps late. The counts travel in
checkpoints (every rank's), so that a resumed run logs the counts the uninterrupted run would.
"""

import logging
from collections import Counter
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from multimodal import distributed
from multimodal.data.faults import bad_sample_count, describe
from multimodal.errors import UserError
from multimodal.throughput import StepTimer, peak_tflops

log = logging.getLogger(__name__)

MIN_SAMPLES_FOR_BAD_FRACTION = 1000  # no verdict on the bad fraction of fewer samples


def is_logging_step(trainer: pl.Trainer, *, before_step: bool = False) -> bool:
    """Whether Lightning writes this training step's metrics: its own rule, `(batches stepped + 1) %
    log_every_n_steps == 0`, in terms of the global step, the same on every rank. After the optimizer
    step (`on_train_batch_end`) by default; `before_step` inside `training_step`, before it counts."""
    every = trainer.log_every_n_steps
    return every > 0 and (trainer.global_step + before_step) % every == 0


def ranks_share(states: list, trainer: pl.Trainer) -> list:
    """This rank's part of the per-rank states a checkpoint saved (`all_gather_objects`): its own on as many
    ranks, else all of them on rank 0 (so that the sums over ranks stay right) and none elsewhere."""
    if len(states) == trainer.world_size:
        return [states[trainer.global_rank]]
    return states if trainer.global_rank == 0 else []


class Throughput(pl.Callback):
    """Logs samples/s (per device and in all), the fraction of step time spent waiting for data, and,
    from the model FLOPs per sample, TFLOP/s per device and MFU (`multimodal.throughput`)."""

    def __init__(self, count_flops: Callable[[], float] | None = None, peak: float | None = None,
                 warmup_steps: int = 1):
        """`count_flops()` gives the model FLOPs of one training sample, counted as training starts."""
        self.count_flops, self.peak, self.warmup_steps = count_flops, peak, warmup_steps
        self.timer = StepTimer()
        self.flops_per_sample: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.timer = StepTimer(window=max(1, trainer.log_every_n_steps), warmup=self.warmup_steps)
        self.peak = self.peak or peak_tflops(pl_module.device)
        if self.count_flops is not None:
            self.flops_per_sample = self.count_flops()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.timer.start(len(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.timer.end()
        rates = self.timer.rates() if is_logging_step(trainer) else None
        if rates is None:
            return
        per_device, wait = rates
        pl_module.log("train/samples_per_second_per_device", per_device)
        pl_module.log("train/samples_per_second", per_device * trainer.world_size)
        pl_module.log("train/data_wait_fraction", wait)
        if self.flops_per_sample:
            achieved = self.flops_per_sample * per_device / 1e12
            pl_module.log("train/tflops_per_device", achieved)
            if self.peak:
                pl_module.log("train/mfu", achieved / self.peak)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.timer.pause()  # validation time is neither training nor waiting for training data


class TrainingHealth(pl.Callback):
    """Bad data and non-finite steps: counted every step, reduced over the ranks, logged and checked
    on logging steps and at the end; the run's totals printed at the end.

    The module skips a non-finite step's update on the device by itself (`CLIPModule.nonfinite`, a
    0/1 flag already agreed over the ranks); this callback counts such steps and stops the run once
    `max_nonfinite_steps` of them came in a row. Bad samples (a `TrainBatch`'s `bad` and `read`, plain
    values from the loader) stop it once more than `max_bad_fraction` of those read, over all ranks,
    were bad (the DataModule's `data.max_bad_fraction` when not given).
    """

    def __init__(self, max_nonfinite_steps: int = 5, max_bad_fraction: float | None = None):
        self.max_nonfinite_steps, self.max_bad_fraction = max_nonfinite_steps, max_bad_fraction
        self.bad: Counter = Counter()  # this rank's skipped samples and shard faults, by kind
        self.read = 0  # this rank's raw training samples, good and bad
        # on the device: non-finite steps in all, in the current run, the step at which a run first
        # reached max_nonfinite_steps (-1: never)
        self._steps: torch.Tensor | None = None
        self.nonfinite_steps = 0  # as last read
        self._saved: dict | None = None  # a checkpoint's counts

    def on_train_start(self, trainer, pl_module) -> None:
        if self.max_bad_fraction is None:  # any DataModule with the setting, ours or a user's
            self.max_bad_fraction = getattr(trainer.datamodule, "max_bad_fraction", None)
        saved, self._saved = self._saved, None
        if saved is not None:  # a resumed run counts on from the checkpoint's counts
            for counts in ranks_share(saved["ranks"], trainer):
                self.bad.update(counts["bad"])
                self.read += counts["read"]
            if saved["steps"] is not None:
                self._steps = torch.tensor(saved["steps"], device=pl_module.device)

    def state_dict(self) -> dict:
        """Every rank's counts, for a resumed run (read on the host: a checkpoint is no step)."""
        return {"ranks": distributed.all_gather_objects({"bad": dict(self.bad), "read": self.read}),
                "steps": self._steps.tolist() if self._steps is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = state_dict  # taken up when training starts, where the rank is known

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.bad.update(batch.bad)
        self.read += batch.read

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        flag = pl_module.nonfinite
        if self._steps is None:
            self._steps = torch.tensor([0.0, 0.0, -1.0], device=flag.device)
        total, run, reached = self._steps.unbind()
        run = (run + flag) * flag
        first = (run >= self.max_nonfinite_steps) & (reached < 0)
        step = trainer.global_step - 1  # the step this batch trained (the optimizer step counted it)
        self._steps = torch.stack([total + flag, run, torch.where(first, step, reached)])
        if is_logging_step(trainer):
            self.check(trainer, pl_module)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool = True) -> None:
        """Read the counts (the one host-device synchronisation), log them, stop the run if over a limit."""
        bad, read = distributed.sum_over_ranks([bad_sample_count(self.bad), self.read], pl_module.device)
        if log:
            pl_module.log("train/bad_samples", bad)
            pl_module.log("train/bad_fraction", bad / max(read, 1.0))
            for kind, count in self.bad.items():  # this rank's; all ranks' at the end
                pl_module.log(f"train/bad/{kind.replace(' ', '_')}", float(count))
        limit = self.max_bad_fraction
        if limit is not None and read >= MIN_SAMPLES_FOR_BAD_FRACTION and bad > limit * read:
            raise UserError(f"{int(bad)} of the {int(read)} training samples read so far were bad ({bad / read:.1%}, "
                            f"more than data.max_bad_fraction = {limit}): check the shards "
                            f"({describe(self.bad)} on rank {trainer.global_rank}).")
        if self._steps is None:
            return
        total, _, reached = self._steps.tolist()
        self.nonfinite_steps = int(total)
        if log:
            pl_module.log("train/nonfinite_steps", total)
        if reached >= 0:
            raise UserError(f"The loss was NaN or infinite for {self.max_nonfinite_steps} steps in a row, the last at "
                            f"step {int(reached)}: lower model.lr (now {pl_module.hparams.get('lr')}) or lengthen "
                            f"model.warmup_steps, or use trainer.precision bf16-mixed or 32-true "
                            f"(now {trainer.precision}).")

    def on_train_end(self, trainer, pl_module) -> None:
        """A last check, then the run's bad data and skipped steps over all ranks, a warning on rank 0."""
        if not is_logging_step(trainer):  # a logging step has just checked
            self.check(trainer, pl_module, log=False)  # Lightning takes no more metrics here
        totals: Counter = Counter()
        for counts in distributed.all_gather_objects(dict(self.bad)):
            totals.update(counts)
        read = sum(distributed.all_gather_objects(self.read))
        if trainer.global_rank == 0 and (totals or self.nonfinite_steps):
            bad = bad_sample_count(totals)
            lines = [f"Bad data: skipped {bad} of {read} training samples read ({bad / max(read, 1):.2%})"
                     + (f": {describe(totals)}." if totals else ".")]
            if self.nonfinite_steps:
                lines.append(f"Skipped {self.nonfinite_steps} steps whose loss was NaN or infinite.")
            log.warning("\n".join(lines))


class SourceShares(pl.Callback):
    """The share of training samples drawn from each source of a weighted mixture (a `TrainBatch`'s
    `sources`, plain counts from the loader), over all ranks since the run started, logged on logging
    steps as `train/share/{name}` (names: the DataModule's `source_names`, else source0, source1, ...)."""

    def __init__(self):
        self.counts: list[int] = []
        self._saved: list | None = None  # a checkpoint's counts

    def on_train_start(self, trainer, pl_module) -> None:
        saved, self._saved = self._saved, None
        for counts in ranks_share(saved or [], trainer):  # a resumed run counts on from the checkpoint's
            self.counts = [a + b for a, b in zip(self.counts, counts)] if self.counts else list(counts)

    def state_dict(self) -> dict:
        return {"ranks": distributed.all_gather_objects(self.counts)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = state_dict["ranks"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch.sources:
            self.counts = [a + b for a, b in zip(self.counts, batch.sources)] if self.counts else list(batch.sources)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.counts or not is_logging_step(trainer):
            return
        counts = distributed.sum_over_ranks([float(c) for c in self.counts], pl_module.device)
        names = getattr(trainer.datamodule, "source_names", None) or [f"source{i}" for i in range(len(counts))]
        for name, count in zip(names, counts):
            pl_module.log(f"train/share/{name}", count / max(sum(counts), 1.0))


class RunProgressBar(TQDMProgressBar):
    """One bar for the whole run, in optimizer steps (epochs of a streamed dataset are nominal), with
    the loss and throughput beside it. It moves every step and reads metrics only on logging steps.

    Nothing in training is logged with `prog_bar=True`: Lightning reads every such metric on the host
    after every batch, whatever the bar shows, which on a GPU is a synchronisation per step.
    """

    SHOWN = {"train/loss": "loss", "train/samples_per_second": "samples/s", "val/image_retrieval_recall@5": "val R@5"}

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps if trainer.max_steps > 0
                                      else trainer.estimated_stepping_batches)
        self.train_progress_bar.update(trainer.global_step)  # a resumed run starts where it stopped

    def on_train_epoch_start(self, trainer, *_) -> None:
        self.train_progress_bar.set_description(f"train (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total) or is_logging_step(trainer):
            bar.update(trainer.global_step - bar.n)
        if is_logging_step(trainer):
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # one bar across epochs; its metrics were set on the last logging step

    def get_metrics(self, trainer, pl_module) -> dict[str, float]:
        logged = trainer.callback_metrics
        return {label: float(logged[key]) for key, label in self.SHOWN.items() if key in logged}
