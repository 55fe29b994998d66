"""Virtual environments of the reference tools our outputs are checked against, beside the project's own
(`.venv-NAME` at the repository root, created on first use): tools whose pins clash with ours, such as
autofaiss, which pins numpy < 2. Used by scripts/bench_index.py and tests/test_embed_parts.py."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

AUTOFAISS_VENV = ".venv-autofaiss"
# autofaiss 2.18 pins numpy < 2 (pyarrow after 17 needs numpy 2); faiss 1.14 dropped the keyword arguments of
# OPQMatrix that autofaiss passes, so the last faiss before it
AUTOFAISS_PACKAGES = ["autofaiss==2.18.0", "faiss-cpu==1.13.2", "pyarrow==17.0.0"]


def reference_python(name: str, packages: list[str]) -> Path:
    """The python of the virtual environment REPO/`name` holding `packages`, created and installed (from the
    package registry) if it is not there yet; raises CalledProcessError when that fails, leaving none."""
    venv = REPO / name
    python = venv / "bin" / "python"
    if not python.is_file():
        print(f"Creating {venv} for {', '.join(packages)} (a minute, once)...", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *packages],
                           check=True)
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)  # not left half-installed for the next call to take as made
            raise
    return python
