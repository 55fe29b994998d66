"""Checkpoint files that survive being killed at any moment, and that load without unpickling code.

`AtomicCheckpointIO` (installed by `multimodal train`) writes each checkpoint to a hidden partial
file in the same folder, flushes and fsyncs it, and renames it over the target: a rename within
one file system is atomic, so a run killed with SIGKILL at any moment leaves either the previous
checkpoint or the new one, never a torn file. (Lightning's own writer goes through a temporary
file in /tmp, whose move into the run folder is a copy when /tmp is another file system, and
does not fsync.) Remote paths (s3://, gs://, ...) keep Lightning's writer.

Checkpoints load with `torch.load(weights_only=True)`: tensors and plain Python values only.
`weights.read_checkpoint` runs that check before a run hands a file to Lightning, so an untrusted file is
refused with one sentence instead of being unpickled.

Exact resume: `ExactResume` saves every rank's random states and what the run had logged, mends the loop
state of a checkpoint written on an epoch's last step, and has the resumed run log what the uninterrupted run
logged after the checkpoint (metrics.csv cut back to the checkpoint's rows, the step's row, the validation that
was due); the DataModule saves the data stream's position itself (`ShardDataModule.state_dict`), the
monitors their counts (`monitor.py`); Lightning saves the rest (weights, optimizer, schedule, scaler, loops).
"""

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import TorchCheckpointIO

from multimodal import distributed
from multimodal.errors import UserError, first_line
from multimodal.files import atomic_file, write_bytes
from multimodal.weights import read_checkpoint


def atomic_torch_save(obj: Any, path: str | os.PathLike, setting: str = "{}") -> None:
    """`torch.save` to `path` through `files.atomic_file` (a partial file, fsynced and renamed).

    A write that fails (a full disk, a quota, a lost mount) leaves no partial file and raises a
    UserError saying that the previous checkpoint at `path` is intact: the run stops there, to be
    resumed once there is room, rather than train on without a way back. `setting` names the
    option `resume` in the caller's words ("--{}" on a command line).
    """
    path = Path(path)
    try:
        with atomic_file(path) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "write" not in str(exc).lower():
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc, 120)
        previous = "the previous checkpoint there is intact" if path.is_file() else "no checkpoint was there yet"
        raise UserError(f"Writing the checkpoint {path} failed ({reason}); {previous}. Make room on that "
                        "disk (or write checkpoints elsewhere), then continue the run with "
                        f"{setting.format('resume')}.") from exc


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and weights-only loads; `setting` names the option
    that resumes a run in the caller's words (`atomic_torch_save`)."""

    def __init__(self, setting: str = "{}"):
        super().__init__()
        self.setting = setting

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"), self.setting)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def check_resumable(path: str | os.PathLike, module: torch.nn.Module) -> None:
    """Refuse, before a run starts, a checkpoint it cannot continue from: a file that is not a
    Lightning checkpoint (a bare state dict), or one whose weights do not fit the run's model."""
    ckpt = read_checkpoint(path)  # one (memory-mapped) load for both checks
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) \
            or "pytorch-lightning_version" not in ckpt:
        raise UserError(f"{path} is not the checkpoint of a Lightning run (a bare state dict, perhaps): resume from "
                        "a run folder or a checkpoint written by `multimodal train`.")
    own, theirs = module.state_dict(), ckpt["state_dict"]
    missing, extra = sorted(own.keys() - theirs.keys()), sorted(theirs.keys() - own.keys())
    resized = sorted(k for k in own.keys() & theirs.keys() if tuple(own[k].shape) != tuple(theirs[k].shape))
    if missing or extra or resized:
        if resized:
            detail = f"{resized[0]} is {tuple(theirs[resized[0]].shape)} there, {tuple(own[resized[0]].shape)} here"
        else:
            detail = f"{len(missing)} weights missing, {len(extra)} unknown, such as {(missing or extra)[0]}"
        trained = (ckpt.get("hyper_parameters") or {}).get("model_name")
        raise UserError(f"The checkpoint {path} does not match this run's model ({detail}): resume with the config "
                        f"it was trained with{f' (model.model_name {trained})' if trained else ''}.")


def resume_finished_epoch_at_the_next(checkpoint: dict) -> None:
    """Rewrite the loop state of a checkpoint written on an epoch's last training step (ModelCheckpoint's
    `every_n_train_steps` dividing the epoch, or a kill right after) into the start of the next epoch.

    Lightning 2.6 restores such a checkpoint as "mid-epoch, last batch done", marks the epoch finished,
    and then still runs the rest of it as the next epoch, with no batches: a run resumed from it
    trains one epoch fewer than an uninterrupted one (tests/test_resume.py). As the start of the next
    epoch, the resumed run trains every epoch, and its data stream begins that epoch afresh.
    """
    fit = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    if not (isinstance(epochs, dict) and isinstance(batches, dict) and batches.get("is_last_batch")):
        return
    total = epochs["total"]
    mid_epoch = total["ready"] == total["started"] == total["processed"] + 1 == total["completed"] + 1
    if not mid_epoch:
        return
    for progress in (epochs["total"], epochs["current"]):
        progress["processed"] = progress["completed"] = progress["started"]
    batches["total"]["completed"] = batches["total"]["processed"]
    batches["current"] = {key: 0 for key in batches["current"]}
    batches["is_last_batch"] = False


