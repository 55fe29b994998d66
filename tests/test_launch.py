"""Cluster launchers and recipes: torchrun and SLURM scripts run `multimodal train` unchanged
(two CPU ranks here, SLURM through a stand-in srun), and the recipes parse with the batch they state."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DEBUG = str(REPO / "configs" / "debug.yaml")
RECIPES = sorted((REPO / "configs" / "cluster").glob("*.yaml"))
VENV_BIN = str(Path(sys.executable).parent)

FAKE_SRUN = """#!/usr/bin/env bash
# srun on one node: SLURM_NTASKS_PER_NODE tasks with the variables SLURM gives each task.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS_PER_NODE; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_NTASKS=$SLURM_NTASKS_PER_NODE \\
    SLURM_NODELIST=localhost SLURM_JOB_NAME=multimodal "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def launch(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_two_ranks_trained(proc: subprocess.CompletedProcess, cwd: Path) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 0" in output and "GLOBAL_RANK: 1" in output
    assert (cwd / "runs" / "debug" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_launcher_runs_two_ranks(tmp_path):
    """Two ranks of a CoCa run: the contrastive loss gathered over ranks, the captioning loss each rank's own,
    the caption decoder's gradients averaged by DDP with the towers' (no unused parameter)."""
    proc = launch([str(REPO / "scripts" / "torchrun.sh"), "--config", DEBUG, "--trainer.strategy", "ddp",
                   "--trainer.max_steps", "4", "--model.model_name", "tiny-coca", "--model.loss", "coca",
                   "--trainer.log_every_n_steps", "2"],
                  tmp_path, {"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())})
    assert_two_ranks_trained(proc, tmp_path)
    metrics = (tmp_path / "runs" / "debug" / "version_0" / "metrics.csv").read_text()
    assert "train/caption_loss" in metrics.splitlines()[0]


def test_slurm_script_runs_two_tasks_through_lightnings_slurm_environment(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    proc = launch(["bash", str(REPO / "scripts" / "slurm.sh"), "--config", DEBUG, "--trainer.strategy", "ddp",
                   "--trainer.max_steps", "4"], tmp_path,
                  {"PATH": f"{bin_dir}:{VENV_BIN}:{os.environ['PATH']}", "SLURM_JOB_ID": str(free_port() % 10000),
                   "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_SUBMIT_DIR": str(tmp_path)})
    assert_two_ranks_trained(proc, tmp_path)


def test_there_are_recipes_for_the_three_architectures():
    assert {p.stem for p in RECIPES} == {"vit-b-32", "vit-b-16", "vit-l-14"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_states_its_global_batch(cli, recipe, tmp_path):
    text = recipe.read_text()
    config = yaml.safe_load(text)
    stated = re.search(r"# global batch: (\d+) = (\d+) per GPU x (\d+) GPUs x (\d+) nodes", text)
    assert stated, "the recipe states its global batch"
    total, per_gpu, gpus, nodes = map(int, stated.groups())
    assert per_gpu == config["data"]["batch_size"] and gpus == config["trainer"]["devices"]
    assert nodes == config["trainer"]["num_nodes"] and total == per_gpu * gpus * nodes
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert re.search(r"Expected throughput to check: [\d.]+ GFLOPs per sample.*?~[\d,]+ samples/s", text, re.S)
    proc = cli("train", "--config", str(recipe), "--print_config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["model_name"] == config["model"]["model_name"]
    assert printed["model"]["lr"] == config["model"]["lr"]


def test_checkpoints_every_n_steps_keep_the_last_k(cli, tmp_path):
    """The recipes' checkpointing: every N steps, the K newest kept, plus last.ckpt, and epoch ends."""
    recipe = yaml.safe_load((REPO / "configs" / "cluster" / "vit-b-32.yaml").read_text())
    callbacks = [c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith(("ModelCheckpoint",
                                                                                        "RunCheckpoint"))]
    assert callbacks[0]["class_path"] == "multimodal.checkpoint.RunCheckpoint"
    callbacks[0]["init_args"].update(every_n_train_steps=6, keep_last=2)  # and every 30 minutes
    callbacks[1]["init_args"].update(save_top_k=2)
    proc = cli("train", "--config", DEBUG, "--data.val_shards", "null", "--data.synthetic.val_samples", "0",
               "--trainer.max_steps", "20", "--trainer.callbacks", json.dumps(callbacks), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "runs" / "debug" / "version_0" / "checkpoints").iterdir())
    # the run stops at max_steps=20 inside epoch 1, which Lightning counts as that epoch's end
    assert names == ["epoch=0-end.ckpt", "epoch=0-step=12.ckpt", "epoch=1-end.ckpt", "epoch=1-step=18.ckpt",
                     "last.ckpt"]
