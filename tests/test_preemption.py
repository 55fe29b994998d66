"""Preemption: a signalled run finishes its step, writes an exact-resume last.ckpt and exits with the resumable
status (under SLURM, requeued by rank 0), also when the signal comes during a checkpoint write and when only
one of two DDP ranks gets it; and RunCheckpoint's schedule (every N minutes as well as N steps, keep_last).

The signalled runs are processes of their own (real signals, Lightning's DDP launcher); the uninterrupted run
and the resume run in this one, with as many torch threads as those processes, so that their sums agree bit
for bit."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from multimodal.checkpoint import AtomicCheckpointIO, RunCheckpoint
from multimodal.preemption import RESUMABLE, Preemption, continue_command, slurm_job_id
from tests.conftest import REPO, limit_memory
from tests.test_sync import LOG_EVERY, HostReads, Record

pytestmark = pytest.mark.slow  # minutes of CLI runs: scheduled first (tests/conftest.py), left out of test-fast

DEBUG = str(REPO / "configs" / "debug.yaml")
STEPS = 40
LOGGER = json.dumps([{"class_path": "pytorch_lightning.loggers.CSVLogger",  # a row in metrics.csv every step
                      "init_args": {"save_dir": "runs", "name": "debug", "flush_logs_every_n_steps": 1}}])
TRAIN = ["train", "--config", DEBUG, "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.logger", LOGGER]
RUN = Path("runs") / "debug" / "version_0"


def run_here(args: list[str], cwd: Path) -> int:
    """`multimodal ARGS` in this process (the `cli` fixture is per test; this serves the module's fixtures)."""
    from multimodal.cli import main

    saved = os.getcwd()
    os.chdir(cwd)
    try:
        return main(args)
    finally:
        os.chdir(saved)


def start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`multimodal ARGS` in a process of its own, its output in cwd/stderr.txt (a full pipe would stall it)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # tests' own plugins
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path,
           "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "multimodal", *args], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=limit_memory,
                                start_new_session=True)  # a process group of its own: signalled whole, as SLURM does


def logged_steps(run: Path) -> list[int]:
    """The steps of metrics.csv's training rows (those with a loss), as far as written."""
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return [int(row["step"]) for row in rows if row.get("train/loss") and (row.get("step") or "").isdigit()]


def wait_for_step(child: subprocess.Popen, run: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_steps(run), default=-1) < step:
        assert child.poll() is None, f"the run ended before step {step}: {(run.parents[2] / 'stderr.txt').read_text()}"
        assert time.monotonic() < deadline, f"no step {step} in {timeout} s"
        time.sleep(0.05)


