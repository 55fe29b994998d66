"""An exact resume logs exactly (issue 22, item 7): a run SIGKILLed at an epoch's end, mid-epoch or at a
random moment and continued with --resume ends with the uninterrupted run's metrics.csv, row for row, and
its weights.

Compared: every column but the wall-clock measurements (`WALL_CLOCK`: a resumed run's step timer starts
afresh, and no two runs take the same time): epoch, step, loss, temperature, learning rate, the skipped-step,
bad-data and mixture-share counts, every validation metric. The killed runs run in processes of their own,
side by side with the uninterrupted one (in this process); the resumes run here, each in a few seconds.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint

from tests.conftest import REPO, limit_memory

DEBUG = str(REPO / "configs" / "debug.yaml")
STEPS, EPOCH = 8, 4  # two epochs of 4 steps of 16 samples, each validated
WALL_CLOCK = {"train/samples_per_second", "train/samples_per_second_per_device", "train/data_wait_fraction",
              "train/tflops_per_device", "train/mfu"}
CHECKPOINTS = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
               "init_args": {"save_last": True, "every_n_train_steps": 2, "save_top_k": 0}}
NAN_STEP = {"class_path": "tests.test_resume_logs.NaNAt", "init_args": {"step": 1}}
# where each run is killed: right after the epoch-end checkpoint (before Lightning logs that step and runs the
# epoch's validation), two logged steps past a mid-epoch checkpoint, and at a random moment past one
_rng = random.Random(22)
KILLS = {"epoch_end": {"step": EPOCH, "hook": "on_train_batch_end"},
         "mid_epoch": {"step": EPOCH + 3, "hook": "on_train_batch_start"},
         "random": {"step": _rng.randint(3, STEPS - 3), "hook": "on_train_batch_start",
                    "delay": round(_rng.uniform(0.0, 0.2), 3)}}


class KillAt(Checkpoint):
    """SIGKILL to this run's process group (trainer and data workers) at `hook` of the step where the global
    step is `step`, or `delay` seconds later. A Checkpoint, so that Lightning runs it after ModelCheckpoint's
    hook of the same name (it orders checkpoint callbacks last)."""

    def __init__(self, step: int, hook: str, delay: float = 0.0):
        self.step, self.delay = step, delay
        setattr(self, hook, self._at)

    def _at(self, trainer, *args) -> None:
        if trainer.global_step != self.step or trainer.sanity_checking:
            return
        kill = lambda: os.killpg(os.getpgid(0), signal.SIGKILL)  # noqa: E731
        threading.Timer(self.delay, kill).start() if self.delay else kill()


class NaNAt(pl.Callback):
    """NaN pixels in the batch of global step `step`: a step the module skips and `train/nonfinite_steps`
    counts from there on, also after a resume."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch.image.fill_(float("nan"))


def train_args(data: Path, *callbacks: dict) -> list[str]:
    return ["train", "--config", DEBUG, "--data.synthetic", "null", "--data.val_shards", str(data / "val"),
            "--data.train_shards", f"{data / 'a'}::{data / 'b'}", "--data.train_weights", "[1, 1]",
            "--data.batch_size", "16", "--trainer.max_steps", str(STEPS),
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.callbacks", json.dumps([CHECKPOINTS, NAN_STEP, *callbacks])]


def run_here(args: list[str], cwd: Path) -> int:
    """`multimodal ARGS` in this process (the `cli` fixture is per test; this serves the module's fixture)."""
    from multimodal.cli import main

    saved = os.getcwd()
    os.chdir(cwd)
    try:
        return main(args)
    finally:
        os.chdir(saved)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The uninterrupted run's folder, and each killed run's (folder, exit status), not yet resumed."""
    from multimodal.data.shards import write_synthetic

    root = tmp_path_factory.mktemp("resume-logs")
    for first, source in enumerate(["a", "b", "val"]):  # two sources of a mixture, and the held-out scenes
        write_synthetic(root / "data" / source, num_samples=32, shard_size=16, first_index=32 * first)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # as many torch threads as here, where the runs are resumed: the same sums in the same order
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path,
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    children = {}
    for name, kill in KILLS.items():
        (root / name).mkdir()
        args = train_args(root / "data", {"class_path": "tests.test_resume_logs.KillAt", "init_args": kill})
        with open(root / name / "stderr.txt", "w") as stderr:  # a file: a full pipe would stall the run
            children[name] = subprocess.Popen([sys.executable, "-m", "multimodal", *args], cwd=root / name,
                                              env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                              start_new_session=True, preexec_fn=limit_memory)
    (root / "whole").mkdir()
    assert run_here(train_args(root / "data"), root / "whole") == 0
    killed = {name: (root / name / "runs" / "debug" / "version_0", child.wait(timeout=300),
                     (root / name / "stderr.txt").read_text()) for name, child in children.items()}
    return {"whole": root / "whole" / "runs" / "debug" / "version_0", "killed": killed, "data": root / "data"}


def logged(run: Path) -> tuple[list[str], list[dict]]:
    """metrics.csv's columns, and its rows without the wall-clock columns."""
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    return sorted(header), [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


@pytest.mark.parametrize("kill", list(KILLS))
def test_a_resumed_run_logs_what_the_uninterrupted_run_logged(cli, runs, kill):
    run, status, stderr = runs["killed"][kill]
    assert status == -signal.SIGKILL, stderr[-3000:]
    proc = cli(*train_args(runs["data"]), "--resume", str(run), cwd=run.parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (columns, rows), (whole_columns, whole_rows) = logged(run), logged(runs["whole"])
    assert columns == whole_columns
    steps = [(row["step"], "val" if row["val/loss"] else "train") for row in rows]
    assert steps == [(row["step"], "val" if row["val/loss"] else "train") for row in whole_rows]  # no row twice
    for row, whole in zip(rows, whole_rows, strict=True):
        assert row == whole
    last = [row for row in rows if row["train/loss"]][-1]
    assert last["train/nonfinite_steps"] == "1.0" and last["train/share/a"]  # step 1's NaN counted on; the shares
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(runs["whole"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == reference["global_step"] == STEPS
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=0, msg=key)
