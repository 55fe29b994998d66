"""The package as a user installs it: a wheel, outside the repository, with its run-time files."""

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO


def test_a_wheel_installed_outside_the_repository_runs_the_demo(tmp_path):
    """`pip install .` (not editable) carries the model configs and the demo and debug configs as
    package data: the demo runs from an empty folder with no checkout in sight."""
    source = tmp_path / "source"  # a copy, so that building leaves nothing in the checkout
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name if source.exists() else (source.mkdir() or source / name))
    for folder in ("multimodal", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("multimodal-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    script = (
        "import sys, multimodal, multimodal.arch\n"
        f"assert multimodal.__file__.startswith({str(site)!r}), multimodal.__file__\n"
        f"assert str(multimodal.arch.CONFIG_DIR).startswith({str(site)!r}), multimodal.arch.CONFIG_DIR\n"
        "from multimodal.cli import main\n"
        "sys.exit(main(['demo', '--trainer.max_steps', '2', '--data.synthetic.train_samples', '128',\n"
        "               '--data.synthetic.val_samples', '16', '--data.synthetic.shard_size', '64',\n"
        "               '--data.batch_size', '32']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=empty, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (empty / "runs" / "demo" / "version_0" / "retrieval.json").is_file()
    assert "Zero-shot retrieval on 16 held-out images" in proc.stdout
