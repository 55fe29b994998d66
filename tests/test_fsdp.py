"""FSDP through Lightning, on two CPU ranks: configs/strategies/fsdp.yaml (each transformer block
an FSDP unit) with tests/scripts/cpu_fsdp.py's CPU variant of Lightning's FSDPStrategy. Sharded
training must equal DDP's step for step, and its checkpoints must be ordinary ones: open_clip's
shapes, loadable, resumable with the optimizer state."""

import os

import pytest
import torch
import yaml

from multimodal.weights import load_model
from tests.conftest import REPO, run_cli

DEBUG = str(REPO / "configs" / "debug.yaml")
# the shipped FSDP settings, on CPU ranks
FSDP = {**yaml.safe_load((REPO / "configs" / "strategies" / "fsdp.yaml").read_text())["trainer"]["strategy"],
        "class_path": "cpu_fsdp.CPUFSDP"}
pytestmark = pytest.mark.slow


def train(tmp_path, strategy, *args):
    config = tmp_path / ("ddp.yaml" if strategy == "ddp" else "fsdp.yaml")
    config.write_text(yaml.safe_dump({"trainer": {"devices": 2, "strategy": strategy, "gradient_clip_val": 1.0}}))
    path = os.pathsep.join(filter(None, [str(REPO / "tests" / "scripts"), os.environ.get("PYTHONPATH")]))
    proc = run_cli("train", "--config", DEBUG, "--config", str(config), *args, cwd=tmp_path, env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The debug run (20 steps, validation every epoch) under DDP (version_0) and FSDP (version_1)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    train(tmp, "ddp")
    train(tmp, FSDP)
    return tmp


def last(tmp, version):
    return torch.load(tmp / "runs" / "debug" / version / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)


def assert_same_weights(fsdp, ddp):
    assert ddp["state_dict"].keys() == fsdp["state_dict"].keys()
    for key, value in ddp["state_dict"].items():
        assert fsdp["state_dict"][key].shape == value.shape, key
        torch.testing.assert_close(fsdp["state_dict"][key], value, atol=2e-4, rtol=1e-3, msg=key)


def test_fsdp_trains_the_same_weights_as_ddp(runs):
    ddp, fsdp = last(runs, "version_0"), last(runs, "version_1")
    assert ddp["global_step"] == fsdp["global_step"] == 20
    assert_same_weights(fsdp, ddp)
    # the temperature moved from its initial ln(1/0.07) and is saved in open_clip's shape, ()
    scale = fsdp["state_dict"]["model.towers.logit_scale"]
    assert scale.shape == () and abs(scale.item() - 2.6593) > 1e-4


def test_fsdp_logs_validation_and_its_checkpoint_loads_as_an_open_clip_model(runs):
    metrics = (runs / "runs" / "debug" / "version_1" / "metrics.csv").read_text()
    assert "val/loss" in metrics and "val/image_retrieval_recall@1" in metrics
    model = load_model(runs / "runs" / "debug" / "version_1" / "checkpoints" / "last.ckpt")
    assert model.logit_scale.shape == ()


def test_fsdp_resumes_with_its_optimizer_state_as_ddp_does(runs):
    """Both runs continue from step 20 to 30: FSDP restores its sharded optimizer state as DDP does."""
    for version, strategy in (("version_0", "ddp"), ("version_1", FSDP)):
        train(runs, strategy, "--resume", str(runs / "runs" / "debug" / version), "--trainer.max_steps", "30")
    ddp, fsdp = last(runs, "version_0"), last(runs, "version_1")
    assert ddp["global_step"] == fsdp["global_step"] == 30
    assert_same_weights(fsdp, ddp)


def test_coca_trains_sharded_and_its_checkpoint_loads(tmp_path):
    """CoCa under FSDP: the caption decoder's blocks are FSDP units too; the checkpoint is an ordinary one."""
    train(tmp_path, FSDP, "--model.model_name", "tiny-coca", "--model.loss", "coca", "--trainer.max_steps", "3",
          "--data.batch_size", "8", "--trainer.log_every_n_steps", "1")
    run = tmp_path / "runs" / "debug" / "version_0"
    assert "train/caption_loss" in (run / "metrics.csv").read_text().splitlines()[0]
    model = load_model(run / "checkpoints" / "last.ckpt")
    assert model.has_caption_decoder and model.logit_scale.shape == ()