def finish(child: subprocess.Popen, cwd: Path) -> tuple[int, str]:
    return child.wait(timeout=300), (cwd / "stderr.txt").read_text()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(ours: dict, theirs: dict) -> None:
    """Weights, AdamW state, schedule and step equal bit for bit."""
    assert ours["global_step"] == theirs["global_step"]
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key
    for mine, reference in zip(ours["optimizer_states"], theirs["optimizer_states"], strict=True):
        assert mine["param_groups"] == reference["param_groups"]
        assert mine["state"].keys() == reference["state"].keys()
        for index, state in reference["state"].items():
            for name, value in state.items():
                assert torch.equal(mine["state"][index][name], value), (index, name)
    assert ours["lr_schedulers"] == theirs["lr_schedulers"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run never stopped: its last.ckpt, the reference."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert run_here(TRAIN, root) == 0
    return root / RUN / "checkpoints" / "last.ckpt"


def test_a_signalled_run_stops_with_a_checkpoint_and_resumes_as_if_never_stopped(uninterrupted, tmp_path):
    """The same command line twice, as a requeued job runs it: `--resume auto` starts a new run, then
    continues it."""
    child = start([*TRAIN, "--resume", "auto"], tmp_path)
    wait_for_step(child, tmp_path / RUN, 8)
    os.killpg(child.pid, signal.SIGTERM)  # the run and its data worker, as a cluster's preemption signals a job
    status, stderr = finish(child, tmp_path)
    assert status == RESUMABLE, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert f"--resume {RUN}" in last and "--resume auto" in last and f"exit status {RESUMABLE}" in last, last
    assert "Traceback" not in stderr
    stopped = load(tmp_path / RUN / "checkpoints" / "last.ckpt")["global_step"]
    assert 8 < stopped < STEPS
    assert f"Stopped at step {stopped}," in last

    assert run_here([*TRAIN, "--resume", "auto"], tmp_path) == 0
    assert not (tmp_path / RUN).with_name("version_1").exists()  # continued, not started anew
    assert_same_state(load(tmp_path / RUN / "checkpoints" / "last.ckpt"), load(uninterrupted))
    assert sorted(logged_steps(tmp_path / RUN)) == list(range(STEPS))  # every step's row, once


FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$SCONTROL_CALLS"
"""


def test_under_slurm_rank_zero_requeues_the_job_once(tmp_path):
    """Lightning's SLURMEnvironment is in force (SLURM_NTASKS and the task's variables, one task) and would
    requeue on SIGUSR1 itself: the job is requeued once, by our handler, as the array task it is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    calls = tmp_path / "scontrol-calls.txt"
    slurm = {"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "3",
             "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_JOB_NAME": "multimodal", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}:{os.environ['PATH']}", "SCONTROL_CALLS": str(calls)}
    child = start([*TRAIN, "--trainer.callbacks", "[]"], tmp_path / "job", slurm)
    wait_for_step(child, tmp_path / "job" / RUN, 3)
    os.killpg(child.pid, signal.SIGUSR1)  # SLURM's --signal reaches every process of the step, workers too
    status, stderr = finish(child, tmp_path / "job")
    assert status == RESUMABLE, stderr[-3000:]
    assert calls.read_text().splitlines() == ["requeue 4240_3"]
    assert "requeueing SLURM job 4240_3" in stderr and "SLURM job 4240_3 requeued" in stderr
    checkpoints = tmp_path / "job" / RUN / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()  # in Lightning's default ModelCheckpoint's folder
    assert 3 < load(checkpoints / "last.ckpt")["global_step"] < STEPS
    assert not list((tmp_path / "job").rglob("hpc_ckpt_*"))  # Lightning's own requeue did not run


