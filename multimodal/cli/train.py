"""`multimodal train` and `multimodal demo`: LightningCLI over the module and the DataModule.

The arguments and every config file the parser reads are bounded first (`cli/configs.py`); the whole
config's numbers are checked (`recipe.check_run`) before a seed is set, data written or a run folder
claimed; a run stopped by its input before its first step gives its run folder back.
"""

import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout, suppress
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ArgumentError
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from multimodal import arch, demo, remote
from multimodal.checkpoint import AtomicCheckpointIO, check_resumable
from multimodal.cli.configs import check_arguments
from multimodal.data.datamodule import ShardDataModule
from multimodal.errors import UserError
from multimodal.files import write_text
from multimodal.loggers import FOLDER_LOGGERS, check_installed, config_params, configure, keep_mlflow_run_ids, kind
from multimodal.monitor import RunProgressBar
from multimodal.notices import QUIET
from multimodal.preemption import Preempted, Preemption
from multimodal.recipe import build_module, check_run
from multimodal.remote import Mirror, is_url
from multimodal.runs import FREE, find_resumable
from multimodal.userfiles import writing
from multimodal.weights import read_checkpoint


class SaveAndLogConfig(SaveConfigCallback):
    """config.yaml in the run folder (Lightning's), and the resolved config as the run's parameters in the
    loggers that keep parameters (W&B's config, MLflow's params; the folder loggers have config.yaml), once:
    not again when the run resumes (MLflow refuses a parameter whose value changes)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if self.config.get("resume"):
            return
        params = None
        for logger in trainer.loggers:
            if type(logger).__name__ in ("WandbLogger", "MLFlowLogger"):
                if params is None:
                    params = config_params(yaml.safe_load(self.parser.dump(self.config, skip_none=False)), FREE)
                logger.log_hyperparams(params)


class TrainCLI(LightningCLI):
    """LightningCLI over the module `recipe.build_module` builds and ShardDataModule, one run directory per run."""

    def add_arguments_to_parser(self, parser) -> None:
        for key in ("model_name", "pretrained", "cache_dir"):  # the data's transforms are the weights' own
            parser.link_arguments(f"model.{key}", f"data.{key}")
        parser.add_argument("--resume", type=str | None, default=None,
                            help="Continue a run: its folder (runs/NAME/version_N: its last.ckpt, logging on in that "
                                 "folder) or a checkpoint file; or auto: the newest run of this config with a "
                                 "checkpoint, else a new run (the same line every time, as a requeued job runs it). "
                                 "Mid-epoch, the data stream continues where it stopped.")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="Allow a run to write into an existing, non-empty run folder given by a logger's "
                                 "version (never needed with --resume, nor with the default: a new version_N).")

    def parse_arguments(self, parser, args) -> None:
        """The config, then its numbers checked (`recipe.check_run`) before the seed is set or anything built."""
        super().parse_arguments(parser, args)
        check_run(self.config.as_dict())

    def before_instantiate_classes(self) -> None:
        trainer = self.config.trainer
        if trainer.precision is None:  # bf16 where a GPU supports it, fp32 elsewhere
            on_gpu = trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
            trainer.precision = "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
        # TensorBoard and CSV loggers each pick "the next free version" on their own and can
        # disagree; give them one version so config, checkpoints and both logs share a folder.
        loggers = self.config.trainer.logger
        if isinstance(loggers, list):
            check_installed(loggers)
        self._swaps = self._remote_roots()
        resumed_version = self._resume()
        for namespace, key, _, working_copy in self._swaps:
            namespace[key] = working_copy
        root = self._run_root()
        if root is None:
            return
        first = self._folder_loggers()[0]
        if resumed_version is not None and root == resumed_version[0].resolve():
            version, force = resumed_version[1], True  # log on in the resumed run's folder
        elif first.get("version") is None:
            taken = remote.versions(self.remote_root) if self.remote_root and _launched_as_rank_zero() else []
            version, force = run_version(root, max(taken, default=-1) + 1), False
        else:  # a folder named by the config: never written into by a new run unless asked
            version, force = first.version, False
            folder = root / (version if isinstance(version, str) else f"version_{version}")
            if folder.is_dir() and any(folder.iterdir()) and not self.ckpt_path \
                    and not self.config.get("overwrite"):
                raise UserError(f"The run folder {folder} already holds a run: pass --resume {folder} to continue "
                                "it, --overwrite to write into it anyway, or leave the logger's version unset.")
        self.run_folder = root / (version if isinstance(version, str) else f"version_{version}")
        self._swaps += configure(loggers, self.run_folder, version, force)  # given back once built, as URLs are

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        """Our progress bar (`RunProgressBar`) unless the config turns bars off or brings its own; `Preemption`
        (stop on SIGUSR1/SIGTERM with a checkpoint, requeue under SLURM) unless the config brings its own."""
        chosen = config.get("callbacks") or []
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in chosen):
            callbacks = [*callbacks, RunProgressBar()]
        trainer = super()._instantiate_trainer(config, callbacks)
        if not any(isinstance(c, Preemption) for c in trainer.callbacks):
            # added to the built Trainer: a checkpoint callback given to its constructor would take the place
            # of the ModelCheckpoint it adds by default, and be refused with enable_checkpointing false
            trainer.callbacks.append(Preemption())
        return trainer

    def _folder_loggers(self) -> list:
        loggers = self.config.trainer.logger
        return [entry.init_args for entry in loggers if kind(entry) in FOLDER_LOGGERS] \
            if isinstance(loggers, list) else []

    def _run_root(self) -> Path | None:
        """The folder of this config's run folders: the first folder logger's (TensorBoard, CSV) save_dir/name;
        None without one (W&B or MLflow alone then pick their own run ids). A remote root's working copy."""
        folders = self._folder_loggers()
        if not folders:
            return None
        return (Path(folders[0].save_dir) / (folders[0].get("name") or "")).resolve()

    def _remote_roots(self) -> list[tuple]:
        """Run folders on object storage (multimodal.remote): a URL save_dir, or a relative save_dir under a URL
        trainer.default_root_dir, is to be replaced by its local working copy; `self.remote_root` keeps the
        run root's URL (None for a local run), probed for writing before anything is claimed. Returns the
        replacements, (namespace, key, URL setting, working copy), applied by `_to_working_copies` once the
        config has been compared (--resume auto) and undone once the classes are built, so that config.yaml
        keeps the URLs."""
        self.remote_root: str | None = None
        trainer, folders, swaps = self.config.trainer, self._folder_loggers(), []
        base = trainer.get("default_root_dir")
        if is_url(base):
            swaps.append((trainer, "default_root_dir", base, str(remote.staging(base))))
        for args in folders:
            save_dir = str(args.save_dir)
            url = save_dir if is_url(save_dir) else \
                remote.join(base, save_dir) if is_url(base) and not Path(save_dir).is_absolute() else None
            if url is None:
                continue
            if self.remote_root is None and args is folders[0]:
                self.remote_root = remote.join(url, args.get("name") or "") if args.get("name") else url
            swaps.append((args, "save_dir", args.save_dir, str(remote.staging(url))))
        if self.remote_root is not None and _launched_as_rank_zero():
            remote.check_writable(self.remote_root)
        return swaps

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        for namespace, key, setting, _ in getattr(self, "_swaps", []):
            namespace[key] = setting  # config.yaml records the URLs the user gave

    def _resume(self) -> tuple[Path, int] | None:
        """Turn --resume into `ckpt_path`; (logger root, version) when it names a run folder. `auto`: the run
        folder `runs.find_resumable` picks under the run root, or none (a new run)."""
        self.ckpt_path: str | None = None
        if not self.config.get("resume"):
            return None
        if self.config.resume == "auto":
            root = self.remote_root or self._run_root()
            if root is None:
                raise UserError("--resume auto looks for runs in the first logger's folder, and trainer.logger has "
                                "none: add a logger with a save_dir, or pass --resume RUN_DIR.")
            current = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_check=True))
            run = find_resumable(root, current)
            if run is None:
                log.info(f"--resume auto: no run under {root} has a checkpoint yet; starting a new run.")
                return None
            log.info(f"--resume auto: continuing {run} from its checkpoints/last.ckpt.")
            self.config.resume = str(run)
        if is_url(self.config.resume):  # a remote run folder: continued in its working copy
            url = self.config.resume.rstrip("/")
            if self.remote_root is None or not url.startswith(self.remote_root):
                raise UserError(f"--resume {url} names a remote run outside this config's run folders: set "
                                "trainer.default_root_dir (or the logger's save_dir) to the URL it is under.")
            local = remote.staging(url)
            target = remote.resume_from(local, os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
            self.config.resume = str(remote.pull(url, local, target, logs=_launched_as_rank_zero()))
        path = Path(self.config.resume)
        ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
        if not ckpt.is_file():
            raise UserError(f"Nothing to resume at {path}: pass a run folder with checkpoints/last.ckpt, "
                            "or a checkpoint file.")
        read_checkpoint(ckpt)
        self.ckpt_path = str(ckpt)
        run = path if path.is_dir() else ckpt.parent.parent
        match = re.fullmatch(r"version_(\d+)", run.name)
        return (run.parent, int(match.group(1))) if match else None


log = logging.getLogger(__name__)

CLAIMED = "MULTIMODAL_RUN_VERSION"  # "ROOT|N": the version rank 0 claimed, inherited by the ranks it launches


def _launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0 as its launcher started it: torchrun sets RANK, SLURM's srun
    SLURM_PROCID, Lightning's own launcher LOCAL_RANK (and NODE_RANK) in the processes it starts."""
    env = os.environ
    if "RANK" in env:
        return env["RANK"] == "0"
    if env.get("LOCAL_RANK", "0") != "0" or env.get("NODE_RANK", "0") != "0":
        return False
    return env.get("SLURM_PROCID", "0") == "0"


def _taken(root: Path) -> list[int]:
    return [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]


def claim_version(root: Path, start: int = 0) -> int:
    """The next free `root/version_N` (N at least `start`), claimed by creating it: `mkdir` either creates the
    folder or fails because it exists, atomically, so runs started at the same moment get different folders."""
    root.mkdir(parents=True, exist_ok=True)
    version = max(max(_taken(root), default=-1) + 1, start)
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def run_version(root: Path, start: int = 0) -> int:
    """The version folder of a new run: claimed by rank 0; the other ranks of the run take the same one
    (inherited from a rank 0 that launched them, else the latest: Lightning broadcasts rank 0's log
    folder to them wherever it matters, and only rank 0 writes there)."""
    if _launched_as_rank_zero():
        with writing(root):
            version = claim_version(root, start)
        os.environ[CLAIMED] = f"{root}|{version}"
        return version
    claimed_root, _, claimed = os.environ.get(CLAIMED, "").rpartition("|")
    if claimed_root == str(root) and claimed.isdigit():
        return int(claimed)
    return max(_taken(root), default=0)


def _train_cli(argv: list[str]) -> TrainCLI:
    check_arguments(argv)
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    try:
        return TrainCLI(
            build_module, ShardDataModule, run=False, args=argv, seed_everything_default=0,
            save_config_callback=SaveAndLogConfig,
            auto_configure_optimizers=False, save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "multimodal train", "description": "Train a CLIP model on webdataset shards.",
                           "exit_on_error": False},
        )
    except ArgumentError as exc:  # jsonargparse's verdicts on the config: several lines, made one sentence
        raise UserError(_config_error(str(exc))) from None
    except (MisconfigurationException, ValueError) as exc:  # Lightning's verdicts on the trainer section
        raise UserError(f"The trainer settings cannot run on this machine ({exc}): "
                        "check trainer.accelerator, trainer.devices, trainer.precision and trainer.strategy.") from None


