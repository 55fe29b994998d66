"""Preemption: a run told to stop (SIGUSR1 from SLURM's `--signal`, SIGTERM from a scheduler or a person)
finishes its step, writes an exact-resume `last.ckpt`, and leaves: requeued under SLURM, elsewhere with the
exit status RESUMABLE and the command that continues it.

The signal handlers only record the signal (the first one; later ones change nothing), so a signal that
arrives while a checkpoint is written never interrupts the write. They take the place of Lightning's own
(`_SignalConnector`): Lightning's SLURM handler would save and requeue a second time, from inside the signal
handler, and its SIGTERM handler broadcasts a flag on the device. They are installed where Lightning installs
its own, before the data workers start: a worker forked from the process inherits them and lives through the
SIGUSR1 that SLURM sends to every process of a job step (its default action would kill the worker, and the
run with it). PyTorch's workers keep a SIGTERM handler of their own, which ends them: SIGTERM is for the main
process only (see docs/resume-and-checkpoints.md).

Ranks see a signal at different steps (SLURM signals them one by one; a person may signal one rank): they
agree on the step to stop at through `distributed.HostVote`, a gloo all-reduce of a host flag, one step
late, that never waits for the device. Stopping raises `Preempted` out of `trainer.fit`; the CLI turns it
into its exit (`Preempted.exit`).
"""

import logging
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector

from multimodal.distributed import HostVote

RESUMABLE = 75  # EX_TEMPFAIL (sysexits.h): stopped before the end, to be continued from its last.ckpt
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The job SLURM would requeue, as Lightning's SLURMEnvironment names it: ARRAYJOB_TASK in an array."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue(job: str) -> str | None:
    """`scontrol requeue JOB`; None when it worked, else why not (one line)."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return None


def continue_command(command: str, argv: list[str], run: str) -> str:
    """The command line that continues a run: `argv` with its own --resume (if any) replaced by `run`."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--resume" or arg.startswith("--resume="):
            skip = arg == "--resume"
            continue
        kept.append(arg)
    return shlex.join(["multimodal", command, *kept, "--resume", run])


@dataclass(eq=False)  # hashable, as exceptions are
class Preempted(Exception):
    """Raised out of `trainer.fit` on every rank once the run stopped: its checkpoint is written (and, under
    SLURM, the job requeued by rank 0)."""

    signal: str  # the first signal any rank received
    signalled_at: float  # when, by time.time()
    step: int
    checkpoint: str
    rank: int
    job: str | None = None  # the SLURM job requeued, if any
    requeue_failed: str | None = None

    def __str__(self) -> str:
        return f"stopped by {self.signal} at step {self.step}, checkpoint {self.checkpoint}"

    def exit(self, command: str, argv: list[str]) -> int:
        """The process's exit status, after rank 0 says, in one line, how the run goes on. Rank 0 exits with
        RESUMABLE, the others with 0: Lightning's own launcher kills every rank as soon as one of the ranks it
        started exits with another status, and so would cut rank 0's exit short."""
        if self.rank != 0:
            return 0
        path = os.path.normpath(self.checkpoint)
        run = os.path.dirname(os.path.dirname(path)) if os.path.basename(os.path.dirname(path)) == "checkpoints" \
            else path
        after = f"{time.time() - self.signalled_at:.2f} s after {self.signal}"
        if self.job and not self.requeue_failed:
            log.info(f"Exiting {after}: SLURM job {self.job} requeued; it continues from {path} "
                     f"(exit status {RESUMABLE}).")
        else:
            failed = f" `scontrol requeue {self.job}` failed ({self.requeue_failed})." if self.job else ""
            log.info(f"Stopped at step {self.step}, exiting {after}:{failed} continue with "
                     f"`{continue_command(command, argv, run)}` (or the same command with --resume auto); "
                     f"exit status {RESUMABLE}.")
        return RESUMABLE


