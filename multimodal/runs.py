"""Run folders: which earlier run `--resume auto` continues.

A run folder is `ROOT/version_N` (ROOT: the first logger's save_dir/name) with the config the run was started
with (`config.yaml`, written by LightningCLI) and its checkpoints (`checkpoints/last.ckpt`). `--resume auto`
is the line a requeued job runs again unchanged: it continues the newest run under ROOT that has a
`last.ckpt` and was started with this config, and starts a new run when no run under ROOT has a checkpoint.
A run with a checkpoint but other settings is never continued, nor silently replaced by a new run (a
requeued job whose config file was edited would otherwise start over): one sentence names the first setting
that differs.
"""

import re
from pathlib import Path

import yaml

from multimodal.errors import UserError

LAST = Path("checkpoints") / "last.ckpt"
# Settings that may differ between a run and the command that continues it: how it is continued (resume,
# overwrite) and the version each logger was given (set when the run started; None on the command line).
FREE = (re.compile(r"resume"), re.compile(r"overwrite"), re.compile(r"trainer\.logger\.\d+\.init_args\.version"))


def _fs(root: str | Path):
    import fsspec

    return fsspec.core.url_to_fs(str(root))


def versions(root: str | Path) -> list[str]:
    """The run folders `root/version_N` (a local folder or any fsspec URL), newest (highest N) first."""
    fs, path = _fs(root)
    if not fs.isdir(path):
        return []
    found = [(int(m.group(1)), name) for name in (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
             if (m := re.fullmatch(r"version_(\d+)", name))]
    return [f"{str(root).rstrip('/')}/{name}" for _, name in sorted(found, reverse=True)]


def _exists(path: str) -> bool:
    fs, inner = _fs(path)
    return fs.isfile(inner)


def flat(value, prefix: str = "") -> dict[str, object]:
    """A nested config as {"a.b.0.c": leaf}."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, object] = {}
    for key, item in items:
        out.update(flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out or {prefix: value}


def first_difference(saved: dict, current: dict) -> tuple[str, object, object] | None:
    """(key, value in the saved run, value now) of the first setting, in the current config's order, that
    differs; None when none does (the FREE settings aside)."""
    before, now = flat(saved), flat(current)
    missing = object()
    for key in [*now, *(k for k in before if k not in now)]:
        if any(free.fullmatch(key) for free in FREE):
            continue
        if before.get(key, missing) != now.get(key, missing):
            return key, before.get(key, "(not set)"), now.get(key, "(not set)")
    return None


def saved_config(run: str) -> dict:
    path = f"{run}/config.yaml"
    try:
        fs, inner = _fs(path)
        config = yaml.safe_load(fs.cat_file(inner).decode())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"--resume auto cannot read {path} ({exc.__class__.__name__}): the run folder {run} holds "
                        "a checkpoint without a readable config; pass --resume RUN_DIR to continue a run by name, "
                        "or --resume null to start a new one.") from None
    return config if isinstance(config, dict) else {}


def find_resumable(root: str | Path, current: dict) -> str | None:
    """The run folder `--resume auto` continues: the newest under `root` (a folder or an fsspec URL) with a
    last.ckpt whose config equals `current` (the FREE settings aside); None when no run under `root` has a
    last.ckpt (a new run)."""
    with_checkpoints = [run for run in versions(root) if _exists(f"{run}/{LAST.as_posix()}")]
    for run in with_checkpoints:
        if first_difference(saved_config(run), current) is None:
            return run
    if not with_checkpoints:
        return None
    newest = with_checkpoints[0]
    key, before, now = first_difference(saved_config(newest), current)
    raise UserError(f"--resume auto found no run under {root} started with this config: the newest, {newest}, has "
                    f"{key} = {before!r} where this run has {now!r}; restore that setting to continue it, pass "
                    "--resume null to start a new run, or give the logger another name.")