def _config_error(message: str) -> str:
    """One sentence from jsonargparse's message: the key, the value given, and where to look."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0]) if lines else None
    if key is None:
        return f"{lines[0] if lines else message}: see `multimodal train --help` for the options."
    given = next((line.split(":", 1)[1].strip() for line in reversed(lines)
                  if line.startswith(("Given value:", "Got value:")) or "Got value:" in line), None)
    detail = key.group(2) or (lines[1] if len(lines) > 1 else "")
    if given is not None:
        return (f"{key.group(1)} cannot be {given!r}: give it a value of the type `multimodal train --help` "
                "lists for it.")
    return f"{key.group(1)}: {detail.rstrip('.')}; see `multimodal train --help`."


def _keep_csv_metrics(trainer) -> None:
    """Lightning's CSV writer deletes a folder's metrics.csv when it starts; a resumed run logging on
    in its own folder keeps the rows written before the interruption, and their columns."""
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger) or trainer.global_rank != 0:
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if path.is_file():
            before = path.read_text()
            writer = logger.experiment  # created now: this deletes the file
            write_text(path, before)
            header = before.splitlines()[0].split(",") if before else []
            writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))


def _atomic_checkpoints(trainer) -> None:
    """Checkpoints written atomically and loaded weights-only (multimodal.checkpoint), unless the
    config chose its own checkpoint IO plugin."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO(setting="--{}")