class SignalsWhileWriting(AtomicCheckpointIO):
    """Sends this process SIGTERM from inside torch.save, between two writes of each checkpoint's bytes, from
    step 4 on: the first signal comes during the step checkpoint's write, the next during the preemption's."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if checkpoint["global_step"] < 4:
            return super().save_checkpoint(checkpoint, path, storage_options)
        save = torch.save

        def interrupted(obj, f):
            save(obj, _SignalOnSecondWrite(f))

        torch.save = interrupted
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            torch.save = save


class _SignalOnSecondWrite:
    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def test_signals_during_checkpoint_writes_lose_nothing(tmp_path):
    every_4 = json.dumps([{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                           "init_args": {"every_n_train_steps": 4, "save_top_k": -1, "save_last": False}}])
    plugin = json.dumps({"class_path": "tests.test_preemption.SignalsWhileWriting"})
    child = start([*TRAIN, "--trainer.callbacks", every_4, "--trainer.plugins", plugin], tmp_path)
    status, stderr = finish(child, tmp_path)
    assert status == RESUMABLE and "Traceback" not in stderr, stderr[-3000:]
    assert "Stopped at step 4," in stderr.strip().splitlines()[-1]
    checkpoints = tmp_path / RUN / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]  # no partial file
    step, last = load(checkpoints / "epoch=0-step=4.ckpt"), load(checkpoints / "last.ckpt")
    assert last["global_step"] == 4 and "rng_states" in last and last["optimizer_states"]
    assert_same_state(last, step)


def processes_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rank_one(pid: int) -> int:
    """The rank Lightning's launcher started from rank 0 (not one of rank 0's data workers)."""
    for child in processes_of(pid):
        try:
            if b"LOCAL_RANK=1" in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                return child
        except OSError:
            continue
    raise AssertionError("no rank 1 among rank 0's processes")


def test_a_signal_to_one_ddp_rank_stops_both_at_one_step(tmp_path):
    """SIGTERM to rank 1 only: both ranks stop at the same step (a checkpoint with both ranks' random states;
    ranks that disagreed would wait for each other in its collectives). RunCheckpoint's minutes ride the same
    host vote: a save every step or so, on rank 0's clock."""
    on_time = json.dumps([{"class_path": "multimodal.checkpoint.RunCheckpoint",
                           "init_args": {"every_n_minutes": 0.002, "every_n_train_steps": None, "keep_last": 1}}])
    child = start([*TRAIN, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.callbacks", on_time],
                  tmp_path)
    wait_for_step(child, tmp_path / RUN, 3)
    other = rank_one(child.pid)
    os.kill(other, signal.SIGTERM)
    status, stderr = finish(child, tmp_path)
    assert status == RESUMABLE, stderr[-3000:]
    deadline = time.monotonic() + 60
    while running(other):
        assert time.monotonic() < deadline, "rank 1 is still running"
        time.sleep(0.1)
    last = load(tmp_path / RUN / "checkpoints" / "last.ckpt")
    assert 3 < last["global_step"] < STEPS and len(last["rng_states"]) == 2
    assert f"Stopped at step {last['global_step']}," in stderr.strip().splitlines()[-1]
    steps = [p for p in (tmp_path / RUN / "checkpoints").iterdir() if p.name != "last.ckpt"]
    assert len(steps) == 1  # saved on time (nothing else is due) and pruned to keep_last


def test_checkpoints_every_n_minutes(cli, tmp_path):
    """No step interval: every step checkpoint there is was saved on time (0.002 minutes, 0.12 s)."""
    on_time = json.dumps([{"class_path": "multimodal.checkpoint.RunCheckpoint",
                           "init_args": {"every_n_minutes": 0.002, "every_n_train_steps": None,
                                         "keep_last": None}}])
    proc = cli("train", "--config", DEBUG, "--trainer.max_steps", "8", "--trainer.enable_progress_bar", "false",
               "--data.val_shards", "null", "--data.synthetic.val_samples", "0", "--trainer.callbacks", on_time,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {p.name for p in (tmp_path / RUN / "checkpoints").iterdir()}
    assert "last.ckpt" in names and len(names) >= 2, names


class RecordsRemovals(AtomicCheckpointIO):
    removed: list[str] = []

    def remove_checkpoint(self, path) -> None:
        RecordsRemovals.removed.append(Path(path).name)
        super().remove_checkpoint(path)


def test_keep_last_keeps_the_newest_step_checkpoints_also_after_a_resume(cli, tmp_path):
    """keep_last 2: two step checkpoints and last.ckpt, the older ones removed through the CheckpointIO; the
    resumed run prunes the first run's (the kept list travels in the checkpoint)."""
    every_2 = json.dumps([{"class_path": "multimodal.checkpoint.RunCheckpoint",
                           "init_args": {"every_n_train_steps": 2, "keep_last": 2}}])
    args = ["train", "--config", DEBUG, "--trainer.enable_progress_bar", "false", "--data.val_shards", "null",
            "--data.synthetic.val_samples", "0", "--trainer.callbacks", every_2,
            "--trainer.plugins", json.dumps({"class_path": "tests.test_preemption.RecordsRemovals"})]
    RecordsRemovals.removed.clear()
    assert cli(*args, "--trainer.max_steps", "10", cwd=tmp_path).returncode == 0
    checkpoints = tmp_path / RUN / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=10.ckpt", "epoch=0-step=8.ckpt",
                                                             "last.ckpt"]
    assert RecordsRemovals.removed == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]
    proc = cli(*args, "--trainer.max_steps", "14", "--resume", str(tmp_path / RUN), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=12.ckpt", "epoch=0-step=14.ckpt",
                                                             "last.ckpt"]