class FinalCheckpoint(pl.Callback):
    """A finished run's `last.ckpt` is its final step. ModelCheckpoint saves every N steps, and Lightning
    2.6 writes `last.ckpt` at the end only when none was written yet: a run of 320 steps with N = 60
    ends with `last.ckpt` at step 300, and a resume from it would train the last 20 steps again.

    A run resumed from a checkpoint other than its `last.ckpt` (`--resume RUN/checkpoints/epoch=0-step=2.ckpt`)
    goes on writing that `last.ckpt`: ModelCheckpoint restores the `last.ckpt` path it had when the checkpoint was
    written (none, at the first), finds another file of that name, and would write `last-v1.ckpt` beside it,
    leaving `last.ckpt` at the older state for the next `--resume RUN` or `--resume auto` to continue from."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                last = callback.format_checkpoint_name(callback._monitor_candidates(trainer),
                                                       callback.CHECKPOINT_NAME_LAST)
                if callback._fs.exists(last):
                    callback.last_model_path = last

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last \
                    and callback._last_global_step_saved != trainer.global_step:
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint on a cluster's schedule: a step checkpoint every `every_n_train_steps` steps or every
    `every_n_minutes` minutes, whichever is due first (the minutes count from the last checkpoint), the newest
    `keep_last` of them kept (None: all; 0: none) besides `last.ckpt` (`save_last`). From a config:

        trainer:
          callbacks:
            - class_path: multimodal.checkpoint.RunCheckpoint
              init_args: {every_n_train_steps: 1000, every_n_minutes: 30, keep_last: 3}

    Lightning's ModelCheckpoint takes steps or a time interval, not both, and decides the time on every rank
    by a broadcast from rank 0 (on NCCL, a wait for the GPU every step). Here rank 0's clock decides and the
    ranks agree through `distributed.HostVote`, on the host, a step late under DDP. Older step checkpoints go
    through the strategy's `remove_checkpoint`, so its CheckpointIO (and whatever mirrors it) deletes them;
    which ones are kept travels in the checkpoint, so a resumed run prunes the interrupted run's too.
    """

    def __init__(self, dirpath: str | None = None, filename: str | None = None, every_n_train_steps: int | None = None,
                 every_n_minutes: float | None = None, keep_last: int | None = 1, save_last: bool = True):
        if every_n_train_steps is None and every_n_minutes is None:
            raise UserError("RunCheckpoint needs every_n_train_steps, every_n_minutes or both: how often to save.")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise UserError(f"RunCheckpoint's every_n_train_steps is {every_n_train_steps}: give a step count of 1 "
                            "or more, or leave it out and save on time alone.")
        if every_n_minutes is not None and not every_n_minutes > 0:
            raise UserError(f"RunCheckpoint's every_n_minutes is {every_n_minutes}: give a positive number of "
                            "minutes, or leave it out and save on steps alone.")
        if keep_last is not None and keep_last < 0:
            raise UserError(f"RunCheckpoint's keep_last is {keep_last}: give how many step checkpoints to keep "
                            "(0 keeps only last.ckpt; null keeps them all).")
        super().__init__(dirpath=dirpath, filename=filename, save_last=save_last,
                         save_top_k=0 if keep_last == 0 else -1, every_n_train_steps=every_n_train_steps or 0)
        self.every_n_minutes, self.keep_last = every_n_minutes, keep_last
        self.kept: list[str] = []  # the step checkpoints on disk, oldest first
        self._since = time.monotonic()
        self._vote: distributed.HostVote | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_train_steps=self._every_n_train_steps,
                                        every_n_minutes=self.every_n_minutes)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.every_n_minutes is not None:
            self._vote = distributed.HostVote()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        on_time = self._vote is not None and self._vote(
            trainer.is_global_zero and time.monotonic() - self._since >= 60 * self.every_n_minutes)
        on_step = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if not (on_time or on_step) or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._since = time.monotonic()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._vote is not None:
            self._vote.close()
        super().on_train_end(trainer, pl_module)

    def _save_none_monitor_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        """The step checkpoint, then the oldest beyond `keep_last` removed (after the write: never fewer kept)."""
        path = self._get_metric_interpolated_filepath_name(monitor_candidates, trainer)
        self.best_model_path = path
        self.kept.append(path)
        stale = self.kept[:-self.keep_last] if self.keep_last else []
        self.kept = self.kept[len(stale):]  # before the save: the checkpoint records what is kept with it
        self._save_checkpoint(trainer, path)
        for old in stale:
            if self._should_remove_checkpoint(trainer, old, path):
                self._remove_checkpoint(trainer, old)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kept": list(self.kept)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            self.kept = list(state_dict.get("kept", []))


