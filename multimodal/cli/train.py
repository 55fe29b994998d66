"""`multimodal train` and `multimodal demo`: LightningCLI over the module and the DataModule."""

import re
import warnings
from pathlib import Path

import torch
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from multimodal import arch, demo
from multimodal.data.datamodule import ShardDataModule
from multimodal.errors import UserError
from multimodal.module import CLIPModule


class TrainCLI(LightningCLI):
    """LightningCLI over CLIPModule and ShardDataModule, one run directory per run."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name", "data.model_name")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Resume training from this checkpoint (e.g. RUN_DIR/checkpoints/last.ckpt).")

    def before_instantiate_classes(self) -> None:
        trainer = self.config.trainer
        if trainer.precision is None:  # bf16 where a GPU supports it, fp32 elsewhere
            on_gpu = trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
            trainer.precision = "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
        # TensorBoard and CSV loggers each pick "the next free version" on their own and can
        # disagree; give them one version so config, checkpoints and both logs share a folder.
        loggers = self.config.trainer.logger
        if not isinstance(loggers, list) or not loggers:
            return
        first = loggers[0].init_args
        if first.get("version") is None:
            root = Path(first.save_dir) / (first.get("name") or "")
            taken = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
            version = max(taken, default=-1) + 1
            for logger in loggers:
                if logger.init_args.get("version") is None:
                    logger.init_args.version = version


# Lightning's warnings about our deliberate choices: args passed from Python, two loggers sharing
# one folder, __len__ on the IterableDataset (exact per rank by construction), no validation
# shards (an empty val loader), a deprecation inside Lightning itself, and the module (not the
# DataModule) normalising uint8 pixels on the device.
QUIET = (
    ".*args parameter is intended to run from within Python.*",
    ".*Experiment logs directory .* exists and is not empty.*",
    ".*Your `IterableDataset` has `__len__` defined.*",
    ".*Total length of `list` across ranks is zero.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ".*overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`.*",
)


def _train_cli(argv: list[str]) -> TrainCLI:
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    try:
        return TrainCLI(
            CLIPModule, ShardDataModule, run=False, args=argv, seed_everything_default=0,
            auto_configure_optimizers=False, save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "multimodal train", "description": "Train a CLIP model on webdataset shards."},
        )
    except (MisconfigurationException, ValueError) as exc:  # Lightning's verdicts on the trainer section
        raise UserError(f"The trainer settings cannot run on this machine ({exc}): "
                        "check trainer.accelerator, trainer.devices, trainer.precision and trainer.strategy.") from None


def train(argv: list[str]) -> int:
    cli = _train_cli(argv)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    return 0


def run_demo(argv: list[str]) -> int:
    cli = _train_cli(["--config", str(arch.CONFIG_DIR / "demo.yaml"), *argv])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    if cli.trainer.is_global_zero:
        data = cli.datamodule
        demo.report(cli.model.model.cpu(), data.model_name, data.val_shards, Path(cli.trainer.log_dir))
    return 0