def test_run_checkpoint_refuses_a_schedule_it_cannot_keep():
    from multimodal.errors import UserError

    with pytest.raises(UserError, match="every_n_train_steps, every_n_minutes or both"):
        RunCheckpoint()
    with pytest.raises(UserError, match="every_n_minutes is 0"):
        RunCheckpoint(every_n_minutes=0)
    with pytest.raises(UserError, match="keep_last is -1"):
        RunCheckpoint(every_n_train_steps=10, keep_last=-1)


def test_the_callbacks_read_no_device_value_outside_logging_steps(tmp_path):
    """Preemption's vote and RunCheckpoint's clock add no host read to a step (tests/test_sync.py's rule)."""
    from multimodal.data.datamodule import ShardDataModule
    from multimodal.data.shards import write_synthetic
    from multimodal.monitor import RunProgressBar
    from multimodal.recipe import build_module

    write_synthetic(tmp_path / "data", num_samples=128, shard_size=32, image_size=64)
    mode, handler = HostReads(), signal.getsignal(signal.SIGTERM)
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, log_every_n_steps=LOG_EVERY, logger=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[RunProgressBar(), Record(mode), Preemption(),
                                    RunCheckpoint(tmp_path / "ckpt", every_n_minutes=60, save_last=False)])
    trainer.fit(build_module("tiny", lr=1e-3, warmup_steps=2),
                datamodule=ShardDataModule(str(tmp_path / "data"), batch_size=16, num_workers=0))
    assert trainer.global_step == 8
    logging_steps = {step for step in range(8) if (step + 1) % LOG_EVERY == 0}
    others = [stack for step, stack in mode.reads if step not in logging_steps]
    assert mode.reads and not others, f"a host read outside logging steps:\n{others[0]}"
    assert signal.getsignal(signal.SIGTERM) is handler  # restored after the run


def test_the_command_that_continues_a_run():
    argv = ["--config", "c.yaml", "--resume", "old", "--trainer.max_steps", "9", "--resume=older"]
    assert continue_command("train", argv, "runs/x/version_1") == \
        "multimodal train --config c.yaml --trainer.max_steps 9 --resume runs/x/version_1"


@pytest.mark.parametrize("env,job", [({"SLURM_JOB_ID": "7"}, "7"),
                                     ({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "1"},
                                      "8_1"),
                                     ({}, None)])
def test_the_slurm_job_to_requeue(monkeypatch, env, job):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert slurm_job_id() == job


ECHO_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
printf '%s\\n' "$@" > "$SRUN_ARGS"
"""


@pytest.mark.parametrize("restarts,resume", [(None, []), ("2", ["--resume", "auto"])])
def test_a_requeued_slurm_job_resumes_its_run(tmp_path, restarts, resume):
    """scripts/slurm.sh runs the same command again when SLURM requeues it (SLURM_RESTART_COUNT), resuming."""
    (tmp_path / "srun").write_text(ECHO_SRUN)
    (tmp_path / "srun").chmod(0o755)
    env = {name: value for name, value in os.environ.items() if name != "SLURM_RESTART_COUNT"}
    env.update(PATH=f"{tmp_path}:{os.environ['PATH']}", SRUN_ARGS=str(tmp_path / "args"),
               SLURM_SUBMIT_DIR=str(tmp_path), **({"SLURM_RESTART_COUNT": restarts} if restarts else {}))
    done = subprocess.run(["bash", str(REPO / "scripts" / "slurm.sh"), "--config", "c.yaml"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[:4] == ["python", "-m", "multimodal", "train"]
    assert args[4:6 + len(resume)] == [*resume, "--config", "c.yaml"]
