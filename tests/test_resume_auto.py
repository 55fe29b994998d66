"""`--resume auto`: the newest run of this config with a checkpoint, else a new run; never a run whose
settings differ (the signalled-then-resumed run with the same command line is in test_preemption.py)."""

import pytest

from multimodal.errors import UserError
from multimodal.runs import find_resumable, first_difference, flat
from tests.conftest import REPO

DEBUG = str(REPO / "configs" / "debug.yaml")
SHORT = ["train", "--config", DEBUG, "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false"]


def test_auto_starts_a_run_continues_the_newest_of_its_config_and_refuses_other_settings(cli, tmp_path):
    runs = tmp_path / "runs" / "debug"
    first = cli(*SHORT, "--resume", "auto", cwd=tmp_path)  # nothing to continue: a new run
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no run under" in first.stderr and (runs / "version_0" / "checkpoints" / "last.ckpt").is_file()
    other = cli(*SHORT, "--model.lr", "0.01", cwd=tmp_path)  # another experiment under the same name
    assert other.returncode == 0 and (runs / "version_1" / "checkpoints" / "last.ckpt").is_file()

    again = cli(*SHORT, "--resume", "auto", cwd=tmp_path)  # the newest run of this config: version_0
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"continuing {runs / 'version_0'}" in again.stderr and not (runs / "version_2").exists()

    refused = cli(*SHORT, "--resume", "auto", "--model.lr", "0.5", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert "model.lr = 0.01 where this run has 0.5" in last and "--resume null" in last, last
    assert not (runs / "version_2").exists()  # no run folder claimed


def test_settings_that_may_differ_and_the_first_that_does():
    saved = {"resume": None, "model": {"lr": 1e-3, "model_name": "tiny"},
             "trainer": {"logger": [{"init_args": {"version": 3, "name": "x"}}], "max_steps": 10}}
    current = {"resume": "auto", "model": {"lr": 1e-3, "model_name": "tiny"},
               "trainer": {"logger": [{"init_args": {"version": None, "name": "x"}}], "max_steps": 10}}
    assert first_difference(saved, current) is None  # how it resumes and the logger's version are free
    current["trainer"]["max_steps"] = 20
    assert first_difference(saved, current) == ("trainer.max_steps", 10, 20)
    current["model"]["model_name"] = "ViT-B-32"
    assert first_difference(saved, current)[0] == "model.model_name"  # in the current config's order
    assert flat({"a": [{"b": 1}, 2], "c": {}}) == {"a.0.b": 1, "a.1": 2, "c": {}}


def test_a_checkpoint_without_a_readable_config_is_one_sentence(tmp_path):
    run = tmp_path / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / "config.yaml").write_text("model: [unclosed")
    with pytest.raises(UserError, match="cannot read .*config.yaml"):
        find_resumable(tmp_path, {"model": {}})
    assert find_resumable(tmp_path / "none", {}) is None