class _RecordingSignals(_SignalConnector):
    """Lightning's signal connector, its handlers replaced by the callback's `_record` for SIGUSR1 and SIGTERM
    (installed after the callbacks' setup, before the first data worker starts). The previous handlers come
    back at the end of the run, as Lightning's do, unless the run was stopped: then the process is on its way
    out, and a second signal must not end it before its exit status says how the run goes on."""

    def __init__(self, trainer: pl.Trainer, callback: "Preemption"):
        super().__init__(trainer)
        self._callback = callback

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False
        self._original_handlers = {signum: signal.getsignal(signum) for signum in SIGNALS}
        for signum in SIGNALS:
            self._register_signal(signum, self._callback._record)

    def teardown(self) -> None:
        if not self._callback.stopped:
            super().teardown()


class Preemption(Checkpoint):
    """Stops a signalled run after the step it is in, with an exact-resume checkpoint (module docstring).

    `multimodal train` adds one after the Trainer is built, unless the config brings its own. A checkpoint
    callback, so that Lightning runs it after the others: the step's monitors have counted it and the step's
    scheduled checkpoints are written when it saves. The checkpoint is `last.ckpt` in the folder of the run's
    ModelCheckpoint (the one that saves last.ckpt, else the first; else the log folder's `checkpoints/`),
    which `--resume RUN_DIR` reads, written with `trainer.save_checkpoint` on every rank (so ExactResume's
    hooks run), unless a ModelCheckpoint has just written it, whole (not weights only), at that very step.
    Once stopped, its signal handlers stay until the process exits: a later signal changes nothing.
    """

    def __init__(self):
        self._signal: tuple[str, float] | None = None  # (name, time.time()) of the first signal
        self._pid = os.getpid()
        self._vote: HostVote | None = None
        self.stopped = False  # set once the run stops for a signal

    def _record(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a data worker forked from this process: its process stops it
            return
        if self._signal is None:
            self._signal = (signal.Signals(signum).name, time.time())

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._signal, self._pid, self.stopped = None, os.getpid(), False
        trainer._signal_connector = _RecordingSignals(trainer, self)
        # Lightning broadcasts its own SIGTERM flag on the device and reads it back before every step under
        # DDP, a wait for the GPU each step; with its handler replaced that flag never rises.
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None
        self._vote = HostVote()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not self._vote(self._signal is not None):
            return
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return  # the last step: the run ends as it would have
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # within an optimizer step (accumulate_grad_batches): the signal stands, a later vote stops
        self._stop(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._vote.close()

    def _stop(self, trainer: pl.Trainer) -> None:
        name, at = min((s for s in self._vote.gather(self._signal) if s is not None), key=lambda s: s[1])
        path = last_checkpoint_path(trainer)
        if not _written_at_this_step(trainer, path):
            trainer.save_checkpoint(path)
        for logger in trainer.loggers:  # as Lightning does after an exception, but before a requeue can end us:
            logger.finalize("failed")  # the rows logged so far reach metrics.csv
        stopped = Preempted(name, at, trainer.global_step, path, trainer.global_rank, job=slurm_job_id())
        if stopped.job and trainer.is_global_zero:
            log.info(f"Stopped by {name} at step {trainer.global_step}, checkpoint {path}; requeueing SLURM job "
                     f"{stopped.job} {time.time() - at:.2f} s after the signal.")
            stopped.requeue_failed = requeue(stopped.job)
        self._vote.barrier()  # no rank leaves (and no launcher ends the job) before the requeue
        self.stopped = True
        raise stopped


def last_checkpoint_path(trainer: pl.Trainer) -> str:
    checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    chosen = next((c for c in checkpoints if c.save_last), checkpoints[0] if checkpoints else None)
    folder = chosen.dirpath if chosen else os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
    return os.path.join(folder, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)


def _written_at_this_step(trainer: pl.Trainer, path: str) -> bool:
    return any(isinstance(c, ModelCheckpoint) and c.save_last and not c.save_weights_only
               and c._last_global_step_saved == trainer.global_step and c.last_model_path == path
               for c in trainer.checkpoint_callbacks)
