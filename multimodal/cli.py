"""The `multimodal` command: argument wiring, nothing else.

    multimodal train --config configs/debug.yaml [--section.key value ...]
    multimodal shards coco --captions captions_train2017.json --images train2017/ --out DIR
    multimodal shards csv --csv captions.txt --images images/ --out DIR
    multimodal demo [--section.key value ...]

Mistakes in the input end with one sentence on stderr and exit status 2; `--debug` shows the
traceback instead.
"""

import argparse
import re
import sys
import warnings
from pathlib import Path

import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.cli import LightningCLI

from multimodal import demo
from multimodal.data import shards
from multimodal.data.datamodule import ShardDataModule
from multimodal.errors import UserError
from multimodal.module import CLIPModule

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


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
# one folder, and __len__ on the IterableDataset (exact per rank by construction).
QUIET = (
    ".*args parameter is intended to run from within Python.*",
    ".*Experiment logs directory .* exists and is not empty.*",
    ".*Your `IterableDataset` has `__len__` defined.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
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
    except MisconfigurationException as exc:
        raise UserError(f"The trainer settings cannot run on this machine ({exc}): "
                        "check trainer.accelerator, trainer.devices, trainer.precision and trainer.strategy.") from None


def train(argv: list[str]) -> int:
    cli = _train_cli(argv)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    return 0


def run_demo(argv: list[str]) -> int:
    cli = _train_cli(["--config", str(CONFIG_DIR / "demo.yaml"), *argv])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    if cli.trainer.is_global_zero:
        data = cli.datamodule
        demo.retrieval_report(cli.model.model.cpu(), data.model_name, data.val_shards, Path(cli.trainer.log_dir))
    return 0


def _shards_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal shards",
                                     description="Write webdataset shards of image-text pairs.")
    sub = parser.add_subparsers(dest="source", required=True)
    coco = sub.add_parser("coco", help="from an official COCO captions JSON")
    coco.add_argument("--captions", type=Path, required=True, help="e.g. annotations/captions_train2017.json")
    csv = sub.add_parser("csv", help="from an image,caption CSV table (several rows per image allowed)")
    csv.add_argument("--csv", type=Path, required=True, help="CSV with a header holding 'image' and 'caption'")
    for p in (coco, csv):
        p.add_argument("--images", type=Path, required=True, help="folder holding the image files")
        p.add_argument("--out", type=Path, required=True, help="output folder for shard-NNNNNN.tar and sizes.json")
        p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
        p.add_argument("--max-side", type=int, default=None, help="downscale images whose longer side exceeds this")
        p.add_argument("--workers", type=int, default=4, help="threads reading and resizing images (default 4)")
        p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    return parser


def write_shards(argv: list[str]) -> int:
    args = _shards_parser().parse_args(argv)
    common = dict(shard_size=args.shard_size, max_side=args.max_side, workers=args.workers, overwrite=args.overwrite)
    if args.source == "coco":
        report = shards.write_coco(args.captions, args.images, args.out, **common)
    else:
        report = shards.write_csv(args.csv, args.images, args.out, **common)
    for name, reason in report.failures:
        print(f"could not read {name}: {reason}", file=sys.stderr)
    print(f"Wrote {report.num_samples} samples in {len(report.sizes)} shards to {args.out}"
          + (f"; {len(report.failures)} images could not be read (listed above)." if report.failures else "."))
    if report.num_samples == 0:
        raise UserError(f"No image could be read from {args.images}: check --images against the file names.")
    return 0


COMMANDS = {"train": train, "shards": write_shards, "demo": run_demo}
USAGE = """usage: multimodal {train,shards,demo} ... [--debug]

  train    train a CLIP model:  multimodal train --config configs/debug.yaml [--section.key value ...]
  shards   write shards:        multimodal shards {coco,csv} --images DIR --out DIR ...
  demo     synthetic data, training and retrieval report in a few CPU minutes

Add --help after a command for its options; --debug shows tracebacks of input errors."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
