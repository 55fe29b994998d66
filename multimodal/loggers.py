"""The loggers of a run, all pointing at its run folder.

The run folder (`ROOT/version_N`, ROOT the first folder logger's save_dir/name) is the run's identity: folder
loggers (TensorBoard, CSV) write into it; W&B gets a run id derived from it, so that separate runs are
separate W&B runs and a resumed run (`--resume`) continues its own; MLflow's run id, which MLflow chooses,
is kept in the folder (`mlflow_run_id`) when the run starts and taken up again when it resumes. The resolved
config is logged as the run's parameters (`config_params`), and the metrics `multimodal plot` draws reach
every logger with their steps, as Lightning logs them.
"""

import hashlib
from pathlib import Path

from multimodal.errors import UserError
from multimodal.files import write_text

FOLDER_LOGGERS = ("TensorBoardLogger", "CSVLogger")
MLFLOW_RUN_FILE = "mlflow_run_id"
NEEDS = {"WandbLogger": ("wandb", "wandb"), "MLFlowLogger": ("mlflow", "mlflow-skinny")}  # module, pip package
MAX_PARAM_CHARS = 500  # MLflow keeps values up to 6,000 characters; a longer setting is a list of shards


def kind(entry) -> str:
    """A logger entry's class name (its class_path's last part)."""
    return str(entry.class_path).rsplit(".", 1)[-1]


def wandb_id(folder: Path) -> str:
    """The W&B run id of a run folder: its logger name and version, and a hash of its absolute path, so that
    the same folder gets the same id on every start and two folders (on two machines too) get two."""
    folder = folder.resolve()
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    return f"{folder.parent.name}-{folder.name}-{digest}".replace("/", "-")


def check_installed(entries: list) -> None:
    """One sentence when a chosen logger's package is missing, before anything is built."""
    import importlib.util

    for entry in entries:
        module, package = NEEDS.get(kind(entry), (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise UserError(f"trainer.logger has {kind(entry)}, which needs the {package} package: "
                            f"pip install {package} (or pip install 'multimodal[loggers]').")


def configure(entries: list, folder: Path, version: int | str, force_version: bool) -> list[tuple]:
    """Each logger entry (class_path, init_args) made to log this run, in `folder`: folder loggers get its
    `version` (all of them when `force_version`, as when a run resumes; else those with none), W&B its
    derived id, name and files' folder, MLflow the run id kept in the folder when the run resumes, and a tag
    naming the folder. Returns what it filled in for W&B and MLflow, as (namespace, key, the setting given,
    the value filled in): put back once the loggers are built, so that config.yaml holds the settings the
    user gave (a run's ids in it would make `--resume auto` find every later command different)."""
    filled: list[tuple] = []

    def fill(args, key: str, value) -> None:
        filled.append((args, key, args.get(key), value))
        args[key] = value

    for entry in entries:
        args, name = entry.init_args, kind(entry)
        if name == "WandbLogger":
            if args.get("id") is None and args.get("version") is None:
                fill(args, "id", wandb_id(folder))
            if args.get("save_dir") in (None, "."):
                fill(args, "save_dir", str(folder))
            if args.get("name") is None:
                fill(args, "name", f"{folder.parent.name}/{folder.name}")
        elif name == "MLFlowLogger":
            kept = folder / MLFLOW_RUN_FILE
            if args.get("run_id") is None and kept.is_file():
                fill(args, "run_id", kept.read_text().strip())
            if args.get("run_name") is None:
                fill(args, "run_name", f"{folder.parent.name}/{folder.name}")
            fill(args, "tags", {**(args.get("tags") or {}), "multimodal.run_folder": str(folder.resolve())})
        elif "version" in args and (force_version or args.get("version") is None):
            args.version = version
    return filled


def keep_mlflow_run_ids(trainer, folder: Path) -> None:
    """Rank 0 writes each MLflow logger's run id into the run folder, for the run's next start."""
    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        if type(logger).__name__ == "MLFlowLogger":
            kept = folder / MLFLOW_RUN_FILE
            if not kept.is_file() or kept.read_text().strip() != logger.run_id:
                write_text(kept, logger.run_id + "\n")


def config_params(config: dict, free: tuple = ()) -> dict[str, str]:
    """The resolved config as flat parameters ("model.lr": "0.0005"), the `free` keys (regular expressions:
    how a run is resumed, the loggers' versions) left out, long values cut to MAX_PARAM_CHARS."""
    from multimodal.runs import flat

    out = {}
    for key, value in flat(config).items():
        if any(pattern.fullmatch(key) for pattern in free):
            continue
        text = str(value)
        out[key] = text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 3] + "..."
    return out