# What a run writes into its version folder before its first training step: the config, the loggers' first
# files (hyperparameters, TensorBoard's events), the checkpoints folder Lightning makes.
BEFORE_THE_FIRST_STEP = ("config.yaml", "hparams.yaml", "metrics.csv", "events.out.tfevents.*", "checkpoints")


class _Run:
    """A run's trainer, once it has one."""

    trainer: pl.Trainer | None = None


@contextmanager
def _released_on_failure() -> Iterator[_Run]:
    """A run stopped before its first training step (an input found wanting after it claimed its version
    folder: shards of unknown size, too few for the workers) gives the folder back, removed when it holds
    nothing but what a run writes before that step, so that the next run takes its number."""
    before, run = os.environ.get(CLAIMED), _Run()
    try:
        yield run
    except BaseException:
        claimed = os.environ.get(CLAIMED, "")
        if claimed != before and (run.trainer is None or run.trainer.global_step == 0):
            root, _, version = claimed.rpartition("|")
            _remove_unstarted(Path(root) / f"version_{version}")
        raise


def _remove_unstarted(folder: Path) -> None:
    """`folder` removed if it holds only what a run writes before its first step (else left as it is)."""
    entries = list(folder.iterdir()) if folder.is_dir() else []
    if not all(any(e.match(name) for name in BEFORE_THE_FIRST_STEP) for e in entries) or \
            any(e.is_dir() and any(e.iterdir()) for e in entries):
        return
    for entry in entries:
        if entry.is_dir():
            entry.rmdir()
        else:
            entry.unlink()
    if folder.is_dir():
        folder.rmdir()


