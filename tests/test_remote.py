"""Run folders in a bucket: a real S3-compatible server on localhost (moto's server mode, in a process of its own,
with IAM enforced so that a read-only user exists), `multimodal train` with `--trainer.default_root_dir
s3://...`: killed, resumed from the bucket on a machine without the working copy, ending as an uninterrupted run;
and the bad buckets, each one sentence naming the URL, nothing left half-written."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.s3 import keys
from tests.test_preemption import assert_same_state, load

pytestmark = pytest.mark.slow  # minutes of CLI runs: scheduled first (tests/conftest.py), left out of test-fast

pytest.importorskip("s3fs")  # the moto server: the `s3` fixture of tests/conftest.py

DEBUG = str(REPO / "configs" / "debug.yaml")
STEPS = 20
TRAIN = ["train", "--config", DEBUG, "--trainer.max_steps", str(STEPS), "--trainer.enable_progress_bar", "false"]
RUN = "runs/debug/version_0"


def bucket_env(monkeypatch, env: dict) -> None:
    """`env` in this process's environment, and no S3 file system kept from an earlier one: the CLI's entry
    point run here (the `cli` fixture) sees the bucket as a fresh process would."""
    import s3fs

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_run_in_a_bucket_killed_and_resumed_from_it_ends_as_an_uninterrupted_run(s3, tmp_path, cli, monkeypatch):
    local = tmp_path / "local"
    local.mkdir()
    assert cli(*TRAIN, cwd=local).returncode == 0  # the uninterrupted run, on local disk
    command = [*TRAIN, "--trainer.default_root_dir", "s3://bkt/exp", "--resume", "auto"]
    env = {**s3["writer"], "MULTIMODAL_STAGING": str(tmp_path / "node-a"), "PYTHONWARNINGS": "ignore"}
    first_node = tmp_path / "a"
    first_node.mkdir()
    with open(tmp_path / "a.txt", "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "multimodal", *command], cwd=first_node,
                                 env={**os.environ, **env}, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 240
    while f"exp/{RUN}/checkpoints/last.ckpt" not in keys(s3["client"], "exp/"):
        assert child.poll() is None, (tmp_path / "a.txt").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGKILL)  # the node is gone, its working copy with it
    child.wait()
    uploaded = keys(s3["client"], "exp/")
    assert f"exp/{RUN}/config.yaml" in uploaded and f"exp/{RUN}/metrics.csv" in uploaded
    assert not any("partial" in key for key in uploaded)

    second_node = tmp_path / "b"  # another node: a new working copy, the same command line
    second_node.mkdir()
    bucket_env(monkeypatch, {**s3["writer"], "MULTIMODAL_STAGING": str(tmp_path / "node-b")})
    again = cli(*command, cwd=second_node)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing s3://bkt/exp/runs/debug/version_0" in again.stderr
    final = tmp_path / "final.ckpt"
    s3["client"].download_file("bkt", f"exp/{RUN}/checkpoints/last.ckpt", str(final))
    assert_same_state(load(final), load(local / RUN / "checkpoints" / "last.ckpt"))
    assert not any(k.startswith("exp/runs/debug/version_1") for k in keys(s3["client"], "exp/"))
    rows = (tmp_path / "final.csv")
    s3["client"].download_file("bkt", f"exp/{RUN}/metrics.csv", str(rows))
    steps = [int(line.split(",")[1]) for line in rows.read_text().splitlines()[1:] if line.split(",")[1].isdigit()]
    assert max(steps) == STEPS - 1


@pytest.mark.parametrize("case", ["unreachable", "no credentials", "read-only", "no bucket", "cut short"])
def test_a_bad_bucket_is_one_sentence_naming_it_and_leaves_nothing(s3, tmp_path, case, cli, monkeypatch):
    root, env = "s3://bkt/bad", {**s3["writer"]}
    resume = []
    if case == "unreachable":
        env["AWS_ENDPOINT_URL"], env["AWS_MAX_ATTEMPTS"] = "http://127.0.0.1:9", "1"
    elif case == "no credentials":
        env = {**s3["base"]}
    elif case == "read-only":
        env = {**s3["reader"]}
    elif case == "no bucket":
        root = "s3://no-such-bucket/bad"
    else:  # a checkpoint cut short in the bucket
        s3["client"].put_object(Bucket="bkt", Key="cut/runs/debug/version_0/checkpoints/last.ckpt", Body=b"PK\x03\x04")
        s3["client"].put_object(Bucket="bkt", Key="cut/runs/debug/version_0/config.yaml", Body=b"{}")
        root, resume = "s3://bkt/cut", ["--resume", "s3://bkt/cut/runs/debug/version_0"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if key not in env:
            monkeypatch.delenv(key, raising=False)
    bucket_env(monkeypatch, {**env, "MULTIMODAL_STAGING": str(tmp_path / "staging")})
    before = keys(s3["client"], "")
    proc = cli(*TRAIN, "--trainer.default_root_dir", root, *resume, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    expected = {"unreachable": "cannot be reached", "no credentials": "no credentials", "read-only": "access denied",
                "no bucket": "bucket does not exist", "cut short": "cannot be resumed from"}[case]
    assert last.startswith("error: ") and root.split("/")[2] in last and expected in last, last
    assert keys(s3["client"], "") == before  # nothing written in the bucket
    runs = list((tmp_path / "staging").rglob("version_*")) if (tmp_path / "staging").exists() else []
    assert all(not any(p.rglob("*.ckpt")) for p in runs), runs  # no working copy holding a checkpoint


def test_checkpoints_pruned_by_keep_last_are_deleted_from_the_bucket_too(s3, tmp_path, cli, monkeypatch):
    callbacks = ("[{class_path: multimodal.checkpoint.RunCheckpoint, "
                 "init_args: {every_n_train_steps: 10, keep_last: 1}}]")
    bucket_env(monkeypatch, {**s3["writer"], "MULTIMODAL_STAGING": str(tmp_path / "staging")})
    proc = cli("train", "--config", DEBUG, "--trainer.max_steps", "20", "--trainer.enable_progress_bar", "false",
               "--trainer.callbacks", callbacks, "--trainer.default_root_dir", "s3://bkt/prune", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = [k.rsplit("/", 1)[-1] for k in keys(s3["client"], f"prune/{RUN}/checkpoints/")]
    local = sorted(p.name for p in (tmp_path / "staging").rglob("checkpoints/*.ckpt"))
    assert sorted(remote) == local and len(remote) == 2 and "last.ckpt" in remote, (remote, local)
