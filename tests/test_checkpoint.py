"""Checkpoints survive SIGKILL at any moment, resume exactly, and are never unpickled as code."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multimodal.checkpoint import atomic_torch_save
from multimodal.errors import UserError
from tests.conftest import REPO

DEBUG = str(REPO / "configs" / "debug.yaml")
EVERY_2_STEPS = json.dumps([{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                             "init_args": {"save_last": True, "every_n_train_steps": 2, "save_top_k": 1}}])
TRAIN = ["train", "--config", DEBUG, "--trainer.max_steps", "40", "--trainer.log_every_n_steps", "1",
         "--trainer.callbacks", EVERY_2_STEPS, "--data.synthetic.train_samples", "1024"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), RuntimeError(
    "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/3: file write failed")])
def test_a_failed_write_leaves_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, failure):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, target)

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise failure

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(UserError, match=r"Writing the checkpoint .*last.ckpt failed .*the previous checkpoint there "
                                        r"is intact\. Make room"):
        atomic_torch_save({"step": 2}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_a_run_whose_checkpoint_write_fails_stops_with_one_sentence(tmp_path, monkeypatch, capsys):
    """A full disk at step 4's checkpoints: the run stops there (exit status 2, one line), and step 2's
    last.ckpt is still there to resume from. (Each checkpoint step writes a step file, then last.ckpt.)"""
    from multimodal import checkpoint
    from multimodal.cli import main

    save, calls = torch.save, []

    def full_disk(obj, f):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        save(obj, f)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    status = main(["train", "--config", DEBUG, "--trainer.max_steps", "8", "--trainer.callbacks", EVERY_2_STEPS,
                   "--trainer.enable_progress_bar", "false", "--data.val_shards", "null",
                   "--data.synthetic.val_samples", "0"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and last.startswith("error: Writing the checkpoint") and "No space left" in last, last
    checkpoints = tmp_path / "runs" / "debug" / "version_0" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not [p for p in checkpoints.iterdir() if p.name.endswith(".partial")]


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_killed_at_random_moments_and_resumed_equals_an_uninterrupted_run(cli, tmp_path):
    """SIGKILL to the whole process group (trainer and data workers) three times at random moments
    after the first checkpoint; each time last.ckpt loads and --resume continues. The final weights,
    temperature included, equal those of the same run never interrupted. (The runs that are killed
    have processes of their own; the uninterrupted run and the last resume run in this one.)"""
    clean = tmp_path / "clean"
    clean.mkdir()
    proc = cli(*TRAIN, cwd=clean)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    killed.mkdir()
    run = killed / "runs" / "debug" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    steps_at_kill = []
    for attempt in range(3):
        args = TRAIN + (["--resume", str(run)] if attempt else [])
        before = torch.load(last, weights_only=True)["global_step"] if last.exists() else -1
        child = subprocess.Popen([sys.executable, "-m", "multimodal", *args], cwd=killed, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        # a random moment: 1-6 steps past the last kill's checkpoint, then a random part of a step
        # (training, saving or validating), so that three kills leave the 40 steps unfinished
        target, deadline = before + rng.randint(1, 6), time.time() + 120
        while time.time() < deadline and child.poll() is None:
            if last.exists() and torch.load(last, weights_only=True)["global_step"] >= target:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        assert child.poll() is None, "the run finished before it could be killed"
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        steps_at_kill.append(torch.load(last, weights_only=True)["global_step"])  # loadable after every kill
    assert steps_at_kill == sorted(steps_at_kill) and steps_at_kill[-1] < 40
    proc = cli(*TRAIN, "--resume", str(run), cwd=killed)
    assert proc.returncode == 0, proc.stderr[-3000:]

    final, reference = weights(last), weights(clean / "runs" / "debug" / "version_0" / "checkpoints" / "last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 40
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)
    losses = [row.split(",") for row in (run / "metrics.csv").read_text().splitlines()]
    column = losses[0].index("train/loss")
    steps = {int(row[1]) for row in losses[1:] if row[column]}
    assert set(range(40)) <= steps  # the loss curve has every step, before and after the kills


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("command", ["resume", "pretrained", "export"])
def test_a_checkpoint_carrying_code_is_refused_unrun(cli, tmp_path, command):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        torch.save({"state_dict": {}, "hyper_parameters": {"model_name": "tiny"}, "x": Payload(marker)}, f)
    args = {"resume": ["train", "--config", DEBUG, "--resume", str(evil)],
            "pretrained": ["train", "--config", DEBUG, "--model.pretrained", str(evil)],
            "export": ["export", "--checkpoint", str(evil), "--out", str(tmp_path / "m.safetensors")]}[command]
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is live: unpickling it creates the file
    assert marker.exists()


def test_a_new_run_never_writes_into_an_existing_run_folder(cli, tmp_path):
    (tmp_path / "runs" / "debug" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "debug" / "mine" / "notes.txt").write_text("keep me")
    args = ["train", "--config", DEBUG, "--trainer.max_steps", "2", "--data.synthetic.train_samples", "128",
            "--trainer.logger", json.dumps([{"class_path": "pytorch_lightning.loggers.CSVLogger",
                                             "init_args": {"save_dir": "runs", "name": "debug", "version": "mine"}}])]
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "debug" / "mine").iterdir()) == ["notes.txt"]
    proc = cli(*args, "--overwrite", "true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "debug" / "mine" / "notes.txt").read_text() == "keep me"


def test_the_row_of_a_checkpointed_step_survives_a_kill_before_it_was_written(cli, tmp_path):
    """Lightning writes a step's log row after the checkpoint saved at that step's end; a run killed in
    between lost the row for good (the resumed run starts after that step). Here the row is dropped from
    metrics.csv as such a kill would leave it: the resumed run writes it back from the checkpoint, once."""
    train = TRAIN[:4] + ["6", *TRAIN[5:]]
    assert cli(*train, cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "debug" / "version_0"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6 and checkpoint["log_row"]["step"] == 5
    lines = (run / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("step")
    kept = [lines[0]] + [row for row in lines[1:] if int(row.split(",")[column]) < 5]
    (run / "metrics.csv").write_text("\n".join(kept) + "\n")
    resumed = cli(*TRAIN[:4], "10", *TRAIN[5:], "--resume", str(run), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = (run / "metrics.csv").read_text().splitlines()
    steps = [int(row.split(",")[column]) for row in rows[1:] if row.split(",")[rows[0].split(",").index("train/loss")]]
    assert sorted(set(steps)) == list(range(10)) and steps.count(5) == 1, steps