def rng_states() -> dict:
    """This process's random states as plain Python values: they travel through all_gather_object
    and load with weights_only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


class ExactResume(pl.Callback):
    """A resumed run that trains and logs as the uninterrupted run did. Each checkpoint carries every rank's
    random states (restored on the same number of ranks) and what the run had logged; a checkpoint of an
    epoch's last step resumes as the start of the next (`resume_finished_epoch_at_the_next`).

    Checkpoints are written at a step's end (ModelCheckpoint's `every_n_train_steps`), before Lightning logs
    that step's row and runs the validation due after it, and a run killed later went on logging. So the
    checkpoint records the rows each CSV log held, the step's row and whether a validation was due; the
    resumed run cuts the log back to those rows (the rows after them are logged again), writes the step's
    row and runs that validation, as the uninterrupted run did at that point. Hooks run on every rank, as
    checkpointing and validation do; the log is rank 0's.
    """

    def __init__(self):
        self._resumed: dict = {}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["rng_states"] = distributed.all_gather_objects(rng_states())
        if trainer.global_rank == 0:
            checkpoint["logged_rows"] = [_rows_logged(logger) for logger in _csv_loggers(trainer)]
        epoch_loop = trainer.fit_loop.epoch_loop
        batches = epoch_loop.batch_progress.current
        if not trainer.training or batches.processed == batches.completed:
            return  # not at a step's end: its row is logged and its validation done
        # read on the host here, at a checkpoint, not in a step
        connector, step = trainer._logger_connector, epoch_loop._batches_that_stepped
        if trainer.loggers and connector.should_update_logs and connector.metrics["log"]:
            row = {key: float(value) for key, value in connector.metrics["log"].items()}
            checkpoint["log_row"] = {"step": step, "metrics": {**row, "epoch": trainer.current_epoch}}
        if epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            checkpoint["validation_due"] = {"epoch": trainer.current_epoch, "step": step}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        resume_finished_epoch_at_the_next(checkpoint)  # before Lightning restores its loops from it
        states = checkpoint.get("rng_states")
        if states and len(states) == trainer.world_size:
            set_rng_states(states[trainer.global_rank])
        self._resumed = {key: checkpoint[key] for key in ("logged_rows", "log_row", "validation_due")
                         if key in checkpoint}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resumed, self._resumed = self._resumed, {}
        if trainer.global_rank == 0:
            for logger, rows in zip(_csv_loggers(trainer), resumed.get("logged_rows", [])):
                _cut_log(logger, rows)
            if "log_row" in resumed:
                row = resumed["log_row"]
                for logger in trainer.loggers:
                    logger.log_metrics(row["metrics"], step=row["step"])  # flushed with the next rows
        if "validation_due" in resumed:
            _validate_as_at(trainer, **resumed["validation_due"])


def _csv_loggers(trainer: pl.Trainer) -> list[CSVLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]


def _csv_lines(path: Path) -> list[bytes]:
    """The lines of a metrics.csv as written (csv's line ends kept), its header first; [] when there is none."""
    return path.read_bytes().splitlines(keepends=True) if path.is_file() else []


def _rows_logged(logger: CSVLogger) -> int:
    """The rows a CSV logger has logged: those in its metrics.csv and those it has yet to write there."""
    written = max(len(_csv_lines(Path(logger.log_dir) / "metrics.csv")) - 1, 0)
    return written + (len(logger._experiment.metrics) if logger._experiment is not None else 0)


def _cut_log(logger: CSVLogger, rows: int) -> None:
    """A CSV logger's metrics.csv cut back to its header and first `rows` rows."""
    path = Path(logger.log_dir) / "metrics.csv"
    lines = _csv_lines(path)
    if len(lines) > rows + 1:
        write_bytes(path, b"".join(lines[:rows + 1]))


def _validate_as_at(trainer: pl.Trainer, epoch: int, step: int) -> None:
    """Lightning's validation as it runs after a training step (`_TrainingEpochLoop.on_advance_end`), with the
    epoch and the logging step of the step it follows: the rows it logs are the uninterrupted run's."""
    fit_loop, epoch_loop = trainer.fit_loop, trainer.fit_loop.epoch_loop
    now = fit_loop.epoch_progress.current.completed, epoch_loop._batches_that_stepped
    fit_loop.epoch_progress.current.completed, epoch_loop._batches_that_stepped = epoch, step
    first_loop_iter = trainer._logger_connector._first_loop_iter
    try:
        trainer.validating = True
        epoch_loop.val_loop.restarting = False
        epoch_loop.val_loop.run()
    finally:
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter
        fit_loop.epoch_progress.current.completed, epoch_loop._batches_that_stepped = now