def train(argv: list[str]) -> int:
    with _released_on_failure() as run:
        return _train(argv, run)


def _train(argv: list[str], run: _Run) -> int:
    cli = _train_cli(argv)
    run.trainer = cli.trainer
    if cli.ckpt_path:
        check_resumable(cli.ckpt_path, cli.model)
    if cli.config.get("resume"):
        _keep_csv_metrics(cli.trainer)
    _atomic_checkpoints(cli.trainer)
    mirror = _mirrored(cli)
    if getattr(cli, "run_folder", None) is not None:
        keep_mlflow_run_ids(cli.trainer, cli.run_folder)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.ckpt_path, weights_only=True)
    except Preempted as stopped:
        return stopped.exit("train", argv)
    finally:
        if mirror is not None and cli.trainer.global_rank == 0 and cli.trainer.global_step > 0:
            mirror.flush()
    return 0


def _mirrored(cli: TrainCLI) -> Mirror | None:
    """A remote run's CheckpointIO mirroring its working copy to its URL (multimodal.remote.Mirror)."""
    if getattr(cli, "remote_root", None) is None or getattr(cli, "run_folder", None) is None:
        return None
    url = remote.join(cli.remote_root, cli.run_folder.name)
    mirror = Mirror(cli.trainer.strategy.checkpoint_io, cli.run_folder, url)
    cli.trainer.strategy.checkpoint_io = mirror
    return mirror


def run_demo(argv: list[str]) -> int:
    with _released_on_failure() as run:
        return _run_demo(argv, run)


def _run_demo(argv: list[str], run: _Run) -> int:
    cli = _train_cli(["--config", str(arch.CONFIG_DIR / "demo.yaml"), *argv])
    run.trainer = cli.trainer
    _atomic_checkpoints(cli.trainer)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.ckpt_path, weights_only=True)
    except Preempted as stopped:
        return stopped.exit("demo", argv)
    if cli.trainer.is_global_zero:
        data = cli.datamodule
        model, run_dir = cli.model.model.cpu(), Path(cli.trainer.log_dir)
        demo.report(model, data.val_shards, run_dir)
        if model.has_caption_decoder:
            demo.caption_report(model, data.val_shards, data.train_shards, run_dir)
    return 0


def parser_help() -> str:
    """What Lightning's parser of `train` prints for --help at the 80 columns of a pipe, trailing spaces
    dropped: the text `multimodal train --help` prints (multimodal/cli/train_help.py) without building it."""
    out, columns = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        with redirect_stdout(out), suppress(SystemExit):
            _train_cli(["--help"])
    finally:
        del os.environ["COLUMNS"]
        if columns is not None:
            os.environ["COLUMNS"] = columns
    return "".join(line.rstrip() + "\n" for line in out.getvalue().splitlines())


def write_help() -> None:
    """multimodal/cli/train_help.py afresh from `parser_help` (after a change to the options or an upgrade
    of Lightning or jsonargparse; tests/test_hostile_training.py says when)."""
    text = parser_help().replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    write_text(Path(__file__).with_name("train_help.py"),
               '"""The help of `multimodal train` and `demo`, as Lightning\'s parser prints it at 80 columns,\n'
               'kept here so that --help answers without importing torch (`multimodal.cli.train.write_help`\n'
               'writes it; tests/test_hostile_training.py checks it against the parser)."""\n\n'
               f'HELP = """\\\n{text}"""\n')
