import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
COCO_MINI = SHARED_DATA / "coco-mini"
FLICKR = SHARED_DATA / "flickr8k-1k"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers, one a core: one torch thread each,
    os.environ["OMP_NUM_THREADS"] = "1"  # and in the processes tests start, or the cores are oversubscribed
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list) -> None:
    """The files holding slow tests first: `make test`'s two workers take a file at a time in this order
    (`--no-loadscope-reorder`; xdist would put the files with the most tests first), so the minute-long
    learning and FSDP files start at once instead of leaving one worker busy after the other has finished."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(autouse=True)
def _multimodal_logs_reach_caplog():
    """`multimodal.cli.main`, run in this process by some tests, stops the package's log records at its own
    stderr handler (`log_to_stderr`); each test starts with them propagating to the root logger, where
    pytest's caplog listens."""
    import logging

    logging.getLogger("multimodal").propagate = True


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    if not (COCO_MINI / "annotations" / "captions_train2017.json").is_file():
        pytest.skip(f"real COCO subset not found at {COCO_MINI}")
    return COCO_MINI


@pytest.fixture(scope="session")
def flickr() -> Path:
    if not (FLICKR / "captions.txt").is_file():
        pytest.skip(f"Flickr8k subset not found at {FLICKR}")
    return FLICKR


def open_clip_transforms(architecture):
    """open_clip's own (train, eval) PIL transforms for an architecture's preprocessing numbers: the reference
    our crops and eval transforms are compared with."""
    import open_clip

    p = architecture.preprocessing
    settings = {"mean": p.mean, "std": p.std, "resize_mode": p.resize_mode, "interpolation": p.interpolation}
    return (open_clip.image_transform(p.size, is_train=True, **settings),
            open_clip.image_transform(p.size, is_train=False, **settings))


MEMORY_LIMIT = 4 << 30  # what any process the suite starts may allocate (issue 22: nothing takes over 4 GB)


def limit_memory(limit: int = MEMORY_LIMIT) -> None:
    """In a child process before it runs: its heap (RLIMIT_DATA, which counts what malloc and torch's
    allocator take, unlike the address space that CUDA builds of torch reserve by the GB) capped at `limit`."""
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None,
            memory: int = MEMORY_LIMIT) -> subprocess.CompletedProcess:
    """`python -m multimodal ARGS` in `cwd`, in a new process (`env`: extra variables) whose heap is capped
    at `memory` bytes: for what only a process of its own can show (DDP re-launching the command, a
    SIGKILL, a traceback, memory that must stay bounded); `cli` for the rest."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "multimodal", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lambda: limit_memory(memory))


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 512 KiB file system of its own (a tmpfs, mounted as root; the test skips where it
    cannot be): what a full disk does to a writer, for real, not a monkeypatched error."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def cli(capfd):
    """`multimodal ARGS` in `cwd` through the command's own entry point (`multimodal.cli.main`), in this
    process: what a user's command does, without importing torch, Lightning and open_clip anew (about
    7 s a call on this project's machine). Returns (returncode, stdout, stderr) as `run_cli` does."""
    from multimodal.cli import main

    def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        saved_env, saved_cwd = dict(os.environ), os.getcwd()
        capfd.readouterr()
        try:
            os.environ.update(env or {})
            os.chdir(cwd)
            code = main(list(args))
        except SystemExit as exc:  # argparse's and jsonargparse's own exits (--help, --print_config)
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(Lightning checkpoint, module) of the tiny model after a few steps on synthetic shards."""
    import pytorch_lightning as pl

    from multimodal.data.datamodule import ShardDataModule
    from multimodal.data.shards import write_synthetic
    from multimodal.recipe import build_module

    root = tmp_path_factory.mktemp("trained")
    write_synthetic(root / "data", num_samples=64, shard_size=16)
    module = build_module("tiny", lr=1e-3, warmup_steps=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, datamodule=ShardDataModule(str(root / "data"), batch_size=8, num_workers=0))
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt", module


@pytest.fixture(scope="module")
def s3():
    """A local S3-compatible server with a bucket `bkt` (tests/s3.py's `moto_server`)."""
    from tests.s3 import moto_server

    yield from moto_server()
